"""Ray scenarios that need a cluster of their own, run by the tests in a subprocess
(`python -m tests.cluster_scenarios NAME ARGS_JSON OUT_JSON`): the session's shared Ray
cluster stays untouched, and this process owns and stops what it starts."""
from __future__ import annotations

import json
import os
import sys
import tempfile


def two_nodes_s3(args: dict) -> dict:
    """A head without CPUs and two one-CPU nodes (two raylets): one Ray Train worker per
    node, run_dir on the object store. Rank 1 is SIGKILLed after the step-3 checkpoint;
    the group restarts on both nodes and resumes from the store."""
    import ray
    from ray.cluster_utils import Cluster

    from distreg.config import ConfigError
    from distreg.launch import launch
    from tests.conftest import tiny_config

    temp_dir = tempfile.mkdtemp(prefix="rc2n", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp_dir})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    out: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    try:
        run_dir = args["run_dir"]
        overrides = {**args["common"], "scaling.max_failures": 1, "tracking.uri": args["tracking_uri"],
                     "hooks": f"[{{name: fail_once, step: 5, rank: 1, signal: kill, run_dir: '{run_dir}'}}]"}
        cfg = tiny_config(args["data"], run_dir, **overrides)
        out["info"] = launch(cfg)
        # The same config again, no --resume: refused before any worker starts.
        try:
            launch(cfg)
        except ConfigError as e:
            out["rerun_refused"] = str(e)
        # A plain local run_dir on two worker nodes, not declared shared: refused.
        try:
            launch(tiny_config(args["data"], os.path.join(temp_dir, "local-run"),
                               **{**args["common"], "tracking.uri": args["tracking_uri"]}))
        except ConfigError as e:
            out["local_refused"] = str(e)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    name, args_json, out_json = sys.argv[1:4]
    result = globals()[name](json.loads(args_json))
    with open(out_json, "w") as f:
        json.dump(result, f, default=str)
