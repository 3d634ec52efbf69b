"""DSnoT (Zhang et al., ICLR 2024) and its Wanda initial mask: the pure core (spec section 5).

Training-free prune-and-grow of a sparse linear layer from calibration statistics of its
input `x` (per input column j):

- `S_j  = (1/N_s) sum_tokens x_j^2`            Wanda's squared column norm per sequence;
- `mu_j = (1/N_s) sum_tokens x_j`              a scaled mean (sum over tokens / sequences);
- `v_j  = sum_seq T_seq Var_seq(x_j) / sum_seq T_seq`, the token-weighted mean of the
  within-sequence population variances (not the pooled variance).

`CalibrationStats` keeps the fp64 *sums* behind them (sum x^2, sum x, sum_seq T*Var_seq,
sum T, N_s), so ranks that saw different sequences all-reduce them (one SUM) and get the
statistics of the union: every quantity is a sum over sequences, which is what makes the
distributed result equal the single-process one up to fp64 summation order.

Rows are independent: `wanda_mask` and `dsnot_rows` take any block of whole rows of a
weight `[out, in]` (FSDP2 `Shard(0)` holds exactly that) and give that block's result,
identical to the same rows of a whole-matrix call.

Mask convention: bool keep-masks (True = kept), like the rest of `distreg.sparsity`.

DSnoT per row (reference `lib/prune.py::prune_DSnoT`, zyxxmu/DSnoT @ 4c029dfa): with
`c_j = W_j mu_j` and `e = sum_{j pruned} c_j` (expected dense-minus-sparse output), repeat
up to `max_cycles` times for all rows at once: grow the pruned weight at the back of the
growth list (largest `c/v^gamma`) if `e > 0`, else at its front (most negative); prune the
kept weight at the front of the prune list (`c < 0`, smallest Wanda score) if `e >= 0`,
else at its back (`c > 0`, smallest Wanda score); accept iff the row is still active and
`|e| > threshold` (and, with `same_sign`, `sign(e + c_p - c_g) == sign(e_initial)`). A
rejected row stays inactive. Cursors advance every cycle, accepted or not.

distreg's lists hold valid candidates only (pruned positions in the growth list, kept ones
in the prune list, `c == 0` kept ones between the two signs); a row whose cursor has run
out of candidates becomes inactive. Per-row sparsity (and the N:M pattern) is therefore
exactly preserved. `fidelity_cursor_quirk=True` reproduces the reference instead: the
growth list spans all `in` positions (kept ones with value 0), zero-`c` entries of the
prune list are replaced by its first entry (`return_reorder_indice`), and rows that are
no longer active still write their cursor positions into the mask every cycle (kept
positions reached by a growth cursor get pruned). A cursor leaving its list, where the
reference indexes out of range, raises ValueError.

N:M (`nm=(n, m)`): the growth side is as above; the prune candidate is the smallest
initial-score kept weight in the growth candidate's M-block (pruned entries score +inf; a
pruned-by-swap entry becomes +inf); the same-sign condition is always checked (as the
reference). The reference uses the *initial* metric (Wanda or magnitude) here, but always
Wanda for the unstructured prune list; so does this code.

Division by zero variance is made explicit: `c/v^gamma` is `+-inf` for `v = 0, c != 0` and 0
for `c = 0` (the reference divides and gets NaN for `0/0`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64
INITIAL_METHODS = ("wanda", "magnitude")


# --------------------------------------------------------------------------- statistics


class CalibrationStats:
    """fp64 sums of one linear layer's inputs over calibration sequences.

    `add(x)` takes `[T, d]` (one sequence) or `[..., T, d]` (a batch of sequences); every
    sequence contributes separately, so how sequences are batched (or split over ranks)
    does not change the result beyond fp64 summation order.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.sum_sq = torch.zeros(dim, dtype=F64)
        self.sum = torch.zeros(dim, dtype=F64)
        self.sum_tvar = torch.zeros(dim, dtype=F64)  # sum over sequences of T * Var_seq (population)
        self.tokens = 0.0
        self.sequences = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"calibration input has {x.shape[-1]} features, expected {self.dim}")
        x = x.detach().to(F64)
        if x.device != self.sum.device:  # sums live where the inputs are (GPU during training)
            self.sum_sq, self.sum, self.sum_tvar = (t.to(x.device) for t in (self.sum_sq, self.sum, self.sum_tvar))
        x = x.reshape(1, *x.shape) if x.dim() == 2 else x.reshape(-1, *x.shape[-2:])
        if x.numel() == 0:
            return
        n, t = x.shape[0], x.shape[1]
        self.sum_sq += x.square().sum((0, 1))
        seq_sum = x.sum(1)  # [n, d]
        self.sum += seq_sum.sum(0)
        centred = x - (seq_sum / t).unsqueeze(1)
        self.sum_tvar += centred.square().sum((0, 1))
        self.tokens += float(n * t)
        self.sequences += float(n)

    # -- what DSnoT uses ----------------------------------------------------------------
    def _need(self) -> None:
        if self.sequences <= 0:
            raise ValueError("no calibration sequences were accumulated")

    @property
    def scaler(self) -> torch.Tensor:
        """S: sum x^2 / N_s."""
        self._need()
        return self.sum_sq / self.sequences

    @property
    def mean(self) -> torch.Tensor:
        """mu~: sum x / N_s."""
        self._need()
        return self.sum / self.sequences

    @property
    def var(self) -> torch.Tensor:
        """v: token-weighted mean of the within-sequence population variances."""
        self._need()
        return self.sum_tvar / self.tokens

    # -- all-reduce ----------------------------------------------------------------------
    def pack(self) -> torch.Tensor:
        return torch.cat([self.sum_sq, self.sum, self.sum_tvar,
                          torch.tensor([self.tokens, self.sequences], dtype=F64, device=self.sum.device)])

    def load_packed(self, vec: torch.Tensor) -> "CalibrationStats":
        d = self.dim
        if vec.numel() != 3 * d + 2:
            raise ValueError(f"packed statistics of {vec.numel()} values, expected {3 * d + 2}")
        vec = vec.to(F64)
        self.sum_sq, self.sum, self.sum_tvar = vec[:d].clone(), vec[d:2 * d].clone(), vec[2 * d:3 * d].clone()
        self.tokens, self.sequences = float(vec[3 * d]), float(vec[3 * d + 1])
        return self

    def state_dict(self) -> dict:
        return {"dim": self.dim, "packed": self.pack()}

    @classmethod
    def from_state(cls, state: dict) -> "CalibrationStats":
        return cls(int(state["dim"])).load_packed(state["packed"])


def all_reduce_stats(stats: list[CalibrationStats], comm) -> None:
    """Sum every layer's statistics over ranks, in place: one fp64 all-reduce in all.
    Collective (same list of layers, same order, on every rank)."""
    if comm is None or comm.world_size == 1 or not stats:
        return
    packed = torch.cat([s.pack() for s in stats])
    comm.all_reduce(packed)
    at = 0
    for s in stats:
        n = 3 * s.dim + 2
        s.load_packed(packed[at:at + n])
        at += n


# The reference's `--skip_layer`: sub-layers whose name starts with it keep their initial
# mask. HF Llama names (`mlp.*`, `self_attn.*`) and distreg's (`feed_forward.*`,
# `attention.*`) both count.
SKIP_LAYERS = ("mlp", "self_attn", "no_skip")
_SKIP_PARTS = {"mlp": {"mlp", "feed_forward"}, "self_attn": {"self_attn", "attention"}, "no_skip": set()}


def skipped(name: str, skip_layer: str) -> bool:
    """Whether the layer `name` (a module or parameter name) gets no DSnoT refinement."""
    if skip_layer not in _SKIP_PARTS:
        raise ValueError(f"skip_layer must be one of {SKIP_LAYERS}, got {skip_layer!r}")
    return any(part in _SKIP_PARTS[skip_layer] for part in name.split("."))


# --------------------------------------------------------------------------- initial masks


def parse_nm(nm: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'N:M' -> (N, M) with 0 < N < M; None stays None."""
    if nm is None:
        return None
    if isinstance(nm, str):
        try:
            n, m = (int(p) for p in nm.split(":"))
        except ValueError:
            raise ValueError(f"expected 'N:M' with integers, got {nm!r}") from None
    else:
        n, m = nm
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    return n, m


def pruned_per_row(d_in: int, sparsity: float) -> int:
    """`int(d_in * sparsity)`, the reference's count (floor; float rounding included)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return int(d_in * sparsity)


def initial_scores(w_rows: torch.Tensor, scaler: torch.Tensor | None, method: str = "wanda") -> torch.Tensor:
    """Wanda `|W_ij| sqrt(S_j)` or magnitude `|W_ij|` (fp64)."""
    w = w_rows.detach().to(F64)
    if method == "magnitude":
        return w.abs()
    if method != "wanda":
        raise ValueError(f"initial method must be one of {INITIAL_METHODS}, got {method!r}")
    if scaler is None:
        raise ValueError("Wanda scores need the calibration statistic S")
    return w.abs() * scaler.to(device=w.device, dtype=F64).sqrt().reshape(1, -1)


def rowwise_keep(scores: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Per row, prune the `int(d_in * sparsity)` smallest scores (stable sort: ties go to
    the lower column), or with `nm` the N smallest of every M consecutive columns."""
    r, d = scores.shape
    keep = torch.ones(r, d, dtype=torch.bool, device=scores.device)
    if nm is not None:
        n, m = nm
        if d % m:
            raise ValueError(f"N:M needs the input dimension ({d}) divisible by M={m}")
        order = scores.reshape(r, d // m, m).sort(dim=-1, stable=True).indices[..., :n]
        return keep.reshape(r, d // m, m).scatter_(-1, order, False).reshape(r, d)
    k = pruned_per_row(d, sparsity)
    order = scores.sort(dim=1, stable=True).indices[:, :k]
    return keep.scatter_(1, order, False)


def wanda_mask(w_rows: torch.Tensor, scaler: torch.Tensor, sparsity: float = 0.5,
               nm: tuple[int, int] | str | None = None) -> torch.Tensor:
    """Wanda keep-mask of a block of rows: per row (the comparison group is the row, not
    the layer) prune the smallest `|W| sqrt(S)` (stable sort)."""
    return rowwise_keep(initial_scores(w_rows, scaler, "wanda"), sparsity, parse_nm(nm))


# --------------------------------------------------------------------------- DSnoT


@dataclass
class DSnoTResult:
    keep: torch.Tensor  # [R, d] bool, True = kept
    cycles: int  # cycles run (the reference's loop count; 0 when no row was active)
    error_before: torch.Tensor  # [R] fp64: e of the initial mask
    error_after: torch.Tensor  # [R] fp64: e of the final mask
    swaps: torch.Tensor  # [R] int64: accepted prune/grow pairs per row


def safe_ratio(c: torch.Tensor, v_pow: torch.Tensor) -> torch.Tensor:
    """c / v^gamma with 0/0 -> 0 and c/0 -> sign(c) inf."""
    out = c / v_pow
    return torch.where(c == 0, 0.0, out)


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx.unsqueeze(1)).squeeze(1)


def _put(t: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """t[i, idx[i]] = values[i] for the rows `where` selects (all rows if None)."""
    if where is None:
        t.scatter_(1, idx.unsqueeze(1), values.unsqueeze(1))
        return
    rows = where.nonzero().squeeze(1)
    t[rows, idx[rows]] = values[rows]


def _check_cursor(name: str, cursor: torch.Tensor, length: torch.Tensor | int, cycle: int) -> None:
    bad = (cursor < 0) | (cursor >= length)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"fidelity_cursor_quirk: the {name} cursor of row {row} left its list in cycle {cycle} "
                         f"(the reference indexes out of range here); use fewer max_cycles or the default lists")


def dsnot_rows(w_rows: torch.Tensor, keep: torch.Tensor, mu: torch.Tensor, v: torch.Tensor, scaler: torch.Tensor | None,
               max_cycles: int = 50, threshold: float = 0.1, *, pow_of_var: float = 1.0,
               nm: tuple[int, int] | str | None = None, initial: str = "wanda", same_sign: bool = False,
               fidelity_cursor_quirk: bool = False) -> DSnoTResult:
    """DSnoT on a block of whole rows `[R, d]` from the initial keep-mask `keep` (see the
    module docstring); vectorised over rows. `scaler` (S) orders the prune list by Wanda
    score; `initial` is the initial metric used for N:M prune candidates."""
    nm = parse_nm(nm)
    if max_cycles < 0:
        raise ValueError(f"max_cycles must be >= 0, got {max_cycles}")
    w = w_rows.detach().to(F64)
    r, d = w.shape
    dev = w.device
    keep = keep.clone().bool().reshape(r, d).to(dev)
    c = w * mu.to(device=dev, dtype=F64).reshape(1, -1)
    e0 = torch.where(keep, 0.0, c).sum(1)
    v = v.to(device=dev, dtype=F64)
    v_pow = v.pow(pow_of_var) if pow_of_var else torch.ones_like(v)
    ratio = safe_ratio(torch.where(keep, 0.0, c), v_pow.reshape(1, -1))
    wanda = initial_scores(w, scaler, "wanda")
    if r == 0:
        return DSnoTResult(keep, 0, e0, e0.clone(), torch.zeros(0, dtype=torch.int64, device=dev))
    if nm is not None:
        if d % nm[1]:
            raise ValueError(f"N:M needs the input dimension ({d}) divisible by M={nm[1]}")
        score = initial_scores(w, scaler, initial)
        fn = _nm_quirk if fidelity_cursor_quirk else _nm_valid
        return fn(keep, c, ratio, score, e0, nm[1], max_cycles, threshold)
    fn = _unstructured_quirk if fidelity_cursor_quirk else _unstructured_valid
    return fn(keep, c, ratio, wanda, e0, max_cycles, threshold, same_sign)


class _Cursors:
    """A front and a back cursor per row into one candidate list; the back cursor is used
    where `from_back` is True, and that cursor advances (inward) every cycle."""

    def __init__(self, back: torch.Tensor):
        self.front, self.back = torch.zeros_like(back), back.clone()

    def at(self, from_back: torch.Tensor) -> torch.Tensor:
        return torch.where(from_back, self.back, self.front)

    def left(self) -> torch.Tensor:
        """Rows whose list still holds an unvisited candidate."""
        return self.front <= self.back

    def advance(self, from_back: torch.Tensor) -> None:
        self.front += (~from_back).long()
        self.back -= from_back.long()


def _full(r: int, value: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((r,), value, dtype=torch.int64, device=like.device)


def _growth_order_valid(keep: torch.Tensor, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned positions first, ascending `c/v^gamma` (stable), then the kept ones; and the
    per-row count of pruned positions."""
    order = ratio.sort(dim=1, stable=True).indices
    kept_first = keep.gather(1, order).to(torch.int8).sort(dim=1, stable=True).indices
    return order.gather(1, kept_first), (~keep).sum(1)


def _prune_order_valid(keep: torch.Tensor, c: torch.Tensor, wanda: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions as [c < 0 ascending Wanda] [c == 0 ascending] [c > 0 descending],
    then the pruned ones; and the per-row count of kept positions. Equal Wanda scores
    keep the reference's order (lower column first; reversed in the c > 0 part)."""
    r, d = keep.shape
    order = wanda.sort(dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(d, device=order.device).expand(r, d).contiguous())
    group = torch.where(keep, torch.where(c < 0, 0, torch.where(c == 0, 1, 2)), 3)
    key = group * (d + 1) + torch.where(group == 2, d - rank, rank)
    return key.sort(dim=1).indices, keep.sum(1)


def _unstructured_valid(keep, c, ratio, wanda, e0, max_cycles, threshold, same_sign) -> DSnoTResult:
    r, d = keep.shape
    grow_list, n_pruned = _growth_order_valid(keep, ratio)
    prune_list, n_kept = _prune_order_valid(keep, c, wanda)
    grow, prune = _Cursors(n_pruned - 1), _Cursors(n_kept - 1)
    e, sign0 = e0.clone(), e0.sign()
    active = torch.ones_like(keep[:, 0])
    swaps = torch.zeros_like(n_kept)
    cycles = 0
    while cycles < max_cycles and active.any():
        cycles += 1
        pos, neg = e > 0, e < 0
        g_idx = _take(grow_list, grow.at(pos).clamp(0, d - 1))
        p_idx = _take(prune_list, prune.at(neg).clamp(0, d - 1))
        cg, cp = _take(c, g_idx), _take(c, p_idx)
        after = e + cp - cg
        accept = active & grow.left() & prune.left() & (e.abs() > threshold)
        if same_sign:
            accept &= after.sign() == sign0
        _put(keep, g_idx, torch.ones_like(accept), accept)
        _put(keep, p_idx, torch.zeros_like(accept), accept)
        e = torch.where(accept, after, e)
        swaps += accept.long()
        active = accept
        grow.advance(pos)
        prune.advance(neg)
    return DSnoTResult(keep, cycles, e0, e, swaps)


def _reference_reorder(values: torch.Tensor) -> torch.Tensor:
    """The reference's `return_reorder_indice`: list positions of the negative values
    (ascending position), then of the positive ones (descending), and position 0 in
    place of every zero value (between the two)."""
    r, n = values.shape
    base = torch.arange(n, dtype=F64, device=values.device).expand(r, n)
    pos = torch.where(values > 0, base, float("inf")).sort(dim=1).values.flip(1)
    neg = torch.where(values < 0, base, float("inf")).sort(dim=1).values
    pos = torch.where(pos.isinf(), 0.0, pos)
    neg = torch.where(neg.isinf(), 0.0, neg)
    return (pos + neg).to(torch.int64)


def _unstructured_quirk(keep, c, ratio, wanda, e0, max_cycles, threshold, same_sign) -> DSnoTResult:
    r, d = keep.shape
    n_kept = keep.sum(1)
    if r and not (n_kept == n_kept[0]).all():
        raise ValueError("fidelity_cursor_quirk needs the same number of kept weights in every row (the reference's "
                         "per-row split)")
    k = int(n_kept[0]) if r else 0
    grow_list = ratio.sort(dim=1, stable=True).indices  # all positions, kept ones with value 0
    res = torch.where(keep, wanda, float("inf")).sort(dim=1, stable=True).indices[:, :k]
    prune_list = res.gather(1, _reference_reorder(c.gather(1, res)))
    grow, prune = _Cursors(_full(r, d - 1, keep)), _Cursors(_full(r, k - 1, keep))
    e, sign0 = e0.clone(), e0.sign()
    active = torch.ones_like(keep[:, 0])
    swaps = torch.zeros_like(n_kept)
    cycles = 0
    while cycles < max_cycles and active.any():
        cycles += 1
        pos, neg = e > 0, e < 0
        gi, pi = grow.at(pos), prune.at(neg)
        _check_cursor("growth", gi, d, cycles)
        _check_cursor("prune", pi, k, cycles)
        g_idx, p_idx = _take(grow_list, gi), _take(prune_list, pi)
        cg, cp = _take(c, g_idx), _take(c, p_idx)
        after = e + cp - cg
        active = active & (e.abs() > threshold)
        if same_sign:
            active &= after.sign() == sign0
        # every row writes both positions, active or not (reference order: prune, then grow)
        _put(keep, p_idx, ~active)
        _put(keep, g_idx, active)
        e = torch.where(active, e + cp, e)
        e = torch.where(active, e - cg, e)
        swaps += active.long()
        grow.advance(pos)
        prune.advance(neg)
    return DSnoTResult(keep, cycles, e0, e, swaps)


def _block_candidates(score: torch.Tensor, g_idx: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In the M-block of each row's growth candidate: the column of the smallest score
    (first on ties) and that score."""
    start = g_idx - g_idx % m
    cols = start.unsqueeze(1) + torch.arange(m, device=g_idx.device).unsqueeze(0)
    best, at = score.gather(1, cols).min(dim=1)
    return start + at, best


def _nm_valid(keep, c, ratio, score, e0, m, max_cycles, threshold) -> DSnoTResult:
    r, d = keep.shape
    inf = torch.full_like(e0, float("inf"))
    grow_list, n_pruned = _growth_order_valid(keep, ratio)
    grow = _Cursors(n_pruned - 1)
    score = torch.where(keep, score, float("inf"))
    e, sign0 = e0.clone(), e0.sign()
    active = torch.ones_like(keep[:, 0])
    swaps = torch.zeros_like(n_pruned)
    cycles = 0
    while cycles < max_cycles and active.any():
        cycles += 1
        pos = e > 0
        g_idx = _take(grow_list, grow.at(pos).clamp(0, d - 1))
        p_idx, best = _block_candidates(score, g_idx, m)
        cg, cp = _take(c, g_idx), _take(c, p_idx)
        after = e + cp - cg
        accept = active & grow.left() & best.isfinite() & (sign0 == after.sign()) & (e.abs() > threshold)
        _put(keep, g_idx, torch.ones_like(accept), accept)
        _put(keep, p_idx, torch.zeros_like(accept), accept)
        _put(score, p_idx, inf, accept)
        e = torch.where(accept, after, e)
        swaps += accept.long()
        active = accept
        grow.advance(pos)
    return DSnoTResult(keep, cycles, e0, e, swaps)


def _nm_quirk(keep, c, ratio, score, e0, m, max_cycles, threshold) -> DSnoTResult:
    r, d = keep.shape
    inf = torch.full_like(e0, float("inf"))
    grow_list = ratio.sort(dim=1, stable=True).indices
    grow = _Cursors(_full(r, d - 1, keep))
    score = torch.where(keep, score, float("inf"))  # the row max + 1 the reference writes is +inf too
    e, sign0 = e0.clone(), e0.sign()
    active = torch.ones_like(keep[:, 0])
    swaps = torch.zeros(r, dtype=torch.int64, device=keep.device)
    cycles = 0
    while cycles < max_cycles and active.any():
        cycles += 1
        pos = e > 0
        gi = grow.at(pos)
        _check_cursor("growth", gi, d, cycles)
        g_idx = _take(grow_list, gi)
        p_idx, _ = _block_candidates(score, g_idx, m)
        cg, cp = _take(c, g_idx), _take(c, p_idx)
        after = e + cp - cg
        active = active & (sign0 == after.sign()) & (e.abs() > threshold)
        _put(score, p_idx, inf)  # unconditional, as the reference
        _put(keep, p_idx, ~active)
        _put(keep, g_idx, active)
        e = torch.where(active, e + cp, e)
        e = torch.where(active, e - cg, e)
        swaps += active.long()
        grow.advance(pos)
    return DSnoTResult(keep, cycles, e0, e, swaps)


def prune_rows(w_rows: torch.Tensor, stats: CalibrationStats | None, sparsity: float = 0.5, *,
               nm: tuple[int, int] | str | None = None, initial: str = "wanda", dsnot: bool = True,
               max_cycles: int = 50, threshold: float = 0.1, pow_of_var: float = 1.0, same_sign: bool = False,
               fidelity_cursor_quirk: bool = False) -> DSnoTResult:
    """The whole per-layer recipe on a block of rows: initial mask (Wanda or magnitude,
    unstructured or N:M), then DSnoT unless `dsnot=False` (the reference's skipped layers
    keep the initial mask; their result reports e of that mask and 0 cycles)."""
    nm = parse_nm(nm)
    scaler = None if stats is None else stats.scaler
    if initial == "wanda" and stats is None:
        raise ValueError("initial='wanda' needs calibration statistics")
    keep = rowwise_keep(initial_scores(w_rows, scaler, initial), sparsity, nm)
    if not dsnot:
        if stats is None:
            e = torch.zeros(w_rows.shape[0], dtype=F64, device=w_rows.device)
        else:
            c = w_rows.detach().to(F64) * stats.mean.to(w_rows.device).reshape(1, -1)
            e = torch.where(keep, 0.0, c).sum(1)
        return DSnoTResult(keep, 0, e, e.clone(), torch.zeros_like(e, dtype=torch.int64))
    if stats is None:
        raise ValueError("DSnoT needs calibration statistics")
    return dsnot_rows(w_rows, keep, stats.mean, stats.var, stats.scaler, max_cycles, threshold, pow_of_var=pow_of_var,
                      nm=nm, initial=initial, same_sign=same_sign, fidelity_cursor_quirk=fidelity_cursor_quirk)
