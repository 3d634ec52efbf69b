"""Held-out quality of distreg's methods on real text: the Python standard library.

Corpus (offline, on every machine): the `.py` files under `sysconfig.get_paths()['stdlib']`
(tests and site-packages left out), split train / val *by file* (a file's SHA-1 of its
relative path decides; about 1 in 8 goes to val), tokenized as UTF-8 bytes
(`distreg data tokenize --tokenizer bytes`, vocab 257). A noisy copy of the training
split has 20 % of its documents corrupted (characters shuffled within the document)
and each corrupted document written twice; the reweighting methods train on it and are
compared with a dense run on the same noisy data. Every run is evaluated on the same
clean held-out files (`eval:` of the Trainer: loss per token, perplexity, next-token
accuracy).

Runs (tiny Llama, equal steps, batch, lr schedule and seeds; world size 1, in-process,
DDP strategy without Ray - the metrics are world-size independent, tests/test_eval.py):
  dense                      clean data
  gmp50 / gmp90              magnitude_pruning, gradual (cubic) to 50 % / 90 %
  z_loss                     z_loss_logit (kappa 1e-4)
  moe_topk / sinkhorn / sparse_ot   4 experts, top-2 of half-width experts (= the
                             dense FFN's active parameters), routing groups of seq_len
  dense_noisy                noisy data
  linupper / quadratic       loss_reweighting on noisy data
  dro                        dro_reweighting (r = 1) on noisy data
Seeds are interleaved (seed 0: every method, seed 1: every method, ...). The table
(mean and spread over seeds, perplexity ratio against the dense run of the same data)
is printed, written to `<out>/quality.json`, and logged to MLflow as a table artifact
with a plot (tracking URI: $MLFLOW_TRACKING_URI, else sqlite under `<out>`).

    python benchmarks/quality.py              # 12 min on 2 shared cores (--jobs 2)
    python benchmarks/quality.py --quick      # 1 seed, fewer steps: a smoke run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLOW = {"moe_sparse_ot"}  # ~10x a dense step here: fewer seeds (--slow-seeds) to fit the time budget


def stdlib_files(limit: int) -> list[tuple[str, str]]:
    """(relative path, text) of up to `limit` stdlib modules, a deterministic spread."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}
    files = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if skip & set(rel.parts):
            continue
        files.append((hashlib.sha1(str(rel).encode()).hexdigest(), str(rel), p))
    files.sort()  # hash order: a spread over packages, stable across machines
    out = []
    for _, rel, p in files[:limit]:
        try:
            out.append((rel, p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def build_corpus(out: Path, max_files: int, corrupt: float = 0.2, seed: int = 0) -> dict:
    """train / val / train_noisy token datasets under `out` (kept between runs)."""
    from distreg.data.tokenize import tokenize_corpus

    done = out / "corpus.json"
    if done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    docs = stdlib_files(max_files)
    val = [t for rel, t in docs if int(hashlib.sha1(rel.encode()).hexdigest()[-2:], 16) % 8 == 0]
    train = [t for rel, t in docs if int(hashlib.sha1(rel.encode()).hexdigest()[-2:], 16) % 8 != 0]
    rng = random.Random(seed)
    bad = set(rng.sample(range(len(train)), int(corrupt * len(train))))
    noisy = []
    for i, t in enumerate(train):
        if i in bad:
            chars = list(t)
            rng.shuffle(chars)
            noisy += ["".join(chars)] * 2  # corrupted and duplicated
        else:
            noisy.append(t)
    info = {}
    for name, texts in (("train", train), ("val", val), ("train_noisy", noisy)):
        src = out / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        summary = tokenize_corpus(str(src), str(out / name), tokenizer="bytes")
        info[name] = {"documents": len(texts), "tokens": summary["num_tokens"], "path": str(out / name)}
    info["corrupted_documents"] = len(bad)
    done.write_text(json.dumps(info, indent=1))
    return info


def methods(steps: int) -> dict[str, tuple[str, dict]]:
    """name -> (training split, config overrides)."""
    gmp = {"start_step": steps // 5, "end_step": (7 * steps) // 10, "frequency": max(1, steps // 20), "plot": False}

    def hooks(*specs):
        return {"hooks": json.dumps(list(specs))}

    # Routing groups of one rank's micro-batch (16 x 64 tokens; eval forwards hold 2 groups):
    # sparse OT's L-BFGS solves cost ~0.6 s per layer at 16 groups of 64, 0.2 s at one of 1024.
    moe = {"model.moe_num_experts": 4, "model.moe_top_k": 2, "model.moe_ffn_dim": 88, "model.moe_group_size": 1024}
    return {
        "dense": ("train", {}),
        "gmp50": ("train", hooks({"name": "magnitude_pruning", "sparsity": 0.5, **gmp})),
        "gmp90": ("train", hooks({"name": "magnitude_pruning", "sparsity": 0.9, **gmp})),
        "z_loss": ("train", hooks({"name": "z_loss_logit", "kappa": 1e-4})),
        "moe_topk": ("train", {**moe, "model.moe_router": "topk"}),
        "moe_sinkhorn": ("train", {**moe, "model.moe_router": "sinkhorn"}),
        "moe_sparse_ot": ("train", {**moe, "model.moe_router": "sparse_ot"}),
        "dense_noisy": ("train_noisy", {}),
        "linupper": ("train_noisy", hooks({"name": "loss_reweighting", "strategy": "linupper"})),
        "quadratic": ("train_noisy", hooks({"name": "loss_reweighting", "strategy": "quadratic"})),
        "dro": ("train_noisy", hooks({"name": "dro_reweighting", "r": 1.0})),
    }


def run_one(corpus: dict, split: str, overrides: dict, seed: int, steps: int, eval_samples: int, run_dir: Path) -> dict:
    from distreg.config import load_config
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer

    base = {
        "run_dir": str(run_dir), "data.path": corpus[split]["path"], "data.seq_len": 64, "model.vocab_size": 257,
        "train.max_steps": steps, "train.global_batch_size": 16, "train.seed": seed, "train.log_every": 10**6,
        "optim.lr": 3e-3, "optim.warmup_steps": steps // 10, "scaling.num_workers": 1, "strategy.name": "ddp",
        "eval.path": corpus["val"]["path"], "eval.max_samples": eval_samples, "eval.batch_size": 32,
    }
    base.update(overrides)
    cfg = load_config(None, [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in base.items()])
    t0 = time.perf_counter()
    result = Trainer(cfg, Comm(), track=False).fit()
    return {**{k.removeprefix("eval/"): v for k, v in result.eval.items()}, "seconds": time.perf_counter() - t0,
            "train_loss": result.losses[steps]}


def summarize(results: dict[str, list[dict]], splits: dict[str, str]) -> list[dict]:
    rows = []
    for name, runs in results.items():
        base = "dense" if splits[name] == "train" else "dense_noisy"
        row = {"method": name, "train_data": splits[name], "seeds": len(runs)}
        for key in ("loss", "ppl", "accuracy"):
            vals = [r[key] for r in runs]
            row[key] = statistics.mean(vals)
            row[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        # Per-seed ratio against the same seed's baseline (paired).
        ratios = [r["ppl"] / b["ppl"] for r, b in zip(runs, results[base])]
        row["ppl_ratio"] = statistics.mean(ratios)
        row["ppl_ratio_sd"] = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        row["seconds"] = statistics.median(r["seconds"] for r in runs)
        rows.append(row)
    return rows


def format_table(rows: list[dict], info: str) -> str:
    head = (f"{'method':<14} {'train data':<12} {'val loss':>16} {'val ppl':>16} {'val acc':>16} "
            f"{'ppl / base':>15} {'s/run':>6}")
    lines = [info, head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<14} {r['train_data']:<12} {r['loss']:>8.4f} ± {r['loss_sd']:<5.3f} "
                     f"{r['ppl']:>8.3f} ± {r['ppl_sd']:<5.3f} {r['accuracy']:>8.4f} ± {r['accuracy_sd']:<5.3f} "
                     f"{r['ppl_ratio']:>7.4f} ± {r['ppl_ratio_sd']:<5.3f} {r['seconds']:>6.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["tab:blue" if r["train_data"] == "train" else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [r["ppl"] for r in rows], yerr=[r["ppl_sd"] for r in rows], color=colors, capsize=3)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out perplexity (bytes; lower is better)")
    lo = min(r["ppl"] - r["ppl_sd"] for r in rows)
    ax.set_ylim(max(0.0, lo * 0.95), max(r["ppl"] + r["ppl_sd"] for r in rows) * 1.02)
    for i, r in enumerate(rows):
        ax.text(i, r["ppl"], f"{r['ppl_ratio']:.3f}x", ha="center", va="bottom", fontsize=7)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label="clean training data (ratio vs dense)"),
                       Patch(color="tab:orange", label="20% corrupted + duplicated (ratio vs dense_noisy)")],
              fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def log_mlflow(rows: list[dict], out: Path, params: dict, png: Path) -> str:
    import os

    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve()}/mlflow.db")
    mlflow.set_experiment("distreg-quality")
    with mlflow.start_run(run_name="quality") as run:
        mlflow.log_params(params)
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, artifact_file="quality/table.json")
        mlflow.log_artifact(str(png), "quality")
        for r in rows:
            mlflow.log_metrics({f"{r['method']}/val_loss": r["loss"], f"{r['method']}/val_ppl": r["ppl"],
                                f"{r['method']}/val_accuracy": r["accuracy"]})
        return run.info.run_id


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--max-files", type=int, default=400, help="stdlib files in the corpus (train + val)")
    ap.add_argument("--eval-samples", type=int, default=512, help="held-out windows of 64 bytes")
    ap.add_argument("--only", default=None, help="comma-separated methods")
    ap.add_argument("--slow-seeds", type=int, default=1, help=f"seeds of the slow runs ({', '.join(sorted(SLOW))})")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel processes (1 thread each)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 40 steps")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps = 1, 40
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    t0 = time.perf_counter()
    corpus = build_corpus(out / "corpus", args.max_files)
    print(f"corpus: {corpus['train']['documents']} train files ({corpus['train']['tokens']:,} bytes), "
          f"{corpus['val']['documents']} val files ({corpus['val']['tokens']:,} bytes), noisy train "
          f"{corpus['train_noisy']['tokens']:,} bytes ({corpus['corrupted_documents']} corrupted, duplicated) "
          f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    table = methods(args.steps)
    if args.only:
        keep = set(args.only.split(",")) | {"dense", "dense_noisy"}
        table = {k: v for k, v in table.items() if k in keep}
    # Interleaved: every method at seed 0, then seed 1, ...; the slow runs first so that
    # they overlap the others when --jobs > 1. Runs are independent (own run_dir, seed).
    jobs = [(seed, name) for seed in range(args.seeds) for name in table
            if not (name in SLOW and seed >= args.slow_seeds)]
    jobs.sort(key=lambda j: j[1] not in SLOW)
    results: dict[str, dict[int, dict]] = {name: {} for name in table}

    def done(seed: int, name: str, r: dict) -> None:
        results[name][seed] = r
        print(f"seed {seed} {name:<14} val loss {r['loss']:.4f} ppl {r['ppl']:.3f} acc {r['accuracy']:.4f} "
              f"(train {r['train_loss']:.4f}, {r['seconds']:.0f}s)", flush=True)

    def submit(run, seed, name):
        split, overrides = table[name]
        return run(run_one, corpus, split, overrides, seed, args.steps, args.eval_samples,
                   out / "runs" / f"{name}_s{seed}")

    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futures = [(seed, name, submit(pool.submit, seed, name)) for seed, name in jobs]
            for seed, name, f in futures:
                done(seed, name, f.result())
    else:
        for seed, name in jobs:
            done(seed, name, submit(lambda fn, *a: fn(*a), seed, name))
    results = {name: [by_seed[s] for s in sorted(by_seed)] for name, by_seed in results.items()}
    rows = summarize(results, {k: v[0] for k, v in table.items()})
    info = (f"quality: tiny Llama (bytes, vocab 257), {args.steps} steps x 16 x 64 tokens, {args.seeds} seed(s) "
            f"({', '.join(sorted(SLOW))}: {min(args.slow_seeds, args.seeds)}), "
            f"held-out {results['dense'][0]['samples']:.0f} windows of clean stdlib files; mean ± sd over seeds; "
            f"ppl / base = paired ratio to the dense run on the same training data")
    text = format_table(rows, info)
    print(text)
    (out / "quality.json").write_text(json.dumps({"rows": rows, "runs": results, "corpus": corpus}, indent=1))
    (out / "quality.txt").write_text(text + "\n")
    png = out / "quality.png"
    plot(rows, png, f"distreg quality: held-out ppl, {args.steps} steps, {args.seeds} seed(s) (error bars: sd)")
    run_id = log_mlflow(rows, out, {"steps": args.steps, "seeds": args.seeds, "max_files": args.max_files,
                                    "eval_samples": args.eval_samples}, png)
    print(f"wrote {out}/quality.json, {png}; MLflow run {run_id}; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
