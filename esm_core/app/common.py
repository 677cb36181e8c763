"""What every view of the ESM Studio app shares: limits, error messages, progress, ZeroGPU, the session gate.

This is the one place that names the studio back end: ``studio`` (the state and
logic of a browser session, no gradio) and ``viz`` (the figures). Views call
``studio.<fn>(s, ...)`` and ``viz.<fn>(...)`` only.
"""
from __future__ import annotations

import functools
import html
import logging
import math
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import gradio as gr
from gradio.context import LocalContext

from esm_core import studio  # noqa: F401  (the views' back end)
from esm_core.checkpoints import CheckpointError, CHECKPOINT_EXTS
from esm_core.merging import METHODS  # noqa: F401
from esm_core.studio import viz  # noqa: F401

log = logging.getLogger("esm_studio.app")

# ---------------------------------------------------------------- limits (the README's "Security and limits")
SESSION_TTL_S = 20 * 60           # a session's tensors are dropped this long after its last update (idle)
MAX_SESSIONS = 8                  # sessions holding a pool at once (env ESM_MAX_SESSIONS); others are turned away
MAX_FILE_SIZE = "2gb"             # uploads above this are refused by Gradio before they reach us
DELETE_CACHE = (15 * 60, 60 * 60)  # every 15 min, delete uploads / outputs older than an hour
MAX_TEXT_CHARS = 4096             # longest text input (task names box); longer is refused, never echoed
MAX_ARCH_CHARS = 128              # longest architecture name
TOAST_S = 15                      # seconds an error message stays on screen
CONCURRENCY = 4                   # events running at once (across all sessions)
HEAVY_CONCURRENCY = 2             # merges / decompositions / routing running at once
HEAVY = {"concurrency_id": "heavy", "concurrency_limit": HEAVY_CONCURRENCY}
LIGHT = {"concurrency_id": "light", "concurrency_limit": CONCURRENCY}   # α recombination, controls: not behind HEAVY
CKPT_TYPES = list(CHECKPOINT_EXTS)                                       # what esm_core.checkpoints reads

try:  # Hugging Face ZeroGPU: GPU work must run inside @spaces.GPU functions; elsewhere unchanged
    import spaces  # type: ignore
    gpu = spaces.GPU(duration=120)
except ImportError:  # pragma: no cover - the usual case off Spaces
    def gpu(fn: Callable) -> Callable:
        return fn


def max_sessions() -> int:
    """The session cap: ``ESM_MAX_SESSIONS`` if set (a positive integer), else :data:`MAX_SESSIONS`."""
    raw = os.environ.get("ESM_MAX_SESSIONS", "")
    try:
        n = int(raw)
    except ValueError:
        return MAX_SESSIONS
    return n if n > 0 else MAX_SESSIONS


def user_error(text: str) -> gr.Error:
    """The message shown to the user: HTML-escaped (the toast renders HTML), closes by itself, no traceback."""
    return gr.Error(html.escape(text), duration=TOAST_S, print_exception=False)


def friendly(fn: Callable) -> Callable:
    """Turn the studio's ValueError / CheckpointError / FileNotFoundError into a clear message for the user,
    logged as one line (the error is the user's: no traceback); work stopped by Cancel, a disconnect or the
    session's end (:class:`studio.Cancelled`) into a "Cancelled" message (the outputs on screen stay as they were)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except studio.Cancelled as e:
            log.info("%s stopped: %s", fn.__name__, e)
            raise gr.Error(f"{stop_text(e)}: nothing was changed.", duration=TOAST_S, print_exception=False,
                           title="Cancelled") from None
        except gr.Error as e:
            log.warning("user error in %s: %.300s", fn.__name__, getattr(e, "message", e))
            raise
        except (ValueError, CheckpointError, FileNotFoundError) as e:
            msg = str(e)
            log.warning("user error in %s: %.300s", fn.__name__, msg.replace("\n", " "))
            raise user_error(msg) from None
    return wrapper


def stop_text(e: Exception) -> str:
    """"Cancelled" when the user pressed Cancel, else what stopped the work."""
    return "Cancelled" if str(e) == "cancelled" else f"Stopped ({html.escape(str(e))})"


def stoppable(n_outputs: int) -> Callable[[Callable], Callable]:
    """For a handler whose work can be stopped (:func:`progress_fn` with the session): when it is, change no output
    (the previous result stays on screen, without gradio's error marks) and say so in a message that closes by
    itself. An API caller gets "no change" updates back. Goes inside :func:`friendly`."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except studio.Cancelled as e:
                log.info("%s stopped: %s", fn.__name__, e)
                gr.Warning(f"{stop_text(e)}: nothing was changed, the previous result stays.", duration=TOAST_S,
                           title="Cancelled")
                keep = tuple(gr.update() for _ in range(n_outputs))
                return keep if n_outputs > 1 else keep[0]
        return wrapper
    return deco


def progress_fn(progress, s=None) -> Callable[[float, str], None]:
    """gr.Progress as the studio's ``progress(fraction, description)`` callback. With the session ``s``, the
    callback also stops the work (:func:`studio.guarded` raises :class:`studio.Cancelled`) once it is no longer
    wanted: Cancel pressed in this session, the session closed or expired, or the event's client gone."""
    report = lambda frac, desc: progress(frac, desc=desc)  # noqa: E731
    return report if s is None else studio.guarded(s, report, client_connected())


def client_connected() -> Callable[[], bool]:
    """For the event running in this thread: a check that its client is still there.

    Gradio marks a queued event not ``alive`` when the client's event stream disconnects (tab closed, network
    gone, HTTP client gone) and drops it from the running jobs when it is cancelled (``/cancel``), but lets the
    handler's thread run on; this reads both (gradio 6: ``LocalContext``, ``Queue.active_jobs``, ``Event.alive``).
    Outside a queued event it always answers yes."""
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return lambda: True

    def find():
        for job in list(getattr(queue, "active_jobs", None) or []):
            for ev in list(job or []):
                if getattr(ev, "_id", None) == event_id:
                    return ev
        return None

    seen = find() is not None              # only an event seen running can be found gone later

    def connected() -> bool:
        ev = find()
        if ev is None:
            return not seen
        return bool(getattr(ev, "alive", True))
    return connected


def finite_number(value, what: str, integer: bool = False):
    """``value`` as a finite float (an exact int with ``integer``), or a refusal naming ``what``: the plain HTTP
    API takes raw JSON, where ``NaN`` and ``Infinity`` parse as numbers that gradio's sliders let through."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number, got {x}")
    if integer:
        if x != int(x):
            raise ValueError(f"{what} must be a whole number, got {x}")
        return int(x)
    return x


def need_session(s):
    """The session of an event (refused if it has not started or has expired); marks it as active."""
    if s is None or getattr(s, "closed", False):
        raise user_error("the session is still starting (or has expired): reload the page")
    for gate in list(_GATES):
        gate.touch(s)
    return s


def file_path(f) -> str | None:
    if f is None:
        return None
    return f if isinstance(f, str) else getattr(f, "name", None) or getattr(f, "path", None)


def bounded_text(text: str | None, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` if at most ``limit`` characters; else a refusal that does not echo it."""
    text = "" if text is None else str(text)
    if len(text) > limit:
        raise ValueError(f"the {what} box holds {len(text):,} characters; at most {limit:,} are accepted")
    return text


_GATES: "weakref.WeakSet[SessionGate]" = weakref.WeakSet()


class SessionGate:
    """At most ``limit`` live sessions per app. A session is counted from its creation until the studio closes it
    (gr.State's delete callback: tab closed or idle for the time to live) or until no event has used it for
    ``ttl_s`` (a safety net for sessions gradio drops without the callback, e.g. its LRU of session states)."""

    def __init__(self, limit: int, ttl_s: float = 2 * SESSION_TTL_S):
        self.limit, self.ttl_s = int(limit), float(ttl_s)
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        _GATES.add(self)

    def _expire(self, now: float) -> None:
        for sid, t in list(self._seen.items()):
            if now - t > self.ttl_s:
                del self._seen[sid]

    def open(self):
        """A new studio session, or a clear refusal when the app is full."""
        with self._lock:
            self._expire(time.monotonic())
            if len(self._seen) >= self.limit:
                log.warning("session refused: %d sessions open (cap %d)", len(self._seen), self.limit)
                raise user_error(f"ESM Studio is busy: {self.limit} people are using it right now, which is its "
                                 f"limit. Please try again in a few minutes (idle sessions close after "
                                 f"{SESSION_TTL_S / 60:.0f} minutes).")
            s = studio.new_session()
            self._seen[s.id] = time.monotonic()
            return s

    def touch(self, s) -> None:
        with self._lock:
            if s is not None and s.id in self._seen:
                self._seen[s.id] = time.monotonic()

    def close(self, s) -> None:
        """gr.State's delete callback: free the session's tensors and files, and its place."""
        with self._lock:
            if s is not None and hasattr(s, "id"):
                self._seen.pop(s.id, None)
        studio.close(s)

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


def short_name(path: str) -> str:
    return Path(path).name.split(".")[0]

