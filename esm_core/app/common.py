"""What every view of the ESM Studio app shares: limits, error messages, progress, ZeroGPU, the session gate.

This is the one place that names the studio back end: ``studio`` (the state and
logic of a browser session, no gradio) and ``viz`` (the figures). Views call
``studio.<fn>(s, ...)`` and ``viz.<fn>(...)`` only.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import html
import logging
import math
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import gradio as gr
from gradio.components.number import Number
from gradio.context import LocalContext

from esm_core import studio  # noqa: F401  (the views' back end)
from esm_core.studio import session as studio_session
from esm_core.checkpoints import CheckpointError, CHECKPOINT_EXTS
from esm_core.merging import METHODS  # noqa: F401
from esm_core.studio import viz  # noqa: F401
from .. import settings

log = logging.getLogger("esm_studio.app")

# ---------------------------------------------------------------- limits (the README's "Security and limits")
SESSION_TTL_S = 20 * 60           # a session's tensors are dropped this long after its last update (idle)
MAX_SESSIONS = 8                  # sessions holding a pool at once (env ESM_MAX_SESSIONS); others are turned away
MAX_FILE_SIZE = "2gb"             # uploads above this are refused by Gradio before they reach us
DELETE_CACHE = (15 * 60, 60 * 60)  # every 15 min, delete uploads / outputs older than an hour
MAX_TEXT_CHARS = 4096             # longest text input (task names box); longer is refused, never echoed
MAX_ARCH_CHARS = 128              # longest architecture name
TOAST_S = 15                      # seconds an error message stays on screen
ROUTING_RANKS = (2, 64, 2)        # the Routing view's expert-rank slider: min, max, step
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
    """The session cap: ``ESM_MAX_SESSIONS`` (:mod:`esm_core.settings`; default 8)."""
    return settings.max_sessions()


def user_error(text: str) -> gr.Error:
    """The message shown to the user: HTML-escaped (the toast renders HTML), closes by itself, no traceback."""
    return gr.Error(html.escape(text), duration=TOAST_S, print_exception=False)


RESOURCE_ERRORS = {   # errors that are no bug of the user's input alone: what the user reads instead of raw text
    MemoryError: "the server ran out of memory for this ({detail}); nothing was changed. Try fewer tasks, a "
                 "smaller model or a smaller rank, or try again later when fewer people use the app",
    RecursionError: "the input is nested too deeply to be read ({detail}); nothing was changed",
    OverflowError: "a number is too large to compute with ({detail}); nothing was changed: use smaller values",
    NotImplementedError: "this is not supported ({detail}); nothing was changed",
}


def _resource_message(e: BaseException) -> str:
    detail = str(e).replace("\n", " ").strip()[:200] or type(e).__name__
    for cls, text in RESOURCE_ERRORS.items():
        if isinstance(e, cls):
            return text.format(detail=detail)
    return str(e)


def friendly(fn: Callable) -> Callable:
    """Turn the studio's ValueError / CheckpointError / FileNotFoundError into a clear message for the user,
    logged as one line (the error is the user's: no traceback); MemoryError, RecursionError, OverflowError and
    NotImplementedError into a message that says what happened (:data:`RESOURCE_ERRORS`, one log line); work
    stopped by Cancel, a disconnect or the session's end (:class:`studio.Cancelled`) into a "Cancelled" message
    (the outputs on screen stay as they were).

    A handler whose first argument is the session keeps that session alive while it runs (:func:`keep_alive`):
    a build or merge longer than the session's time to live does not lose its session."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        s = args[0] if args and isinstance(args[0], studio.Session) else None
        with keep_alive(s):
            return _call(fn, args, kwargs)
    return wrapper


def _call(fn: Callable, args, kwargs):
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
    except tuple(RESOURCE_ERRORS) as e:
        msg, out_of_memory = _resource_message(e), isinstance(e, MemoryError)
        log.warning("%s in %s: %.300s", type(e).__name__, fn.__name__, str(e).replace("\n", " "))
    # outside the except block: the failed work's frames (and what they allocated) are released
    if out_of_memory:
        studio_session.trim_heap()
    raise user_error(msg)


def install_quiet_bounds() -> bool:
    """Gradio checks a number input against its slider's or box's bounds before the handler runs and, on a value
    out of range (posted as raw JSON), raises an error that prints a ~25-line traceback per request. Make it the
    user error it is: the same message to the client, one log line on the server (idempotent; False when this
    gradio has no such check)."""
    check = getattr(Number, "raise_if_out_of_bounds", None)
    if check is None:
        return False
    if getattr(check, "esm_quiet", False):
        return True

    def raise_if_out_of_bounds(num, minimum, maximum):
        try:
            check(num, minimum, maximum)
        except gr.Error as e:
            log.warning("user error: %.200s", getattr(e, "message", e))
            raise gr.Error(getattr(e, "message", str(e)), duration=TOAST_S, print_exception=False) from None

    raise_if_out_of_bounds.esm_quiet = True
    Number.raise_if_out_of_bounds = staticmethod(raise_if_out_of_bounds)
    return True


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
        raise user_error("the session is still starting (or has expired): reload the page (the comparison "
                         "table of your merges comes back with it)")
    _refresh(_event_state(), s)
    return s


# ---------------------------------------------------------------- keeping a working session alive
def keepalive_interval() -> float:
    """Seconds between two refreshes of a busy session's lifetime: well inside its time to live."""
    return max(0.2, min(30.0, SESSION_TTL_S / 4))


def _event_state():
    """Gradio's per-browser state of the event running in this thread (``SessionState``), or None outside one."""
    blocks, request = LocalContext.blocks.get(None), LocalContext.request.get(None)
    holder, sid = getattr(blocks, "state_holder", None), getattr(request, "session_hash", None)
    if holder is None or sid is None:
        return None
    return holder.session_data.get(sid)


def _refresh(state, s) -> None:
    """Restart the lifetimes of a session: gradio's gr.State time to live (counted from the state's last write:
    an event that only reads the session, like the text-pool build, never restarts it) and the gate's."""
    if state is not None and not getattr(state, "is_closed", False):
        now = datetime.datetime.now()
        ttl = getattr(state, "_state_ttl", None)
        if isinstance(ttl, dict):
            for key, (live, _) in list(ttl.items()):
                ttl[key] = (live, now)
    if s is not None:
        for gate in list(_GATES):
            gate.touch(s)


class _KeepAlive:
    """Refreshes the lifetimes of every session an event is working with, every :func:`keepalive_interval`
    seconds, from one daemon thread (started on first use): work that reports no progress for minutes keeps its
    session too."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: dict[int, tuple] = {}
        self._thread: threading.Thread | None = None

    def add(self, token: int, state, s) -> None:
        with self._lock:
            self._live[token] = (state, s)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="esm-keepalive", daemon=True)
                self._thread.start()

    def remove(self, token: int) -> None:
        with self._lock:
            self._live.pop(token, None)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(min(1.0, keepalive_interval()))       # short ticks: a shorter time to live takes effect soon
            if time.monotonic() - last < keepalive_interval():
                continue
            last = time.monotonic()
            with self._lock:
                live = list(self._live.values())
            for state, s in live:
                try:
                    _refresh(state, s)
                except Exception as e:  # noqa: BLE001 - a refresh must never kill the thread
                    log.warning("keep-alive: %s", e)


_KEEPALIVE = _KeepAlive()


@contextlib.contextmanager
def keep_alive(s):
    """While the block runs, the session ``s`` is busy (no gate frees it, :func:`studio.session.working`) and its
    lifetimes are refreshed (:func:`_refresh`): at the start, every :func:`keepalive_interval` seconds and at the end."""
    if s is None:
        yield
        return
    state, token = _event_state(), object()
    with studio_session.working(s):
        _refresh(state, s)
        _KEEPALIVE.add(id(token), state, s)
        try:
            yield
        finally:
            _KEEPALIVE.remove(id(token))
            _refresh(state, s)


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
    """At most ``limit`` live sessions per app, and never more session folders than that.

    A session is counted from its creation until it is closed — by gr.State's delete callback (idle for the time
    to live), by :meth:`close_request` when its tab closes (``demo.unload``), or by the gate itself once no event
    has used it for ``ttl_s`` and none is working with it (a safety net for sessions gradio keeps or drops
    without the callback: gradio keeps a closed tab's state for an hour). Closing frees the session's tensors and
    deletes its folder (:func:`studio.close`)."""

    def __init__(self, limit: int, ttl_s: float | None = None):
        self.limit = int(limit)
        self.ttl_s = float(2 * SESSION_TTL_S if ttl_s is None else ttl_s)
        self._seen: dict[str, float] = {}
        self._sessions: dict[str, weakref.ref] = {}
        self._lock = threading.Lock()
        _GATES.add(self)

    def _expire(self, now: float) -> list:
        """Forget the sessions idle for ``ttl_s`` that no event is working with; returns them (to close)."""
        gone = []
        for sid, t in list(self._seen.items()):
            s = self._sessions[sid]() if sid in self._sessions else None
            if s is not None and getattr(s, "busy", 0) > 0:
                continue                                # a long build or merge: not idle
            if now - t > self.ttl_s:
                del self._seen[sid]
                self._sessions.pop(sid, None)
                if s is not None:
                    gone.append(s)
        return gone

    def _close_all(self, sessions) -> None:
        for s in sessions:
            log.info("session %s closed: idle for %.0f s", s.id, self.ttl_s)
            studio.close(s)

    def open(self):
        """A new studio session, or a clear refusal when the app is full."""
        with self._lock:
            gone = self._expire(time.monotonic())
            full = len(self._seen) >= self.limit
            if not full:
                s = studio.new_session()
                self._seen[s.id] = time.monotonic()
                self._sessions[s.id] = weakref.ref(s)
        self._close_all(gone)
        if full:
            log.warning("session refused: %d sessions open (cap %d)", len(self), self.limit)
            raise user_error(f"ESM Studio is busy: {self.limit} people are using it right now, which is its "
                             f"limit. Please try again in a few minutes (idle sessions close after "
                             f"{SESSION_TTL_S / 60:.0f} minutes).")
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
                self._sessions.pop(s.id, None)
        studio.close(s)

    def sessions(self) -> list:
        """The sessions counted now (live objects only)."""
        with self._lock:
            return [s for s in (r() for r in self._sessions.values()) if s is not None]

    def sweep(self) -> int:
        """Close the sessions :meth:`_expire` finds; returns how many (run by :func:`close_tab` and on every open)."""
        with self._lock:
            gone = self._expire(time.monotonic())
        self._close_all(gone)
        return len(gone)

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


def close_tab(demo, state_component, gate: SessionGate) -> Callable:
    """``demo.unload``'s handler: when a tab closes (its heartbeat stream ends), close its session at once — free
    its tensors, delete its folder, give back its place — and drop it from gradio's state, which gradio would
    otherwise keep for an hour (``SessionState.STATE_TTL_WHEN_CLOSED``, overriding the app's time to live)."""
    def unload(request: gr.Request):
        holder = getattr(demo, "state_holder", None)
        sid = getattr(request, "session_hash", None)
        state = holder.session_data.get(sid) if holder is not None and sid is not None else None
        s = None
        if state is not None:
            s = state.state_data.pop(state_component._id, None)
            getattr(state, "_state_ttl", {}).pop(state_component._id, None)
        if isinstance(s, studio.Session):
            log.info("session %s closed: its tab closed", s.id)
            gate.close(s)
        gate.sweep()
    return unload


def short_name(path: str) -> str:
    return Path(path).name.split(".")[0]

