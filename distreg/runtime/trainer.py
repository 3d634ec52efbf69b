"""The training loop: one loop for every strategy, hooks at fixed events.

Per optimizer step:
  fetch this rank's micro-batches -> global loss denominator (one all-reduce)
  for each micro-batch: forward -> per-sample losses -> `loss` hooks -> backward
  `after_backward` hooks -> clip + optimizer step (strategy) -> `after_step` hooks
  -> metrics (rank 0, queued to MLflow) -> checkpoint when due.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from distreg.config import RunConfig
from distreg.data import build_data
from distreg.data.device_input import model_input
from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import build_hooks
from distreg.models import build_model, materialize
from distreg.models.moe import check_moe_setup, moe_layers, moe_penalties
from distreg.runtime import checkpoint as ckpt
from distreg.runtime.compile import compile_blocks
from distreg.runtime.comm import Comm
from distreg.runtime.evaluate import Evaluator
from distreg.runtime.inner import inner_loss_fn
from distreg.runtime.precision import check_precision
from distreg.runtime.loss import StepCounts, known_counts, local_counts, per_sample_loss, reduction_weights
from distreg.runtime.step_metrics import StepMetricBuffer
from distreg.runtime import storage
from distreg.runtime.strategies import build_strategy
from distreg.runtime.weights import init_shards_from
from distreg.tracking.progress import Progress


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> global step loss
    step_times: list[float] = field(default_factory=list)  # seconds, this process's steps
    tokens_per_s: list[float] = field(default_factory=list)  # per logging interval, all ranks
    tokens_per_s_per_device: list[float] = field(default_factory=list)
    mfu: list[float] = field(default_factory=list)  # per logging interval (runtime/mfu.py)
    peak_device_mem_gb: float | None = None
    final_step: int = 0
    checkpoint: str | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    eval: dict[str, float] = field(default_factory=dict)  # the latest held-out metrics (eval:)
    summary: dict | None = None  # rank 0: what summary.json holds (returned to the driver through Ray)


@dataclass
class JobLink:
    """What the launcher decided for this worker group (all ranks get the same):
    the run's lineage, the checkpoint to start from, and where saved checkpoints are
    reported (Ray Train)."""

    run: dict  # {"run_id", "mlflow_run_id", "tracking_uri"}: travels in every checkpoint
    start_checkpoint: str | None = None  # None: from step 0
    on_checkpoint: object = None  # callable(path, step), called on every rank after a save


class Trainer:
    def __init__(self, cfg: RunConfig, comm: Comm | None = None, device: torch.device | None = None,
                 track: bool = True):
        self.cfg = cfg
        self.comm = comm or Comm()
        self.device = device or torch.device("cpu")
        self.is_main = self.comm.rank == 0
        if self.comm.world_size != cfg.scaling.num_workers:
            raise ValueError(f"scaling.num_workers={cfg.scaling.num_workers} but {self.comm.world_size} ranks are running")
        torch.manual_seed(cfg.train.seed)  # identical on every rank: hooks key their randomness on it
        check_moe_setup(cfg, self.comm.world_size)  # MoE checks that need the world size (no-op when dense)
        check_precision(cfg)  # also for configs that did not come through load_config

        self.hooks = build_hooks(cfg.hooks)
        self.strategy = build_strategy(cfg, self.comm, self.device)
        lazy = cfg.model.init_device == "meta"
        model = self.strategy.create_model(
            lambda device, init: build_model(cfg.model, cfg.train.seed, device, init), lazy)
        self.ctx = HookContext(comm=self.comm, strategy=cfg.strategy.name, model=model,
                               grad_accum_steps=cfg.train.grad_accum_steps, run_dir=hook_files_dir(cfg.run_dir),
                               model_config=cfg.model)
        for hook in self.hooks:
            hook.prepare_model(model, self.ctx)
        model.activation_checkpointing = cfg.strategy.activation_checkpointing
        if cfg.strategy.compile:  # per transformer block, before the strategy wraps / shards
            compile_blocks(model, cfg.strategy.compile_backend, verbose=self.is_main)
        self.strategy.setup(model)
        self.ctx.model, self.ctx.shards_fn, self.ctx.sharded = self.strategy.module, self.strategy.local_shards, self.strategy.sharded
        self.ctx.lr_fn, self.ctx.base_lr = self.strategy.lr, cfg.optim.lr
        if lazy:
            materialize(self.strategy.local_shards(), cfg.train.seed, cfg.model.init_std)
        if cfg.model.init_from:
            init_shards_from(self.strategy.local_shards(), cfg.model.init_from)
        # MoE layers leave their router aux / z losses on the module after each forward;
        # train_step adds them to the penalties (empty for dense models).
        self.moe_layers = [m for _, m in moe_layers(self.strategy.module)]

        self.data = build_data(cfg, self.comm.rank, self.comm.world_size, self.comm)
        self.ctx.num_samples = getattr(self.data, "num_samples", None)
        # The data position of the steps run so far; while the next step's batches are
        # prefetched, the data source is one step ahead (`_prefetch` keeps the position).
        self._prefetched, self._data_consumed = None, None
        self.ctx.epoch_fn = lambda: self._data_consumed[1] if self._data_consumed else getattr(self.data, "epoch", 0)
        self.evaluator = Evaluator(cfg, self.comm, self.device) if cfg.eval.enabled else None
        self.step = 0
        self.step_metrics = StepMetricBuffer(self.comm, self.device)
        self.tracker = None
        if track and self.is_main:
            from distreg.tracking.mlflow_tracker import MlflowTracker

            t = cfg.tracking
            self.tracker = MlflowTracker(cfg.run_dir, t.uri, t.experiment, t.run_name)

    # -- one optimizer step ------------------------------------------------------------
    def train_step(self) -> tuple[float, float, StepCounts]:
        """One step, then its metrics read back: (global step loss, grad norm, global
        counts). For tests and tools; `fit` uses `step_on_device` and reads metrics back
        only on logging steps."""
        self.step_on_device(metrics_due=True)  # the caller reads hook metrics after every step
        (rec,), _ = self.step_metrics.flush()
        return rec.loss, rec.grad_norm, StepCounts(rec.tokens, rec.samples)

    def _to_device(self, batches: list[dict]) -> list[dict]:
        """Host -> device copies: pinned and non-blocking on CUDA, all micro-batches issued
        up front so the copy of micro-batch m+1 overlaps the compute of micro-batch m."""
        # uint8 image inputs travel as uint8 and are normalised after the copy (model_input).
        if self.device.type != "cuda":
            return [{k: model_input(v, self.device) if k == "input" else v.to(self.device) for k, v in b.items()}
                    for b in batches]
        return [{k: model_input(v.pin_memory(), self.device, True) if k == "input"
                 else v.pin_memory().to(self.device, non_blocking=True) for k, v in b.items()} for b in batches]

    def _next_batches(self) -> list[dict]:
        """This step's micro-batches on the device: prefetched during the previous step,
        or fetched now."""
        if self._prefetched is None:
            return self._to_device(self.data.next_step())
        batches, stream = self._prefetched
        self._prefetched, self._data_consumed = None, None
        if stream is not None:  # the copies ran on a side stream: order them before this step's kernels
            torch.cuda.current_stream().wait_stream(stream)
            for b in batches:
                for v in b.values():
                    v.record_stream(torch.cuda.current_stream())
        return batches

    def _prefetch(self) -> None:
        """Fetch the next step's micro-batches and issue their copies (pinned, non-blocking,
        on a side stream on CUDA) while this step's device work is still queued. The data
        source then is one step ahead: the position of the steps run so far is kept for
        checkpoints (`save`) and hooks (`ctx.epoch`)."""
        self._data_consumed = (self.data.state_dict(), getattr(self.data, "epoch", 0))
        host = self.data.next_step()
        stream = None
        if self.device.type == "cuda":
            stream = getattr(self, "_copy_stream", None) or torch.cuda.Stream(self.device)
            self._copy_stream = stream
            with torch.cuda.stream(stream):
                batches = self._to_device(host)
        else:
            batches = self._to_device(host)
        self._prefetched = (batches, stream)

    def step_on_device(self, metrics_due: bool | None = None, prefetch: bool = False) -> None:
        """One optimizer step with no host read: the loss, gradient norm and counts stay
        on the device in `self.step_metrics` (flushed by `_log` on logging steps).
        Collectives besides the strategy's own: none when the data guarantees the counts
        (packed token windows), else one all-reduce of the counts before the forward.
        `prefetch`: fetch and copy the next step's batches at the end of this one (`fit`,
        when a next step follows)."""
        cfg, world = self.cfg, self.comm.world_size
        micro_batches = self._next_batches()
        known = known_counts(self.data, cfg.train.global_batch_size, getattr(cfg.data, "seq_len", None))
        local = None
        if known is not None:
            denom = float(known[0] if cfg.train.loss_reduction == "token" else known[1])
        else:
            local = local_counts(micro_batches)
            glob = self.comm.all_reduce(local.clone())
            denom = glob[0] if cfg.train.loss_reduction == "token" else glob[1]  # stays on the device
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        upcoming = self.step + 1
        self.ctx.metrics_due = (upcoming % cfg.train.log_every == 0 or upcoming == cfg.train.max_steps
                                if metrics_due is None else metrics_due)
        if cfg.model.kind == "mae":  # masked image modeling: keyed random masks (models/mae.py)
            from distreg.models.mae import add_random_masks

            micro_batches = add_random_masks(micro_batches, cfg.model.mae, cfg.train.seed, self.step)
        for hook in self.hooks:  # e.g. hpm: masks chosen by a predicted loss
            micro_batches = hook.prepare_batches(self.ctx, micro_batches)
        adversarial = [h for h in self.hooks if h.adversarial]
        if adversarial:  # inner maximisation before the real passes (hooks/base.py: `adversarial`)
            loss_fn = inner_loss_fn(self.strategy, cfg.train.loss_reduction, denom)
            for hook in adversarial:
                hook.inner_step(self.ctx, micro_batches, loss_fn)
        for m, batch in enumerate(micro_batches):
            last = m == len(micro_batches) - 1
            self.ctx.micro_step = m
            with self.strategy.accumulation_context(last):
                for hook in self.hooks:
                    hook.before_forward(self.ctx, batch)
                out = self.strategy.model(batch["input"], *([batch["visible"]] if "visible" in batch else []))
                terms = LossTerms(per_sample_loss(out, batch["target"]),
                                  reduction_weights(batch["target"], cfg.train.loss_reduction, denom), batch["index"])
                if self.moe_layers:
                    # This rank's shares of the global aux / z losses, * world like the sample loss.
                    terms.penalties.update(moe_penalties(self.moe_layers, world))
                for hook in self.hooks:
                    terms = hook.loss(self.ctx, out, batch, terms)
                sample_part = (terms.weight * terms.per_sample).sum()
                penalty = sum(terms.penalties.values(), torch.zeros((), device=self.device))
                # The strategies average gradients over ranks, hence * world; penalties
                # count once per optimizer step, hence / grad_accum.
                self.strategy.backward(sample_part * world + penalty / len(micro_batches), last)
            step_loss += sample_part.detach().double() + penalty.detach().double() / (len(micro_batches) * world)
        for hook in self.hooks:
            hook.after_backward(self.ctx)
        grad_norm = self.strategy.step()
        self.step += 1
        self.ctx.step = self.step
        for hook in self.hooks:
            hook.after_step(self.ctx)
        self.step_metrics.add(self.step, step_loss, grad_norm, local, known)
        if prefetch:
            self._prefetch()

    # -- the loop ------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_at: int | None = None, job: JobLink | None = None) -> TrainResult:
        """Train to `train.max_steps` (or stop early after step `stop_at`, as a
        preemption would, checkpointing there). `job`: set by the launcher (the run's
        identity and start point); without it the Trainer owns its MLflow run and
        `resume` takes the latest complete checkpoint."""
        cfg = self.cfg
        self.job = job
        last = min(cfg.train.max_steps, stop_at or cfg.train.max_steps)
        result = TrainResult()
        if self.tracker is not None:
            from distreg.tracking.mlflow_tracker import run_tags

            result.mlflow_run_id = self.tracker.start(cfg.flat(), run_tags(cfg.strategy.name, self.comm.world_size),
                                                      cfg.to_yaml(), run_id=job.run.get("mlflow_run_id") if job else None)
            result.tracking_uri = self.tracker.uri
            self.ctx.artifact_fn = self.tracker.log_artifact
        if job is not None:
            if job.start_checkpoint:
                self._resume(job.start_checkpoint)
        elif resume:
            self._resume()
        for hook in self.hooks:
            hook.on_train_start(self.ctx)
        progress = Progress(cfg.train.max_steps, self.step, cfg.train.log_every, enabled=self.is_main)
        status = "FAILED"
        try:
            while self.step < last:
                t0 = time.perf_counter()
                self.step_on_device(prefetch=self.step + 1 < last)
                result.step_times.append(time.perf_counter() - t0)  # host time (the device may run behind)
                every = cfg.checkpoint.every
                checkpoint_due = bool(every and self.step % every == 0) or self.step == last
                # A checkpoint also flushes the metrics buffered since the last logging
                # step: a restart resumes after it, so steps up to it are never re-run
                # and their losses must be in MLflow before a crash can drop the buffer.
                self._log(result, progress, last, flush=checkpoint_due)
                if self.evaluator is not None and self.evaluator.due(self.step, last):
                    result.eval = self.evaluator.run_logged(self.strategy, self.step, self.tracker, progress)
                if checkpoint_due:
                    result.checkpoint = self.save()
            self.wait_for_checkpoint()
            status = "FINISHED"
        finally:
            progress.close()
            sync_hook_files(self.ctx.run_dir, cfg.run_dir)
            if self.tracker is not None:
                self.tracker.finish(status)
        result.final_step = self.step
        if self.is_main:
            result.summary = write_summary(storage.join(cfg.run_dir, "summary.json"), result, cfg,
                                           self.comm.world_size, run_id=job.run["run_id"] if job else None)
        return result

    def _log(self, result: TrainResult, progress: Progress, last: int, flush: bool = False) -> None:
        """On logging steps (train.log_every, checkpoint steps, the last step) only: read the interval's
        metrics back (one all-reduce, one host read), record every buffered step's loss in
        `result` and MLflow (`train/loss` per step, sent now), throughput over the interval."""
        if not (flush or self.step % self.cfg.train.log_every == 0 or self.step == last):
            return
        records, elapsed = self.step_metrics.flush()
        if not records:
            return
        dt = elapsed / len(records)  # mean step time of the interval
        tokens, samples = sum(r.tokens for r in records), sum(r.samples for r in records)
        for r in records:
            result.losses[r.step] = r.loss
        result.tokens_per_s.append(tokens / max(elapsed, 1e-12))
        perf = self._throughput_metrics(tokens / max(elapsed, 1e-12))
        result.tokens_per_s_per_device.append(perf["train/tokens_per_s_per_device"])
        if "train/mfu" in perf:
            result.mfu.append(perf["train/mfu"])
        result.peak_device_mem_gb = perf.get("train/peak_device_mem_gb")
        rec = records[-1]
        extra = "".join(f"  {label} {perf[k]:{fmt}}" for k, label, fmt in
                        (("train/mfu", "mfu", ".1%"), ("train/peak_device_mem_gb", "mem", ".1f")) if k in perf)
        progress.update(self.step, rec.loss, (tokens if self.data.unit == "tok" else samples) / max(elapsed, 1e-12),
                        self.data.unit + "/s", extra + ("GiB" if "train/peak_device_mem_gb" in perf else ""))
        if self.tracker is None:
            return
        for r in records[:-1]:
            self.tracker.log_metrics(r.step, {"train/loss": r.loss, "train/grad_norm": r.grad_norm})
        metrics = {"train/loss": rec.loss, "train/lr": self.strategy.lr(), "train/grad_norm": rec.grad_norm,
                   "train/step_time_s": dt, "train/samples_per_s": samples / max(elapsed, 1e-12)}
        if self.data.unit == "tok":
            metrics["train/tokens_per_s"] = tokens / max(elapsed, 1e-12)
            metrics.update(perf)
        metrics.update(self.data.metrics())
        for hook in self.hooks:
            metrics.update(hook.metrics())
        self.tracker.log_metrics(self.step, metrics)

    def _throughput_metrics(self, tokens_per_s: float) -> dict[str, float]:
        """train/tokens_per_s_per_device, train/mfu (when the peak is known) and
        train/peak_device_mem_gb (CUDA) for an interval's global token rate."""
        from distreg.runtime import mfu

        if not hasattr(self, "_mfu_inputs"):
            self._mfu_inputs = (mfu.model_flops_per_token(self.cfg),
                                mfu.peak_flops(mfu.device_name(self.device), self.cfg.train.peak_tflops))
        flops, peak = self._mfu_inputs
        per_device = tokens_per_s / self.comm.world_size
        out = {"train/tokens_per_s_per_device": per_device}
        if flops and peak:
            out["train/mfu"] = per_device * flops / peak
        mem = mfu.peak_memory_gb(self.device)
        if mem is not None:
            out["train/peak_device_mem_gb"] = mem
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def save(self) -> str:
        job = getattr(self, "job", None)
        # The run's lineage travels in the checkpoint: a resume continues this run (same
        # run id, same MLflow run) even if run.json beside it is gone.
        lineage = job.run if job else {"run_id": None, "mlflow_run_id": self.tracker.run_id if self.tracker else None}
        data_state = self._data_consumed[0] if self._data_consumed else self.data.state_dict()  # not the prefetched step's
        trainer_state = {"step": self.step, "data": data_state, "world_size": self.comm.world_size,
                         "config": self.cfg.model_dump(mode="json"), "run": lineage}
        if self.evaluator is not None and self.evaluator.last_step == self.step:
            trainer_state["eval"] = dict(self.evaluator.last)  # checkpoint.keep_best ranks on it
        rank_state = {"rng": ckpt.rng_state(), "hooks": [h.state_dict() for h in self.hooks]}
        if self.cfg.checkpoint.async_:
            # Background write, COMPLETE once every rank's upload is done. Not reported to
            # Ray Train (it would register a checkpoint before it is complete): a restart
            # finds it on storage once complete (launch._start_checkpoint).
            path = self._async_checkpointer().save(self.cfg.checkpoint_dir, self.step, self.strategy, trainer_state,
                                                   rank_state, self.cfg.checkpoint.keep_last,
                                                   self.cfg.checkpoint.keep_best)
            sync_hook_files(self.ctx.run_dir, self.cfg.run_dir)
            return path
        path = ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.step, self.strategy, trainer_state, rank_state,
                                    self.comm, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_best)
        sync_hook_files(self.ctx.run_dir, self.cfg.run_dir)
        if job is not None and job.on_checkpoint is not None:
            job.on_checkpoint(path, self.step)
        return path

    def _async_checkpointer(self):
        if getattr(self, "_async_ckpt", None) is None:
            import tempfile

            from distreg.runtime.async_checkpoint import AsyncCheckpointer

            # A rank-local staging folder: under a local run_dir, or a temporary one when
            # run_dir is a URL (never inside the hook-files folder that is synced to it).
            stage = (tempfile.mkdtemp(prefix="distreg-ckpt-stage-") if storage.is_url(self.cfg.run_dir)
                     else os.path.join(self.cfg.run_dir, ".checkpoint_stage"))
            self._async_ckpt = AsyncCheckpointer(self.comm, stage)
        return self._async_ckpt

    def wait_for_checkpoint(self) -> None:
        """Block until an asynchronous save in flight is complete (no-op otherwise)."""
        if getattr(self, "_async_ckpt", None) is not None:
            self._async_ckpt.wait()

    def _resume(self, path: str | None = None) -> None:
        """Restore from `path` (decided by the launcher, the same on every rank) or, for a
        standalone Trainer, the latest complete checkpoint."""
        if path is None:
            found = ckpt.latest_checkpoint(self.cfg.checkpoint_dir)
            if found is None:
                if self.is_main:
                    print(f"--resume: no complete checkpoint under {self.cfg.checkpoint_dir}; starting from step 0")
                return
            path = found[1]
        trainer_state, rank_state = ckpt.load_checkpoint(path, self.strategy, self.comm)
        self.step = self.ctx.step = trainer_state["step"]
        self.data.load_state_dict(trainer_state["data"])
        self._prefetched, self._data_consumed = None, None
        ckpt.set_rng_state(rank_state["rng"])
        for hook, state in zip(self.hooks, rank_state["hooks"]):
            hook.load_state_dict(state)
        if self.is_main:
            print(f"resumed from {path} (step {self.step})")


def hook_files_dir(run_dir: str) -> str:
    """Where hooks write their files (plots, reports): run_dir itself when local; for an
    object-store run_dir a local staging folder that `sync_hook_files` copies under
    run_dir at every checkpoint and at the end (hooks write with plain file APIs)."""
    if not storage.is_url(run_dir):
        return run_dir
    import tempfile

    return tempfile.mkdtemp(prefix="distreg-hook-files-")


def sync_hook_files(local_dir: str, run_dir: str) -> None:
    if local_dir == run_dir or not os.path.isdir(local_dir) or not os.listdir(local_dir):
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.put(local_dir.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)


def write_summary(path: str, result: TrainResult, cfg: RunConfig, world_size: int, run_id: str | None = None) -> dict:
    """`<run_dir>/summary.json` (run_dir may be a URL): what scripts read after a run;
    also returned, for the driver to get through Ray."""
    summary = summary_dict(result, cfg, world_size, run_id)
    storage.write_text(str(path), json.dumps(summary, indent=1))
    return summary


def summary_dict(result: TrainResult, cfg: RunConfig, world_size: int, run_id: str | None = None) -> dict:
    """What a run reports at its end (summary.json, and to the driver through Ray)."""
    import resource

    times = sorted(result.step_times) or [float("nan")]
    summary = {
        "final_step": result.final_step,
        "final_loss": result.losses.get(result.final_step),
        "strategy": cfg.strategy.name, "world_size": world_size,
        "step_time_p50_s": times[len(times) // 2], "step_time_p90_s": times[int(0.9 * (len(times) - 1))],
        "tokens_per_s": statistics.median(result.tokens_per_s) if result.tokens_per_s else None,
        "tokens_per_s_per_device": (statistics.median(result.tokens_per_s_per_device)
                                    if result.tokens_per_s_per_device else None),
        "mfu": statistics.median(result.mfu) if result.mfu else None,
        "peak_device_mem_gb": result.peak_device_mem_gb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "run_id": run_id, "mlflow_run_id": result.mlflow_run_id, "checkpoint": result.checkpoint,
        "losses": {str(k): v for k, v in sorted(result.losses.items())[-100:]},
        "eval": result.eval,
    }
    return summary


def worker_device(cfg: RunConfig) -> torch.device:
    """The device Ray Train assigned to this worker (right with gpus_per_worker > 1 and
    whatever CUDA_VISIBLE_DEVICES Ray set); LOCAL_RANK outside Ray Train (spawned tests)."""
    if not (cfg.scaling.use_gpu and torch.cuda.is_available()):
        return torch.device("cpu")
    import ray

    if ray.is_initialized():  # a Ray Train worker: Ray picked the GPU (ray.get_gpu_ids())
        from ray.train.torch import get_device

        device = get_device()
    else:  # a process spawned by distreg.testing / torchrun
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def train_worker(config: dict, resume: bool = False, track: bool = True, stop_at: int | None = None,
                 job: JobLink | None = None) -> TrainResult:
    """Entry point on every rank (Ray Train worker or a spawned test process); the
    process group is already initialised by the launcher."""
    cfg = RunConfig.model_validate(config)
    device = worker_device(cfg)
    return Trainer(cfg, Comm(), device, track=track).fit(resume=resume, stop_at=stop_at, job=job)
