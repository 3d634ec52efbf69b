"""Submit a distreg config to a Ray cluster as a Ray job (also: `distreg submit`).

    python launch/submit.py --address http://HEAD:8265 configs/quickstart.yaml \
        [--set key=value ...] [--resume] [--no-wait] [--working-dir .] [--env KEY=VALUE ...]

Prints the job id, streams the job's logs (with --wait, the default), prints the MLflow
run the job reports and exits with the job's status (0 when it succeeded).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
