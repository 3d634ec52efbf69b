"""Deployment files stay consistent with the code: Dockerfile pins agree with
pyproject, every KubeRay manifest has the structure we rely on, and its image tag,
config paths and GPU counts agree with the repository."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from distreg.config import load_config

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"distreg:{VERSION}"
IMAGE_ROOT = "/home/ray/distreg/"  # WORKDIR of docker/Dockerfile


def pinned(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(rf"{re.escape(name)}(\[[^\]]*\])?(==|>=)([\w.]+)", dep)
        if m:
            return m.group(3)
    raise KeyError(name)


# ---- Dockerfiles ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_pins_agree_with_pyproject(name):
    text = (REPO / "docker" / name).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    assert args["TORCH_VERSION"] == pinned("torch") == "2.14.1"
    assert args["TORCHVISION_VERSION"] == pinned("torchvision")
    assert args["RAY_VERSION"].startswith(pinned("ray").rsplit(".", 1)[0])  # ray>=2.60,<2.61
    assert args["DEEPSPEED_VERSION"].startswith("0.19.")
    assert PYPROJECT["project"]["requires-python"] == ">=3.10" and args["PYTHON_VERSION"] == "3.11"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")  # the image runs as a non-root user
    assert re.search(r"^RUN pip install \.(\[test\])?\"?$", text.replace('".[test]"', ".[test]"), re.M)


# ---- KubeRay manifests: the CRD fields we rely on -----------------------------------------
# A schema is {field: type | nested schema | [item schema]}; fields not listed are errors
# at the levels listed (a typo in a CRD field is silently ignored by some operators).
POD_TEMPLATE = dict  # core/v1 PodTemplateSpec: checked separately below
HEAD = {"rayStartParams": dict, "template": POD_TEMPLATE}
WORKER = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
          "rayStartParams": dict, "template": POD_TEMPLATE}
CLUSTER_SPEC = {"rayVersion": str, "authOptions": {"mode": str}, "headGroupSpec": HEAD, "workerGroupSpecs": [WORKER]}
JOB_SPEC = {"entrypoint": str, "runtimeEnvYAML": str, "shutdownAfterJobFinishes": bool,
            "ttlSecondsAfterFinished": int, "activeDeadlineSeconds": int, "backoffLimit": int,
            "submissionMode": str, "rayClusterSpec": CLUSTER_SPEC}
SCHEMAS = {
    ("ray.io/v1", "RayCluster"): CLUSTER_SPEC,
    ("ray.io/v1", "RayJob"): JOB_SPEC,
    ("ray.io/v1", "RayCronJob"): {"schedule": str, "suspend": bool, "jobTemplate": JOB_SPEC},
}


def check(node, schema, path: str) -> None:
    if isinstance(schema, list):
        assert isinstance(node, list) and node, f"{path}: expected a non-empty list"
        for i, item in enumerate(node):
            check(item, schema[0], f"{path}[{i}]")
    elif isinstance(schema, dict):
        assert isinstance(node, dict), f"{path}: expected a mapping"
        unknown = set(node) - set(schema)
        assert not unknown, f"{path}: fields not in the CRD subset we use: {sorted(unknown)}"
        for key, sub in schema.items():
            if key in node:
                check(node[key], sub, f"{path}.{key}")
    else:
        assert isinstance(node, schema), f"{path}: expected {schema.__name__}, got {node!r}"


def documents():
    for path in sorted((REPO / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            yield path.name, doc
            if doc["kind"] == "ConfigMap":  # the CronJob's embedded RayJob
                for key, text in doc["data"].items():
                    yield f"{path.name}:{key}", yaml.safe_load(text)


DOCS = list(documents())


def cluster_specs():
    for name, doc in DOCS:
        spec = doc.get("spec", {})
        if doc["kind"] == "RayCluster":
            yield name, spec, None
        elif doc["kind"] == "RayJob":
            yield name, spec["rayClusterSpec"], spec["entrypoint"]
        elif doc["kind"] == "RayCronJob":
            yield name, spec["jobTemplate"]["rayClusterSpec"], spec["jobTemplate"]["entrypoint"]


def containers(cluster_spec):
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name,doc", DOCS, ids=[n for n, _ in DOCS])
def test_manifest_structure(name, doc):
    key = (doc["apiVersion"], doc["kind"])
    if key in SCHEMAS:
        check(doc["spec"], SCHEMAS[key], f"{name}:spec")


def test_every_kind_we_promise_is_there():
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap", "Role", "RoleBinding"} <= kinds
    cron = next(doc for _, doc in DOCS if doc["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # no overlapping reruns
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] == "distreg-bench"


@pytest.mark.parametrize("name,spec,entrypoint", list(cluster_specs()), ids=[n for n, *_ in cluster_specs()])
def test_clusters_agree_with_repo(name, spec, entrypoint):
    assert spec["rayVersion"] == "2.60.0" and spec["rayVersion"].startswith(pinned("ray"))
    assert spec["authOptions"]["mode"] == "token"
    for c in containers(spec):
        assert c["image"] == IMAGE, f"{name}: {c['name']} uses {c['image']}, the repo builds {IMAGE}"
    secret_keys = set(yaml.safe_load((REPO / "k8s/secrets.example.yaml").read_text())["stringData"])
    for c in containers(spec):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "distreg-secrets" and ref["key"] in secret_keys, f"{name}: {ref}"
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        gpus = int(group["rayStartParams"]["num-gpus"])
        for c in pod["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == gpus
        if "volumes" in pod:  # GPU pods need a big /dev/shm for NCCL and loaders
            assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
    if entrypoint is None:
        return
    for command in entrypoint.split("&&"):
        words = shlex.split(command)
        assert words[0] == "distreg", command
        target = next(w for w in words if w.endswith(".yaml"))
        assert target.startswith(IMAGE_ROOT), f"{name}: {target} is not inside the image's repo copy"
        local = REPO / target.removeprefix(IMAGE_ROOT)
        assert local.exists(), f"{name}: {local} does not exist in the repo"
        if words[1] == "bench":
            from distreg.bench import load_suite

            for entry in load_suite(str(local)).runs:
                assert (REPO / entry.config).exists(), f"{local.name}: {entry.config}"
        if words[1] == "train":
            sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
            cfg = load_config(str(local), sets)  # the config and its overrides validate
            total_gpus = sum(g["replicas"] * int(g["rayStartParams"]["num-gpus"]) for g in spec["workerGroupSpecs"])
            assert cfg.scaling.num_workers * cfg.scaling.gpus_per_worker == total_gpus, name
            assert cfg.scaling.use_gpu


def test_job_upload_keeps_every_package_file_and_drops_local_data(tmp_path):
    """`distreg submit` uploads the working dir minus UPLOAD_EXCLUDES, matched the way
    Ray matches them: the package (incl. `distreg/data/`) must travel, `data/` must not."""
    from pathlib import Path

    from ray._private.runtime_env.packaging import _get_excludes

    from distreg.submit import UPLOAD_EXCLUDES

    repo = Path(__file__).resolve().parents[1]
    excluded = _get_excludes(repo, UPLOAD_EXCLUDES)
    package = [p for p in (repo / "distreg").rglob("*.py")]
    assert any("/data/" in str(p) for p in package)
    assert not [p for p in package if excluded(p)]
    for local in ("data/quickstart_tokens", "runs/x", ".git", "mlruns"):
        assert excluded(repo / local), local
