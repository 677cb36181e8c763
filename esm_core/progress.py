"""Progress reporting, one type for the whole library.

A progress function is called as ``progress(fraction, description)`` with a
fraction in [0, 1]. Long work reports at every natural step (a layer, a task,
an α) and raising from the progress function is how a caller stops that work
(the studio raises ``Cancelled`` when Cancel is pressed or the client left).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

Progress = Callable[[float, str], None]
T = TypeVar("T")


def no_progress(frac: float, desc: str) -> None:
    """The progress function of a caller that does not listen."""


def reporter(progress: Progress | None) -> Progress:
    """``progress``, or :func:`no_progress` when it is None."""
    return progress or no_progress


def scaled(progress: Progress | None, start: float, end: float) -> Progress:
    """``progress`` mapped onto [start, end]: a step of a longer piece of work reports its own 0 → 1."""
    report = reporter(progress)
    return lambda frac, desc: report(start + (end - start) * min(max(frac, 0.0), 1.0), desc)


def steps(items: Sequence[T] | Iterable[T], progress: Progress | None, desc: str,
          start: float = 0.0, end: float = 1.0) -> Iterator[T]:
    """Yield ``items`` one by one, reporting ``"{desc} {item} (i/n)"`` before each on [start, end]."""
    seq = list(items)
    report = reporter(progress)
    n = max(len(seq), 1)
    for i, item in enumerate(seq):
        report(start + (end - start) * i / n, f"{desc} {item} ({i + 1}/{len(seq)})")
        yield item
