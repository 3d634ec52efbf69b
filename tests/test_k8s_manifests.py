"""The Kubernetes manifests deploy: every k8s/ manifest is valid against KubeRay v1.7.0's
CRD schemas (unknown fields rejected, as the API server's strict field validation does)
and the core kinds against Kubernetes' own schemas (kubernetes-validate); the committed
files are what k8s/render.py renders; and what the manifests say agrees with the
repository -- one image, configs that exist and validate, GPU and CPU counts that add
up, the same object-store identity and MLflow credentials on the driver and workers,
absolute output locations writable by the image's user.

What this cannot show: pods actually scheduling and running (no cluster, no GPU here).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
MANIFEST_DIRS = [K8S, K8S / "shared-volume"]
# The KubeRay CRDs ship beside the repository (CI clones shared/ next to it);
# DISTREG_SHARED points elsewhere (a worktree).
SHARED = Path(os.environ.get("DISTREG_SHARED", REPO.parent / "shared"))
CRD_DIR = SHARED / "k8s" / "kuberay-crds-v1.7.0"
IMAGE_REPO_ROOT = "/home/ray/distreg/"  # WORKDIR of docker/Dockerfile
VALUES = yaml.safe_load((K8S / "values" / "site.yaml").read_text())
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def manifest_files() -> list[Path]:
    return sorted(p for d in MANIFEST_DIRS for p in d.glob("*.yaml"))


def load_documents():
    """(label, document) for every manifest, plus the RayJob embedded in the nightly ConfigMap."""
    for path in manifest_files():
        rel = path.relative_to(K8S).as_posix()
        for doc in yaml.safe_load_all(path.read_text()):
            yield rel, doc
            if doc["kind"] == "ConfigMap":
                for key, text in doc["data"].items():
                    if key.endswith(".json"):
                        yield f"{rel}:{key}", json.loads(text)


DOCS = list(load_documents())
IDS = [f"{label}:{doc['kind']}" for label, doc in DOCS]
RAY_DOCS = [(label, doc) for label, doc in DOCS if doc["apiVersion"].startswith("ray.io/")]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_templates(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]


# ---- schemas ------------------------------------------------------------------------------
def _strict(schema):
    """A CRD's openAPIV3Schema with unknown fields rejected: every object with `properties`
    and no `additionalProperties` / `x-kubernetes-preserve-unknown-fields` is closed."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict(v) if k != "required" else v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay v1.7.0 CRDs not found at {CRD_DIR} (clone shared/ beside the repo "
                    "or set DISTREG_SHARED)")
    validators = {}
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        # libyaml's loader: the three CRDs are 56k lines (seconds with the pure-Python one)
        crd = next(d for d in yaml.load_all(path.read_text(), Loader=FAST_LOADER) if d)
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{crd['spec']['group']}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def test_crd_validation_rejects_unknown_fields(crd_validators):
    """The validator is strict: a misspelt field anywhere in a pod template is an error."""
    _, doc = next((label, d) for label, d in RAY_DOCS if d["kind"] == "RayJob")
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerration"] = []
    errors = list(crd_validators[("ray.io/v1", "RayJob")].iter_errors(bad))
    assert any("tolerration" in e.message for e in errors), errors
    bad = copy.deepcopy(doc)
    bad["spec"]["authOptions"] = {"mode": "token"}  # belongs in rayClusterSpec
    assert list(crd_validators[("ray.io/v1", "RayJob")].iter_errors(bad))


@pytest.mark.parametrize("label,doc", RAY_DOCS, ids=[f"{lb}:{d['kind']}" for lb, d in RAY_DOCS])
def test_kuberay_documents_match_crd_schema(label, doc, crd_validators):
    key = (doc["apiVersion"], doc["kind"])
    assert key in crd_validators, f"{label}: no KubeRay v1.7.0 CRD for {key}"
    errors = sorted(crd_validators[key].iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{label}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


# Kubernetes versions: the oldest this needs (CronJob.spec.timeZone is GA in 1.27; the Job
# pod labels batch.kubernetes.io/* the launcher reads exist since 1.27) and the newest known.
K8S_VERSIONS = ["1.29.0", "1.37.0"]


@pytest.mark.parametrize("label,doc", [(lb, d) for lb, d in DOCS if not d["apiVersion"].startswith("ray.io/")],
                         ids=[i for i, (lb, d) in zip(IDS, DOCS) if not d["apiVersion"].startswith("ray.io/")])
def test_core_documents_are_valid_kubernetes(label, doc):
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_ray_pod_templates_are_valid_pod_templates():
    """The pod templates inside the KubeRay kinds, against core/v1's own (strict) schema."""
    import kubernetes_validate

    for label, doc in RAY_DOCS:
        for group, template in pod_templates(cluster_spec(doc)):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
            kubernetes_validate.validate(wrapped, K8S_VERSIONS[0], strict=True)


def test_kuberay_rules_the_schema_does_not_express():
    """Checks KubeRay's operator makes (ray-operator/controllers/ray/utils/validation.go, v1.7.0)."""
    dns1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for label, doc in RAY_DOCS:
        name = doc["metadata"]["name"]
        limit = 53 if doc["kind"] == "RayCluster" else 47  # RayJob: its cluster gets a 6-char suffix
        assert dns1035.match(name) and len(name) <= limit, f"{label}: name {name!r}"
        spec = cluster_spec(doc)
        major, minor, _ = map(int, spec["rayVersion"].split("."))
        assert spec["authOptions"]["mode"] == "token" and (major, minor) >= (2, 52), label
        for g in spec["workerGroupSpecs"]:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{label}: {g['groupName']}"
    # The nightly launcher names RayJobs <its Job>-ray, the Job being <CronJob>-<8-digit minute>.
    cron = next(d for _, d in DOCS if d["kind"] == "CronJob")
    assert len(cron["metadata"]["name"]) + len("-29412000-ray") <= 47


def test_committed_manifests_are_rendered_from_values():
    """k8s/*.yaml are outputs of k8s/render.py: hand edits would be lost, so none may exist."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    rendered = render.texts(K8S / "values" / "site.yaml")
    committed = {p.relative_to(K8S).as_posix() for p in manifest_files()}
    assert committed == set(rendered), "k8s/ holds files render.py does not write (or misses some)"
    stale = [rel for rel, text in rendered.items() if (K8S / rel).read_text() != text]
    assert not stale, f"stale, run `python k8s/render.py`: {stale}"


# ---- the repository's side -----------------------------------------------------------------
def test_one_registry_qualified_image_everywhere():
    image = VALUES["image"]
    registry, _, rest = image.partition("/")
    assert "." in registry or ":" in registry, f"{image}: no registry host"
    assert rest.endswith(f"distreg:{PYPROJECT['project']['version']}"), image
    images = {c["image"] for _, doc in RAY_DOCS for _, t in pod_templates(cluster_spec(doc))
              for c in t["spec"]["containers"]}
    assert images == {image}
    # The only other image is the kubectl launcher's, and the image name appears nowhere else.
    cron = next(d for _, d in DOCS if d["kind"] == "CronJob")
    launcher = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert launcher["image"] == VALUES["kubectl_image"]
    assert launcher["image"].startswith("registry.k8s.io/kubectl:v")  # the Kubernetes project's image
    assert launcher["command"][0] == "/bin/bash"  # its entrypoint is kubectl itself
    for path in manifest_files():
        for line in path.read_text().splitlines():
            if "image" in line and ":" in line and "distreg:" in line:
                assert image in line, f"{path.name}: {line.strip()}"


def test_driver_and_workers_share_identity_and_credentials():
    """The driver runs on the head: it reads and writes run_dir like the workers, so it needs
    the same ServiceAccount (workload identity) and the same Secret-provided variables."""
    secret = next(d for _, d in DOCS if d["kind"] == "Secret")
    sa = next(d for _, d in DOCS if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == VALUES["service_account"])
    assert sa["metadata"]["annotations"] == VALUES["service_account_annotations"]
    for label, doc in RAY_DOCS:
        templates = dict(pod_templates(cluster_spec(doc)))
        identities = {(t["spec"]["serviceAccountName"], json.dumps(t["spec"]["containers"][0]["env"], sort_keys=True))
                      for t in templates.values()}
        assert len(identities) == 1, f"{label}: head and workers differ in identity or environment"
        (account, env_json), = identities
        assert account == VALUES["service_account"]
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in json.loads(env_json)}
        for name, ref in env.items():
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"] or ref.get("optional"), f"{label}: {name} -> {ref['key']}"
        assert not env["MLFLOW_TRACKING_URI"].get("optional")
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"} <= set(env)
        if not label.startswith("shared-volume/"):
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)


def test_head_schedules_no_ray_work_and_gpu_pods_land_on_gpu_nodes():
    node = VALUES["gpu_node"]
    for label, doc in RAY_DOCS:
        spec = cluster_spec(doc)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", label
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) == node["gpus"]
            assert pod["nodeSelector"] == node["node_selector"]
            assert pod["tolerations"] == node["tolerations"]
            shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
            assert shm["emptyDir"]["medium"] == "Memory"


def _entrypoint_commands(doc: dict) -> list[list[str]]:
    return [shlex.split(part) for part in doc["spec"]["entrypoint"].split("&&")]


def _overrides(words: list[str]) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


def _load(config: Path, sets: list[str]):
    from distreg.config import RunConfig, load_config

    # `run_dir_shared` is the runtime's declaration that a local run_dir is on a volume
    # every node mounts; until that key exists in this checkout it cannot be validated.
    if "run_dir_shared" not in RunConfig.model_fields:
        sets = [s for s in sets if not s.startswith("run_dir_shared=")]
    return load_config(str(config), sets)


def _is_absolute(path: str) -> bool:
    return path.startswith("/") or re.match(r"^(s3|gs)://[^/]+/.+", path) is not None


TRAIN_JOBS = [(label, doc) for label, doc in RAY_DOCS
              if doc["kind"] == "RayJob" and _entrypoint_commands(doc)[0][1] == "train"]


@pytest.mark.parametrize("label,doc", TRAIN_JOBS, ids=[lb for lb, _ in TRAIN_JOBS])
def test_training_jobs_agree_with_their_config(label, doc):
    (words,) = _entrypoint_commands(doc)
    target = words[2]
    assert target.startswith(IMAGE_REPO_ROOT), f"{label}: {target} is not in the image's copy of the repo"
    config = REPO / target.removeprefix(IMAGE_REPO_ROOT)
    assert config.is_file(), f"{label}: {config} does not exist"
    sets = _overrides(words)
    assert not [s for s in sets if s.startswith("scaling.")], "the config's scaling is the one that runs"
    cfg = _load(config, sets)
    spec = cluster_spec(doc)
    (group,) = spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    s = cfg.scaling
    assert s.use_gpu and s.num_workers * s.gpus_per_worker == group["replicas"] * gpus_per_pod, \
        f"{label}: config wants {s.num_workers} x {s.gpus_per_worker} GPUs, the job has {group['replicas']} x {gpus_per_pod}"
    workers_per_pod = gpus_per_pod // s.gpus_per_worker
    assert workers_per_pod * s.cpus_per_worker <= float(limits["cpu"]), \
        f"{label}: {workers_per_pod} workers x {s.cpus_per_worker} CPUs do not fit a {limits['cpu']}-CPU pod"
    # Everything the job keeps: absolute, on object storage or the shared volume, never in
    # the image's working directory (root-owned; the pods run as uid 1000).
    assert _is_absolute(cfg.run_dir) and _is_absolute(cfg.checkpoint_dir), (cfg.run_dir, cfg.checkpoint_dir)
    assert cfg.checkpoint_dir.startswith(cfg.run_dir + "/")
    assert cfg.tracking.uri is None, "the Secret's MLFLOW_TRACKING_URI must decide"
    if label.startswith("shared-volume/"):
        mount = VALUES["shared_volume"]["mount"]
        assert cfg.run_dir.startswith(mount + "/") and "run_dir_shared=true" in sets
        paths = [src.path for src in cfg.data.sources] or [cfg.data.path]
        assert all(p.startswith(mount + "/data/") for p in paths), paths
        for _, t in pod_templates(spec):
            mounts = {m["mountPath"]: m["name"] for m in t["spec"]["containers"][0]["volumeMounts"]}
            claim = {v["name"]: v for v in t["spec"]["volumes"]}[mounts[mount]]["persistentVolumeClaim"]["claimName"]
            assert claim == VALUES["shared_volume"]["claim"]
    else:
        assert cfg.run_dir.startswith(VALUES["run_root"] + "/")


def test_readme_and_configs_state_the_gpu_counts_the_jobs_use():
    readme = (REPO / "README.md").read_text()
    for label, doc in TRAIN_JOBS:
        if label.startswith("shared-volume/"):
            continue
        group = cluster_spec(doc)["workerGroupSpecs"][0]
        gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        mention = f"`{label}` ({group['replicas']} x {gpus} GPUs"
        assert mention in readme, f"README does not say {mention}"


def test_nightly_bench_fits_its_node_and_writes_off_the_head():
    from distreg.bench import load_suite

    cm = next(d for _, d in DOCS if d["kind"] == "ConfigMap")
    job = json.loads(cm["data"]["rayjob.json"])
    run, compare = _entrypoint_commands(job)
    assert run[:3] == ["distreg", "bench", "run"] and compare[:3] == ["distreg", "bench", "compare"]
    assert run[3] == compare[3]
    suite_path = REPO / run[3].removeprefix(IMAGE_REPO_ROOT)
    assert suite_path.is_file()
    out = run[run.index("--out") + 1]
    assert _is_absolute(out) and out.startswith(VALUES["run_root"] + "/"), out
    (group,) = cluster_spec(job)["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    suite = load_suite(str(suite_path))
    for entry in suite.runs:
        assert (REPO / entry.config).is_file(), entry.config
        cfg = _load(REPO / entry.config, list(entry.overrides))
        s = cfg.scaling
        assert s.num_workers * s.gpus_per_worker <= group["replicas"] * int(limits["nvidia.com/gpu"]), entry.name
        assert s.num_workers * s.cpus_per_worker <= float(limits["cpu"]) * group["replicas"], \
            f"{entry.name}: {s.num_workers} x {s.cpus_per_worker} CPUs on a {limits['cpu']}-CPU node"
    # The embedded script is the repository's file, byte for byte.
    assert cm["data"]["bench-nightly.sh"] == (K8S / "scripts" / "bench-nightly.sh").read_text()
