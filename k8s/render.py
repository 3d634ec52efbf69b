"""Render distreg's Kubernetes manifests from k8s/values/site.yaml.

    python k8s/render.py                       # rewrite k8s/*.yaml and k8s/shared-volume/*.yaml
    python k8s/render.py --check               # exit 1 if the committed files are stale
    python k8s/render.py --values site.yaml --out build/k8s

Why a renderer rather than hand-kept YAML: the image, the object-store identity, the GPU
node shape and the MLflow credentials must be identical in every pod of every manifest
(head = driver and workers alike), the nightly RayJob is embedded as text in a ConfigMap
(no kustomize transformer reaches it), and the node counts must follow the configs. Here
each of those is written once. Only PyYAML is needed; the output is plain YAML for
`kubectl apply -f`.

Two storage variants are rendered from the same functions:
  object  (k8s/)               run_dir on s3:// / gs://, identity from the ServiceAccount
                               (workload identity) or the Secret's keys
  shared  (k8s/shared-volume/) run_dir on a ReadWriteMany volume mounted on every pod,
                               declared shared to the runtime (run_dir_shared=true)
"""
from __future__ import annotations

import argparse
import difflib
import json
import shlex
import sys
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent
REPO = K8S.parent
IMAGE_REPO_ROOT = "/home/ray/distreg"  # WORKDIR of docker/Dockerfile: configs/ live here
IMAGE_UID = 1000                        # USER of docker/Dockerfile
SECRET = "distreg-secrets"
BENCH_SUITE = "configs/bench/nightly.yaml"
NIGHTLY = "distreg-bench-nightly"

# Environment of every Ray container, from the Secret: (variable, key, required).
# MLflow's client reads MLFLOW_TRACKING_USERNAME/PASSWORD (basic auth, e.g. `mlflow server
# --app-name basic-auth` or a proxy) or MLFLOW_TRACKING_TOKEN (bearer) itself.
MLFLOW_ENV = [
    ("MLFLOW_TRACKING_URI", "mlflow-tracking-uri", True),
    ("MLFLOW_TRACKING_USERNAME", "mlflow-tracking-username", False),
    ("MLFLOW_TRACKING_PASSWORD", "mlflow-tracking-password", False),
    ("MLFLOW_TRACKING_TOKEN", "mlflow-tracking-token", False),
]
# The Secret alternative to workload identity (s3fs/boto read these; the endpoint is for
# S3-compatible stores such as MinIO or Ceph RGW). Optional: absent keys leave the
# variables unset and workload identity applies.
OBJECT_STORE_ENV = [
    ("AWS_ACCESS_KEY_ID", "aws-access-key-id", False),
    ("AWS_SECRET_ACCESS_KEY", "aws-secret-access-key", False),
    ("AWS_ENDPOINT_URL", "aws-endpoint-url", False),
]
# The example Secret's keys (its header lists the optional others: token, object-store keys).
SECRET_EXAMPLE = {
    "mlflow-tracking-uri": "https://mlflow.example.com",
    "mlflow-tracking-username": "distreg",
    "mlflow-tracking-password": "REPLACE_ME",
}

# The training jobs: (file stem, RayJob name, config, deadline in seconds, header).
TRAIN_JOBS = [
    ("rayjob-llama7b-reweight", "distreg-llama7b-reweight", "configs/llama7b_reweight.yaml", 14 * 86400,
     "Llama-2-7B pretraining with dynamic loss reweighting, FSDP2, bf16."),
    ("rayjob-imagenet-gmp", "distreg-imagenet-resnet50-gmp", "configs/imagenet_resnet50_gmp.yaml", 4 * 86400,
     "ResNet-50 on ImageNet with gradual magnitude pruning to 90 %, DDP."),
]


# ---- building blocks ---------------------------------------------------------------------
def secret_env(spec) -> list[dict]:
    return [{"name": var, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key, **({} if required else {"optional": True})}}}
            for var, key, required in spec]


def ray_env(storage: str) -> list[dict]:
    return secret_env(MLFLOW_ENV + (OBJECT_STORE_ENV if storage == "object" else []))


def quantities(cpu: str, memory: str, gpus: int = 0) -> dict:
    q = {"cpu": cpu, "memory": memory}
    if gpus:
        q["nvidia.com/gpu"] = str(gpus)
    return {"requests": q, "limits": dict(q)}


def ray_pod(v: dict, storage: str, name: str, resources: dict, shm: str, gpu: bool) -> dict:
    """Pod template of a Ray container: same image, identity and environment everywhere."""
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    if storage == "shared":
        sv = v["shared_volume"]
        mounts.append({"name": "shared", "mountPath": sv["mount"]})
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": sv["claim"]}})
    spec = {
        "serviceAccountName": v["service_account"],
        # The image's user; fsGroup makes a fresh volume writable for it.
        "securityContext": {"runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "runAsNonRoot": True,
                            "fsGroup": IMAGE_UID, "fsGroupChangePolicy": "OnRootMismatch"},
        "containers": [{"name": name, "image": v["image"], "env": ray_env(storage),
                        "resources": resources, "volumeMounts": mounts}],
        "volumes": volumes,
    }
    if gpu:
        spec["nodeSelector"] = dict(v["gpu_node"]["node_selector"])
        spec["tolerations"] = [dict(t) for t in v["gpu_node"]["tolerations"]]
    return {"spec": spec}


def cluster_spec(v: dict, storage: str, replicas: int, min_replicas: int | None = None,
                 max_replicas: int | None = None) -> dict:
    node, head = v["gpu_node"], v["head"]
    return {
        "rayVersion": v["ray_version"],
        # KubeRay creates a Secret named like the RayCluster with key `auth_token` and sets
        # RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray container (and the submitter).
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # num-cpus 0: no Ray task or training worker lands on the head; it runs the
            # driver (the entrypoint), GCS and dashboard. Ray Train's controller needs 0 CPUs.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": ray_pod(v, storage, "ray-head", quantities(head["cpus"], head["memory"]), "8Gi", gpu=False),
        },
        "workerGroupSpecs": [{
            "groupName": "gpu-workers",
            "replicas": replicas,
            "minReplicas": replicas if min_replicas is None else min_replicas,
            "maxReplicas": replicas if max_replicas is None else max_replicas,
            # CPUs, GPUs and memory: KubeRay passes the container limits to `ray start`.
            "rayStartParams": {},
            "template": ray_pod(v, storage, "ray-worker", quantities(node["cpus"], node["memory"], node["gpus"]),
                                node["shm"], gpu=True),
        }],
    }


def load_repo_config(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def nodes_for(config: dict, v: dict) -> int:
    """Worker pods a config needs: its GPUs over the GPUs of one node."""
    s = config["scaling"]
    gpus = s["num_workers"] * s.get("gpus_per_worker", 1)
    per_node = v["gpu_node"]["gpus"]
    if gpus % per_node:
        raise SystemExit(f"render: {s['num_workers']} x {s.get('gpus_per_worker', 1)} GPUs do not fill "
                         f"{per_node}-GPU nodes")
    return gpus // per_node


def to_shared(path: str, v: dict) -> str:
    """s3://bucket/a/b -> <mount>/data/a/b: where the RWX variant expects data."""
    rest = path.split("://", 1)[1].split("/", 1)[1] if "://" in path else path.lstrip("/")
    return f"{v['shared_volume']['mount']}/data/{rest}"


def train_entrypoint(config_rel: str, run: str, v: dict, storage: str) -> str:
    cfg = load_repo_config(config_rel)
    if storage == "object":
        run_dir = f"{v['run_root']}/runs/{run}"
        sets = [f"run_dir={run_dir}"]
    else:
        run_dir = f"{v['shared_volume']['mount']}/runs/{run}"
        sets = [f"run_dir={run_dir}", "run_dir_shared=true"]
        data = cfg["data"]
        if data.get("sources"):
            sources = [{**s, "path": to_shared(s["path"], v)} for s in data["sources"]]
            sets.append("data.sources=" + json.dumps(sources, separators=(", ", ": ")))
        elif "path" in data:
            sets.append(f"data.path={to_shared(data['path'], v)}")
    sets.append(f"checkpoint.dir={run_dir}/checkpoints")  # everything the job keeps, under run_dir
    if (cfg.get("tracking") or {}).get("uri"):
        sets.append("tracking.uri=null")  # the Secret's MLFLOW_TRACKING_URI decides
    # --resume: a resubmission (backoffLimit) continues the run; the first one starts fresh.
    words = ["distreg", "train", f"{IMAGE_REPO_ROOT}/{config_rel}", "--resume"]
    for s in sets:
        words += ["--set", s]
    return shlex.join(words)


def rayjob(name: str, namespace: str, entrypoint: str, spec: dict, deadline: int, backoff: int, ttl: int) -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "distreg"}},
        "spec": {
            "entrypoint": entrypoint,
            "runtimeEnvYAML": "env_vars:\n  NCCL_DEBUG: WARN\n  TORCH_NCCL_ASYNC_ERROR_HANDLING: \"1\"\n",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl,
            "activeDeadlineSeconds": deadline,
            "backoffLimit": backoff,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": spec,
        },
    }


# ---- documents per file ------------------------------------------------------------------
def identity_docs(v: dict) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": v["service_account"], "namespace": v["namespace"],
                          "annotations": dict(v.get("service_account_annotations") or {})}}]


def secret_docs(v: dict) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": SECRET, "namespace": v["namespace"]},
             "stringData": dict(SECRET_EXAMPLE)}]


def raycluster_docs(v: dict, storage: str) -> list[dict]:
    return [{"apiVersion": "ray.io/v1", "kind": "RayCluster",
             "metadata": {"name": "distreg", "namespace": v["namespace"], "labels": {"app.kubernetes.io/name": "distreg"}},
             "spec": cluster_spec(v, storage, replicas=2, min_replicas=0, max_replicas=8)}]


def train_docs(v: dict, storage: str, name: str, config_rel: str, deadline: int) -> list[dict]:
    replicas = nodes_for(load_repo_config(config_rel), v)
    run = name.removeprefix("distreg-")
    return [rayjob(name, v["namespace"], train_entrypoint(config_rel, run, v, storage),
                   cluster_spec(v, storage, replicas), deadline, backoff=2, ttl=600)]


def nightly_rayjob(v: dict) -> dict:
    suite = f"{IMAGE_REPO_ROOT}/{BENCH_SUITE}"
    entrypoint = (f"{shlex.join(['distreg', 'bench', 'run', suite, '--out', v['run_root'] + '/bench'])} && "
                  f"{shlex.join(['distreg', 'bench', 'compare', suite, '--best-of', '7'])}")
    job = rayjob(NIGHTLY, v["namespace"], entrypoint, cluster_spec(v, "object", replicas=1),
                 deadline=6 * 3600, backoff=0, ttl=300)
    job["metadata"]["labels"]["app.kubernetes.io/component"] = "bench-nightly"
    return job


def nightly_docs(v: dict) -> list[dict]:
    ns, job = v["namespace"], nightly_rayjob(v)
    script = (K8S / "scripts" / "bench-nightly.sh").read_text()
    launcher = {
        "name": "launcher",
        "image": v["kubectl_image"],
        "command": ["/bin/bash", "/etc/distreg-bench/bench-nightly.sh"],
        "env": [
            {"name": "RAYJOB_TEMPLATE", "value": "/etc/distreg-bench/rayjob.json"},
            {"name": "JOB_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}},
            {"name": "JOB_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/controller-uid']"}}},
            {"name": "HOME", "value": "/tmp"},  # kubectl's cache
        ],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "launcher", "mountPath": "/etc/distreg-bench", "readOnly": True}],
    }
    meta = lambda name: {"name": name, "namespace": ns}  # noqa: E731
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("distreg-bench")},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("distreg-bench"),
         "rules": [
             {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
             # `kubectl logs job/NAME`: the submitter Job KubeRay names after the RayJob.
             {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]},
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
             {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta("distreg-bench"),
         "subjects": [{"kind": "ServiceAccount", "name": "distreg-bench", "namespace": ns}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "distreg-bench"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(NIGHTLY),
         "data": {"bench-nightly.sh": script, "rayjob.json": json.dumps(job, indent=2) + "\n"}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta(NIGHTLY),
         "spec": {
             "schedule": "0 2 * * *",
             "timeZone": "Etc/UTC",
             "concurrencyPolicy": "Forbid",  # the pod lives as long as its RayJob: no overlap
             "startingDeadlineSeconds": 3600,
             "successfulJobsHistoryLimit": 7,
             "failedJobsHistoryLimit": 14,
             "jobTemplate": {"spec": {
                 "backoffLimit": 0,
                 "activeDeadlineSeconds": job["spec"]["activeDeadlineSeconds"] + 1800,
                 "template": {"spec": {
                     "serviceAccountName": "distreg-bench",
                     "restartPolicy": "Never",
                     "terminationGracePeriodSeconds": 60,  # time to delete the RayJob on TERM
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [launcher],
                     "volumes": [{"name": "launcher", "configMap": {"name": NIGHTLY}}],
                 }},
             }},
         }},
    ]


def pvc_docs(v: dict) -> list[dict]:
    sv = v["shared_volume"]
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": sv["claim"], "namespace": v["namespace"]},
             "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": sv["storage_class"],
                      "resources": {"requests": {"storage": sv["size"]}}}}]


HEADERS = {
    "identity.yaml": "The object-store identity of every Ray pod (head = driver, and workers): workload\n"
                     "identity through this ServiceAccount's annotation (see k8s/values/site.yaml).",
    "secrets.example.yaml": "The Secret every Ray pod reads (fill in, `kubectl apply -f`, never commit real values).\n"
                            "Required: mlflow-tracking-uri. MLflow auth: mlflow-tracking-username + -password\n"
                            "(basic auth) or mlflow-tracking-token (bearer). Without workload identity:\n"
                            "aws-access-key-id, aws-secret-access-key (+ aws-endpoint-url for S3-compatible stores).",
    "raycluster.yaml": "A long-lived Ray cluster: CPU head (driver only) + 8-GPU worker pods. Submit with\n"
                       "`distreg submit --address http://distreg-head-svc:8265 CONFIG --set run_dir=...`.\n"
                       "Token auth: the token is in the Secret KubeRay creates with the RayCluster's name\n"
                       "(`distreg`), key `auth_token`.",
    "bench-nightly-cronjob.yaml": "Nightly benchmark rerun: a CronJob (concurrencyPolicy Forbid) whose pod creates one\n"
                                  "RayJob from the ConfigMap, watches it, relays the verdict of `distreg bench compare`\n"
                                  "and deletes it. Script: k8s/scripts/bench-nightly.sh (exit codes there).",
    "pvc.yaml": "The ReadWriteMany volume of the shared-volume variant: every Ray pod mounts it at the\n"
                "same path; runs under <mount>/runs, data under <mount>/data.",
}


def render(v: dict) -> dict[str, list[dict]]:
    """{relative output path: documents}."""
    files: dict[str, list[dict]] = {
        "identity.yaml": identity_docs(v),
        "secrets.example.yaml": secret_docs(v),
        "raycluster.yaml": raycluster_docs(v, "object"),
        "bench-nightly-cronjob.yaml": nightly_docs(v),
        "shared-volume/pvc.yaml": pvc_docs(v),
        "shared-volume/raycluster.yaml": raycluster_docs(v, "shared"),
    }
    for stem, name, config_rel, deadline, _ in TRAIN_JOBS:
        files[f"{stem}.yaml"] = train_docs(v, "object", name, config_rel, deadline)
        files[f"shared-volume/{stem}.yaml"] = train_docs(v, "shared", name, config_rel, deadline)
    return files


def header(path: str, v: dict) -> str:
    base = path.rsplit("/", 1)[-1]
    text = HEADERS.get(base)
    if text is None:
        stem = base.removesuffix(".yaml")
        job = next(j for j in TRAIN_JOBS if j[0] == stem)
        text = (f"{job[4]} Runs {job[2]} as written (its scaling decides the node count);\n"
                "KubeRay creates the cluster, submits the job and deletes the cluster when it ends.")
    if path.startswith("shared-volume/"):
        text += "\nShared-volume variant: apply shared-volume/pvc.yaml first."
    lines = ["# GENERATED by k8s/render.py from k8s/values/site.yaml -- edit those, then rerun it.", "#"]
    lines += [f"# {line}" for line in text.splitlines()]
    lines.append("# Needs KubeRay >= 1.6.0 (see docs/kubernetes.md).")
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=4096) for d in docs)


def texts(values_path: Path) -> dict[str, str]:
    v = yaml.safe_load(values_path.read_text())
    return {path: header(path, v) + dump(docs) for path, docs in render(v).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--values", type=Path, default=K8S / "values" / "site.yaml")
    p.add_argument("--out", type=Path, default=K8S)
    p.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    a = p.parse_args(argv)
    stale = 0
    for rel, text in texts(a.values).items():
        target = a.out / rel
        if a.check:
            current = target.read_text() if target.exists() else ""
            if current != text:
                stale += 1
                sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                           str(target), f"{rel} (rendered)"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    if a.check and stale:
        print(f"render: {stale} file(s) differ from a render of {a.values}; run python k8s/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
