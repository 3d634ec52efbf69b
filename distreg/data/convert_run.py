"""Running a conversion (tokenize, imagenet-to-shards) as a list of deterministic tasks:
in this process, in a local process pool, or as Ray tasks spread over a cluster's nodes.

Why Ray tasks over a fixed task plan rather than Ray Data: the output must be
bit-identical to the local run whatever the number of workers, and a re-run after a
crash must redo only what is missing. Both hold when the driver cuts the input into
tasks deterministically (sorted files, fixed byte budget / sample order) and each task
writes its own, deterministically named shards plus a completion record. Ray Data's
blocks depend on its parallelism and autoscaling, its writers name files by block and
write no completion records, so neither property would survive.

Each task runs the same function on every backend; the backends differ only in where
it runs. At most `max_in_flight` tasks are submitted at a time (bounded driver memory,
and a restart loses little), and `SPREAD` scheduling puts them on every node.

Atomic writes: `atomic_write` renames a temporary file on local disks; on object stores
an object becomes visible only when its upload is complete (PUT / complete-multipart),
so a plain write is already atomic. A task writes its record last, so "record present
and matching the plan" means "task complete".
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterator

from fsspec.implementations.local import LocalFileSystem

# Environment a conversion's Ray tasks need to reach the same storage as the driver:
# endpoints and fsspec settings, never credentials (workers use their own identity:
# instance role, workload identity, or the cluster's environment).
FORWARDED_ENV_PREFIXES = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "FSSPEC_", "DISTREG_")


def atomic_write(fs, path: str, data: bytes) -> None:
    """Write `path` so that readers see either nothing or all of `data`."""
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def use_ray(flag: bool) -> bool:
    """`--ray`, or a cluster named by RAY_ADDRESS (as inside `ray job submit`)."""
    return flag or bool(os.environ.get("RAY_ADDRESS"))


def _init_ray():
    import ray

    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env} if env else None,
                 log_to_driver=False)
    return ray


def _call(fn, task):
    import ray

    return fn(task), ray.get_runtime_context().get_node_id()


def run_tasks(fn: Callable, tasks: list, backend: str = "local", processes: int = 1,
              max_in_flight: int | None = None) -> Iterator[tuple[int, object, str]]:
    """Run `fn(task)` for every task; yields (task position, result, where) as tasks
    finish (any order). backend: "local" (this process, or `processes` spawned
    processes) or "ray" (the cluster of RAY_ADDRESS, or a new local one)."""
    if not tasks:
        return
    if backend == "ray":
        ray = _init_ray()
        remote = ray.remote(_call).options(scheduling_strategy="SPREAD", num_cpus=1, max_retries=3)
        limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: dict = {}
        queue = list(enumerate(tasks))[::-1]
        while queue or pending:
            while queue and len(pending) < limit:
                i, t = queue.pop()
                pending[remote.remote(fn, t)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                result, node = ray.get(ref)
                yield pending.pop(ref), result, node
        return
    if processes > 1 and len(tasks) > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads / fsspec loops
        limit = max_in_flight or 2 * processes
        with ProcessPoolExecutor(min(processes, len(tasks)), mp_context=ctx) as pool:
            futures, queue = {}, list(enumerate(tasks))[::-1]
            while queue or futures:
                while queue and len(futures) < limit:
                    i, t = queue.pop()
                    futures[pool.submit(fn, t)] = i
                done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                for f in done:
                    yield futures.pop(f), f.result(), "pool"
        return
    for i, t in enumerate(tasks):
        yield i, fn(t), "driver"


class Progress:
    """Files, bytes and tokens/images done, rate and ETA: printed every `every` seconds
    (and at the end); logged to MLflow when `mlflow_uri` is given (long jobs)."""

    def __init__(self, what: str, unit: str, total_files: int, total_bytes: int, every: float = 10.0,
                 mlflow_uri: str | None = None, mlflow_experiment: str = "distreg-data", out=sys.stderr):
        self.what, self.unit, self.every, self.out = what, unit, every, out
        self.total_files, self.total_bytes = total_files, max(total_bytes, 1)
        self.files = self.bytes = self.units = 0
        self.start = self.last = time.monotonic()
        self._mlflow, self._run_id, self._step = None, None, 0
        if mlflow_uri:
            from mlflow.tracking import MlflowClient

            self._mlflow = MlflowClient(mlflow_uri)
            exp = self._mlflow.get_experiment_by_name(mlflow_experiment)
            exp_id = exp.experiment_id if exp else self._mlflow.create_experiment(mlflow_experiment)
            self._run_id = self._mlflow.create_run(exp_id, run_name=what).info.run_id

    def skip(self, files: int, nbytes: int, units: int) -> None:
        """Work found complete from an earlier run (not counted in the rate)."""
        self.total_files -= files
        self.total_bytes = max(self.total_bytes - nbytes, 1)

    def add(self, files: int, nbytes: int, units: int) -> None:
        self.files, self.bytes, self.units = self.files + files, self.bytes + nbytes, self.units + units
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.report()

    def stats(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.bytes / elapsed
        return {"files_done": self.files, "files_total": self.total_files, "bytes_done": self.bytes,
                f"{self.unit}_done": self.units, "mb_per_s": rate / 2**20, f"{self.unit}_per_s": self.units / elapsed,
                "eta_s": max(self.total_bytes - self.bytes, 0) / rate if rate > 0 else float("nan")}

    def report(self, final: bool = False) -> None:
        s = self.stats()
        print(f"{self.what}: {s['files_done']}/{s['files_total']} files, {s['bytes_done'] / 2**20:.1f} MiB, "
              f"{s[f'{self.unit}_done']} {self.unit}, {s['mb_per_s']:.2f} MiB/s, "
              f"{s[f'{self.unit}_per_s']:.0f} {self.unit}/s" + ("" if final else f", ETA {s['eta_s']:.0f} s"),
              file=self.out, flush=True)
        if self._mlflow is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            self._mlflow.log_batch(self._run_id, [Metric(f"data/{k}", float(v), ts, self._step)
                                                  for k, v in s.items() if v == v])
            self._step += 1

    def close(self, status: str = "FINISHED") -> None:
        self.report(final=True)
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._run_id, status)
