"""`fail_once`: kill one worker process at a given step, once per run directory.

For rehearsing fault tolerance (tests, or a new cluster before a long run): the process
exits abruptly, as a lost node would; Ray Train restarts the worker group and the run
resumes from its latest checkpoint. A marker file in `<run_dir>` makes it fire only once.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from distreg.hooks.base import Hook, HookContext
from distreg.hooks.registry import register


@register
class FailOnce(Hook):
    name = "fail_once"

    class Params(Hook.Params):
        step: int = Field(gt=0, description="fail right after this optimizer step")
        rank: int = Field(0, ge=0)
        run_dir: str = Field(description="where the once-only marker lives (the run's run_dir)")

    def after_step(self, ctx: HookContext) -> None:
        p = self.params
        marker = Path(p.run_dir) / ".fail_once.fired"
        if ctx.step == p.step and ctx.rank == p.rank and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            os._exit(17)
