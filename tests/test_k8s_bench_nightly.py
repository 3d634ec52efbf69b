"""The nightly CronJob's launcher script -- the text embedded in the ConfigMap of
k8s/bench-nightly-cronjob.yaml -- run by bash against a fake `kubectl` on PATH.

The fake answers like the API server and KubeRay would: `create -f -` stores the RayJob,
`get -o jsonpath=...` evaluates the path against a scripted sequence of RayJob statuses
(or fails like an unreachable API server), `logs job/NAME` prints the submitter's log,
`delete` records the deletion. Every call is logged, so the tests check what the script
did to the cluster, not only its exit status. A real API server and operator are not
available here; the status sequences follow KubeRay v1.7.0's RayJob controller
(jobDeploymentStatus Initializing/Running/Complete/Failed/ValidationFailed, reasons,
messages copied from Ray's job info).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRONJOB = REPO / "k8s" / "bench-nightly-cronjob.yaml"
JOB_NAME, JOB_UID = "distreg-bench-nightly-29412000", "0b6c8a3e-1111-2222-3333-444455556666"
RAYJOB = JOB_NAME + "-ray"

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("jq")),
                                reason="the launcher runs in registry.k8s.io/kubectl, which has bash and jq; "
                                       "this machine lacks one of them")

FAKE_KUBECTL = r'''#!@PYTHON@
"""A scripted kubectl: see tests/test_k8s_bench_nightly.py."""
import json, os, re, sys

root = os.environ["FAKE_KUBECTL_DIR"]
scenario = json.load(open(os.path.join(root, "scenario.json")))
state_path = os.path.join(root, "state.json")
state = json.load(open(state_path)) if os.path.exists(state_path) else {"reads": 0, "creates": 0, "objects": {}}
args = sys.argv[1:]
stdin = sys.stdin.read() if args[:3] == ["create", "-f", "-"] else None
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"args": args, "stdin": stdin}) + "\n")

def save():
    json.dump(state, open(state_path, "w"))

def finish(rc=0, out="", err=""):
    save()
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.exit(rc)

def jsonpath(template, status):
    def one(m):
        token = m.group(1)
        if token.startswith('"'):
            return json.loads(token)
        return str(status.get(token.removeprefix(".status."), ""))
    return re.sub(r"\{([^{}]*)\}", one, template)

verb = args[0]
if verb == "create":
    obj = json.loads(stdin)
    outcomes = scenario.get("create", [])
    outcome = outcomes[min(state["creates"], len(outcomes) - 1)] if outcomes else {}
    state["creates"] += 1
    if outcome.get("stored", outcome.get("rc", 0) == 0):
        state["objects"][obj["metadata"]["name"]] = obj
    if outcome.get("rc", 0):
        finish(outcome["rc"], err=outcome.get("err", "Error from server"))
    finish(out="rayjob.ray.io/%s created\n" % obj["metadata"]["name"])
if verb == "get":
    name = args[2]
    output = args[args.index("-o") + 1]
    if output == "name":
        if name in state["objects"]:
            finish(out="rayjob.ray.io/%s" % name)
        finish(1, err='Error from server (NotFound): rayjobs.ray.io "%s" not found' % name)
    template = output.removeprefix("jsonpath=")
    statuses = scenario["status"]
    if "jobDeploymentStatus" in template:  # a watch read: the next scripted answer
        index = min(state["reads"], len(statuses) - 1)
        state["reads"] += 1
        state["current"] = index
    status = statuses[state.get("current", 0)]
    if "error" in status:
        finish(1, err=status["error"] + "\n")
    finish(out=jsonpath(template, status))
if verb == "logs":
    finish(out=scenario.get("logs", ""))
if verb == "delete":
    state["objects"].pop(args[2], None)
    finish(out='rayjob.ray.io "%s" deleted\n' % args[2])
finish(2, err="fake kubectl: unexpected %r\n" % args)
'''


def launcher_files() -> tuple[str, str]:
    """The script and the RayJob template exactly as the ConfigMap ships them."""
    cm = next(d for d in yaml.safe_load_all(CRONJOB.read_text()) if d["kind"] == "ConfigMap")
    return cm["data"]["bench-nightly.sh"], cm["data"]["rayjob.json"]


class Cluster:
    """A temp dir with the fake kubectl, the scenario and the call log."""

    def __init__(self, tmp_path: Path, scenario: dict):
        self.dir = tmp_path
        (tmp_path / "bin").mkdir()
        kubectl = tmp_path / "bin" / "kubectl"
        kubectl.write_text(FAKE_KUBECTL.replace("@PYTHON@", sys.executable))
        kubectl.chmod(0o755)
        (tmp_path / "scenario.json").write_text(json.dumps(scenario))
        script, template = launcher_files()
        (tmp_path / "bench-nightly.sh").write_text(script)
        (tmp_path / "rayjob.json").write_text(template)
        self.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
                    "FAKE_KUBECTL_DIR": str(tmp_path), "RAYJOB_TEMPLATE": str(tmp_path / "rayjob.json"),
                    "JOB_NAME": JOB_NAME, "JOB_UID": JOB_UID,
                    "POLL_SECONDS": "0", "BACKOFF_SECONDS": "0", "API_GRACE_SECONDS": "30"}

    def run(self, **env) -> subprocess.CompletedProcess:
        # stdout and stderr together, as in the pod's log
        return subprocess.run(["bash", str(self.dir / "bench-nightly.sh")], env={**self.env, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)

    def calls(self) -> list[dict]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def verbs(self, verb: str) -> list[list[str]]:
        return [c["args"] for c in self.calls() if c["args"][0] == verb]

    def created(self) -> list[dict]:
        return [json.loads(c["stdin"]) for c in self.calls() if c["args"][0] == "create"]


def status(deployment="", job="", reason="", message=""):
    return {"jobDeploymentStatus": deployment, "jobStatus": job, "reason": reason, "message": message}


RUNNING = status("Running", "RUNNING")
SUCCEEDED = status("Complete", "SUCCEEDED")
API_DOWN = {"error": "Unable to connect to the server: dial tcp 10.0.0.1:443: i/o timeout"}
TABLE = "| metric | baseline | latest | change | verdict |\n"


def assert_created_once_and_deleted(cluster: Cluster) -> dict:
    (job,) = cluster.created()
    assert cluster.verbs("delete") and cluster.verbs("delete")[-1][:3] == ["delete", "rayjob", RAYJOB]
    return job


def test_api_errors_then_recovery_keep_watching_until_success(tmp_path):
    cluster = Cluster(tmp_path, {"status": [status("Initializing"), API_DOWN, API_DOWN, RUNNING, RUNNING, SUCCEEDED],
                                 "logs": TABLE + "distreg bench compare: no regression\n"})
    result = cluster.run()
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("kubectl get failed") == 2
    assert "succeeded" in result.stdout and "no regression" in result.stdout  # the job's log is relayed
    job = assert_created_once_and_deleted(cluster)
    # Named after the CronJob's Job but not the same: KubeRay names its submitter Job after
    # the RayJob and would mistake the launcher's Job for it. Owned by that Job: Kubernetes
    # collects it with the Job even if this pod dies before its own delete.
    assert job["metadata"]["name"] == RAYJOB
    assert cluster.verbs("logs") == [["logs", f"job/{RAYJOB}", "--tail=200", "--request-timeout=30s"]]
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": JOB_NAME, "uid": JOB_UID}]
    assert job["spec"] == json.loads(launcher_files()[1])["spec"]  # the template, unchanged


def test_persistent_api_outage_gives_up_with_its_own_status(tmp_path):
    cluster = Cluster(tmp_path, {"status": [RUNNING, API_DOWN]})
    result = cluster.run(API_GRACE_SECONDS="0")
    assert result.returncode == 4, result.stdout
    assert "unreachable" in result.stdout


def test_rayjob_deleted_by_someone_else_is_not_retried(tmp_path):
    gone = {"error": f'Error from server (NotFound): rayjobs.ray.io "{RAYJOB}" not found'}
    cluster = Cluster(tmp_path, {"status": [RUNNING, gone]})
    result = cluster.run()  # API_GRACE_SECONDS=30: a retried NotFound would take that long
    assert result.returncode == 3 and "can no longer be read" in result.stdout, result.stdout
    assert result.stdout.count("kubectl get failed") == 1


@pytest.mark.parametrize("final", [
    # The submitter Job failed: jobStatus never left "" -- a jobStatus-only watch spins forever.
    status("Failed", "", "SubmissionFailed", "Job submission has failed. Reason: BackoffLimitExceeded. Message: ..."),
    # No GPU node within the deadline: the Ray job is still RUNNING/PENDING, the RayJob is done.
    status("Failed", "RUNNING", "DeadlineExceeded", "The RayJob has passed the activeDeadlineSeconds."),
    status("ValidationFailed", "", "ValidationFailed", "The RayJob metadata is invalid: ..."),
], ids=["submission-failed", "deadline-exceeded", "validation-failed"])
def test_rayjob_failing_to_deploy_fails_the_cronjob_and_is_cleaned_up(tmp_path, final):
    cluster = Cluster(tmp_path, {"status": [status("Initializing"), status("Initializing"), final]})
    result = cluster.run()
    assert result.returncode == 3, result.stdout
    assert f"reason={final['reason']}" in result.stdout and final["message"][:20] in result.stdout
    assert_created_once_and_deleted(cluster)


def test_first_night_without_baseline_is_a_success_with_a_note(tmp_path):
    """`distreg bench compare` exits 0 with a note when the suite has no earlier run."""
    logs = ("distreg bench: suite run 8f2e... (s3://BUCKET/distreg/bench/nightly-20261207-020000)\n"
            "distreg bench compare: no baseline yet for suite 'nightly' (first run); nothing to compare\n")
    cluster = Cluster(tmp_path, {"status": [status("Initializing"), RUNNING, SUCCEEDED], "logs": logs})
    result = cluster.run()
    assert result.returncode == 0, result.stdout
    assert "NOTE: no baseline yet" in result.stdout
    assert_created_once_and_deleted(cluster)


@pytest.mark.parametrize("code,expected,word", [(1, 1, "REGRESSION"), (2, 2, "usage"), (137, 3, "failed")])
def test_compare_verdicts_map_to_distinct_exit_statuses(tmp_path, code, expected, word):
    message = (f"Job entrypoint command failed with exit code {code}, last available logs "
               "(truncated to 20,000 chars):\n" + TABLE)
    cluster = Cluster(tmp_path, {"status": [RUNNING, status("Complete", "FAILED", "AppFailed", message)],
                                 "logs": TABLE})
    result = cluster.run()
    assert result.returncode == expected, result.stdout
    assert word in result.stdout
    assert "no baseline" not in result.stdout.lower()
    assert_created_once_and_deleted(cluster)


def test_create_that_reached_the_server_before_failing_is_adopted(tmp_path):
    """A create whose response was lost: the RayJob exists under our name; no second one."""
    cluster = Cluster(tmp_path, {"create": [{"rc": 1, "stored": True, "err": "Error from server: etcdserver: request timed out"}],
                                 "status": [RUNNING, SUCCEEDED]})
    result = cluster.run()
    assert result.returncode == 0, result.stdout
    assert "already exists" in result.stdout
    assert len(cluster.created()) == 1


def test_create_refused_fails_without_watching(tmp_path):
    cluster = Cluster(tmp_path, {"create": [{"rc": 1, "err": 'admission webhook "kueue" denied the request'}],
                             "status": [RUNNING]})
    result = cluster.run()
    assert result.returncode == 5 and "could not create" in result.stdout
    assert not [c for c in cluster.verbs("get") if "jsonpath" in " ".join(c)]


def test_terminated_launcher_deletes_its_rayjob(tmp_path):
    """The Job's activeDeadlineSeconds or a node drain sends TERM: the RayJob goes too."""
    cluster = Cluster(tmp_path, {"status": [RUNNING]})
    proc = subprocess.Popen(["bash", str(tmp_path / "bench-nightly.sh")], env={**cluster.env, "POLL_SECONDS": "30"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not [c for c in cluster.verbs("get") if "jsonpath" in " ".join(c)]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert_created_once_and_deleted(cluster)
