"""Progress that also shows in logs: a tqdm bar on a terminal, plain lines at a bounded rate otherwise.

``tqdm(disable=None)`` hides the bar whenever stderr is not a terminal, so a job under ``nohup``,
Slurm or CI printed nothing for hours. :class:`Progress` keeps tqdm for terminals and otherwise writes one
plain line (``encode: 1,200/10,000 img (12%), 35.1 img/s, ETA 4m11s``) each time another ``percent_step``
of the total is done or ``interval_s`` seconds have passed, whichever comes first, and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A progress report on ``stream`` (default stderr); ``update(n)``, ``write(msg)``, ``close()``.

    Args:
        total: units expected (None or 0: unknown; plain lines are then timed only).
        desc: label at the start of each line.
        unit: what is counted.
        enabled: False: report nothing (``write`` still prints).
        interval_s, percent_step: the plain-line rate (terminal output is tqdm's).
        stream: where to report (default ``sys.stderr``).
        clock: seconds, monotonic (for tests).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "img", enabled: bool = True,
                 interval_s: float = 30.0, percent_step: float = 5.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.enabled = total or None, desc, unit, enabled
        self.interval_s, self.percent_step = interval_s, percent_step
        self.stream = stream or sys.stderr
        self.clock = clock
        self.done = 0
        self.lines = 0  # plain lines written
        self._bar: Any = None
        self._start = self._last = clock()
        self._next_percent = percent_step
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.enabled:
            return
        now = self.clock()
        due = now - self._last >= self.interval_s
        if self.total:
            percent = 100.0 * self.done / self.total
            if percent >= self._next_percent:
                due = True
                while self._next_percent <= percent:
                    self._next_percent += self.percent_step
        if due and (not self.total or self.done < self.total):  # the last line is close()'s
            self._line(now)

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and (self.done or self.total):
            self._line(self.clock(), final=True)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, now: float, final: bool = False) -> None:
        self._last = now
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        if final:
            text += f", done in {_duration(elapsed)}"
        elif self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        print(text, file=self.stream, flush=True)
        self.lines += 1


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
