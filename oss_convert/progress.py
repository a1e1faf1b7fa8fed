"""How library code reports progress and notes without printing (base layer).

A long job calls ``progress.task(description, total)`` once per phase and the returned
``advance(n)`` as it goes; ``note(text)`` carries a warning or a result line for the user. The
library never prints: the command line passes a ``Progress`` that draws tqdm bars on stderr,
a library or bench caller passes nothing (``SILENT``) or its own subclass.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Advance = Callable[[int], None]


class Progress:
    """The silent default; subclasses override ``start``/``advance``/``finish``/``note``."""

    def start(self, description: str, total: int, unit: str) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: int, unit: str = "B") -> Iterator[Advance]:
        self.start(description, total, unit)
        try:
            yield self.advance
        finally:
            self.finish()


SILENT = Progress()
