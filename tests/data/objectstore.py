"""A real S3-compatible server (moto's) on 127.0.0.1 and a two-node Ray cluster on this
machine, for the data tests and benchmarks/data_objectstore.py. Both are started as
processes and stopped by PID."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """`moto_server` on a free port; `env` reaches it from any process (s3fs/botocore
    read AWS_ENDPOINT_URL), `fs` from this one."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        import s3fs

        self.fs = s3fs.S3FileSystem(endpoint_url=self.url, key="testing", secret="testing", skip_instance_cache=True)

    def bucket(self, name: str) -> str:
        self.fs.mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def env_set(env: dict):
    """os.environ with `env` added, restored after (processes started inside inherit it)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def two_node_cluster(env: dict, temp_root: str = "/tmp/data-eng"):
    """ray.cluster_utils.Cluster with 2 nodes of 1 CPU each (its own temp dir); its
    raylets and workers inherit `env` (the object store's endpoint and credentials).
    The caller connects drivers with RAY_ADDRESS=cluster.address and calls shutdown()."""
    from ray.cluster_utils import Cluster

    os.makedirs(temp_root, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir=temp_root)
    with env_set(env):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp_dir,
                                                                "include_dashboard": False})
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster
