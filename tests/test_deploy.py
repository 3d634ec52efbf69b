"""Deployment files stay consistent with the code: the Dockerfiles' pins agree with
pyproject and the image is laid out for layer caching and a non-root user; the job
upload keeps the package and drops local data. The Kubernetes manifests have their own
tests: tests/test_k8s_manifests.py (schemas, consistency) and
tests/test_k8s_bench_nightly.py (the nightly launcher script)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


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
    assert PYPROJECT["project"]["requires-python"] == ">=3.10" and args["PYTHON_VERSION"] == "3.11"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")  # the image runs as a non-root user


def test_job_upload_keeps_every_package_file_and_drops_local_data(tmp_path):
    """`distreg submit` uploads the working dir minus UPLOAD_EXCLUDES, matched the way
    Ray matches them: the package (incl. `distreg/data/`) must travel, `data/` must not."""
    from ray._private.runtime_env.packaging import _get_excludes

    from distreg.submit import UPLOAD_EXCLUDES

    excluded = _get_excludes(REPO, UPLOAD_EXCLUDES)
    package = [p for p in (REPO / "distreg").rglob("*.py")]
    assert any("/data/" in str(p) for p in package)
    assert not [p for p in package if excluded(p)]
    for local in ("data/quickstart_tokens", "runs/x", ".git", "mlruns"):
        assert excluded(REPO / local), local


def test_gpu_image_layers_and_contents():
    """Dependencies before code (a code change reuses the dependency layers); no compiler;
    the object-store clients installed; the code installed without re-resolving deps."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    steps = [line for line in text.splitlines() if re.match(r"^(RUN|COPY|FROM|USER|WORKDIR)\b", line)]
    first_code = next(i for i, s in enumerate(steps) if re.match(r"COPY .*\bdistreg\b \./distreg", s))
    deps = next(i for i, s in enumerate(steps) if "requirements.py" in s and s.startswith("RUN"))
    assert deps < first_code
    assert steps.index('RUN pip install --no-deps .') > first_code
    assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|clang|cuda-toolkit|nvcc", text.split("FROM", 1)[1]
                         .replace("no compiler", "").replace("(nvcc, g++, ninja)", ""))
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    assert args["RAY_VERSION"].startswith(pinned("ray").rsplit(".", 1)[0])  # ray>=2.60,<2.61
    assert args["DEEPSPEED_VERSION"].startswith("0.19.")
    assert {"s3", "gcs"} <= set(args["EXTRAS"].split(","))


def test_requirements_from_pyproject_include_object_store_clients(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "docker" / "requirements.py"), "--pyproject",
                          str(REPO / "pyproject.toml"), "--extras", "s3,gcs,hf"],
                         capture_output=True, text=True, check=True).stdout.split()
    names = [re.split(r"[<>=\[ ]", r)[0] for r in out]
    assert {"torch", "ray", "deepspeed", "mlflow", "s3fs", "gcsfs"} <= set(names)
    assert out[: len(PYPROJECT["project"]["dependencies"])] == PYPROJECT["project"]["dependencies"]
    bad = subprocess.run([sys.executable, str(REPO / "docker" / "requirements.py"), "--pyproject",
                          str(REPO / "pyproject.toml"), "--extras", "s4"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no extra 's4'" in bad.stderr


NO_COMPILER_STEP = """
import importlib
import sys
sys.path.insert(0, {repo!r})
from deepspeed.ops.op_builder.builder import OpBuilder
ds_torch_backend = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` is torch itself

# The one op DeepSpeed JIT-builds on the CPU accelerator is its shared-memory comm op; the
# CUDA accelerator has no such builder (checked in the test), so behave like CUDA here.
ds_torch_backend.build_shm_op = lambda: None
_load = OpBuilder.load
def load(self, *a, **k):
    print("OP BUILD:", self.name, file=sys.stderr)
    return _load(self, *a, **k)
OpBuilder.load = load

from distreg.runtime.comm import Comm
from distreg.runtime.trainer import Trainer
from distreg.testing import run_distributed
from distreg.data.tokens import synth_tokens
from tests.conftest import tiny_config

def step(data, run_dir):
    losses = {{}}
    for stage in (2, 3):
        cfg = tiny_config(data, f"{{run_dir}}/z{{stage}}", **{{"strategy.name": "deepspeed", "strategy.zero_stage": stage,
                                                              "scaling.num_workers": 1, "optim.name": "adamw"}})
        losses[stage] = Trainer(cfg, Comm(), track=False).train_step()[0]
    return losses

if __name__ == "__main__":
    synth_tokens({data!r}, num_tokens=20_000, vocab_size=256, num_shards=1)
    print("LOSSES", run_distributed(step, 1, {data!r}, {run!r}))
"""


def test_deepspeed_builds_no_op_so_the_gpu_image_needs_no_compiler(tmp_path):
    """The GPU image has no compiler. A DeepSpeed ZeRO-2 and ZeRO-3 step (AdamW, configured
    as distreg configures DeepSpeed) runs with every compiler and ninja shadowed by a stub
    that records the call, and with every op build logged: none happens. CPU accelerator
    here (no GPU); its only extra op, the shared-memory comm op built at init_distributed,
    is absent from the CUDA accelerator -- which is why docker/Dockerfile.cpu keeps g++."""
    import os
    import subprocess
    import sys

    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    assert CUDA_Accelerator().create_op_builder("ShareMemCommBuilder") is None
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("cc", "gcc", "c++", "g++", "clang", "clang++", "nvcc", "ninja"):
        stub = stubs / tool
        stub.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {tmp_path}/compiler-calls\nexit 1\n")
        stub.chmod(0o755)
    script = tmp_path / "step.py"
    script.write_text(NO_COMPILER_STEP.format(repo=str(REPO), data=str(tmp_path / "tokens"), run=str(tmp_path / "runs")))
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "CC": str(stubs / "cc"), "CXX": str(stubs / "c++"),
           "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_ext")}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "OP BUILD" not in done.stderr, [line for line in done.stderr.splitlines() if "OP BUILD" in line]
    assert not (tmp_path / "compiler-calls").exists(), (tmp_path / "compiler-calls").read_text()
    assert "LOSSES [{2:" in done.stdout and ", 3:" in done.stdout  # both steps ran
