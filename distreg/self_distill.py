"""`distreg self-distill CONFIG --rounds N --alpha A`: iterative self-distillation with
ground-truth weighting (the `self_distill_gt` hook), one run per round.

Round 0 trains CONFIG as is (labels only) into `<run_dir>/round_0`; round k >= 1 trains a
fresh model of the same architecture into `<run_dir>/round_k` with the `self_distill_gt`
hook whose teacher is round k-1's final checkpoint and whose weight is the round's α
(`--alpha 0.6` for every round, or one value per round: `--alpha 0.6,0.6,0.5`). Each round
is a complete run with its own MLflow run (named `<run_name or config>-round<k>`, the hook's
α among its params); a round starts only after the previous one finished and reported its
checkpoint. Other hooks of CONFIG stay in every round.
"""
from __future__ import annotations

import json
import posixpath
from typing import Callable

from distreg.config import ConfigError, RunConfig

TrainFn = Callable[[RunConfig], dict]


def round_config(cfg: RunConfig, k: int, alpha: float | None = None, teacher: str | None = None,
                 loss: str = "soft_ce") -> RunConfig:
    """Round k's config: its own run_dir and MLflow run name; from round 1 on, the
    `self_distill_gt` hook with the previous round's checkpoint as teacher."""
    from distreg.config import HookSpec

    out = cfg.model_copy(deep=True)
    out.run_dir = posixpath.join(cfg.run_dir, f"round_{k}")
    out.checkpoint.dir = None  # under the round's run_dir
    out.tracking.run_name = f"{cfg.tracking.run_name or 'self-distill'}-round{k}"
    if k:
        spec = {"name": "self_distill_gt", "alpha": alpha, "loss": loss, "teacher": {"checkpoint": teacher}}
        out.hooks = [*cfg.hooks, HookSpec.model_validate(spec)]
    return out


def run_rounds(cfg: RunConfig, rounds: int, alphas: list[float], train: TrainFn, loss: str = "soft_ce") -> list[dict]:
    """Train round 0 and `rounds` distillation rounds; returns each round's summary (with
    `alpha` and `run_dir`)."""
    if any(h.name == "self_distill_gt" for h in cfg.hooks):
        raise ConfigError("self-distill: the config already lists a self_distill_gt hook; the rounds add it")
    if len(alphas) == 1:
        alphas = alphas * rounds
    if len(alphas) != rounds:
        raise ConfigError(f"self-distill: --alpha gives {len(alphas)} values for {rounds} rounds")
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ConfigError(f"self-distill: --alpha values must be in [0, 1], got {alphas}")
    out: list[dict] = []
    for k, alpha in enumerate([None, *alphas]):
        teacher = out[-1].get("checkpoint") if out else None
        if k and not teacher:
            raise RuntimeError(f"self-distill: round {k - 1} reported no checkpoint to distil from")
        current = round_config(cfg, k, alpha, teacher, loss)
        out.append({**train(current), "alpha": alpha, "run_dir": current.run_dir})
    return out


def add_command(sub) -> None:
    p = sub.add_parser("self-distill", help="rounds of self-distillation with ground-truth weighting")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, required=True, help="distillation rounds after round 0")
    p.add_argument("--alpha", required=True, help="ground-truth weight: one value or one per round (comma-separated)")
    p.add_argument("--loss", choices=["soft_ce", "mse_softmax"], default="soft_ce")
    p.set_defaults(fn=_run)


def _run(args) -> int:
    from distreg.config import load_config
    from distreg.launch import launch

    cfg = load_config(args.config, args.overrides)
    alphas = [float(a) for a in str(args.alpha).split(",")]
    results = run_rounds(cfg, args.rounds, alphas, launch, args.loss)
    print(json.dumps([{k: r.get(k) for k in ("run_dir", "alpha", "mlflow_run_id", "checkpoint")} for r in results],
                     indent=1))
    return 0
