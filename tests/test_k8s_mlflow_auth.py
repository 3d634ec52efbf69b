"""The manifests' MLflow endpoint with authentication: the environment a Ray pod gets from
the distreg-secrets Secret -- built here exactly as Kubernetes builds it from the rendered
manifest's `secretKeyRef`s (optional keys absent from the Secret leave the variable
unset) -- authenticates against a real `mlflow server --app-name basic-auth` on
127.0.0.1, and the same environment without the credentials is refused."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from distreg.testing import free_port

REPO = Path(__file__).resolve().parents[1]
ADMIN, PASSWORD = "admin", "k8s-Test-passw0rd"

pytest.importorskip("flask_wtf", reason="mlflow's basic-auth app needs Flask-WTF (the test extra has it)")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root}/auth.db\nadmin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {**__import__("os").environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def pod_environment(secret: dict[str, str]) -> dict[str, str]:
    """What Kubernetes puts in the head (driver) container of k8s/raycluster.yaml."""
    cluster = yaml.safe_load((REPO / "k8s" / "raycluster.yaml").read_text())
    env = {}
    for entry in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]:
        ref = entry["valueFrom"]["secretKeyRef"]
        if ref["key"] in secret:
            env[entry["name"]] = secret[ref["key"]]
        else:
            assert ref.get("optional"), f"{ref['key']} is required but absent: the pod would not start"
    return env


def test_secret_credentials_authenticate_and_their_absence_is_refused(auth_server, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    example = yaml.safe_load((REPO / "k8s" / "secrets.example.yaml").read_text())["stringData"]
    secret = {"mlflow-tracking-uri": auth_server, "mlflow-tracking-username": ADMIN,
              "mlflow-tracking-password": PASSWORD}
    assert set(secret) <= set(example)  # the example Secret documents these keys
    env = pod_environment(secret)
    assert env == {"MLFLOW_TRACKING_URI": auth_server, "MLFLOW_TRACKING_USERNAME": ADMIN,
                   "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    client = MlflowClient()  # URI and credentials from the environment, as in the pod
    exp = client.create_experiment("k8s-auth")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "train/loss", 1.25, step=1)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"train/loss": 1.25}

    # A Secret without the credentials: the server refuses, nothing is logged.
    no_creds = pod_environment({"mlflow-tracking-uri": auth_server})
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    assert set(no_creds) == {"MLFLOW_TRACKING_URI"}
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient().create_experiment("k8s-no-auth")
