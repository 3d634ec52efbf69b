"""One job per run_dir at a time: a lock object on the run's own storage.

`<run_dir>/.distreg.lock` holds the owner (job, host, pid), a random token and a
heartbeat the driver refreshes every `HEARTBEAT_S`. A second job finds a fresh lock and
is refused with the owner's name. A job that died without releasing (driver SIGKILLed,
node lost) leaves a lock whose heartbeat stops: after `STALE_AFTER_S` it is taken over,
with a warning, so a crash never blocks the directory for good.

Object stores offer no create-if-absent that every S3-compatible server honours, so the
claim is write-then-read-back: of two jobs racing for a free lock both write, both wait
`SETTLE_S`, and only the one whose token survived (the last writer) goes on; the same
code works on a local or shared filesystem.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings

from distreg.runtime import storage

LOCK_FILE = ".distreg.lock"
HEARTBEAT_S = float(os.environ.get("DISTREG_LOCK_HEARTBEAT_S", 30))
STALE_AFTER_S = float(os.environ.get("DISTREG_LOCK_STALE_S", 300))
SETTLE_S = 1.0


class RunDirLocked(RuntimeError):
    """Another live job holds the run_dir."""


def ray_job_id() -> str | None:
    """The submission id when this process is a `ray job submit` entrypoint, else None
    (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR only there; the id is in its metadata)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id") or "ray-job"
    except (ValueError, AttributeError):
        return "ray-job"


def owner_description() -> str:
    job = ray_job_id()
    return f"{'job ' + job + ' ' if job else ''}pid {os.getpid()} on {socket.gethostname()}"


class RunLock:
    def __init__(self, run_dir: str):
        self.url = storage.join(run_dir, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self.owner = owner_description()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        text = storage.read_text(self.url)
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return None  # a torn write of a dead job: treat as free

    def _write(self) -> None:
        record = {"token": self.token, "owner": self.owner, "heartbeat": time.time()}
        storage.write_text(self.url, json.dumps(record) + "\n")

    def acquire(self) -> "RunLock":
        held = self._read()
        if held:
            age = time.time() - held["heartbeat"]
            if age < STALE_AFTER_S:
                raise RunDirLocked(self._busy(held, age))
            warnings.warn(f"{self.url}: taking over a stale lock of {held['owner']} (no heartbeat for {age:.0f}s)")
        self._write()
        time.sleep(SETTLE_S)
        held = self._read()
        if not held or held["token"] != self.token:
            raise RunDirLocked(self._busy(held or {"owner": "another job", "heartbeat": time.time()}, 0.0))
        self._thread = threading.Thread(target=self._heartbeat, name="distreg-run-lock", daemon=True)
        self._thread.start()
        return self

    def _busy(self, held: dict, age: float) -> str:
        return (f"run_dir is in use: {self.url} is held by {held['owner']} (heartbeat {age:.0f}s ago); two jobs "
                f"must not write one run. Wait for it to end, or, if it is gone, remove the lock (it expires "
                f"{STALE_AFTER_S:.0f}s after the last heartbeat)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                held = self._read()
                if held and held["token"] == self.token:
                    self._write()
            except Exception as e:  # noqa: BLE001 - a storage hiccup must not kill the driver
                warnings.warn(f"{self.url}: heartbeat failed: {e}")

    def release(self) -> None:
        self._stop.set()
        try:
            held = self._read()
            if held and held["token"] == self.token:
                storage.remove(self.url)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"{self.url}: could not release the lock: {e}")

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
