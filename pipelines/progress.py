"""Progress lines for long stages: a worker logs its counts and rate every ``every`` seconds.

Beam's own counters feed the runner's UI (Dataflow, Flink); these log lines are what a user of
the DirectRunner, or anyone reading worker logs, sees while a multi-hour fetch runs.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger("pipelines.progress")


class Progress:
    def __init__(self, stage: str, every: float = 30.0) -> None:
        self.stage = stage
        self.every = every
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._start = self._last = time.monotonic()

    def add(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.counts[outcome] += n
            now = time.monotonic()
            if now - self._last < self.every:
                return
            self._last = now
            line = self.line(now)
        log.info(line)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        total = sum(self.counts.values())
        top = ", ".join(f"{k} {v}" for k, v in self.counts.most_common(6))
        return f"{self.stage}: {total} done in {elapsed:.0f} s ({total / elapsed:.1f}/s): {top}"
