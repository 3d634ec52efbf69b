"""Held-out evaluation: exact, rank-invariant metrics of the model as it is served.

Every rank runs the same number of forwards over its block of the held-out set
(`distreg.data.heldout`: sequential, no drop-last, padding rows with ignored targets)
and accumulates per source, in float64 on its device, five sums:

  loss     cross-entropy summed over valid targets (tokens; images)
  valid    valid targets (tokens; images)
  correct  targets equal to the argmax (next-token accuracy; top-1)
  top5     targets among the 5 largest logits (vision)
  samples  real (non-padding) samples

One all-reduce of that [sources, 5] table at the end; the metrics are ratios of global
sums, so they do not depend on the world size or the strategy beyond float round-off.

Eval mode is what every method changes at inference: `model.eval()` switches Dice to
its running statistics, nested dropout off (or to its `eval_keep`), MoE routing to
its eval path (whose dropped-token statistics are collected here: `eval/moe/*`); masks
of pruning hooks are already in the weights (re-applied after every step in training,
and on load by `distreg eval`); SORSA adapters are parameters of the model.

Metrics (`eval/` prefix): loss (per valid token / image), ppl = exp(loss), accuracy
(next-token accuracy or top-1), top1/top5 (vision), samples, tokens; per source
`eval/<source>/loss|ppl|accuracy|samples` when the held-out set has several.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distreg.config import RunConfig
from distreg.data.device_input import model_input
from distreg.data.heldout import build_heldout
from distreg.runtime.comm import Comm
from distreg.runtime.loss import IGNORE_INDEX

_LOSS, _VALID, _CORRECT, _TOP5, _SAMPLES = range(5)


@torch.no_grad()
def batch_sums(logits: torch.Tensor, target: torch.Tensor, source: torch.Tensor, num_sources: int) -> torch.Tensor:
    """[num_sources, 5] float64 sums of one batch (padding rows: source -1, all
    targets ignored, contribute nothing)."""
    logits = logits.float()
    valid = target != IGNORE_INDEX
    safe = target.clamp(min=0)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
                         ignore_index=IGNORE_INDEX).view(target.shape)
    correct = (logits.argmax(-1) == target) & valid
    k = min(5, logits.shape[-1])
    top5 = (logits.topk(k, dim=-1).indices == safe.unsqueeze(-1)).any(-1) & valid
    if target.ndim > 1:  # sequences: per-row sums over tokens
        ce, valid, correct, top5 = ce.double().sum(1), valid.sum(1), correct.sum(1), top5.sum(1)
    rows = torch.stack([ce.double(), valid.double(), correct.double(), top5.double(), (source >= 0).double()], 1)
    out = torch.zeros(num_sources, 5, dtype=torch.float64, device=logits.device)
    real = source >= 0
    out.index_add_(0, source[real], rows[real])
    return out


def metrics_from_sums(sums: torch.Tensor, names: list[str], unit: str) -> dict[str, float]:
    """The eval/ metrics of a global [sources, 5] table."""
    def block(row: torch.Tensor, prefix: str) -> dict[str, float]:
        valid = float(row[_VALID])
        loss = float(row[_LOSS]) / valid if valid else float("nan")
        m = {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(loss) if loss < 700 else float("inf"),
             f"{prefix}accuracy": float(row[_CORRECT]) / valid if valid else float("nan"),
             f"{prefix}samples": float(row[_SAMPLES])}
        if unit == "img":
            m[f"{prefix}top1"] = m[f"{prefix}accuracy"]
            m[f"{prefix}top5"] = float(row[_TOP5]) / valid if valid else float("nan")
        else:
            m[f"{prefix}tokens"] = valid
        return m

    out = block(sums.sum(0), "eval/")
    if len(names) > 1:
        for name, row in zip(names, sums):
            out.update(block(row, f"eval/{name}/"))
    return out


class Evaluator:
    """The `eval:` section of a run on one rank: `due(step)` says when, `run(...)`
    evaluates (collective: every rank calls it at the same step)."""

    def __init__(self, cfg: RunConfig, comm: Comm, device: torch.device):
        self.cfg, self.comm, self.device = cfg, comm, device
        self.heldout = build_heldout(cfg, comm.rank, comm.world_size)
        self.last: dict[str, float] = {}  # metrics of the latest evaluation
        self.last_step: int | None = None

    def due(self, step: int, last_step: int) -> bool:
        e = self.cfg.eval
        return bool((e.every and step % e.every == 0) or (e.at_end and step == last_step))

    @torch.no_grad()
    def run(self, model: torch.nn.Module, module: torch.nn.Module, step: int | None = None) -> dict[str, float]:
        """Evaluate `model` (what the forward is called on: DDP / FSDP2 module,
        DeepSpeed engine; `module` is the unwrapped model) in eval mode; restores its
        training mode afterwards."""
        from distreg.models.moe import moe_layers, moe_metrics

        h = self.heldout
        was_training = model.training
        moe = [m for _, m in moe_layers(module)]
        saved = [(m.stats, m.forwards) for m in moe]  # the training statistics of this step stay
        for m in moe:
            m.stats, m.forwards, m.record_eval = None, 0, True
        sums = torch.zeros(len(h.sources), 5, dtype=torch.float64, device=self.device)
        model.eval()
        try:
            for batch in h.batches():
                logits = model(model_input(batch["input"], self.device))  # uint8 images: normalised here
                sums += batch_sums(logits, batch["target"].to(self.device), batch["source"].to(self.device),
                                   len(h.sources))
            moe_stats = {f"eval/{k}": v for k, v in moe_metrics(module).items()
                         if k.split("/", 1)[1] in ("dropped_frac", "dropped_tokens_frac", "load_max", "router_entropy")}
        finally:
            model.train(was_training)
            for m, (stats, forwards) in zip(moe, saved):
                m.stats, m.forwards, m.record_eval = stats, forwards, False
        sums = self.comm.all_reduce(sums.cpu())
        metrics = metrics_from_sums(sums, h.sources, h.unit)
        if int(sums[:, _SAMPLES].sum()) != h.num_samples:  # every held-out sample exactly once
            raise RuntimeError(f"eval: counted {int(sums[:, _SAMPLES].sum())} samples, the held-out set has {h.num_samples}")
        metrics.update(moe_stats)
        self.last, self.last_step = metrics, step
        return metrics


    def run_logged(self, strategy, step: int, tracker=None, progress=None) -> dict[str, float]:
        """`run` inside training: metrics to MLflow (rank 0's tracker) under `eval/` at
        `step` and onto the progress line."""
        metrics = self.run(strategy.model, strategy.module, step)
        if tracker is not None:
            tracker.log_metrics(step, metrics)
        if progress is not None and progress.enabled:
            progress.note(f"step {step}  {progress_text(metrics)}")
        return metrics


def progress_text(metrics: dict[str, float]) -> str:
    """A short suffix for the progress line."""
    if not metrics:
        return ""
    parts = [f"eval loss {metrics['eval/loss']:.4f}"]
    if "eval/top1" in metrics:
        parts.append(f"top1 {metrics['eval/top1']:.4f} top5 {metrics['eval/top5']:.4f}")
    else:
        parts.append(f"ppl {metrics['eval/ppl']:.2f} acc {metrics['eval/accuracy']:.4f}")
    return "  ".join(parts)
