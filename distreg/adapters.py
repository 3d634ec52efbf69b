"""`distreg adapters merge CONFIG --checkpoint PATH --out FILE`: fold trained SORSA adapters
back into plain weights.

The checkpoint (any strategy, read whole in one process by `runtime.weights`) holds, for
every adapted layer `<layer>`, the frozen residual `<layer>.weight` and the trained
`<layer>.sorsa_A` [r, in], `.sorsa_S` [r], `.sorsa_B` [out, r]. The output is the model's
plain state dict: `<layer>.weight` = W_res + s B diag(S) A (float64 sum, stored in the
residual's dtype), no adapter entries, so `build_model(cfg.model)` loads it strictly and
gives the trained network's outputs (up to float32 round-off of the fold). The scale s =
alpha / r comes from the config's `sorsa` hook. The file is written atomically (a
temporary file renamed into place) with `torch.save`; it can serve as `sorsa.init_from`.
"""
from __future__ import annotations

import os
import sys

import torch

from distreg.regularizers.sorsa import merge


def merge_adapters(weights: dict[str, torch.Tensor], scale: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(plain state dict, names of the merged layers). Raises ValueError naming an
    incomplete adapter."""
    layers = sorted({k[: -len(".sorsa_A")] for k in weights if k.endswith(".sorsa_A")})
    if not layers:
        raise ValueError("no SORSA adapters (*.sorsa_A) in the checkpoint")
    out = {k: v for k, v in weights.items() if not k.rsplit(".", 1)[-1].startswith("sorsa_")}
    for layer in layers:
        keys = [f"{layer}.{n}" for n in ("weight", "sorsa_A", "sorsa_S", "sorsa_B")]
        missing = [k for k in keys if k not in weights]
        if missing:
            raise ValueError(f"incomplete adapter {layer}: missing {missing}")
        res, a, s, b = (weights[k] for k in keys)
        if a.shape != (s.numel(), res.shape[1]) or b.shape != (res.shape[0], s.numel()):
            raise ValueError(f"{layer}: adapter shapes A {tuple(a.shape)}, S {tuple(s.shape)}, B {tuple(b.shape)} "
                             f"do not fit the residual {tuple(res.shape)}")
        out[f"{layer}.weight"] = merge(res, a, s, b, scale)
    return out, layers


def _sorsa_params(cfg):
    from distreg.config import ConfigError
    from distreg.hooks.registry import build_hooks

    hooks = [h for h in build_hooks(cfg.hooks) if h.name == "sorsa"]
    if len(hooks) != 1:
        raise ConfigError(f"hooks: the config needs exactly one 'sorsa' hook for the adapter scale, found {len(hooks)}")
    return hooks[0]


def check_against_model(state: dict[str, torch.Tensor], model_cfg) -> None:
    """Names and shapes equal the plain model's (built on the meta device: no memory)."""
    from distreg.models import build_model

    own = build_model(model_cfg, 0, "meta", init=False).state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or bad:
        raise ValueError(f"merged weights do not match model config: missing {missing[:5]}, unexpected {extra[:5]}, "
                         f"wrong shape {sorted(bad)[:5]}")


def save_atomic(state: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _merge(args) -> int:
    from distreg.config import load_config
    from distreg.runtime.weights import load_model_weights

    cfg = load_config(args.config, args.overrides)
    hook = _sorsa_params(cfg)
    try:
        weights = load_model_weights(args.checkpoint)
        state, layers = merge_adapters(weights, hook.scale)
        check_against_model(state, cfg.model)
    except ValueError as e:
        print(f"distreg adapters merge: {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    save_atomic(state, args.out)
    print(f"merged {len(layers)} SORSA layers (rank {hook.params.rank}, scale {hook.scale:g}) into {args.out}")
    return 0


def add_commands(sub) -> None:
    """Add this module's subcommands to `sub` (an argparse subparsers object)."""
    p = sub.add_parser("merge", help="fold SORSA adapters of a checkpoint into plain weights (a torch.save'd state dict)")
    p.add_argument("config", help="the training YAML config (model and the sorsa hook's rank / alpha)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--checkpoint", required=True, help="a step_N directory or a checkpoint root (latest step)")
    p.add_argument("--out", required=True, help="output file (torch.save of the plain state dict)")
    p.set_defaults(fn=_merge)
