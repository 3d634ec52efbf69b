"""`strategy.compile: true`: regional compilation, one `torch.compile` per transformer
block (as torchtitan does), before the strategy wraps or shards the model.

Why per block and not the whole model: every block has the same code, so dynamo traces
one graph and reuses it for all of them (compile time of one block, not of the model),
and the strategies' own machinery stays outside the graphs - FSDP2's per-block
all-gathers and reduce-scatters run from its module hooks around the compiled forward,
DDP's bucketed all-reduce and DeepSpeed ZeRO's parameter hooks likewise. `Module.compile`
compiles in place: parameter names, state-dict keys (checkpoints), `local_shards()` and
every hook's view of the parameters are those of the eager model.

Left eager (the block runs as written, reported once on rank 0):
- a block holding an MoE layer or a Dice activation: routing and Dice's statistics issue
  collectives and host reads (`.tolist()`, counts that size buffers) inside the forward,
  which would break the graph into many pieces and recompile per token count;
- a block in which a hook has put a forward (pre-)hook on a submodule (`nested_dropout`
  targeting a block module, `dsnot`'s calibration taps): their Python state changes per
  step, which dynamo would guard on and recompile.
Hooks that work on parameters and gradients (`after_backward` / `after_step`: every
penalty, pruning, reweighting on losses) and taps outside the blocks (the heads of
`embedding_*` hooks) are unaffected. Activation checkpointing recomputes the compiled
block. The output head, embedding and final norm stay eager (outside the blocks).
"""
from __future__ import annotations

import torch
from torch import nn

from distreg.models import transformer_blocks


def _eager_reason(block: nn.Module) -> str | None:
    from distreg.models.dice import Dice
    from distreg.models.moe import MoEFeedForward

    for name, mod in block.named_modules():
        if isinstance(mod, MoEFeedForward):
            return f"MoE layer {name}"
        if isinstance(mod, Dice):
            return f"Dice activation {name}"
        if mod._forward_pre_hooks or mod._forward_hooks:
            return f"a forward hook on {name or 'the block'}"
    return None


def compile_blocks(model: nn.Module, backend: str = "inductor", verbose: bool = False) -> tuple[int, list[str]]:
    """Compile each transformer block of `model` in place; returns (blocks compiled,
    reasons of the blocks left eager)."""
    compiled, eager = 0, []
    for i, block in enumerate(transformer_blocks(model)):
        reason = _eager_reason(block)
        if reason is not None:
            eager.append(f"block {i}: {reason}")
            continue
        block.compile(backend=backend)
        compiled += 1
    if verbose and eager:
        print(f"strategy.compile: {len(eager)} block(s) left eager: " + "; ".join(eager))
    return compiled, eager
