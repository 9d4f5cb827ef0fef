"""Thread count for small-op workloads on a shared CPU, chosen by timing."""

from __future__ import annotations

import os

import torch


class ThreadTuner:
    """Chooses the torch thread count by timing real steps: 1 thread against all cores, two steps
    each, at the start and again every ``every`` steps. On an idle machine all cores win; on a busy
    one (other processes on the same cores) multi-threaded steps can be 5-10x slower than one thread,
    because every small op waits at a thread barrier for a descheduled thread."""

    def __init__(self, every: int, fixed: int | None = None):
        cores = max(1, os.cpu_count() or 1)
        try:
            cores = min(cores, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            pass
        self.candidates = [fixed] if fixed else sorted({1, cores})
        self.every = max(every, 8)
        self.times: dict[int, list[float]] = {}
        self.choice = self.candidates[-1]
        self.history: list[int] = []

    def _phase(self, step: int) -> int:
        return step % self.every - 1  # step 0 of each period (warm-up effects) is not timed

    def before(self, step: int) -> None:
        phase = self._phase(step)
        if len(self.candidates) > 1 and 0 <= phase < 2 * len(self.candidates):
            if phase == 0:
                self.times = {}
            torch.set_num_threads(self.candidates[phase // 2])
        else:
            torch.set_num_threads(self.choice)

    def after(self, step: int, seconds: float) -> None:
        phase = self._phase(step)
        if len(self.candidates) > 1 and 0 <= phase < 2 * len(self.candidates):
            self.times.setdefault(self.candidates[phase // 2], []).append(seconds)
            if phase == 2 * len(self.candidates) - 1:
                self.choice = min(self.times, key=lambda k: sum(self.times[k]))
                self.history.append(self.choice)
