"""One run identity per job.

`<run_dir>/run.json` names the run that owns the directory: `run_id` (fresh per new
job), `mlflow_run_id`, `tracking_uri`. Every checkpoint carries the same record in its
`trainer.pt` ("lineage"), so a resume continues the run its checkpoint came from even if
`run.json` was lost or rewritten.

A plain run (no `--resume`) into a run_dir that already holds a run (run.json or a
complete checkpoint) is refused: a new run never adopts another run's checkpoints or
MLflow run, and a fresh run_dir per run keeps every run's files apart. `--resume` (and
Ray Train's automatic restarts) continue the same run: same run id, same MLflow run,
same checkpoint lineage.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass

from distreg.runtime import checkpoint as ckpt
from distreg.runtime import storage

RUN_FILE = "run.json"
MLFLOW_ID_FILE = "mlflow_run_id"  # kept beside run.json for scripts that read it


class RunDirInUse(RuntimeError):
    """A plain (not --resume) run into a run_dir that already holds a run."""


@dataclass
class RunIdentity:
    run_id: str
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    created: float = 0.0
    # Where this job starts: None (fresh) or a complete checkpoint, decided once by the driver.
    start_checkpoint: str | None = None
    start_step: int = 0

    def lineage(self) -> dict:
        """The record a checkpoint carries."""
        return {"run_id": self.run_id, "mlflow_run_id": self.mlflow_run_id, "tracking_uri": self.tracking_uri}


def read_record(run_dir: str) -> dict | None:
    text = storage.read_text(storage.join(run_dir, RUN_FILE))
    return json.loads(text) if text else None


def write_record(run_dir: str, identity: RunIdentity) -> None:
    record = {k: v for k, v in asdict(identity).items() if k not in ("start_checkpoint", "start_step")}
    storage.write_text(storage.join(run_dir, RUN_FILE), json.dumps(record, indent=1) + "\n")
    if identity.mlflow_run_id:
        storage.write_text(storage.join(run_dir, MLFLOW_ID_FILE), identity.mlflow_run_id + "\n")


def checkpoint_lineage(path: str) -> dict | None:
    """The run record saved in a checkpoint's trainer state (None for older checkpoints)."""
    return ckpt.load_torch(storage.join(path, "trainer.pt")).get("run")


def open_run(run_dir: str, checkpoint_dir: str, resume: bool) -> RunIdentity:
    """Decide, once and in the driver, which run this job is and where it starts."""
    record = read_record(run_dir)
    found = ckpt.latest_checkpoint(checkpoint_dir)
    if not resume:
        if record or found:
            owner = f"run {record['run_id']}" if record else "checkpoints of an earlier run"
            at = f", latest checkpoint step {found[0]} in {checkpoint_dir}" if found else ""
            raise RunDirInUse(
                f"run_dir {run_dir} already holds {owner}{at}: pass --resume to continue it, or give this run "
                "its own directory (--set run_dir=...); a new run never reuses another run's checkpoints or MLflow run")
        identity = RunIdentity(run_id=uuid.uuid4().hex, created=time.time())
        write_record(run_dir, identity)
        return identity
    lineage = checkpoint_lineage(found[1]) if found else None
    source = lineage or record
    if source is None:  # --resume of an empty run_dir: a fresh run
        identity = RunIdentity(run_id=uuid.uuid4().hex, created=time.time())
    else:
        identity = RunIdentity(run_id=source["run_id"], mlflow_run_id=source.get("mlflow_run_id"),
                               tracking_uri=source.get("tracking_uri"),
                               created=(record or {}).get("created", time.time()))
    if found:
        identity.start_step, identity.start_checkpoint = found
    write_record(run_dir, identity)
    return identity
