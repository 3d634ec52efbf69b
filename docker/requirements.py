"""Print distreg's pip requirements from pyproject.toml alone (one per line).

The image installs them in a layer of their own, before the code is copied, so a code
change does not reinstall the dependencies:
    python docker/requirements.py --extras s3,gcs,hf > /tmp/requirements.txt
"""
from __future__ import annotations

import argparse
import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"requirements.py: {pyproject} has no extra {extra!r} (has {sorted(optional)})")
        reqs += optional[extra]
    return list(dict.fromkeys(reqs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pyproject", default="pyproject.toml")
    p.add_argument("--extras", default="", help="comma-separated extras, e.g. s3,gcs,hf")
    a = p.parse_args(argv)
    extras = [e for e in a.extras.split(",") if e]
    sys.stdout.write("".join(r + "\n" for r in requirements(a.pyproject, extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
