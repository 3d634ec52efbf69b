"""An S3-compatible object store for tests: moto's server on 127.0.0.1 (a real HTTP
server in a thread of the test process, reached by every Ray worker over the network).

`s3_env(server)` is the environment a process needs to use it through s3fs/fsspec:
credentials plus FSSPEC_S3_ENDPOINT_URL (fsspec's per-protocol default kwargs). Set it
before Ray starts so raylets, workers and job drivers inherit it."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

from distreg.testing import free_port


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


@contextmanager
def moto_s3():
    """Start moto's server, export its environment into os.environ, yield the endpoint."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
    os.environ.update(s3_env(endpoint))
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def new_bucket(prefix: str = "distreg") -> str:
    """A fresh bucket on the current endpoint; returns `s3://NAME`."""
    import fsspec

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"
