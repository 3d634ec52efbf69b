"""Per-rank memory of the configured hooks, for `distreg plan` (no weights, no data read
beyond an index file when one is at hand).

What a hook keeps per rank, by family:
  masks            sparsity hooks: one bool per local element of the participating
                   parameters (the rank's shard; DDP / ZeRO-1/2: whole tensors)
  frozen copies    sara: two bool masks + the frozen fp32 values of its parameters
  per-sample store elr / ps_kd: ceil(num_samples / world) rows x classes x 4 (2 in bf16)
  teachers         distillation: every teacher whole, fp32, on every rank (assumed the
                   student's size when its own config is not given)
  counts           mba_l2: one int64 per embedding row
  old weights      group_envelope: the local parameters kept from backward to step
  histograms       exact selections (radix rounds) use [layers, 256] int64 transients
A hook not listed keeps O(1) scalars (reweighting's group statistics, monitors).
"""
from __future__ import annotations

import fnmatch
import math

from torch import nn

_MASK_HOOKS = {"magnitude_pruning", "random_pruning", "iss_p", "dsnot", "layer_adaptive"}


def _participants(model: nn.Module, params) -> list[tuple[str, nn.Parameter]]:
    """The default participant rule of the sparsity hooks: 2-D+ weights, no embeddings
    (unless asked), filtered by include / exclude patterns."""
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    include = getattr(params, "include", ["*"])
    exclude = getattr(params, "exclude", [])
    out = []
    for name, p in model.named_parameters():
        if p.ndim < 2 and not getattr(params, "include_1d", False):
            continue
        if name in embeddings and not getattr(params, "include_embeddings", False):
            continue
        if any(fnmatch.fnmatch(name, pat) for pat in include) and not any(fnmatch.fnmatch(name, pat) for pat in exclude):
            out.append((name, p))
    return out


def _num_samples(cfg) -> int | None:
    try:
        from distreg.data import _image_samples, _token_datasets

        if cfg.data.kind == "imagenet":
            return len(_image_samples(cfg))
        return sum(len(d) for d in _token_datasets(cfg))
    except Exception:  # noqa: BLE001 - data not reachable from here: the plan says so
        return None


def hook_memory(cfg, hooks, model: nn.Module, world: int, local_numel) -> list[dict]:
    """[{name, bytes, what}] per configured hook; `local_numel(shape)` is the element
    count the largest rank holds of a parameter of that shape."""
    rows = []
    total_local = sum(local_numel(p.shape) for p in model.parameters() if p.requires_grad)
    n_layers = max(1, len(_participants(model, None)))
    for hook in hooks:
        name, params = hook.name, hook.params
        if name in _MASK_HOOKS:
            n = sum(local_numel(p.shape) for _, p in _participants(model, params))
            rows.append({"name": name, "bytes": n, "what": f"keep-masks: {n:,} bool (local shard of participants); "
                         f"selection histograms [{n_layers}, 256] int64 transient"})
        elif name == "sara":
            n = sum(local_numel(p.shape) for _, p in _participants(model, params))
            rows.append({"name": name, "bytes": 6 * n, "what": "2 bool masks + frozen fp32 values of the local shard"})
        elif name in ("elr", "ps_kd"):
            samples = _num_samples(cfg)
            classes = params.num_classes or (cfg.model.num_classes if cfg.model.kind == "torchvision"
                                             else model.output.out_features if hasattr(model, "output") else 0)
            width = 2 if params.store_dtype == "bf16" else 4
            if samples is None:
                rows.append({"name": name, "bytes": 0, "what": f"per-sample store: ceil(num_samples/{world}) x "
                             f"{classes} x {width} B (data not readable here: not counted)"})
            else:
                b = math.ceil(samples / world) * classes * width
                where = "host" if params.store_on_host else "device"
                rows.append({"name": name, "bytes": b, "what": f"per-sample store ({where}): ceil({samples:,}/{world}) "
                             f"rows x {classes} classes x {width} B"})
        elif name == "distillation":
            teachers = len(params.teachers)
            n = sum(p.numel() for p in model.parameters())
            rows.append({"name": name, "bytes": 4 * n * teachers,
                         "what": f"{teachers} frozen teacher(s), whole fp32 on every rank (student-sized estimate)"})
        elif name == "mba_l2":
            rowsn = model.tok_embeddings.num_embeddings if hasattr(model, "tok_embeddings") else 0
            rows.append({"name": name, "bytes": 8 * rowsn, "what": f"running counts: {rowsn:,} int64"})
        elif name == "group_envelope":
            rows.append({"name": name, "bytes": 4 * total_local, "what": "old local weights kept from backward to step"})
        elif name == "mask_sparsity":
            n = sum(local_numel(p.shape) for n_, p in model.named_parameters() if p.ndim == 1)
            rows.append({"name": name, "bytes": n, "what": "channel masks of the norm scales (bool)"})
        elif name in ("loss_reweighting", "dro_reweighting"):
            micro = cfg.train.global_batch_size // (world * cfg.train.grad_accum_steps)
            group = micro * world if getattr(params, "mode", "allreduce") == "allgather" else micro
            rows.append({"name": name, "bytes": 8 * 3 * group,
                         "what": f"per micro-batch: losses / weights of {group} samples (float64, transient); "
                                 "no state across steps"})
        elif hasattr(hook, "plan_memory_bytes"):
            rows.append({"name": name, "bytes": hook.plan_memory_bytes(total_local), "what": "hook's own estimate"})
        else:
            rows.append({"name": name, "bytes": 0, "what": "O(1) scalars per step (no per-rank tables)"})
    return rows
