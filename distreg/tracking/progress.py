"""Rank-0 progress: a tqdm bar on a terminal, plain periodic lines otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, start: int, every: int, enabled: bool):
        self.total, self.every, self.enabled = total, every, enabled
        self.t0, self.start = time.perf_counter(), start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, throughput: float, unit: str, extra: str = "") -> None:
        """Called on logging steps (the Trainer reads metrics back only there); `extra`:
        more fields for the line (MFU, peak device memory)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", **{unit: f"{throughput:,.0f}"})
            return
        if step % self.every == 0 or step == self.total:
            done = step - self.start
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(done, 1) * (self.total - step)
            # sys.stdout.write, not print: Ray Train patches print() into a logger that
            # echoes every line twice on the driver.
            sys.stdout.write(f"step {step}/{self.total}  loss {loss:.4f}  {throughput:,.0f} {unit}{extra}  eta {eta:,.0f}s\n")
            sys.stdout.flush()

    def note(self, text: str) -> None:
        """A line of its own (evaluation results), kept above a tqdm bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
