"""Per-sample loss weights normalised over the GLOBAL batch (functional core).

Methods (spec `methods/sparsity-reweighting-ot.md`):

* §8 dynamic loss-based sample reweighting (Sow et al., ICLR 2025): losses are min/max
  normalised to ``h ∈ [-δ, δ]`` over the group, mapped by a strategy ``f`` and turned into
  ``w = softmax(f(h) / r)``;
* §9 KL-regularised DRO weights (DRAT): ``w = softmax(ℓ / r)``, optionally normalised by a
  running (EMA) log-normaliser instead of the batch.

Every weight function has the signature
``fn(losses, valid_mask=None, comm=None, *, mode="allreduce", **params) -> local weights``:

* ``losses``: this rank's detached 1-D per-sample losses (any float dtype);
* ``valid_mask``: bool, same shape; ``False`` marks padded / duplicated samples
  (``DistributedSampler`` padding). They get weight 0 and take no part in any statistic.
  Their loss values may be garbage (NaN, inf): they are never read;
* ``comm``: a ``distreg.runtime.comm.Comm`` (``None`` or world size 1: single process).

Pattern S4: every statistic (min, max, softmax normaliser, count) is taken over the global
batch ``B_g`` (the rank-order concatenation of all local batches), so the returned local
weights are exactly the slice of the single-process weights on ``B_g``, for any (uneven,
possibly empty) local batch sizes. Two modes:

* ``mode="allreduce"`` (default, O(1) traffic): one MAX all-reduce of ``(-min, max)`` and one
  all-gather of the per-rank ``(max, Σexp(·−max), count)`` triple, merged into a global
  log-sum-exp. Equal to the single-process result up to float summation order.
* ``mode="allgather"``: all-gather the ``B_g`` losses (and mask), compute on the full vector,
  take this rank's slice: bitwise identical on every rank and for every world size.

Statistics are computed in float64; weights are returned as float32 (float64 if the losses
are float64). Normalisation: **weights sum to 1 over the valid samples of the global batch**
(the papers' softmax; the ICLR trainer's equivalent "mean 1" form is ``N_g · w``). The
EMA-normalised DRO weights are the one exception (mean ≈ 1/N_g, see `kl_dro_weights`).
All functions are collective when the world size is > 1: every rank must call them, in the
same order, with the same keyword parameters.

Loss conventions (``reweighted_loss``, ``kl_dro_objective``, ``global_mean``): each rank
returns ``W · (its share)``, so the mean over ranks of the returned values is the global
loss and the gradient averaged over ranks by DDP / FSDP2 / ZeRO is the single-process
gradient. Pass ``scale_by_world=False`` for plain shares (they sum to the global loss).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from distreg.runtime.comm import Comm

__all__ = [
    "DEFAULTS",
    "STRATEGIES",
    "extremes_weights",
    "global_mean",
    "loss_based_logits",
    "prior_tilted_weights",
    "kl_dro_normalizer_update",
    "kl_dro_objective",
    "kl_dro_weights",
    "linear_weights",
    "linupper_weights",
    "quadratic_weights",
    "reweighted_loss",
    "sample_weights",
    "temperature_schedule",
    "uniform_weights",
    "weight_stats",
]

_F64 = torch.float64
_SPAN_EPS = 1e-6  # reference: Δ = max(ℓ_max − ℓ_min, 1e-6)


# --------------------------------------------------------------------------- helpers
def _world(comm: Comm | None) -> int:
    return 1 if comm is None else int(comm.world_size)


def _prep(losses: torch.Tensor, valid_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 detached losses with invalid entries zeroed, and a bool validity mask."""
    if losses.dim() != 1:
        raise ValueError(f"per-sample losses must be 1-D, got shape {tuple(losses.shape)}")
    l = losses.detach().to(_F64)
    if valid_mask is None:
        v = torch.ones_like(l, dtype=torch.bool)
    else:
        v = valid_mask.detach().to(device=l.device, dtype=torch.bool).reshape(-1)
        if v.numel() != l.numel():
            raise ValueError(f"valid_mask has {v.numel()} entries, losses have {l.numel()}")
    return torch.where(v, l, torch.zeros_like(l)), v


def _out_dtype(losses: torch.Tensor) -> torch.dtype:
    return _F64 if losses.dtype == _F64 else torch.float32


class _Reducer:
    """Global reductions over the valid entries of a rank-sharded vector (`None`: local).

    The `*_t` forms stay on the tensors' device (no host read; on a GPU a read is a
    stream sync) and call the collective whatever the world size (a `Comm` over one
    process makes it a no-op), so the number of collectives of a code path does not
    depend on the world size. The float forms read the result back for host-side callers.
    """

    def __init__(self, comm: Comm | None):
        self.comm = comm

    def min_max_t(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global (min, max) over valid entries as 0-dim tensors; (+inf, -inf) when there
        are none. One MAX all-reduce."""
        inf = torch.tensor([math.inf], dtype=_F64, device=x.device)
        xv = x[v]
        t = torch.cat([torch.cat([-xv, -inf]).max().view(1), torch.cat([xv, -inf]).max().view(1)])
        if self.comm is not None:
            self.comm.all_reduce(t, op="max")
        return -t[0], t[1]

    def min_max(self, x: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
        lo, hi = self.min_max_t(x, v)
        return float(lo), float(hi)

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """[world, k]: every rank's `row`, in rank order (one all-gather)."""
        return torch.stack(self.comm.all_gather(row)) if self.comm is not None else row.unsqueeze(0)

    def shifted_sums(self, z: torch.Tensor, v: torch.Tensor, *weights: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, [Σ_valid a e^(z − M) for a in (1, *weights)], [Σ a for a in weights]) over
        the global batch, M = the global max of z over valid entries (−inf if none), in
        one all-gather of a small per-rank row: each rank contributes its local max m_r
        and sums shifted by it; ranks merge S = Σ_r s_r e^(m_r − M) in rank order
        (identical on every rank). No host read."""
        zv = z[v]
        m = zv.max() if zv.numel() else torch.tensor(-math.inf, dtype=_F64, device=z.device)
        e = torch.exp(zv - m)
        row = torch.stack([m, torch.tensor(float(zv.numel()), dtype=_F64, device=z.device), e.sum(),
                           *[(a[v] * e).sum() for a in weights], *[a.sum() for a in weights]])
        parts = self.gather_rows(row)
        big = parts[:, 0].max()
        scale = torch.where(parts[:, 1] > 0, torch.exp(parts[:, 0] - big), torch.zeros_like(parts[:, 0]))
        k = 1 + len(weights)
        shifted = (parts[:, 2:2 + k] * scale.unsqueeze(1)).sum(0)
        return big, shifted, parts[:, 2 + k:].sum(0)

    def logsumexp_count_t(self, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``log Σ_valid exp(z)`` (``-inf`` if empty) and global valid count, as
        0-dim tensors (one all-gather, no host read)."""
        zv = z[v]
        m = zv.max() if zv.numel() else torch.tensor(-math.inf, dtype=_F64, device=z.device)
        row = torch.stack([m, torch.exp(zv - m).sum(), torch.tensor(float(zv.numel()), dtype=_F64, device=z.device)])
        parts = self.gather_rows(row)
        big = parts[:, 0].max()
        scale = torch.where(parts[:, 2] > 0, torch.exp(parts[:, 0] - big), torch.zeros_like(parts[:, 0]))
        total = (parts[:, 1] * scale).sum()
        n = parts[:, 2].sum()
        lse = torch.where(total > 0, big + torch.log(total), torch.full_like(total, -math.inf))
        return lse, n

    def logsumexp_count(self, z: torch.Tensor, v: torch.Tensor) -> tuple[float, int]:
        """Global ``log Σ_valid exp(z)`` (``-inf`` if empty) and global valid count."""
        lse, n = self.logsumexp_count_t(z, v)
        return float(lse), int(round(float(n)))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        return t if self.comm is None else self.comm.all_reduce(t, op="sum")

    def max(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        return t if self.comm is None else self.comm.all_reduce(t, op="max")


def _run(core: Callable, losses, valid_mask, comm, mode: str, **params) -> torch.Tensor:
    """Apply ``core(l64, valid, reducer, **params)`` in the requested distributed mode."""
    if mode not in ("allreduce", "allgather"):
        raise ValueError(f"mode must be 'allreduce' or 'allgather', got {mode!r}")
    l, v = _prep(losses, valid_mask)
    if _world(comm) == 1 or mode == "allreduce":
        w = core(l, v, _Reducer(comm), **params)
    else:  # allgather
        parts = comm.all_gather_uneven(torch.stack([l, v.to(_F64)], dim=1))
        full = torch.cat(parts)
        off = sum(p.shape[0] for p in parts[: comm.rank])
        w = core(full[:, 0], full[:, 1] > 0.5, _Reducer(None), **params)[off : off + l.numel()]
    return w.to(_out_dtype(losses))


def _check_r(r: float) -> float:
    r = float(r)
    if not r > 0:
        raise ValueError(f"temperature r must be > 0 (math.inf = uniform), got {r}")
    return r


def _softmax(z: torch.Tensor, v: torch.Tensor, red: _Reducer) -> torch.Tensor:
    """Global softmax of ``z`` over valid entries (zeros elsewhere / if none is valid).
    One all-gather, no host read."""
    lse, _ = red.logsumexp_count_t(z, v)
    return torch.where(v, torch.exp(z - lse), torch.zeros_like(z))


def prior_tilted_weights(z: torch.Tensor, v: torch.Tensor, prior: torch.Tensor, red: _Reducer) -> torch.Tensor:
    """``w_i = M · b_i e^{z_i} / Σ_{valid j} b_j e^{z_j}`` with ``M = Σ_j b_j`` over the
    global batch: the softmax of ``z`` tilted by the prior ``b`` and scaled to the prior's
    mass (`loss_reweighting`'s group weights, ``M b u / Σ b u`` with ``u = softmax(z)``:
    the softmax normaliser cancels). One all-gather of 5 numbers per rank, no host read.
    Where ``Σ b e^z`` is 0 (no valid entry) the prior is returned unchanged."""
    b = prior.to(_F64)
    big, (_, tilt), (mass,) = red.shifted_sums(z, v, b)
    w = torch.where(v, mass * b * torch.exp(z - big) / tilt, torch.zeros_like(b))
    return torch.where(tilt > 0, w, b)


# --------------------------------------------------------------- §8 loss-based strategies
def _f_linupper(h: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.clamp(h + delta, max=delta)  # min(h + δ, δ)


def _f_quadratic(h: torch.Tensor, delta: float) -> torch.Tensor:
    return 1.0 - h * h / (delta * delta)  # reference "mid": 1 − h²/δ²


def _f_extremes(h: torch.Tensor, delta: float) -> torch.Tensor:
    return h.abs()


def _f_linear(h: torch.Tensor, delta: float) -> torch.Tensor:
    return 0.5 * h + 0.5 * delta  # ICLR trainer "upper"


def loss_based_logits(l, v, red: _Reducer, *, f, r: float, delta: float) -> torch.Tensor:
    """``z = f(h) / r`` with ``h`` the losses min/max-normalised over the global batch (one
    MAX all-reduce, no host read). Entries are meaningless where ``v`` is False, and all
    of them when no sample of the global batch is valid (every consumer masks by ``v``)."""
    lo, hi = red.min_max_t(l, v)
    span = (hi - lo).clamp(min=_SPAN_EPS)
    h = (2.0 * delta * l - delta * (hi + lo)) / span
    return torch.zeros_like(l) if math.isinf(r) else f(h, delta) / r


def _loss_based_core(l, v, red: _Reducer, *, f, r: float, delta: float) -> torch.Tensor:
    return _softmax(loss_based_logits(l, v, red, f=f, r=r, delta=delta), v, red)


_F_STRATEGIES: dict[str, Callable] = {"linupper": _f_linupper, "quadratic": _f_quadratic, "extremes": _f_extremes,
                                      "linear": _f_linear}
"""The maps ``f`` of the loss-based strategies (``mid`` = ``quadratic``)."""


def _make_loss_based(f: Callable, name: str, doc: str) -> Callable:
    def fn(losses: torch.Tensor, valid_mask: torch.Tensor | None = None, comm: Comm | None = None, *,
           r: float = 1.0, delta: float = 1.0, mode: str = "allreduce") -> torch.Tensor:
        return _run(_loss_based_core, losses, valid_mask, comm, mode, f=f, r=_check_r(r), delta=float(delta))

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (
        f"{doc}\n\n"
        "``h_i = (2δℓ_i − δ(ℓ_max+ℓ_min)) / max(ℓ_max−ℓ_min, 1e-6)`` over the global batch, "
        "``w = softmax(f(h)/r)`` over the global batch (sums to 1; padded samples 0). "
        "Defaults r=1 (ICLR GPT-2 12-layer config), δ=1. ``r=math.inf`` gives uniform weights."
    )
    return fn


linupper_weights = _make_loss_based(
    _f_linupper, "linupper_weights",
    "LinUpper (ICLR ``linupper``, fms-fsdp ``upper``): ``f(h) = min(h+δ, δ)`` — ramps up "
    "below-midrange losses, flat above, i.e. de-emphasises low-loss (redundant) samples.")
quadratic_weights = _make_loss_based(
    _f_quadratic, "quadratic_weights",
    "Quadratic (``mid`` in both repos): ``f(h) = 1 − h²/δ²`` — favours medium losses, "
    "down-weights both extremes.")
extremes_weights = _make_loss_based(
    _f_extremes, "extremes_weights",
    "Extremes: ``f(h) = |h|`` — favours both the lowest and the highest losses.")
linear_weights = _make_loss_based(
    _f_linear, "linear_weights",
    "Plain linear (ICLR trainer ``upper`` only — NOT fms-fsdp ``upper``): ``f(h) = h/2 + δ/2``.")


def uniform_weights(losses: torch.Tensor, valid_mask: torch.Tensor | None = None, comm: Comm | None = None, *,
                    mode: str = "allreduce") -> torch.Tensor:
    """Baseline: ``w_i = 1/N_g`` for every valid sample of the global batch (per-sample mean).

    Note: the ICLR trainer's non-reweighted loss is the *token* mean (sequence weight ∝ its
    active-token count); this is the per-sample mean (equal for equal-length sequences)."""

    def core(l, v, red):
        _, n = red.logsumexp_count(torch.zeros_like(l), v)
        return torch.where(v, torch.full_like(l, 1.0 / max(n, 1)), torch.zeros_like(l))

    return _run(core, losses, valid_mask, comm, mode)


# ------------------------------------------------------------------------- §9 KL-DRO
def _dro_core(l, v, red: _Reducer, *, r: float, log_normalizer: float | None) -> torch.Tensor:
    z = torch.zeros_like(l) if math.isinf(r) else l / r
    if log_normalizer is None:
        return _softmax(z, v, red)
    _, n = red.logsumexp_count(z, v)
    w = torch.exp(z - float(log_normalizer)) / max(n, 1)
    return torch.where(v, w, torch.zeros_like(l))


def kl_dro_weights(losses: torch.Tensor, valid_mask: torch.Tensor | None = None, comm: Comm | None = None, *,
                   r: float = 1.0, log_normalizer: float | None = None, mode: str = "allreduce") -> torch.Tensor:
    """KL-regularised DRO weights ``w* = argmax_{w∈Δ} Σ w_i ℓ_i − r·KL(w‖u) = softmax(ℓ/r)``.

    Batch normaliser (default): sums to 1 over the global batch. With ``log_normalizer=z``
    (the EMA/"dataset" normaliser of `kl_dro_normalizer_update`): ``w_i = exp(ℓ_i/r − z)/N_g``,
    which sums to ``mean_{B_g} exp(ℓ/r) / e^z`` (≈ 1), not exactly 1. DRAT's default ``r``
    and which normaliser its experiments use are UNVERIFIED (no public code): r=1 here is a
    placeholder — configs should set it."""
    return _run(_dro_core, losses, valid_mask, comm, mode, r=_check_r(r),
                log_normalizer=None if log_normalizer is None else float(log_normalizer))


def kl_dro_normalizer_update(log_z: float | None, losses: torch.Tensor, valid_mask: torch.Tensor | None = None,
                             comm: Comm | None = None, *, r: float = 1.0, beta: float = 0.1) -> float:
    """EMA of the DRO normaliser in log space (spec §9 [DERIVED]):
    ``z ← log((1−β)·e^z + β·mean_{B_g} exp(ℓ/r))``; ``log_z=None`` initialises
    ``z = log mean_{B_g} exp(ℓ/r)``. Identical float on every rank (collective).
    Returns ``log_z`` unchanged if the global batch has no valid sample."""
    r = _check_r(r)
    l, v = _prep(losses, valid_mask)
    lse, n = _Reducer(comm).logsumexp_count(l / r, v)
    if n == 0:
        return log_z  # type: ignore[return-value]
    lme = lse - math.log(n)
    if log_z is None:
        return lme
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    a = math.log1p(-beta) + float(log_z) if beta < 1 else -math.inf
    b = math.log(beta) + lme if beta > 0 else -math.inf
    hi = max(a, b)
    return hi + math.log(math.exp(a - hi) + math.exp(b - hi))


def kl_dro_objective(losses: torch.Tensor, valid_mask: torch.Tensor | None = None, comm: Comm | None = None, *,
                     r: float = 1.0, scale_by_world: bool = True) -> torch.Tensor:
    """DRO objective ``r · log mean_{B_g} exp(ℓ/r)`` (grad-carrying ``losses``).

    The returned VALUE equals the global objective on every rank; the GRADIENT w.r.t. a local
    ``ℓ_i`` is ``s·w_i`` (``w = softmax(ℓ/r)`` over ``B_g``, ``s = W`` if ``scale_by_world``,
    else 1), i.e. Danskin's gradient, correctly scaled for rank-averaging strategies. Same
    gradient as ``reweighted_loss(losses, kl_dro_weights(...))``; differs only in the logged
    value."""
    r = _check_r(r)
    l, v = _prep(losses, valid_mask)
    red = _Reducer(comm)
    lse, n = red.logsumexp_count(l / r, v)
    w = torch.where(v, torch.exp(l / r - lse), torch.zeros_like(l)) if n else torch.zeros_like(l)
    value = r * (lse - math.log(n)) if n else 0.0
    s = float(_world(comm)) if scale_by_world else 1.0
    lv = torch.where(v, losses, torch.zeros_like(losses))
    wt = w.to(_out_dtype(losses))
    return (s * (wt * (lv - lv.detach())).sum()).to(_out_dtype(losses)) + value


# ------------------------------------------------------------------ registry, schedule
STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": uniform_weights,
    "linupper": linupper_weights,
    "quadratic": quadratic_weights,
    "mid": quadratic_weights,  # name used by both reference repos
    "extremes": extremes_weights,
    "linear": linear_weights,  # ICLR "upper"; "upper" itself is ambiguous, so not registered
    "kl_dro": kl_dro_weights,
}
"""Name → weight function. Deliberately no ``"upper"`` key: it means LinUpper in fms-fsdp
and the plain linear map in the ICLR trainer."""

DEFAULTS: dict[str, dict] = {
    "uniform": {},
    "linupper": {"r": 1.0, "delta": 1.0},
    "quadratic": {"r": 1.0, "delta": 1.0},
    "mid": {"r": 1.0, "delta": 1.0},
    "extremes": {"r": 1.0, "delta": 1.0},
    "linear": {"r": 1.0, "delta": 1.0},
    "kl_dro": {"r": 1.0},
}
"""Per-strategy default parameters (ICLR repo: r = ``kl_reg`` = 1.0 for the 12-layer GPT-2
config, 0.4 for the 36-layer one, δ = 1; shipped configs use ``mid``; ``burnout_steps``
= 1000 steps of uniform weighting first, see `temperature_schedule`). fms-fsdp instead
defaults to LinUpper with r = 100 for 2000 steps, then ``kl_regularizer`` (dataclass
default also 100)."""


def sample_weights(name: str, losses: torch.Tensor, valid_mask: torch.Tensor | None = None,
                   comm: Comm | None = None, **params) -> torch.Tensor:
    """Look up strategy ``name`` in `STRATEGIES` and call it with `DEFAULTS` overridden by
    ``params`` (collective)."""
    try:
        fn = STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown reweighting strategy {name!r}; known: {sorted(STRATEGIES)}") from None
    return fn(losses, valid_mask, comm, **{**DEFAULTS.get(name, {}), **params})


def temperature_schedule(step: int, r: float, warmup_steps: int = 0, warmup_r: float = math.inf) -> float:
    """Temperature at optimizer step ``step``: ``warmup_r`` for ``step < warmup_steps``, then
    ``r``. ICLR repo: ``warmup_steps=burnout_steps=1000, warmup_r=inf`` (uniform first);
    fms-fsdp: ``warmup_steps=2000, warmup_r=100``."""
    return float(warmup_r) if step < warmup_steps else float(r)


# --------------------------------------------------------------------------- losses
def reweighted_loss(losses: torch.Tensor, weights: torch.Tensor, comm: Comm | None = None, *,
                    scale_by_world: bool = True) -> torch.Tensor:
    """``W · Σ_{i∈B_r} w_i ℓ_i`` with detached ``w`` (S4): averaged over ranks it is the
    single-process ``Σ_{B_g} w_i ℓ_i`` and so are its rank-averaged gradients
    (``∂/∂ℓ_i = w_i``). Samples with ``w_i = 0`` contribute nothing even if ``ℓ_i`` is NaN."""
    if losses.shape != weights.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and weights {tuple(weights.shape)} differ")
    w = weights.detach().to(device=losses.device, dtype=torch.promote_types(losses.dtype, torch.float32))
    keep = w != 0
    terms = torch.where(keep, w * losses.to(w.dtype), torch.zeros_like(w))
    s = float(_world(comm)) if scale_by_world else 1.0
    return s * terms.sum()


def global_mean(values: torch.Tensor, valid_mask: torch.Tensor | None = None, comm: Comm | None = None, *,
                scale_by_world: bool = True) -> torch.Tensor:
    """Spec P1 batch mean over ``B_g``: ``W · Σ_{B_r, valid} v_i / N_g`` (grad-carrying).

    Its mean over ranks is the global mean (and so are the rank-averaged gradients); equal
    to the local mean only when every rank has the same number of valid samples. Reduces
    over dim 0; extra dims are kept. Collective (one count all-reduce)."""
    v = (torch.ones(values.shape[0], dtype=torch.bool, device=values.device) if valid_mask is None
         else valid_mask.to(device=values.device, dtype=torch.bool).reshape(-1))
    n = _Reducer(comm).sum(torch.tensor([float(v.sum())], dtype=_F64, device=values.device))
    vm = v.view(-1, *([1] * (values.dim() - 1)))
    total = torch.where(vm, values, torch.zeros_like(values)).sum(dim=0)
    s = float(_world(comm)) if scale_by_world else 1.0
    return total * (s / max(float(n[0]), 1.0))


# ------------------------------------------------------------------------ statistics
def weight_stats(weights: torch.Tensor, losses: torch.Tensor | None = None, comm: Comm | None = None,
                 valid_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Global statistics of the weights over the valid samples of ``B_g`` (collective, 3
    all-reduces), as python floats identical on every rank:

    ``n, sum, mean, std`` (population), ``min, max``, ``ess = (Σw)²/Σw²`` (effective sample
    size; = n for uniform weights), ``ess_fraction = ess/n``, ``frac_downweighted`` (share of
    samples with ``w_i < (1 − 1e-6)·mean``, i.e. below uniform) and, with ``losses``:
    ``loss_mean`` (unweighted) and ``loss_weighted = Σwℓ/Σw``."""
    w, v = _prep(weights, valid_mask)
    l = torch.zeros_like(w) if losses is None else _prep(losses, v)[0]
    red = _Reducer(comm)
    s1 = red.sum(torch.stack([v.to(_F64).sum(), w.sum(), (w * w).sum(), l.sum(), (w * l).sum()]))
    n, sw, sww, sl, swl = (float(x) for x in s1)
    inf = torch.tensor([math.inf], dtype=_F64, device=w.device)
    mx = red.max(torch.stack([torch.cat([w[v], -inf]).max(), torch.cat([-w[v], -inf]).max()]))
    mean = sw / n if n else 0.0
    s2 = red.sum(torch.stack([torch.where(v, (w - mean) ** 2, torch.zeros_like(w)).sum(),
                              (v & (w < mean * (1 - 1e-6))).to(_F64).sum()]))
    out = {
        "n": n, "sum": sw, "mean": mean, "std": math.sqrt(float(s2[0]) / n) if n else 0.0,
        "min": -float(mx[1]) if n else 0.0, "max": float(mx[0]) if n else 0.0,
        "ess": sw * sw / sww if sww > 0 else 0.0,
        "frac_downweighted": float(s2[1]) / n if n else 0.0,
    }
    out["ess_fraction"] = out["ess"] / n if n else 0.0
    if losses is not None:
        out["loss_mean"] = sl / n if n else 0.0
        out["loss_weighted"] = swl / sw if sw else 0.0
    return out
