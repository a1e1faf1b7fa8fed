"""What every command shares: exit codes and the tqdm ``Progress`` the library reports to.

Imports: library modules only (never another cli module).
"""

from __future__ import annotations

import sys
import time

import click
from tqdm import tqdm

from ..errors import printable
from ..progress import Progress
from ..sizes import format_size

EXIT_FAIL = 1
EXIT_ERROR = 2


class BarProgress(Progress):
    """One tqdm bar on stderr per task; notes are printed to stderr. ``enabled=False`` (``--quiet``)
    hides the bars but still prints the notes (warnings and results)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: tqdm | None = None

    def start(self, description: str, total: int, unit: str) -> None:
        scale = unit == "B"
        self.bar = tqdm(total=total, desc=description, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                        disable=not self.enabled, file=sys.stderr, dynamic_ncols=True)

    def advance(self, amount: int) -> None:
        if self.bar is not None:
            self.bar.update(amount)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def note(self, message: str) -> None:
        click.echo(message, err=True)


QUIET_START_S = 1.0


class LineProgress(Progress):
    """Progress for a log (stderr not a terminal, e.g. a CI job): a plain line when a task starts,
    at each 10% of it (after its first second), or after ``every`` seconds once it has moved by
    1%, and when it ends:
    task, percent, rate, time left. No carriage returns, and at most ~100 lines a task however
    long it runs."""

    def __init__(self, enabled: bool = True, every: float = 30.0, clock=time.monotonic):
        self.enabled, self.every, self.clock = enabled, every, clock
        self.task_name: str | None = None

    def start(self, description: str, total: int, unit: str) -> None:
        self.task_name, self.total, self.unit = description, max(int(total), 0), unit
        self.done, self.started = 0, self.clock()
        self.last_time, self.last_percent = self.started, 0
        self._line(f"{description}: started ({self._amount(self.total)})")

    def advance(self, amount: int) -> None:
        if self.task_name is None:
            return
        self.done += amount
        percent = min(100, self.done * 100 // self.total) if self.total else 0
        now = self.clock()
        if now - self.started < QUIET_START_S:  # a task over in a moment gets its first and last line only
            return
        if percent // 10 > self.last_percent // 10 and percent < 100 or \
                now - self.last_time >= self.every and percent > self.last_percent:
            self._line(self._status(percent, now))
            self.last_time, self.last_percent = now, percent

    def finish(self) -> None:
        if self.task_name is None:
            return
        elapsed = self.clock() - self.started
        self._line(f"{self.task_name}: done, {self._amount(self.done)} in {elapsed:.0f} s{self._rate(self.done, elapsed)}")
        self.task_name = None

    def note(self, message: str) -> None:
        click.echo(message, err=True)

    def _status(self, percent: int, now: float) -> str:
        elapsed = now - self.started
        left = elapsed * (self.total - self.done) / self.done if self.done else 0.0
        return (f"{self.task_name}: {percent}% ({self._amount(self.done)} of {self._amount(self.total)})"
                f"{self._rate(self.done, elapsed)}, {left:.0f} s left")

    def _amount(self, count: int) -> str:
        return format_size(count) if self.unit == "B" else f"{count} {self.unit}"

    def _rate(self, count: int, seconds: float) -> str:
        if seconds <= 0:
            return ""
        per_second = count / seconds
        return f", {format_size(int(per_second))}/s" if self.unit == "B" else f", {per_second:.1f} {self.unit}/s"

    def _line(self, text: str) -> None:
        if self.enabled:
            click.echo(text, err=True)


def progress_for(quiet: bool) -> Progress:
    """Bars on a terminal, plain lines in a log; ``--quiet`` shows neither (notes still print)."""
    return BarProgress(not quiet) if sys.stderr.isatty() else LineProgress(not quiet)


def say(line: str) -> None:
    """One line of output on stdout, with what came from a file escaped (``errors.printable``)."""
    click.echo(printable(line))
