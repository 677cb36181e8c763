"""Warming a built pool: what every session of it reads first, computed once, right after the build.

A session's first visit to a pool read from files pays for the zero-shot and fine-tuned reference accuracies,
the first merge's evaluation and the Spectra view's decompositions; :mod:`esm_core.studio.shared` keeps those
results for every later session (and, for a pool in the app's cache folder, on disk across restarts). Warming
runs that first visit once, in the process that built the pool — so the first *visitor* after a build finds
them too instead of waiting about a minute and a half of CPU on the text pool.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from ..progress import Progress, no_progress
from . import shared
from .inspect import spectra
from .live import merge, references
from .session import close, load_text, new_session


def warm_text_pool(path=None, *, method: str = "ta", params: Mapping[str, Any] | None = None,
                   with_spectra: bool = True, progress: Progress | None = None) -> dict[str, float]:
    """Load the built text pool in a fresh session (as the app does), compute the reference accuracies, the
    first merge (``method`` with ``params``; the Merge view's defaults: Task Arithmetic at its default α) and,
    with ``with_spectra``, the Spectra rows; write them to disk now. Returns the seconds of each step."""
    report = progress or no_progress
    s = new_session()
    seconds: dict[str, float] = {}
    try:
        steps = [("load", lambda p: load_text(s, path, p)), ("references", lambda p: references(s, "test", p)),
                 ("first merge", lambda p: merge(s, method, params, p))]
        if with_spectra:
            steps.append(("spectra", lambda p: spectra(s, p)))
        for i, (name, run) in enumerate(steps):
            t0 = time.perf_counter()
            run(lambda f, d, i=i: report((i + min(max(float(f), 0.0), 1.0)) / len(steps), f"warming: {d}"))
            seconds[name] = round(time.perf_counter() - t0, 2)
        shared.flush()
    finally:
        close(s)
    return seconds
