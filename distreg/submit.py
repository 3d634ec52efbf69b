"""`distreg submit`: a config to a Ray cluster as a Ray job, logs streamed, exit status returned.

The job runs `python -m distreg.cli train CONFIG ...` from the uploaded working
directory, so it joins the cluster (RAY_ADDRESS is set inside jobs) instead of starting
its own. MLFLOW_TRACKING_URI, when set here, is passed on to the job.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# gitignore-style, as Ray matches them: a leading "/" anchors a pattern at the working
# dir, so "/data" (the local datasets) does not also drop the package `distreg/data/`.
UPLOAD_EXCLUDES = ["/.git", "/runs", "/data", "/mlruns", "*.egg-info", ".pytest_cache", "__pycache__"]


def entrypoint(config: str, overrides: list[str], resume: bool) -> str:
    words = ["python", "-m", "distreg.cli", "train", config]
    for item in overrides:
        words += ["--set", item]
    if resume:
        words.append("--resume")
    return shlex.join(words)


def runtime_env(working_dir: str, env: list[str]) -> dict:
    env_vars = {}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    for item in env:
        key, _, value = item.partition("=")
        env_vars[key] = value
    return {"working_dir": working_dir, "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}


async def _stream(client, job_id: str) -> list[str]:
    seen = []
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        seen.extend(chunk.splitlines())
    return seen


def submit(address: str, config: str, overrides: list[str], resume: bool = False, wait: bool = True,
           working_dir: str = ".", env: list[str] | None = None) -> int:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint(config, overrides, resume),
                               runtime_env=runtime_env(working_dir, env or []))
    print(f"distreg: submitted job {job_id} to {address}")
    if not wait:
        return 0
    lines = asyncio.run(_stream(client, job_id))
    status = str(client.get_job_status(job_id).value)
    for line in lines:
        if "MLflow run:" in line or "checkpoint:" in line:
            print(f"distreg: {line.strip()}")
    print(f"distreg: job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray dashboard/job address, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--wait", dest="wait", action="store_true", default=True, help="stream logs until the job ends (default)")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="print the job id and return")
    p.add_argument("--working-dir", default=".")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the job")


def run(args) -> int:
    if not args.address:
        print("distreg submit: no --address and no RAY_ADDRESS", file=sys.stderr)
        return 2
    # Validate locally first: a config error is reported here, not after an upload (paths
    # are checked by the job's driver, on the cluster, before its workers start).
    from distreg.config import load_config
    from distreg.runs.preflight import check_model

    check_model(load_config(args.config, args.overrides))
    try:
        return submit(args.address, args.config, args.overrides, args.resume, args.wait, args.working_dir, args.env)
    except Exception as e:  # noqa: BLE001 - turn Ray's auth failure into one clear line
        if type(e).__name__ != "AuthenticationError":
            raise
        print(f"distreg submit: {args.address} requires a Ray auth token (token auth is on); set RAY_AUTH_TOKEN, "
              "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token to the cluster's token", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from distreg.config import ConfigError

    p = argparse.ArgumentParser(prog="distreg submit", description=__doc__)
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except ConfigError as e:
        print(f"distreg: config error: {e}", file=sys.stderr)
        return 2
