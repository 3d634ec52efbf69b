"""`distreg prune dsnot`: training-free Wanda + DSnoT pruning of a trained checkpoint.

    distreg prune dsnot CONFIG --checkpoint PATH --sparsity 0.5 --out DIR
        [--calib-batches N] [--max-cycles 50] [--threshold 0.1] [--skip-layer mlp|self_attn|no_skip]
        [--nm N:M] [--initial wanda|magnitude] [--world-size W] [--set key=value ...]

What it does (spec section 5; reference zyxxmu/DSnoT `prune_DSnoT`):
the model of CONFIG (dense Llama) is built and the checkpoint's weights loaded (any
strategy's checkpoint: `distreg.runtime.weights`; a `torch.save`d state_dict file works
too). Calibration sequences are the first `--calib-batches` global batches of CONFIG's data
(`train.global_batch_size` sequences each, in the training order; default: enough batches
for 128 sequences, the reference's count). Then block by block, as the reference does:
the block's nn.Linear inputs are accumulated (`CalibrationStats`, fp64 sums) while the
block runs on the calibration sequences it receives from the *already pruned* blocks
before it, the sums are all-reduced, every linear of the block gets its Wanda (or
magnitude) mask and DSnoT refinement, and the pruned block's outputs feed the next block.
The token embeddings, norms and the output head are not pruned (the reference prunes the
decoder layers only). With the reference's default `--skip-layer mlp`, DSnoT refines the
attention projections only; the feed-forward projections keep their plain Wanda masks.

`--world-size W` runs W local gloo processes: each takes its own share of the
calibration sequences (the data source's rank slices), the statistics are all-reduced
(fp64), each rank computes the masks of its block of rows of every weight (rows are
independent; the FSDP2 `Shard(0)` split) and the row blocks are all-gathered. The result
equals the single-process one up to fp64 summation order. Sequences run through a block
one at a time, as in the reference, so their outputs do not depend on W.

Output in `--out` (written by rank 0, each file atomically, `report.json` last):
  model.pt     the pruned model's whole state_dict (`model.load_state_dict(torch.load(...))`)
  masks.pt     {parameter name: bool keep-mask (True = kept)} of every pruned weight
  report.json  per-layer realised sparsity, the reconstruction-error proxy mean|e| over rows
               (e = expected dense-minus-sparse output of a row, sum over pruned j of
               W_ij mu_j) for the initial mask and after DSnoT, cycles and swaps.

Continuing training from the pruned weights: `model.init_from: DIR/model.pt` loads them
(into every rank's shards, any strategy), and the `dsnot` hook in mask-file mode holds the
masks fixed during training:

    model: {init_from: out/model.pt}
    hooks: [{name: dsnot, mask_file: out/masks.pt}]

The hook then re-applies the saved masks after every optimizer step (masked weights stay
exactly zero, whatever the strategy).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from distreg.config import ConfigError, RunConfig, load_config
from distreg.sparsity.dsnot import (
    INITIAL_METHODS,
    SKIP_LAYERS,
    CalibrationStats,
    all_reduce_stats,
    parse_nm,
    prune_rows,
    skipped,
)

REFERENCE_SEQUENCES = 128


@dataclass(frozen=True)
class DSnoTOptions:
    sparsity: float
    calib_batches: int
    max_cycles: int = 50
    threshold: float = 0.1
    skip_layer: str = "mlp"
    nm: str | None = None
    initial: str = "wanda"
    pow_of_var: float = 1.0
    same_sign: bool = False
    fidelity_cursor_quirk: bool = False


# --------------------------------------------------------------------------- argument checks


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0.0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _nm(text: str) -> str:
    try:
        n, m = parse_nm(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return f"{n}:{m}"


def add_commands(sub) -> None:
    """Add this module's subcommands to `sub` (an argparse subparsers object)."""
    p = sub.add_parser("dsnot", help="Wanda + DSnoT pruning of a checkpoint from calibration batches (no training)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config of the model and its data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--checkpoint", required=True,
                   help="a step_N checkpoint, a checkpoint root (latest step), or a torch.save'd state_dict")
    p.add_argument("--sparsity", required=True, type=_fraction, help="fraction pruned per row, e.g. 0.5")
    p.add_argument("--out", required=True, help="output directory (model.pt, masks.pt, report.json)")
    p.add_argument("--calib-batches", type=_int_at_least(1), default=None,
                   help=f"global batches of calibration data (default: enough for {REFERENCE_SEQUENCES} sequences)")
    p.add_argument("--max-cycles", type=_int_at_least(0), default=50, help="DSnoT cycles per layer (default 50)")
    p.add_argument("--threshold", type=_non_negative, default=0.1, help="update threshold tau on |e| (default 0.1)")
    p.add_argument("--skip-layer", choices=SKIP_LAYERS, default="mlp",
                   help="sub-layers left at their initial mask: mlp = feed_forward (the reference default), "
                        "self_attn = attention, no_skip")
    p.add_argument("--nm", type=_nm, default=None, help="N:M semi-structured sparsity (needs --sparsity N/M)")
    p.add_argument("--initial", choices=INITIAL_METHODS, default="wanda", help="initial mask (default wanda)")
    p.add_argument("--pow-of-var", type=_non_negative, default=1.0,
                   help="gamma in the growth key c/v^gamma (default 1)")
    p.add_argument("--same-sign", action="store_true",
                   help="also require sign(e after) == sign(e initial) (unstructured; the reference cannot enable it)")
    p.add_argument("--fidelity-cursor-quirk", action="store_true",
                   help="reproduce the reference's unrestricted candidate lists and cursor writes")
    p.add_argument("--world-size", type=_int_at_least(1), default=1, help="local gloo processes (default 1)")
    p.set_defaults(fn=_dsnot_command)


def options_from_args(args, cfg: RunConfig) -> DSnoTOptions:
    """Cross-flag and flag-vs-config checks; ConfigError names the flag."""
    if args.nm is not None:
        n, m = parse_nm(args.nm)
        if abs(args.sparsity - n / m) > 1e-12:
            raise ConfigError(f"--nm {args.nm} prunes {n}/{m} of every row; --sparsity must be {n / m:g}, "
                              f"got {args.sparsity:g}")
    g, accum = cfg.train.global_batch_size, cfg.train.grad_accum_steps
    if g % (accum * args.world_size):
        raise ConfigError(f"--world-size {args.world_size}: train.global_batch_size={g} is not divisible by "
                          f"--world-size * train.grad_accum_steps = {args.world_size * accum}")
    batches = args.calib_batches or max(1, math.ceil(REFERENCE_SEQUENCES / g))
    return DSnoTOptions(sparsity=args.sparsity, calib_batches=batches, max_cycles=args.max_cycles,
                        threshold=args.threshold, skip_layer=args.skip_layer, nm=args.nm, initial=args.initial,
                        pow_of_var=args.pow_of_var, same_sign=args.same_sign,
                        fidelity_cursor_quirk=args.fidelity_cursor_quirk)


def check_model(cfg: RunConfig, source: str) -> None:
    m = cfg.model
    if m.kind != "llama":
        raise ConfigError(f"{source}: model.kind={m.kind!r}: `prune dsnot` prunes Llama decoders only")
    if m.moe_num_experts:
        raise ConfigError(f"{source}: model.moe_num_experts={m.moe_num_experts}: MoE models are not supported "
                          "(their experts are not nn.Linear layers)")
    if getattr(m, "ffn_activation", "swiglu") != "swiglu":
        raise ConfigError(f"{source}: model.ffn_activation={m.ffn_activation!r}: only swiglu blocks are supported "
                          "(a batch-statistics activation would couple the calibration sequences)")


def _dsnot_command(args) -> int:
    from distreg.data import check_data
    from distreg.data.errors import DataError
    from distreg.runtime.weights import CheckpointError, resolve_checkpoint

    cfg = load_config(args.config, args.overrides)
    check_model(cfg, args.config)
    opts = options_from_args(args, cfg)
    if not os.path.isfile(args.checkpoint):
        try:
            resolve_checkpoint(args.checkpoint)
        except CheckpointError as e:
            raise ConfigError(f"--checkpoint: {e}") from None
    try:
        check_data(cfg)
    except DataError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out}: exists and is not a directory")
    report = prune_checkpoint(cfg, args.checkpoint, opts, str(out), args.world_size)
    print(format_summary(report, str(out)))
    return 0


# --------------------------------------------------------------------------- the pruning run


def prune_checkpoint(cfg: RunConfig, checkpoint: str, opts: DSnoTOptions, out: str, world_size: int = 1) -> dict:
    """Prune `checkpoint` with `world_size` local processes; returns the report (also in
    `out/report.json`)."""
    if world_size == 1:
        return _rank_main(cfg, checkpoint, opts, out, 1)
    import torch.multiprocessing as mp

    from distreg.testing import run_distributed

    try:
        return run_distributed(_rank_main, world_size, cfg, checkpoint, opts, out, world_size)[0]
    except mp.ProcessRaisedException as e:
        # A flag error found inside a rank (a checkpoint that does not fit the model) is
        # reported like the single-process one, not as a worker traceback.
        marker = "ConfigError: "
        lines = [ln for ln in str(e).splitlines() if marker in ln]
        if lines:
            raise ConfigError(lines[-1].split(marker, 1)[1]) from None
        raise


def load_weights(model: nn.Module, checkpoint: str) -> None:
    from distreg.runtime.weights import CheckpointError, load_into

    try:
        if os.path.isfile(checkpoint):
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            missing, extra = model.load_state_dict(state, strict=False)
            if missing or extra:
                raise CheckpointError(f"{checkpoint}: state_dict does not match the model: missing {missing[:5]}, "
                                      f"unexpected {extra[:5]}")
        else:
            load_into(model, checkpoint)
    except CheckpointError as e:
        raise ConfigError(f"--checkpoint: {e}") from None


def calibration_sequences(cfg: RunConfig, batches: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's calibration sequences: its slices of the first `batches` global batches
    of the config's data (the union over ranks does not depend on the world size)."""
    from distreg.data import build_data

    data = build_data(cfg, rank, world)
    seqs: list[torch.Tensor] = []
    for _ in range(batches):
        for micro in data.next_step():
            seqs.extend(micro["input"])
    return seqs


def row_block(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's rows [a, b) under FSDP2's Shard(0) split (ceil(rows / world) per rank)."""
    per = -(-rows // world)
    a = min(rank * per, rows)
    return a, min(a + per, rows)


@torch.no_grad()
def prune_linear(name: str, layer: nn.Linear, stats: CalibrationStats, opts: DSnoTOptions, comm) -> dict:
    """Masks for this rank's rows, all-gathered; applies the whole mask to `layer`.
    Collective. Returns the layer's report entry and the keep-mask."""
    n_rows, d_in = layer.weight.shape
    a, b = row_block(n_rows, comm.rank, comm.world_size)
    dsnot = not skipped(name, opts.skip_layer)
    res = prune_rows(layer.weight[a:b], stats, opts.sparsity, nm=opts.nm, initial=opts.initial, dsnot=dsnot,
                     max_cycles=opts.max_cycles, threshold=opts.threshold, pow_of_var=opts.pow_of_var,
                     same_sign=opts.same_sign, fidelity_cursor_quirk=opts.fidelity_cursor_quirk)
    keep = torch.cat(comm.all_gather_uneven(res.keep.to(torch.uint8))).bool()
    rows = torch.stack([res.error_before, res.error_after, res.swaps.to(torch.float64)], 1)
    rows = torch.cat(comm.all_gather_uneven(rows))
    cycles = int(comm.all_reduce(torch.tensor([res.cycles], dtype=torch.int64), op="max"))
    layer.weight.mul_(keep.to(layer.weight.dtype))
    entry = {
        "method": "dsnot" if dsnot else opts.initial,
        "shape": [n_rows, d_in],
        "sparsity": float((~keep).sum()) / keep.numel(),
        "error_before": float(rows[:, 0].abs().mean()),
        "error_after": float(rows[:, 1].abs().mean()),
        "cycles": cycles,
        "swaps": int(rows[:, 2].sum()),
    }
    return {"entry": entry, "keep": keep}


def _rank_main(cfg: RunConfig, checkpoint: str, opts: DSnoTOptions, out: str, world_size: int) -> dict:
    from distreg.models import build_model
    from distreg.runtime.comm import Comm

    comm = Comm()
    if comm.world_size != world_size:
        raise RuntimeError(f"prune dsnot: expected {world_size} ranks, the process group has {comm.world_size}")
    model = build_model(cfg.model, cfg.train.seed, "cpu", init=False)
    load_weights(model, checkpoint)
    model.eval()
    seqs = calibration_sequences(cfg, opts.calib_batches, comm.rank, comm.world_size)
    layers: dict[str, dict] = {}
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        t = seqs[0].shape[0]
        cos, sin = model.rope_cos[:t], model.rope_sin[:t]
        hidden = [model.tok_embeddings(s.unsqueeze(0)) for s in seqs]
        for i, block in enumerate(model.layers):
            linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            stats = {n: CalibrationStats(m.in_features) for n, m in linears}
            handles = [m.register_forward_pre_hook(lambda _mod, args, st=stats[n]: st.add(args[0])) for n, m in linears]
            try:
                for h in hidden:  # one sequence at a time, as the reference
                    block(h, cos, sin)
            finally:
                for handle in handles:
                    handle.remove()
            all_reduce_stats(list(stats.values()), comm)
            for n, m in linears:
                full = f"layers.{i}.{n}.weight"
                got = prune_linear(n, m, stats[n], opts, comm)
                layers[full], masks[full] = got["entry"], got["keep"]
            hidden = [block(h, cos, sin) for h in hidden]
    pruned = sum(int((~k).sum()) for k in masks.values())
    in_layers = sum(k.numel() for k in masks.values())
    params = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    report = {
        "checkpoint": checkpoint, "options": asdict(opts), "world_size": comm.world_size,
        "calibration": {"sequences": len(seqs) * comm.world_size, "seq_len": t,
                        "batches": opts.calib_batches},
        "sparsity_pruned_layers": pruned / in_layers, "zero_fraction_all_params": zeros / params,
        "layers": layers,
    }
    if comm.rank == 0:
        write_outputs(out, model.state_dict(), masks, report)
    comm.barrier()
    return report


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_outputs(out: str, state: dict, masks: dict, report: dict) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    _atomic(d / "model.pt", lambda p: torch.save(state, p))
    _atomic(d / "masks.pt", lambda p: torch.save(masks, p))
    _atomic(d / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))


def format_summary(report: dict, out: str) -> str:
    o = report["options"]
    head = (f"dsnot: sparsity {o['sparsity']:g}{' (' + o['nm'] + ')' if o['nm'] else ''}, initial {o['initial']}, "
            f"skip_layer {o['skip_layer']}, {report['calibration']['sequences']} calibration sequences of "
            f"{report['calibration']['seq_len']} tokens, world size {report['world_size']}")
    width = max(len(k) for k in report["layers"])
    lines = [head, f"{'layer':<{width}}  {'method':<9} {'sparsity':>8}  {'mean|e| before':>14}  "
                   f"{'after':>10}  {'cycles':>6}  {'swaps':>6}"]
    for name, e in report["layers"].items():
        lines.append(f"{name:<{width}}  {e['method']:<9} {e['sparsity']:>8.4f}  {e['error_before']:>14.6g}  "
                     f"{e['error_after']:>10.6g}  {e['cycles']:>6}  {e['swaps']:>6}")
    lines.append(f"pruned layers: {report['sparsity_pruned_layers']:.4f} sparse; all parameters: "
                 f"{report['zero_fraction_all_params']:.4f} zeros")
    lines.append(f"wrote {out}/model.pt, {out}/masks.pt, {out}/report.json")
    return "\n".join(lines)
