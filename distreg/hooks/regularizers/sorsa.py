"""`sorsa`: SVD-initialised adapters with the orthonormal regulariser (spec regularizers.md
section 6; Cao, arXiv:2409.00055; reference Gunale0926/SORSA `sorsalib`).

`prepare_model` (whole, unsharded model, right after build, before sharding):
  1. optionally loads `init_from` (a distreg checkpoint - step dir or checkpoint root - or
     a plain state-dict file such as `distreg adapters merge` writes) into the model;
  2. replaces every selected nn.Linear by a `SorsaLinear`: W = U diag(sigma) V^T (float64),
     trainable `sorsa_A` = V_r^T [r, in], `sorsa_S` = sigma_r [r], `sorsa_B` = U_r [out, r],
     frozen `weight` = W_res = W - s B diag(S) A (a requires_grad=False parameter, so FSDP2
     and ZeRO-3 shard it like any parameter and checkpoints carry it under the layer's own
     `weight` name); y = W_res x + s B diag(S) A dropout(x) + bias. The SVD of layer j is
     done on rank j % world only (float64, canonical signs) and broadcast with the residual,
     so every rank holds bitwise the same split (spec: no per-rank SVDs);
  3. freezes every other parameter (`freeze_others`, the reference trains the adapters only).
  `model.init_device=meta` is refused: the SVD needs the real weights before sharding.

Regulariser L_orth = 1/(2L) sum_layers (||A A^T - I|| + ||B^T B - I||) (non-squared norms,
reference `calc_ortho`). Order inside a step: forward -> loss -> backward + reduction ->
`after_backward`: L_orth and its gradient from the weights the step started from; mode
`code` adds (gamma / peak_lr) * grad L_orth to the reduced local gradients of A and B (the
reference backpropagates (gamma / lr_peak) * L_orth into the gradients before AdamW, once
per optimizer step) -> clipping -> optimizer step -> `after_step`: mode `decoupled` takes
the paper's separate step W <- W - gamma * grad L_orth(W_t) on A and B instead.
Deviation: the reference adds its term *after* gradient clipping; here the Trainer clips
after `after_backward`, so with `train.grad_clip` set the term is clipped with the loss
gradient (identical without clipping). Gradient writes are refused under ZeRO-1/2 in mode
`code` (mode `decoupled` writes weights and runs there too); DeepSpeed fp16 is unsupported.

Communication per step (sharded strategies; none under DDP): two collectives in all.
- A [r, in]: FSDP2 shards it along r, so A A^T needs every row: every layer's A slice goes
  into one all-gather (parameter dtype); each rank forms only its own rows of A A^T - I
  (float64: near init the non-squared norm's gradient direction is set by round-off, so an
  fp32 Gram would change it) and of the gradient, and its share of ||A A^T - I||^2.
  (Column partial products would avoid the gather, but no strategy shards by columns.)
- B [out, r]: whole-row blocks (FSDP2 Shard(0); aligned ZeRO-3 partitions): each rank forms
  its r x r partial B_loc^T B_loc; one all-reduce carries all layers' B Grams and A norm
  shares; the gradient rows 2 B_loc (G - I) / ||G - I|| are local. Partitions that cut
  rows: gathered with the A slices.
No host reads: the metrics stay device tensors until a logging step reads them.
Metrics: `reg` (L_orth), `penalty` (coefficient * L_orth), `orth_error_A` / `orth_error_B`
(mean ||A A^T - I|| / ||B^T B - I|| over layers), `rank`, `layers`, `coef`.
State: the adapters and residuals are model parameters (checkpointed by the strategy); the
hook keeps its last values. `distreg adapters merge` folds W = W_res + s B diag(S) A back.
"""
from __future__ import annotations

import os
from fnmatch import fnmatchcase
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distreg.hooks.base import HookContext, ParamShard
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import (
    F64,
    SelectParams,
    ValuesHook,
    add_to_grad,
    plan_routes,
    require_grad_writes,
)
from distreg.hooks.regularizers._matrices import MatrixPlan, make_plan, matrices, own_slice
from distreg.regularizers._dist import active
from distreg.regularizers.sorsa import svd_split

ADAPTER_NAMES = ("sorsa_A", "sorsa_S", "sorsa_B")


class SorsaLinear(nn.Module):
    """y = x W_res^T + scale * ((dropout(x) A^T) * S) B^T + bias, low-rank path never forming
    B diag(S) A. `weight` (the residual) and `bias` are frozen; A, S, B train."""

    def __init__(self, residual: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor,
                 bias: torch.Tensor | None, scale: float, dropout: float = 0.0):
        super().__init__()
        self.out_features, self.in_features = residual.shape
        self.rank, self.scale = S.numel(), scale
        self.weight = nn.Parameter(residual, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sorsa_A = nn.Parameter(A)
        self.sorsa_S = nn.Parameter(S)
        self.sorsa_B = nn.Parameter(B)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(self.dropout(x), self.sorsa_A) * self.sorsa_S
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(low, self.sorsa_B)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale}"


def scale_of(rank: int, alpha: float | None) -> float:
    """The reference's adapter scale: alpha / r, or 1 without alpha."""
    return 1.0 if alpha is None else alpha / rank


def _load_initial(model: nn.Module, path: str) -> None:
    """A distreg checkpoint (directory) or a plain state-dict file, loaded whole."""
    if os.path.isfile(path):
        from distreg.runtime.weights import CheckpointError

        state = torch.load(path, map_location="cpu", weights_only=True)
        own = model.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise CheckpointError(f"sorsa.init_from {path}: does not match the model: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
        model.load_state_dict(state)
        return
    from distreg.runtime.weights import load_into

    load_into(model, path)


@register
class Sorsa(ValuesHook):
    writes_gradients = True  # edits reduced gradients: refused with DeepSpeed fp16 (scaled grads)
    name = "sorsa"
    path_params = ("init_from",)

    class Params(SelectParams):
        include: list[str] = Field(["layers.*.attention.*.weight", "layers.*.feed_forward.*.weight"],
                                   description="fnmatch patterns of nn.Linear weight names to adapt "
                                               "(reference: q,k,v,o,gate,up,down projections)")
        rank: int = Field(128, gt=0, description="adapter rank r (reference scripts: 128)")
        alpha: float | None = Field(None, gt=0, description="scale alpha / r (None: scale 1, reference default)")
        dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input (reference: 0)")
        gamma: float = Field(4e-4, ge=0, description="orthonormal regulariser weight gamma")
        peak_lr: float | None = Field(None, gt=0, description="eta_peak of the code's coefficient gamma / eta_peak "
                                                                "(default: optim.lr); mode code only")
        mode: Literal["code", "decoupled"] = "code"
        init_from: str | None = Field(None, description="pretrained weights: a distreg checkpoint or a state-dict file")
        freeze_others: bool = Field(True, description="freeze every non-adapter parameter (reference)")
        every: int = Field(1, gt=0, description="apply the regulariser on steps s with s % every == 0, its gradient "
                                                "(or decoupled step) x every: the same mean force per step")

    params: "Sorsa.Params"

    def __init__(self, params):
        super().__init__(params)
        self.values: dict[str, float] = {}
        self.layers: list[str] | None = None  # module names of the adapted layers, model order
        self.b_routes: list[str] | None = None
        self.matrix_plan: MatrixPlan | None = None  # A's then B's, made on the first application
        self.pending: list[tuple[ParamShard, torch.Tensor]] = []  # decoupled: local updates of this step
        self.peak_lr = params.peak_lr  # filled from optim.lr at train start when not given

    @property
    def prefix(self) -> str:
        return self.params.metrics_prefix or self.name

    @property
    def scale(self) -> float:
        return scale_of(self.params.rank, self.params.alpha)

    @property
    def coef(self) -> float:
        """Multiplier of L_orth: gamma / peak_lr (code) or gamma (decoupled step size)."""
        p = self.params
        return p.gamma / self.peak_lr if p.mode == "code" and p.gamma > 0 else p.gamma

    # ----------------------------------------------------------------------- model surgery

    def selected(self, model: nn.Module) -> list[str]:
        p = self.params
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and any(fnmatchcase(f"{n}.weight", pat) for pat in p.include)
                 and not any(fnmatchcase(f"{n}.weight", pat) for pat in p.exclude)]
        if not names:
            raise ValueError(f"sorsa: no nn.Linear weight matches include={p.include} exclude={p.exclude}")
        return names

    def prepare_model(self, model: nn.Module, ctx: HookContext) -> None:
        if any(t.is_meta or hasattr(t, "ds_id") for t in model.parameters()):
            raise ValueError("sorsa: the SVD initialisation needs the pretrained weights before sharding; "
                             "model.init_device=meta is not supported (use model.init_device=cpu)")
        if self.params.init_from:
            _load_initial(model, self.params.init_from)
        self.layers = self.selected(model)
        comm = ctx.comm
        for j, name in enumerate(self.layers):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            lin: nn.Linear = getattr(parent, attr)
            parts = self.split(lin.weight, comm, owner=j % comm.world_size, name=name)
            dtype, device = lin.weight.dtype, lin.weight.device
            cast = [t.to(device=device, dtype=dtype, copy=True) for t in parts]
            bias = None if lin.bias is None else lin.bias.detach().clone()
            setattr(parent, attr, SorsaLinear(cast[3], cast[0], cast[1], cast[2], bias, self.scale, self.params.dropout))
        if self.params.freeze_others:
            for pname, p in model.named_parameters():
                if not pname.endswith(ADAPTER_NAMES):
                    p.requires_grad_(False)

    def split(self, weight: torch.Tensor, comm, owner: int, name: str) -> list[torch.Tensor]:
        """[A, S, B, W_res] (float64) of one weight: computed on `owner`, broadcast."""
        out_f, in_f = weight.shape
        r = self.params.rank
        sizes = [r * in_f, r, out_f * r, out_f * in_f]
        shapes = [(r, in_f), (r,), (out_f, r), (out_f, in_f)]
        if min(out_f, in_f) < r:  # checked on every rank: none is left waiting in the broadcast
            raise ValueError(f"sorsa.rank: {r} exceeds min(out, in) = {min(out_f, in_f)} of {name}")
        packed = torch.empty(sum(sizes), dtype=F64)
        if comm.rank == owner or not active(comm):
            res = svd_split(weight, r, self.scale)
            packed.copy_(torch.cat([res.A.reshape(-1), res.S, res.B.reshape(-1), res.residual.reshape(-1)]))
        if active(comm):
            comm.broadcast(packed, src=owner)
        return [t.view(s) for t, s in zip(torch.split(packed, sizes), shapes)]

    # ----------------------------------------------------------------------- regulariser

    def pairs(self, ctx: HookContext) -> list[tuple[ParamShard, ParamShard]]:
        if self.layers is None:
            raise RuntimeError("sorsa: prepare_model has not run")
        by_name = {s.name: s for s in ctx.local_shards()}
        out = []
        for layer in self.layers:
            a, b = by_name.get(f"{layer}.sorsa_A"), by_name.get(f"{layer}.sorsa_B")
            if a is None or b is None:
                raise RuntimeError(f"sorsa: {layer} has no trainable sorsa_A / sorsa_B shard")
            out.append((a, b))
        return out

    def on_train_start(self, ctx: HookContext) -> None:
        pairs = self.pairs(ctx)
        if self.params.mode == "code" and self.params.gamma > 0:
            require_grad_writes([s for pair in pairs for s in pair], ctx, self.name)
            self.peak_lr = self.params.peak_lr or ctx.base_lr
            if self.peak_lr is None:
                raise ValueError("sorsa: peak_lr not given and optim.lr unknown (coefficient gamma / peak_lr)")
        self.b_routes = plan_routes(ctx, [b for _, b in pairs])
        self.matrix_plan = None

    def terms(self, ctx: HookContext) -> tuple[torch.Tensor, torch.Tensor, list[tuple[ParamShard, torch.Tensor]]]:
        """Per layer ||A A^T - I|| and ||B^T B - I|| (float64 [layers] device tensors,
        identical on every rank) and this rank's slices of their gradients. Collectives:
        one all-gather of every layer's A slice (and of B slices that cut rows), one
        all-reduce of the B partial Grams with the A partial norms; each rank forms only
        its own rows of A A^T and of the gradients."""
        pairs = self.pairs(ctx)
        shards = [a for a, _ in pairs] + [b for _, b in pairs]
        if self.matrix_plan is None:
            a_routes = ["gather" if ctx.sharded and not a.replicated else "local" for a, _ in pairs]
            self.matrix_plan = make_plan(ctx, shards, a_routes + self.b_routes)
        plan, n_layers = self.matrix_plan, len(pairs)
        local, whole = matrices(ctx, plan, shards, F64)
        partial, a_parts = [], []  # summed over ranks in one all-reduce
        for j in range(n_layers):  # A: this rank's rows of A A^T - I (rows side, whole A)
            a, (lo, hi) = whole[j], (0, plan.shapes[j][0]) if plan.routes[j] == "local" else plan.rows(j)
            diff = a[lo:hi] @ a.t()
            diff[:, lo:hi].diagonal().sub_(1)
            if plan.routes[j] == "local":
                own = diff
            else:  # rows whose first element is ours carry our share of the norm
                d = plan.shapes[j][1]
                first = -(-plan.starts[j] // d)
                last = -(-(plan.starts[j] + plan.numels[j]) // d) if plan.numels[j] else first
                own = diff[first - lo: max(first, last) - lo]
            a_parts.append(diff)
            partial.append((own * own).sum().reshape(1))
        a_local = [plan.routes[j] == "local" for j in range(n_layers)]
        grams = [local[n_layers + j].t() @ local[n_layers + j] for j in range(n_layers) if local[n_layers + j] is not None]
        flat = torch.cat([g.reshape(-1) for g in grams] + partial)
        if ctx.sharded:
            red = ctx.comm.all_reduce(flat.clone())
            a_sq = torch.where(torch.tensor(a_local, device=flat.device), flat[-n_layers:], red[-n_layers:])
            flat = red
        else:
            a_sq = flat[-n_layers:]
        grams = iter(torch.split(flat[: flat.numel() - n_layers], [g.numel() for g in grams]))
        va, vb, grads = a_sq.sqrt(), [], []
        for j, (a, b) in enumerate(pairs):
            block = (2.0 / torch.where(va[j] > 0, va[j], torch.ones_like(va[j]))) * (a_parts[j] @ whole[j])
            block = torch.where(va[j] > 0, block, torch.zeros_like(block))
            grads.append((a, block.reshape(-1) if plan.routes[j] == "local" else own_slice(plan, j, block)))
            i = n_layers + j
            if plan.routes[i] == "gram":
                g, rows = next(grams).view(plan.shapes[i][1], -1), local[i]
            else:
                rows = whole[i] if plan.routes[i] == "local" else whole[i][slice(*plan.rows(i))]
                g = whole[i].t() @ whole[i]
            diff = g - torch.eye(g.shape[0], dtype=F64, device=g.device)
            value = torch.linalg.matrix_norm(diff)
            block = (2.0 / torch.where(value > 0, value, torch.ones_like(value))) * (rows @ diff)
            block = torch.where(value > 0, block, torch.zeros_like(block))
            vb.append(value)
            grads.append((b, block.reshape(-1) if plan.routes[i] != "gather" else own_slice(plan, i, block)))
        return va, torch.stack(vb), grads

    def after_backward(self, ctx: HookContext) -> None:
        self.pending = []
        if ctx.step % self.params.every:
            return
        va, vb, grads = self.terms(ctx)  # device tensors: read back in metrics() only
        n_mat = 2 * len(va)
        reg = (va.sum() + vb.sum()) / n_mat
        # d(coef * L_orth) = coef / (2L) * sum of the term gradients; x every on due steps
        step = self.coef / n_mat * self.params.every
        if self.params.gamma > 0:
            if self.params.mode == "code":
                for shard, g in grads:
                    add_to_grad(shard, step * g)
            else:
                self.pending = [(shard, step * g) for shard, g in grads]
        self.values = {"reg": reg, "penalty": self.coef * reg, "orth_error_A": va.mean(),
                       "orth_error_B": vb.mean(), "rank": float(self.params.rank),
                       "layers": float(len(va)), "coef": self.coef}

    def after_step(self, ctx: HookContext) -> None:
        # decoupled: W_{t+1} = (optimizer step of W_t) - gamma * grad L_orth(W_t); every rank
        # writes every pending shard (ZeRO-3 writes are collective-safe only that way).
        for shard, delta in self.pending:
            shard.write(shard.data().detach().to(F64) - delta)
        self.pending = []
