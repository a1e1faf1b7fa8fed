"""What every command shares: exit codes and the tqdm ``Progress`` the library reports to.

Imports: library modules only (never another cli module).
"""

from __future__ import annotations

import sys

import click
from tqdm import tqdm

from ..progress import Progress

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
