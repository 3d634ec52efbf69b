"""Grokking at the edge of numerical stability (Prieto et al. 2025), small: modular addition
(a + b) mod p with a bias-free MLP, full-batch AdamW without weight decay, at equal steps:

- `softmax`: softmax cross-entropy (no regulariser): expected to memorise the training split
  and drift into Softmax Collapse (SC: the softmax sum is exactly 1 in fp32 for many samples,
  whose gradient is then exactly 0);
- `stablemax`: the `stablemax` hook (StableMax CE replaces the loss);
- `perp_grad`: softmax CE with the `perp_grad` hook (⊥Grad on the gradients).

Each run drives the real hooks through the Trainer's event order (forward -> `loss` hooks ->
backward -> `after_backward` hooks -> optimizer step) on a one-process context over the
model; the `collapse_monitor` hook measures SC on the whole training split in the training
precision (fp32), as the reference logger does. Printed: train / test accuracy and the SC
and zero-loss fractions of each run at the end, the peak SC fraction seen at the
evaluations (every `--eval-every` steps) and the step where test accuracy first reached 90 %.

    python benchmarks/grokking.py [--p 61] [--steps 4000] [--train-frac 0.4] [--lr 0.01] [--adam-eps 1e-25]

Reference setup (spec 2.4): p = 113, 40 % train, MLP [200, 200], AdamW lr 0.01, wd 0,
adam eps 1e-25 (with 1e-8 the updates fade as the gradients vanish and logits stop
growing before SC), full batch; StableMax needs long runs (80k epochs there), ⊥Grad groks
in ~300 epochs (MLP). The defaults here (p = 61, 4000 steps) fit in ~4 minutes on 2 cores.
Note that `SC fraction` measures the *softmax* of the logits: a StableMax-trained model may
show softmax collapse without its own (StableMax) gradient vanishing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.config import HookSpec  # noqa: E402
from distreg.hooks.base import HookContext, LossTerms, ParamShard  # noqa: E402
from distreg.hooks.registry import build_hooks  # noqa: E402
from distreg.runtime.comm import Comm  # noqa: E402


class MLP(nn.Module):
    """One-hot(a) ++ one-hot(b) -> 200 -> 200 -> p, ReLU, no biases (reference MLP)."""

    def __init__(self, p: int, width: int = 200):
        super().__init__()
        self.p = p
        self.l1 = nn.Linear(2 * p, width, bias=False)
        self.l2 = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, p, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.one_hot(x[:, 0], self.p), F.one_hot(x[:, 1], self.p)], 1).float()
        return self.out(F.relu(self.l2(F.relu(self.l1(h)))))


def context(model: nn.Module) -> HookContext:
    """What the Trainer gives hooks in one process (replicated whole tensors)."""

    def shards():
        out = []
        for n, p in model.named_parameters():
            out.append(ParamShard(n, p.shape, 0, p.numel(), True, _read=lambda p=p: p.data.view(-1),
                                  _write=lambda v, p=p: p.data.view(-1).copy_(v),
                                  _grad=lambda p=p: None if p.grad is None else p.grad.view(-1),
                                  _write_grad=lambda v, p=p: p.grad.view(-1).copy_(v)))
        return out

    return HookContext(comm=Comm(), strategy="ddp", model=model, shards_fn=shards)


def make_hooks(specs: list[dict]):
    return build_hooks([HookSpec.model_validate(s) for s in specs])


@torch.no_grad()
def evaluate(model, x, y, monitor, ctx) -> tuple[float, float, float]:
    logits = model(x)
    monitor.loss(ctx, logits, {"target": y}, None)
    monitor.after_backward(ctx)
    m = monitor.metrics()
    return float((logits.argmax(-1) == y).float().mean()), m["collapse_monitor/softmax_collapse"], m["collapse_monitor/zero_loss"]


def run(method: str, data, args) -> dict:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(args.seed)
    model = MLP(args.p)
    ctx = context(model)
    hooks = make_hooks({"softmax": [], "stablemax": [{"name": "stablemax", "collapse_metrics": False}],
                        "perp_grad": [{"name": "perp_grad"}]}[method])
    monitor = make_hooks([{"name": "collapse_monitor"}])[0]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, args.beta2), eps=args.adam_eps)
    for h in hooks:
        h.on_train_start(ctx)
    n = len(ytr)
    grokked, sc_peak, t0 = None, (0.0, None), time.perf_counter()
    for step in range(args.steps):
        ctx.step = step
        logits = model(xtr)
        terms = LossTerms(F.cross_entropy(logits, ytr, reduction="none"), torch.full((n,), 1.0 / n), torch.arange(n))
        for h in hooks:
            terms = h.loss(ctx, logits, {"target": ytr}, terms)
        loss = (terms.weight * terms.per_sample).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for h in hooks:
            h.after_backward(ctx)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps - 1:
            test_acc = float((model(xte).argmax(-1) == yte).float().mean())
            if grokked is None and test_acc >= 0.9:
                grokked = step
            sc = evaluate(model, xtr, ytr, monitor, ctx)[1]
            if sc > sc_peak[0]:
                sc_peak = (sc, step)
    train_acc, sc, zero = evaluate(model, xtr, ytr, monitor, ctx)
    test_acc, _, _ = evaluate(model, xte, yte, monitor, ctx)
    return {"method": method, "loss": float(loss.detach()), "train_acc": train_acc, "test_acc": test_acc, "sc": sc,
            "zero_loss": zero, "grokked_at": grokked, "sc_peak": sc_peak, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=int, default=61)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--train-frac", type=float, default=0.4)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--adam-eps", type=float, default=1e-25, help="the reference default (spec 2.4)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="softmax,stablemax,perp_grad")
    args = ap.parse_args()
    torch.set_num_threads(1)

    g = torch.Generator().manual_seed(args.seed)
    pairs = torch.cartesian_prod(torch.arange(args.p), torch.arange(args.p))
    labels = (pairs[:, 0] + pairs[:, 1]) % args.p
    perm = torch.randperm(len(labels), generator=g)
    cut = int(args.train_frac * len(labels))
    data = ((pairs[perm[:cut]], labels[perm[:cut]]), (pairs[perm[cut:]], labels[perm[cut:]]))
    print(f"modular addition mod {args.p}: {cut} train / {len(labels) - cut} test pairs, MLP [200, 200], "
          f"full-batch AdamW lr {args.lr} wd 0, {args.steps} steps each")
    rows = [run(m, data, args) for m in args.methods.split(",")]
    print(f"\n| method | final train loss | train acc | test acc | SC fraction (train, fp32) | zero-loss fraction "
          f"| peak SC fraction (at step) | test acc >= 90 % at step | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peak, at = r["sc_peak"]
        print(f"| {r['method']} | {r['loss']:.3g} | {r['train_acc']:.3f} | {r['test_acc']:.3f} | {r['sc']:.3f} | "
              f"{r['zero_loss']:.3f} | {peak:.3f} ({at if at is not None else '-'}) | "
              f"{r['grokked_at'] if r['grokked_at'] is not None else 'never'} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
