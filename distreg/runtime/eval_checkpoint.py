"""Evaluate a saved model on any strategy and world size (`distreg eval`).

The checkpoint is read whole with `runtime.weights` (DCP or DeepSpeed's offline reader,
or a torch.save'd `model.pt` of `distreg prune dsnot` / `adapters merge`), so a
checkpoint written by FSDP2 on 8 ranks evaluates under ZeRO-3 on 3, or in one process.
What a method keeps outside the weights and changes at inference is restored too:

- parameters: every rank writes its own shard (trainable ones through the strategy's
  `local_shards`, frozen ones - SORSA's residuals, `freeze_others` - directly);
- buffers (Dice running statistics): copied where the checkpoint has them;
- sparsity masks: assembled whole from every rank file's mask slices (the hook state
  of the run that saved them, on its world size) and re-applied, so weights that
  drifted from their mask (an edited file, a resumed optimizer) still evaluate masked.
"""
from __future__ import annotations

import posixpath

import fsspec
import torch

from distreg.config import RunConfig
from distreg.runtime.comm import Comm
from distreg.runtime.weights import CheckpointError, read_weights, resolve_checkpoint, write_shards

# Hooks that change the parameter set in prepare_model (the driver's name check needs
# their weights, so it leaves those configs to the workers' load).
_RESHAPING_HOOKS = {"sorsa", "distillation"}


def eval_config(cfg: RunConfig, world_size: int | None) -> RunConfig:
    """`cfg` on `world_size` ranks (the global batch is only rounded to keep the batch
    arithmetic valid: evaluation does not use it)."""
    if not cfg.eval.enabled:
        raise CheckpointError("eval: no held-out data configured (set eval.path, or eval.sources for a mixture)")
    raw = cfg.model_dump(mode="json")
    if world_size:
        per = world_size * cfg.train.grad_accum_steps
        raw["scaling"]["num_workers"] = world_size
        raw["train"]["global_batch_size"] = per * max(1, -(-cfg.train.global_batch_size // per))
    raw["model"]["init_from"] = None if not _keeps_init_from(cfg) else raw["model"]["init_from"]
    return RunConfig.model_validate(raw)


def _keeps_init_from(cfg: RunConfig) -> bool:
    # SORSA builds its adapters from model.init_from in prepare_model; everything else
    # comes from the checkpoint.
    return any(h.name == "sorsa" for h in cfg.hooks)


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of a checkpoint, from its metadata only (DCP
    `.metadata`, DeepSpeed `param_shapes`) or a state-dict file (memory-mapped)."""
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local):
        raise CheckpointError(f"--checkpoint {path}: no such file or directory")
    if fs.isfile(local):
        try:
            return {k: tuple(v.shape) for k, v in read_weights(path).items() if isinstance(v, torch.Tensor)}
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise CheckpointError(f"--checkpoint {path}: not a torch state-dict file ({type(e).__name__})") from None
    model_dir = posixpath.join(resolve_checkpoint(path), "model")
    fs, local = fsspec.core.url_to_fs(model_dir)
    if fs.exists(posixpath.join(local, ".metadata")):
        from distreg.runtime.strategies.torch_native import _storage

        meta = _storage(model_dir, False).read_metadata().state_dict_metadata
        return {k[len("model."):]: tuple(v.size) for k, v in meta.items()
                if k.startswith("model.") and hasattr(v, "size")}
    states = fs.glob(posixpath.join(local, "engine", "*model_states.pt"))
    if states:
        with fs.open(states[0], "rb") as f:
            sd = torch.load(f, map_location="cpu", weights_only=False)
        shapes = {}
        for group in sd.get("param_shapes") or []:
            shapes.update({k: tuple(v) for k, v in group.items()})
        return shapes
    raise CheckpointError(f"{model_dir}: neither a DCP checkpoint (.metadata) nor a DeepSpeed one (engine/)")


def check_checkpoint(cfg: RunConfig, path: str) -> None:
    """In the driver, before any worker starts: the checkpoint exists, is complete and
    holds every parameter of the configured model with its shape (one-line errors)."""
    shapes = checkpoint_shapes(path)
    if any(h.name in _RESHAPING_HOOKS for h in cfg.hooks):
        return
    from distreg.models import build_model

    model = build_model(cfg.model, cfg.train.seed, device="meta")
    own = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing = sorted(set(own) - set(shapes))
    if missing:
        raise CheckpointError(f"--checkpoint {path} does not match the model: no {missing[0]}"
                              + (f" (and {len(missing) - 1} more parameters)" if len(missing) > 1 else ""))
    for name, shape in own.items():
        if shapes[name] != shape:
            raise CheckpointError(f"--checkpoint {path} does not match the model: {name} is {shapes[name]} in the "
                                  f"checkpoint, {shape} in the model (check model.preset / model.* overrides)")


# -- on every rank --------------------------------------------------------------------------
def _write_frozen(p: torch.nn.Parameter, full: torch.Tensor, rank: int) -> None:
    """Write a frozen parameter (not in `local_shards`) from its full value."""
    with torch.no_grad():
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
            part = p.ds_tensor.numel()
            piece = full.reshape(-1)[rank * part:(rank + 1) * part]
            p.ds_tensor.data.view(-1)[:piece.numel()].copy_(piece.to(p.ds_tensor.dtype))
        elif hasattr(p, "to_local"):  # FSDP2 DTensor rows
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local = p.to_local()
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local.copy_(full.view(p.shape)[offset[0]:offset[0] + shape[0]].to(local.dtype))
        else:
            p.data.copy_(full.view(p.shape).to(p.dtype))


def load_weights(strategy, path: str, rank: int) -> dict[str, torch.Tensor]:
    """Parameters (this rank's shards) and buffers of `path` into the set-up strategy.
    Returns the weights read (callers may inspect them)."""
    weights = read_weights(path)
    write_shards(strategy.local_shards(), weights, f"--checkpoint {path}")
    for name, p in strategy.module.named_parameters():
        if not p.requires_grad and name in weights:
            _write_frozen(p, weights[name], rank)
    for name, b in strategy.module.named_buffers():
        if name in weights and weights[name].shape == b.shape:
            b.copy_(weights[name].to(b.dtype))
    return weights


def checkpoint_masks(path: str) -> dict[str, torch.Tensor]:
    """Whole keep-masks (flat bool per parameter) of every sparsity hook in the
    checkpoint at `path`, assembled from all its rank files' mask slices. Empty for a
    state-dict file or a run without masks."""
    fs, local = fsspec.core.url_to_fs(path)
    if fs.isfile(local):
        return {}
    step_dir = resolve_checkpoint(path)
    fs, local = fsspec.core.url_to_fs(step_dir)
    masks: dict[str, list] = {}
    from distreg.runtime.checkpoint import load_torch

    for rank_file in sorted(fs.glob(posixpath.join(local, "rank_*.pt"))):
        state = load_torch(posixpath.join(step_dir, posixpath.basename(rank_file)))
        for h, hook_state in enumerate(state.get("hooks") or []):
            if not isinstance(hook_state, dict) or hook_state.get("masks") is None:
                continue
            for name, piece in hook_state["masks"].items():
                start, n = hook_state["slices"][name]
                masks.setdefault(name, []).append((h, start, piece.reshape(-1)[:n]))
    full: dict[str, torch.Tensor] = {}
    for name, pieces in masks.items():
        numel = max(start + piece.numel() for _, start, piece in pieces)
        keep = torch.ones(numel, dtype=torch.bool)
        for _, start, piece in pieces:
            keep[start:start + piece.numel()] &= piece.bool()  # several hooks: a weight kept by all
        full[name] = keep
    return full


def apply_masks(strategy, masks: dict[str, torch.Tensor]) -> int:
    """w <- w * m on this rank's shards (every rank writes the same parameters, as
    ZeRO-3 requires). Returns the number of masked parameters."""
    for shard in strategy.local_shards():
        keep = masks.get(shard.name)
        if keep is None:
            continue
        if keep.numel() > shard.full_shape.numel():
            raise CheckpointError(f"checkpoint mask of {shard.name} has {keep.numel()} entries, "
                                  f"the parameter {shard.full_shape.numel()}")
        mine = torch.ones(shard.numel, dtype=torch.bool)
        n = max(0, min(shard.numel, keep.numel() - shard.flat_start))
        mine[:n] = keep[shard.flat_start:shard.flat_start + n]
        w = shard.data()
        shard.write(torch.where(mine.to(w.device), w, torch.zeros((), dtype=w.dtype, device=w.device)))
    return len(masks)


def checkpoint_step(path: str) -> int | None:
    fs, local = fsspec.core.url_to_fs(path)
    if fs.isfile(local):
        return None
    from distreg.runtime.checkpoint import load_torch

    return int(load_torch(posixpath.join(resolve_checkpoint(path), "trainer.pt"))["step"])


def evaluate_checkpoint(cfg: RunConfig, path: str, comm: Comm | None = None,
                        device: torch.device | None = None) -> dict:
    """On every rank (process group initialised): build the configured model under the
    configured strategy, load `path` into it, evaluate the `eval:` held-out set.
    Returns {"metrics", "step", "checkpoint", "world_size", "strategy", "masked_params"}."""
    from distreg.hooks.base import HookContext
    from distreg.hooks.registry import build_hooks
    from distreg.models import build_model, materialize
    from distreg.models.moe import check_moe_setup
    from distreg.runtime.evaluate import Evaluator
    from distreg.runtime.strategies import build_strategy

    comm = comm or Comm()
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    check_moe_setup(cfg, comm.world_size)
    hooks = build_hooks(cfg.hooks)
    strategy = build_strategy(cfg, comm, device)
    lazy = cfg.model.init_device == "meta"
    model = strategy.create_model(lambda dev, init: build_model(cfg.model, cfg.train.seed, dev, init), lazy)
    ctx = HookContext(comm=comm, strategy=cfg.strategy.name, model=model, run_dir=cfg.run_dir,
                      model_config=cfg.model)
    for hook in hooks:
        hook.prepare_model(model, ctx)  # SORSA adapters, nested dropout's eval_keep, ...
    strategy.setup(model)
    if lazy:
        materialize(strategy.local_shards(), cfg.train.seed, cfg.model.init_std)
    load_weights(strategy, path, comm.rank)
    masked = apply_masks(strategy, checkpoint_masks(path))
    step = checkpoint_step(path)
    metrics = Evaluator(cfg, comm, device).run(strategy.model, strategy.module, step)
    strategy_name = cfg.strategy.name if cfg.strategy.name != "deepspeed" else f"deepspeed-zero{cfg.strategy.zero_stage}"
    return {"metrics": metrics, "step": step, "checkpoint": path, "world_size": comm.world_size,
            "strategy": strategy_name, "masked_params": masked}
