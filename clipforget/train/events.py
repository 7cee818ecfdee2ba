"""What a stage reports and how a job stops it: progress events go to callbacks, and a callback may
raise :class:`Cancelled`. No torch here (the job registry imports it before any model loads)."""
from __future__ import annotations

from typing import Callable

Callback = Callable[[dict], None]


class Cancelled(Exception):
    """Raised by a callback to stop a job; the loop lets it through untouched."""


class StageClock:
    """How far the current stage is and how long it will take at its pace so far: the seconds per
    step measured since the stage began, times the steps left. Fed the same progress events as
    any callback (``stage``, ``step``, ``total``); the app's jobs and the CLI both show it.

        clock = StageClock()
        clock.update({"stage": "forget", "step": 10, "total": 40})
        clock.text()          # 'forget 10/40 · about 31 s left'
    """

    def __init__(self, clock: Callable[[], float] | None = None):
        import time
        self._now = clock or time.monotonic
        self.stage, self.step, self.total = "", 0, 0
        self.started = self._now()          # when the current stage began
        self._first: tuple[float, int] | None = None     # (time, step) of the stage's first step report

    def update(self, event: dict) -> bool:
        """Take a progress event; True when it begins a new stage."""
        stage = event.get("stage", self.stage)
        new = stage != self.stage
        if new:
            self.stage, self.started, self._first = stage, self._now(), None
        self.step, self.total = int(event.get("step", 0) or 0), int(event.get("total", 0) or 0)
        if self._first is None and self.step > 0:
            # pace from the first step reported on: what came before it (building an optimizer,
            # a first trunk pass) is start-up, not a step
            self._first = (self._now(), self.step)
        return new

    def seconds_left(self) -> float | None:
        """None until two steps of the stage have been seen (no pace yet) or without a total."""
        if self._first is None or not self.total or self.step <= self._first[1] or self.step > self.total:
            return None
        t0, s0 = self._first
        per_step = (self._now() - t0) / (self.step - s0)
        return per_step * (self.total - self.step)

    def text(self) -> str:
        """``stage step/total · about N s left`` (parts left out when unknown)."""
        out = self.stage + (f" {self.step}/{self.total}" if self.total else "")
        left = self.seconds_left()
        return out + (f" · {describe_seconds(left)} left" if left is not None else "")


def describe_seconds(seconds: float) -> str:
    """``about 40 s`` / ``about 3 min``: an estimate, said as one."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    return f"about {round(seconds / 60)} min"


class LogProgress:
    """A callback writing progress lines to ``logger`` (the CLI's, shown with -v): each stage as it
    begins, then its step count and the time left at its pace so far, at most every ``every`` seconds."""

    def __init__(self, logger, every: float = 2.0):
        self.logger, self.clock, self.every, self._last = logger, StageClock(), every, 0.0

    def __call__(self, event: dict) -> None:
        import time
        new = self.clock.update(event)
        now = time.monotonic()
        if new or now - self._last >= self.every:
            self._last = now
            self.logger.info("stage %s", self.clock.text())
