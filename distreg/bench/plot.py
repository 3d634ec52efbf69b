"""The comparison plot, logged to the candidate suite run under `comparisons/`.

One direction for every metric: bars show the change vs the baseline median in percent,
signed so that right is better whatever the metric's own direction. Per row: the noise
band (grey) and the regression zone beyond the threshold (red); regressions are drawn red
and marked. Each comparison gets its own file name (UTC time + a random suffix): a rerun
never overwrites an earlier plot.
"""
from __future__ import annotations

import math
import tempfile
import time
import uuid
from pathlib import Path


def artifact_stem() -> str:
    return f"compare-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def draw(result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 2.2))
    pct = [100 * r.change if math.isfinite(r.change) else 0.0 for r in rows]
    limits = [100 * r.allowed for r in rows if r.allowed is not None and math.isfinite(r.allowed)]
    span = max([5.0, *(abs(p) for p in pct), *limits]) * 1.25
    for y, r in enumerate(rows):
        if r.band:
            ax.fill_between([-100 * r.band, 100 * r.band], y - 0.4, y + 0.4, color="0.85", lw=0, zorder=0,
                            label="noise band" if y == next(i for i, q in enumerate(rows) if q.band) else None)
        if r.allowed is not None and math.isfinite(r.allowed):
            ax.fill_between([-span, -100 * r.allowed], y - 0.4, y + 0.4, color="tab:red", alpha=0.12, lw=0, zorder=0,
                            label="regression zone" if y == next(i for i, q in enumerate(rows) if q.allowed is not None)
                            else None)
    colors = ["tab:red" if r.verdict == "REGRESSION" else "tab:green" if r.verdict == "ok" else "0.55" for r in rows]
    ax.barh(range(len(rows)), pct, color=colors, height=0.6, zorder=2)
    for y, (r, p) in enumerate(zip(rows, pct)):
        text = "missing" if r.value is None else f"{p:+.1f}%"
        if r.verdict == "REGRESSION":
            text += "  REGRESSION"
        ax.text(p + (0.02 * span if p >= 0 else -0.02 * span), y, text, va="center", ha="left" if p >= 0 else "right",
                fontsize=8, color="tab:red" if r.verdict == "REGRESSION" else "black", zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(-span, span)
    ax.set_yticks(range(len(rows)), [f"{r.key} ({r.better or '?'} is better)" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("change vs baseline median, %   (better →)")
    commit = (result.commit or "unknown commit")[:12]
    ax.set_title(f"bench {result.suite} @ {commit} vs median of {len(result.baseline_ids)} baseline run(s)\n"
                 f"hardware: {result.hardware}   regressions: {len(result.regressions)}", fontsize=10)
    if any(r.band or r.allowed is not None for r in rows):
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_comparison(mlflow_client, result, table: str) -> str:
    """Draw, log plot + table to the candidate run; returns the plot's artifact path."""
    stem = artifact_stem()
    with tempfile.TemporaryDirectory() as tmp:
        png, md = Path(tmp) / f"{stem}.png", Path(tmp) / f"{stem}.md"
        draw(result, str(png))
        md.write_text(f"baseline runs: {', '.join(result.baseline_ids)}\n\n{table}\n")
        for f in (png, md):
            mlflow_client.log_artifact(result.latest_id, str(f), artifact_path="comparisons")
    return f"comparisons/{stem}.png"
