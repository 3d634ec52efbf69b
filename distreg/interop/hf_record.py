"""The export as an MLflow artifact *reference*: the training run (from
`<run_dir>/mlflow_run_id`, else a new run in the config's experiment) gets tags with the
export's path / URL, source checkpoint and step, and the small manifest as
`hf_export/step_<N>.json`. The weights are never uploaded. Tracking failures warn and
never fail the export (the directory is already complete)."""
from __future__ import annotations

import warnings
from pathlib import Path

from distreg.config import RunConfig


def record_export(cfg: RunConfig, manifest: dict) -> str | None:
    from mlflow.tracking import MlflowClient

    from distreg.tracking.mlflow_tracker import RUN_ID_FILE, default_tracking_uri

    uri = cfg.tracking.uri or default_tracking_uri(cfg.run_dir)
    try:
        client = MlflowClient(tracking_uri=uri)
        id_file = Path(cfg.run_dir) / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
            run_id = client.create_run(exp_id, run_name="hf-export").info.run_id
        step = manifest["step"]
        for key, value in (("hf_export.path", manifest["out"]), ("hf_export.source_checkpoint", manifest["source_checkpoint"]),
                           ("hf_export.step", step), ("hf_export.dtype", manifest["dtype"])):
            client.set_tag(run_id, key, str(value))
        client.log_dict(run_id, manifest, f"hf_export/step_{step if step is not None else 'file'}.json")
        return run_id
    except Exception as e:  # noqa: BLE001 - the export itself is done; tracking is best effort
        warnings.warn(f"HF export written to {manifest['out']}, but recording it in MLflow at {uri} failed: {e}",
                      stacklevel=2)
        return None
