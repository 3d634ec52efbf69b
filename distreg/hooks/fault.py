"""`fail_once`: kill one worker process at a given step, once per run directory.

For rehearsing fault tolerance (tests, or a new cluster before a long run): the process
exits abruptly, as a lost node would; Ray Train restarts the worker group and the run
resumes from its latest checkpoint. A marker file in `<run_dir>` (a path or URL) makes
it fire only once. `signal: kill` dies by SIGKILL (as the OOM killer or a lost node
would), `exit` by `os._exit(17)`.
"""
from __future__ import annotations

import os
import signal
from typing import Literal

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
        signal: Literal["exit", "kill"] = "exit"

    def after_step(self, ctx: HookContext) -> None:
        from distreg.runtime import storage

        p = self.params
        marker = storage.join(p.run_dir, ".fail_once.fired")
        if ctx.step == p.step and ctx.rank == p.rank and not storage.exists(marker):
            storage.write_text(marker, f"{ctx.step}\n")
            if p.signal == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(17)
