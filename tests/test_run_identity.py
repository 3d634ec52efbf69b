"""One run per job, on local disk and on an S3-compatible store (moto's server):
run identity and lineage, the run_dir lock (second job refused, stale lock taken over),
checkpoints loaded as data only, the restart decision made on rank 0, replayed steps
not logged twice, a run whose end was lost closed by `mlflow-sync`."""
from __future__ import annotations

import io
import json
import os
import pickle
import time

import pytest
import torch

from distreg.runs import identity as ident
from distreg.runs.lock import LOCK_FILE, RunDirLocked, RunLock
from distreg.runtime import checkpoint as ckpt
from distreg.runtime import storage
from distreg.testing import run_distributed


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A place for run_dirs: a local folder or a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("s3_endpoint")
    from tests.s3server import new_bucket

    return new_bucket()


def _complete_checkpoint(ckpt_dir: str, step: int, lineage: dict) -> str:
    path = ckpt.step_path(ckpt_dir, step)
    ckpt.save_torch(storage.join(path, "trainer.pt"), {"step": step, "world_size": 1, "run": lineage})
    ckpt.write_bytes_atomic(storage.join(path, ckpt.MARKER), f"{step}\n".encode())
    return path


def test_run_identity_fresh_refused_and_resumed(root):
    run_dir = storage.join(root, "run")
    ckpt_dir = storage.join(run_dir, "checkpoints")
    first = ident.open_run(run_dir, ckpt_dir, resume=False)
    assert first.start_checkpoint is None and len(first.run_id) == 32
    assert ident.read_record(run_dir)["run_id"] == first.run_id
    # A plain re-run into the used run_dir is refused, naming the run and what to do.
    with pytest.raises(ident.RunDirInUse, match=f"already holds run {first.run_id}.*--resume"):
        ident.open_run(run_dir, ckpt_dir, resume=False)
    # The lineage travels in the checkpoint: it wins over run.json (here: rewritten by hand).
    first.mlflow_run_id = "mlflow-abc"
    path = _complete_checkpoint(ckpt_dir, 3, first.lineage())
    storage.write_text(storage.join(run_dir, ident.RUN_FILE), json.dumps({"run_id": "someone-else"}))
    resumed = ident.open_run(run_dir, ckpt_dir, resume=True)
    assert (resumed.run_id, resumed.mlflow_run_id) == (first.run_id, "mlflow-abc")
    assert (resumed.start_step, resumed.start_checkpoint) == (3, path)
    # Checkpoints without a run.json (another run's checkpoints in checkpoint.dir) also refuse a fresh run.
    other = storage.join(root, "other")
    _complete_checkpoint(storage.join(other, "checkpoints"), 5, {"run_id": "x"})
    with pytest.raises(ident.RunDirInUse, match="checkpoints of an earlier run, latest checkpoint step 5"):
        ident.open_run(other, storage.join(other, "checkpoints"), resume=False)


def test_second_job_on_a_run_dir_is_refused_and_a_stale_lock_taken_over(root):
    run_dir = storage.join(root, "locked")
    with RunLock(run_dir) as held:
        with pytest.raises(RunDirLocked, match=f"held by pid {os.getpid()}.*heartbeat"):
            RunLock(run_dir).acquire()
        assert json.loads(storage.read_text(held.url))["token"] == held.token
    assert not storage.exists(storage.join(run_dir, LOCK_FILE))  # released
    # A driver that was SIGKILLed never releases: its heartbeat stops and the lock expires.
    storage.write_text(storage.join(run_dir, LOCK_FILE),
                       json.dumps({"token": "dead", "owner": "job gone", "heartbeat": time.time() - 3600}))
    with pytest.warns(UserWarning, match="taking over a stale lock of job gone"):
        lock = RunLock(run_dir).acquire()
    lock.release()


class _Planted:
    """What an attacker with write access to the bucket would plant in a state file."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/distreg-pwned-by-checkpoint",))


def test_checkpoint_state_loads_as_data_only(root):
    marker = "/tmp/distreg-pwned-by-checkpoint"
    if os.path.exists(marker):
        os.remove(marker)
    good = storage.join(root, "step/trainer.pt")
    ckpt.save_torch(good, {"step": 7, "rng": torch.get_rng_state(), "hooks": [{"t": torch.ones(2)}], "run": {"x": None}})
    state = ckpt.load_torch(good)
    assert state["step"] == 7 and state["hooks"][0]["t"].device.type == "cpu"
    bad = storage.join(root, "step/rank_00000.pt")
    ckpt.write_bytes_atomic(bad, pickle.dumps({"rng": _Planted()}))  # a plain pickle ...
    with pytest.raises(pickle.UnpicklingError, match="rank_00000.pt: refused to load"):
        ckpt.load_torch(bad)
    buf = io.BytesIO()
    torch.save({"rng": _Planted()}, buf)  # ... and one in torch's own zip format
    ckpt.write_bytes_atomic(bad, buf.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="refused to load"):
        ckpt.load_torch(bad)
    assert not os.path.exists(marker)  # nothing ran


def _decide_with_rank0_late(ckpt_dir: str) -> tuple[int, str | None]:
    """Rank 0 decides late; meanwhile rank 1 completes a checkpoint, as a restarted
    group's straggler could. Deciding per rank from the file system would split the
    group (rank 1: fresh, rank 0: resume); decided on rank 0 and broadcast, never."""
    import torch.distributed as dist

    from distreg.launch import decide_start
    from distreg.runtime.comm import Comm

    comm = Comm()

    def choose():
        if comm.rank == 0:
            time.sleep(2.0)
        found = ckpt.latest_checkpoint(ckpt_dir)
        return found[1] if found else None

    if comm.rank == 1:
        # Without the broadcast this rank would have chosen by now (no checkpoint yet).
        import threading

        t = threading.Thread(target=lambda: (time.sleep(0.5), _complete_checkpoint(ckpt_dir, 4, {"run_id": "r"})))
        t.start()
    start = decide_start(comm, choose)
    if comm.rank == 1:
        t.join()
    dist.barrier()
    return comm.rank, start


def test_restart_decision_is_the_same_on_every_rank(tmp_path):
    ckpt_dir = str(tmp_path / "checkpoints")
    got = run_distributed(_decide_with_rank0_late, 2, ckpt_dir)
    assert got[0][1] == got[1][1] == ckpt.step_path(ckpt_dir, 4)  # rank 0 (late) saw it; rank 1 follows


def test_replayed_steps_are_not_logged_twice_and_sync_closes_a_lost_end(tmp_path):
    from mlflow.tracking import MlflowClient

    from distreg.testing import free_port
    from distreg.tracking.mlflow_tracker import FALLBACK, MlflowTracker, close_run, open_run, sync_fallback

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = str(tmp_path / "run")
    run_id = open_run(uri, "dedupe", None, {"a": 1}, {}, "a: 1\n", None, run_dir)
    first = MlflowTracker(run_dir, uri, "dedupe", None)
    first.start({}, {}, "", run_id=run_id)
    for step in range(1, 6):  # the attempt that died after step 5 (checkpoint at 3)
        first.log_metrics(step, {"train/loss": float(step)})
    first.finish()
    second = MlflowTracker(run_dir, uri, "dedupe", None)
    second.start({}, {}, "", run_id=run_id)  # the restarted group replays 4, 5, then 6..8
    for step in range(4, 9):
        second.log_metrics(step, {"train/loss": float(step)})
    second.finish()
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, 9))
    assert client.get_run(run_id).info.status == "RUNNING"  # attached trackers never close the driver's run
    # The end is lost in an outage: kept in the fallback file, closed by mlflow-sync.
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(UserWarning, match="kept for `distreg mlflow-sync`"):
        close_run(dead, run_id, "KILLED", run_dir)
    assert json.loads(storage.read_text(storage.join(run_dir, FALLBACK)))["kind"] == "end"
    assert sync_fallback(run_dir, uri) == 1
    assert client.get_run(run_id).info.status == "KILLED"


def test_hook_files_of_an_object_store_run_dir_land_under_it(s3_endpoint, token_data):
    """Hooks write plots with plain file APIs; with run_dir on S3 they are staged locally
    and copied under run_dir (never into a local folder named 's3:')."""
    from distreg.runtime.trainer import Trainer
    from tests.conftest import tiny_config
    from tests.s3server import new_bucket

    run_dir = f"{new_bucket()}/run"
    cfg = tiny_config(token_data, run_dir, **{"scaling.num_workers": 1, "strategy.name": "ddp", "train.max_steps": 2,
                                              "hooks": "[{name: loss_reweighting, plot_every: 2}]"})
    Trainer(cfg, track=False).fit()
    assert storage.exists(storage.join(run_dir, "reweighting/loss_reweighting_step00000002.png"))
    assert storage.exists(storage.join(run_dir, "summary.json"))
    assert not os.path.exists("s3:")
