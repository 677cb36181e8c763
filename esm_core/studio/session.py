"""One ESM Studio browser session: its state, its lifetime, its pool (what ``esm_core.app`` calls through
:mod:`esm_core.studio`).

A :class:`Session` holds one user's pool (the built-in demo or uploaded
checkpoints), the expensive caches computed on first use (activation
statistics, decompositions, spectra), every merge of the session (the
comparison table), the current merge's update and the ESM++ routed model.
The module functions below are the operations of the views; each takes the
session first and an optional ``progress(fraction, description)`` callback.
Nothing here imports gradio: bad input raises :class:`ValueError` (or
:class:`~esm_core.checkpoints.CheckpointError`), and the app turns it into
a message for the user. The views' operations live beside this module:
:mod:`.live` (merging, α curve), :mod:`.inspect` (spectra, interference),
:mod:`.routing` (ESM++), :mod:`.export`.

Live merging: every method's update is affine in α, so the first merge with
a given set of parameters computes the update at α = 0 and α = 1 once
(:func:`esm_core.evaluation.alpha.affine_updates`); moving α afterwards only
recombines. Accuracy in the live view is measured on a fixed, seeded subset
of each task's test split (``live_per_task`` images); :func:`full_evaluation`
measures the whole split.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import types
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..progress import Progress, no_progress as _noop  # noqa: F401  (the studio's views import it from here)
from .. import settings
from ..device import resolve_device, trim_heap
from ..evaluation.accuracy import normalised
from ..merging import get_method
from ..models import family_or_vit
from ..models.roles import MATRIX
from ..pools import text_build
from ..pools.demo import DEMO_DIR, load_demo_pool
from ..pools.hf_vit_pool import hf_vit_pool_from_upload
from ..pools.text_pool import load_text_task_pool
from ..pools.upload import pool_from_upload
from ..pools.upload_text import text_pool_from_upload
from . import shared


LIVE_PER_TASK = 100          # test images per task behind the live accuracy bars
ALPHA_PER_TASK = 50          # validation images per task behind the α curve
AFFINE_CACHE = 3             # parameter sets whose α=0 / α=1 updates a session keeps (live merging)
# besides its pool, a session keeps up to this many model-sized sets of tensors: the α=0 and α=1 updates of
# AFFINE_CACHE parameter sets, the current merge's update, the image tower it evaluates with, the ESM++ merge
WORKING_COPIES = 2 * AFFINE_CACHE + 3


class Cancelled(Exception):
    """Work stopped on purpose, at a progress report: the user pressed Cancel, the client went away, or the
    session was closed. The operation leaves the session as it was (caches of finished work excepted)."""


@dataclass
class Session:
    """Everything one browser session owns. Create with :func:`new_session`; free with :func:`close`.

    ``device_pref`` ("auto", "cpu", "cuda") is resolved at every use, so a
    session created where no GPU is visible uses one inside a GPU worker
    (Hugging Face ZeroGPU). Sessions pickle (without their lock) for the same reason.
    """
    device_pref: str
    workdir: Path
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    live_per_task: int = LIVE_PER_TASK
    alpha_per_task: int = ALPHA_PER_TASK
    pool: Any = None
    origin: str = ""                         # "demo" or "upload"
    notes: list = field(default_factory=list)  # what the user should know about the pool (refusals, choices)
    stats: Any = None                        # probe_pool result (first use)
    cache: Any = None                        # DecompositionCache shared by ESM merges and the analysis
    spectra_rows: list | None = None
    cosines: dict | None = None
    refs: dict = field(default_factory=dict)  # {split: {"zeroshot": .., "finetuned": ..}} on the capped subsets
    affine: OrderedDict = field(default_factory=OrderedDict)   # (method, params) -> (u0, slope)
    merges: list = field(default_factory=list)                # every merge of the session (comparison table)
    current: dict | None = None              # the latest merge, with its update
    curves: dict = field(default_factory=dict)                # (method, params) -> α curve
    esmpp: Any = None                        # ESM++ routed model + its build record
    routing: dict | None = None              # the latest routing run
    _visual: Any = None                      # one image tower, reloaded for every evaluation
    lock: Any = field(default_factory=threading.RLock, repr=False)
    closed: bool = False
    cancel_epoch: int = 0                    # :func:`cancel` bumps it; work started before then stops
    busy: int = 0                            # events working with the session now (:func:`working`)
    _closer: Any = field(default=None, repr=False)   # the thread freeing a session closed while it worked

    @property
    def device(self) -> torch.device:
        return resolve_device(self.device_pref)

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("lock", None)
        d["_visual"] = d["_closer"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.lock = threading.RLock()


def new_session(device: str | torch.device = "auto", *, live_per_task: int = LIVE_PER_TASK,
                alpha_per_task: int = ALPHA_PER_TASK) -> Session:
    """A fresh, empty session with its own temporary folder (for exports)."""
    resolve_device(device)                 # refuse an unusable device now
    return Session(device_pref=str(device), workdir=Path(tempfile.mkdtemp(prefix="esm-studio-session-")),
                   live_per_task=int(live_per_task), alpha_per_task=int(alpha_per_task))


def close(s: Session | None) -> None:
    """Free a session: drop its tensors and delete its files (the gr.State delete callback).

    Never waits for running work: the session is marked closed at once, so that work stops at its next
    progress report (:func:`guarded`), and is freed as soon as that work lets go of it (by a helper thread
    when it is busy; gradio calls this from its event loop, which must not block)."""
    if s is None or not isinstance(s, Session):
        return
    s.closed = True
    if s.lock.acquire(blocking=False):
        try:
            _free(s)
        finally:
            s.lock.release()
        return
    s._closer = threading.Thread(target=_free_when_idle, args=(s,), name=f"esm-close-{s.id}", daemon=True)
    s._closer.start()


def _free(s: Session) -> None:
    s.pool = s.stats = s.cache = s.current = s.esmpp = s.routing = s._visual = None
    s.affine.clear()
    s.merges.clear()
    s.curves.clear()
    shutil.rmtree(s.workdir, ignore_errors=True)
    trim_heap()


def _free_when_idle(s: Session) -> None:
    with s.lock:
        _free(s)


_BUSY_LOCK = threading.Lock()


class working:
    """``with working(s):`` marks the session busy while an event works with it (:attr:`Session.busy`), so that
    nothing that frees idle sessions (the app's session gate) frees it under a long build or merge."""

    def __init__(self, s):
        self.s = s if isinstance(s, Session) else None

    def __enter__(self):
        if self.s is not None:
            with _BUSY_LOCK:
                self.s.busy += 1
        return self.s

    def __exit__(self, *exc):
        if self.s is not None:
            with _BUSY_LOCK:
                self.s.busy = max(0, self.s.busy - 1)
        return False


def cancel(s: Session | None) -> None:
    """Stop the session's running work at its next progress report (:func:`guarded`); later work runs."""
    if isinstance(s, Session):
        s.cancel_epoch += 1


def guarded(s: Session, progress: Progress | None = None, still_wanted: Callable[[], bool] | None = None
            ) -> Progress:
    """``progress`` as a callback that first raises :class:`Cancelled` when the work is no longer wanted: the
    session was closed, :func:`cancel` was called after this guard was made, or ``still_wanted()`` says no
    (the app: the client disconnected). Every long operation reports progress inside its loops (per layer,
    per task, per α), so that is where it stops."""
    report = progress or _noop
    epoch = s.cancel_epoch

    def check(frac: float, desc: str) -> None:
        if s.closed:
            raise Cancelled("the session was closed")
        if s.cancel_epoch != epoch:
            raise Cancelled("cancelled")
        if still_wanted is not None and not still_wanted():
            raise Cancelled("the client disconnected")
        report(frac, desc)
    return check


def stats_folder(s: Session) -> Path:
    """Where the session's probe statistics live (:func:`esm_core.studio.inspect.ensure_stats`)."""
    return s.workdir / "stats"


def _reset(s: Session) -> None:
    """Forget everything derived from the previous pool."""
    s.stats = s.spectra_rows = s.cosines = s.current = s.esmpp = s.routing = s._visual = None
    shutil.rmtree(stats_folder(s), ignore_errors=True)          # the statistics (studio.inspect.ensure_stats)
    s.cache = None
    s.refs.clear()
    s.affine.clear()
    s.merges.clear()
    s.curves.clear()
    s.notes = []


def _need_pool(s: Session):
    if s.closed:
        raise ValueError("this session has ended: reload the page")
    if s.pool is None:
        raise ValueError("no pool is loaded yet: load the demo pool or upload checkpoints first")
    return s.pool


def memory_budget() -> int:
    """Bytes of tensors one session may hold: ``ESM_SESSION_MEMORY_MB`` (:mod:`esm_core.settings`; 8 GiB)."""
    return settings.session_memory_bytes()


def tensor_bytes(*objs, seen: set | None = None) -> int:
    """Bytes of the tensors (torch, numpy) reachable from ``objs`` through containers, modules and object
    attributes; a storage shared by several tensors counts once — also across calls that pass one ``seen`` set
    (e.g. the parts of a session, each storage counted in the first part that holds it)."""
    seen_ids, total, stack = set(), 0, [(o, 0) for o in objs]
    storages = set() if seen is None else seen
    while stack:
        obj, depth = stack.pop()
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, types.ModuleType, type)) \
                or id(obj) in seen_ids or depth > 16:
            continue                          # a module or class (a model family's module) holds no session tensor
        seen_ids.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "meta":
                continue
            st = obj.untyped_storage()
            key = (obj.device.type, st.data_ptr())
            if key not in storages:
                storages.add(key)
                total += st.nbytes()
        elif isinstance(obj, np.ndarray):
            key = ("numpy", obj.__array_interface__["data"][0])
            if obj.base is None and key not in storages:
                storages.add(key)
                total += obj.nbytes
        elif isinstance(obj, torch.nn.Module):      # parameters and buffers, then plain attributes (ESM++ factors)
            stack += [(v, depth + 1) for v in obj.state_dict(keep_vars=True).values()]
            stack += [(v, depth + 1) for v in vars(obj).values() if not isinstance(v, (dict, torch.nn.Module))]
        elif isinstance(obj, dict):
            stack += [(v, depth + 1) for v in obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += [(v, depth + 1) for v in obj]
        else:
            attrs = dict(getattr(obj, "__dict__", {}))
            for cls in type(obj).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(obj, name):
                        attrs[name] = getattr(obj, name)
            stack += [(v, depth + 1) for v in attrs.values() if not callable(v) or isinstance(v, torch.nn.Module)]
    return total


def memory(s: Session) -> dict:
    """Bytes of tensors the session holds now: its pool and what it computed from it."""
    with s.lock:
        parts = {"pool": tensor_bytes(s.pool), "probe statistics": tensor_bytes(s.stats),
                 "decompositions": tensor_bytes(s.cache),
                 "merges": tensor_bytes(s.affine, s.current, s.esmpp, s.routing, s._visual)}
    return {**parts, "total": sum(parts.values()), "budget": memory_budget()}


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def trim_caches(s: Session) -> list[str]:
    """Keep the session within its memory budget by dropping what can be recomputed, oldest first: the α=0 /
    α=1 updates of earlier parameter sets, the decompositions, the ESM++ model. Returns what was dropped."""
    dropped = []
    with s.lock:
        budget = memory_budget()
        steps = [("earlier parameter sets' updates", lambda: len(s.affine) > 1,
                  lambda: [s.affine.popitem(last=False) for _ in range(len(s.affine) - 1)]),
                 ("decompositions", lambda: s.cache is not None, lambda: setattr(s, "cache", None)),
                 ("ESM++ model", lambda: s.esmpp is not None, lambda: setattr(s, "esmpp", None))]
        for what, present, drop in steps:
            if memory(s)["total"] <= budget:
                break
            if present():
                drop()
                dropped.append(what)
    return dropped


def check_memory(pool_bytes: int, base_bytes: int, what: str) -> None:
    """Refuse a pool whose tensors (``pool_bytes``) and the model-sized copies a session keeps while merging
    (:data:`WORKING_COPIES` × ``base_bytes``) would exceed :func:`memory_budget`; the message names the figures."""
    need, budget = pool_bytes + WORKING_COPIES * base_bytes, memory_budget()
    if need > budget:
        raise ValueError(f"{what} needs about {_mib(need)} in this session ({_mib(pool_bytes)} of checkpoints and "
                         f"data, plus {WORKING_COPIES} model-sized copies of {_mib(base_bytes)} kept while merging), "
                         f"more than the {_mib(budget)} a session may hold (ESM_SESSION_MEMORY_MB): use fewer tasks "
                         "or a smaller model")


def load_pool(s: Session, pool, origin: str, notes: list[str] | None = None, files: Path | None = None) -> dict:
    """Make ``pool`` (a TaskPool) the session's pool; returns :func:`pool_info`. Refused (the previous pool stays)
    when it would not fit the session's memory budget (:func:`check_memory`). ``files``: the folder of the
    session's workdir holding the new pool's checkpoints; the previous pools' folders (``pool-*``) are deleted."""
    if len(pool.task_names) < 2:
        raise ValueError(f"merging needs at least two task models; this pool has {len(pool.task_names)}")
    check_memory(tensor_bytes(pool), tensor_bytes(pool.base), f"the pool {getattr(pool, 'name', '')!r}")
    with s.lock:
        _reset(s)
        s.pool, s.origin, s.notes = pool, origin, list(notes or [])
        for old in s.workdir.glob("pool-*"):       # the previous upload's task files: its pool is gone
            if files is None or old != Path(files):
                shutil.rmtree(old, ignore_errors=True)
        trim_heap()                                # the previous pool's memory
        return pool_info(s)


def load_demo(s: Session, loader: Callable[[], Any] | None = None, progress: Progress | None = None) -> dict:
    """Load the built-in demo pool (``loader`` overrides :func:`esm_core.pools.demo.load_demo_pool`)."""
    report = progress or _noop
    report(0.1, "loading the demo pool")
    if loader is None:                 # the committed demo: its results are shared by its sessions (studio.shared)
        pool = shared.load_stamped(DEMO_DIR, load_demo_pool)
    else:
        pool = loader()
    report(1.0, "demo pool loaded")
    return load_pool(s, pool, "demo")


def text_pool_status(path=None) -> dict:
    """Whether the ``text`` pool is built in the cache: ``{"built", "path", "tasks", "model"}``."""
    path = Path(path or text_build.TEXT_POOL_DIR).expanduser()
    try:
        cfg = json.loads((path / "pool.json").read_text())
        return {"built": True, "path": str(path), "tasks": list(cfg["tasks"]), "model": cfg.get("model")}
    except (OSError, ValueError, KeyError):
        return {"built": False, "path": str(path), "tasks": list(text_build.TASKS),
                "model": "sentence-transformers/all-MiniLM-L6-v2"}


def load_text(s: Session, path=None, progress: Progress | None = None) -> dict:
    """Load the built ``text`` pool (MiniLM on 8 text tasks, methods §8) from the cache (seconds)."""
    report = progress or _noop
    st = text_pool_status(path)
    if not st["built"]:
        raise ValueError(f"the text pool is not built yet (no pool.json in {st['path']}): build it first "
                         "(the Pool view's button, or `esm-studio build-pool text`)")
    report(0.1, "loading the text pool")
    pool = shared.load_stamped(st["path"], lambda: load_text_task_pool(st["path"]))   # results shared (studio.shared)
    report(1.0, "text pool loaded")
    return load_pool(s, pool, "text")


_TEXT_BUILD = threading.Lock()       # one text-pool build per process: every session shares the cache folder


def build_text(path=None, progress: Progress | None = None, **kwargs) -> dict:
    """Build the ``text`` pool into the cache (fine-tuning on this machine: tens of minutes on a CPU; tasks a
    previous build made with the same recipe are reused). Needs the registry packages of the README's text
    section; a missing one is named with its install command. One build at a time (a second call while one
    runs is refused). Returns the pool.json dict."""
    out = Path(path or text_build.TEXT_POOL_DIR).expanduser()
    if not _TEXT_BUILD.acquire(blocking=False):
        raise ValueError("the text pool is being built already (by this or another session): wait for it, then "
                         "load it")
    try:
        return text_build.build_text_pool(out, progress=progress, **kwargs)
    finally:
        _TEXT_BUILD.release()


def pool_info(s: Session) -> dict:
    """What the Pool view shows: name, architecture, parameter count, tasks (classes, images), notes."""
    pool = _need_pool(s)
    base = pool.base
    n_params = int(sum(v.numel() for v in base.values()))
    fam = family_or_vit(list(base))
    blocks = sorted({fam.block_index(k) for k in base if fam.block_index(k) is not None})
    layers = [k for k in fam.layer_types_of(base) if fam.block_index(k) == (blocks[0] if blocks else None)]
    # the model's width: the input width most of the first block's matrices share (the residual stream's; a
    # decoder's keys sort mlp.down_proj, whose input is the MLP's width, first)
    widths = [int(base[k].shape[1]) for k in layers]
    width = max(widths, key=widths.count) if widths else None
    unit = "sentences" if pool.modality == "text" else "images"
    tasks = []
    for t in pool.task_names:
        sizes = {split: int(len(pool.data[t][split][1])) for split in ("val", "test")
                 if t in getattr(pool, "data", {}) and split in pool.data[t]}
        tasks.append({"task": t, "classes": len(pool.class_names[t]), f"val {unit}": sizes.get("val", 0),
                      f"test {unit}": sizes.get("test", 0),
                      "example classes": ", ".join(pool.class_names[t][:4]) + (" …" if len(pool.class_names[t]) > 4 else "")})
    return {"name": pool.name, "origin": s.origin, "model": model_label(getattr(pool, "model_name", None)),
            "parameters": n_params, "blocks": len(blocks), "width": width,
            "matrices": sum(1 for k, v in base.items() if fam.key_role(k, v) == MATRIX),
            "family": fam.NAME, "inputs": unit,
            "tasks": tasks, "notes": list(s.notes), "device": str(s.device)}


def model_label(model) -> str:
    """The pool's model as the Pool view names it: an open_clip model name as it is; an uploaded model config
    (a dict: never registered under a name) as its recorded name or a one-line description of its shape."""
    if model is None:
        return "?"
    if not isinstance(model, dict):
        return str(model)[:200]
    name = model.get("_name")
    v = model.get("vision_cfg") if isinstance(model.get("vision_cfg"), dict) else {}
    shape = ", ".join(f"{what} {v[k]}" for k, what in (("image_size", "image"), ("patch_size", "patch"),
                                                        ("layers", "layers"), ("width", "width")) if k in v)
    desc = f"open_clip ViT from the uploaded config ({shape})" if shape else "open_clip model from the uploaded config"
    return f"{str(name)[:120]} (uploaded config)" if name else desc


# ---------------------------------------------------------------- the merge history across page reloads
HISTORY_MAX = 200            # merges of a session kept in the browser (the most recent ones)
HISTORY_MAX_TASKS = 64       # tasks of a pool whose history is kept
HISTORY_MAX_CHARS = 256      # longest string (pool name, task name, parameter value) in a stored history
HISTORY_POOLS = 4            # pools whose tables the browser keeps at once (the most recently merged on)


def _pool_key(s: Session) -> dict:
    pool = s.pool
    return {"name": str(pool.name), "origin": s.origin, "tasks": [str(t) for t in pool.task_names]}


def history(s: Session) -> dict | None:
    """The session's comparison table as plain JSON — pool, fine-tuned references, and per merge its method,
    parameters, accuracies and time, never tensors — for the browser to keep across a page reload
    (:func:`restore_history` reads it back). None when the session has no merges."""
    if s.closed or s.pool is None or not s.merges:
        return None
    with s.lock:
        ft = (s.refs.get("test") or {}).get("finetuned")
        if not ft:
            return None
        merges = [{"method": r["method"], "params": dict(r["params"]), "accs": {t: float(a) for t, a in
                                                                               r["accs"].items()},
                   "seconds": float(r.get("seconds", 0.0))} for r in s.merges[-HISTORY_MAX:]]
        return {"version": 1, "pool": _pool_key(s), "fingerprint": shared.content_fingerprint(s.pool),
                "finetuned": {t: float(a) for t, a in ft.items()}, "merges": merges}


def _stored_tables(stored) -> list:
    """The tables a browser keeps: ``{"version": 2, "pools": [history, ...]}`` (one per pool), or one history."""
    if isinstance(stored, dict) and stored.get("version") == 2:
        pools = stored.get("pools")
        if not isinstance(pools, list) or len(pools) > HISTORY_POOLS:
            raise ValueError(f"a stored history keeps a list of at most {HISTORY_POOLS} pools' tables")
        return pools
    return [] if stored is None else [stored]


def remember(s: Session, stored=None) -> dict | None:
    """What the browser keeps after a change of the session's table: ``{"version": 2, "pools": [...]}`` with this
    pool's table (:func:`history`) in place of its earlier one and the other pools' tables as they were (the
    :data:`HISTORY_POOLS` most recent), so that loading another pool and coming back — or reloading the page —
    finds each pool's table (matched by :func:`esm_core.studio.shared.content_fingerprint`). None when the
    session has no table to keep."""
    h = history(s)
    if h is None:
        return None
    try:
        others = [x for x in _stored_tables(stored)
                  if isinstance(x, dict) and x.get("fingerprint") != h["fingerprint"]]
    except ValueError:
        others = []                                   # a malformed store is replaced
    return {"version": 2, "pools": (others + [h])[-HISTORY_POOLS:]}


def _unit(x, what: str, hi: float = 1.0) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 0.0 <= x <= hi:
        raise ValueError(f"{what} is not a number in [0, {hi:g}]")
    return float(x)


def _check_history(data, s: Session) -> list[dict] | None:
    """The merge records of a stored history, checked field by field (it comes from the client): None when it is
    another pool's; ValueError naming the first thing wrong."""
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ValueError("not a merge history of this app")
    key, want = data.get("pool"), _pool_key(s)
    if not isinstance(key, dict) or set(key) != {"name", "origin", "tasks"}:
        raise ValueError("the history names no pool")
    if key != want or data.get("fingerprint") != shared.content_fingerprint(s.pool):
        return None                                   # another pool's merges (or the same name, other content)
    tasks = want["tasks"]
    if len(tasks) > HISTORY_MAX_TASKS or any(len(t) > HISTORY_MAX_CHARS for t in tasks):
        raise ValueError("the pool has too many tasks, or too long task names, for a stored history")
    ft = data.get("finetuned")
    if not isinstance(ft, dict) or list(ft) != tasks:
        raise ValueError("the history's fine-tuned references do not match the pool's tasks")
    ft = {t: _unit(ft[t], f"fine-tuned accuracy of {t!r}") for t in tasks}
    merges = data.get("merges")
    if not isinstance(merges, list) or len(merges) > HISTORY_MAX:
        raise ValueError(f"a history holds a list of at most {HISTORY_MAX} merges")
    out = []
    for i, r in enumerate(merges, 1):
        if not isinstance(r, dict) or set(r) != {"method", "params", "accs", "seconds"}:
            raise ValueError(f"merge {i} of the history is malformed")
        if not isinstance(r["method"], str) or not isinstance(r["params"], dict) or len(r["params"]) > 32:
            raise ValueError(f"merge {i} of the history is malformed")
        for k, v in r["params"].items():
            if not isinstance(k, str) or len(k) > 64 or not (
                    isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= HISTORY_MAX_CHARS)):
                raise ValueError(f"merge {i} of the history: parameter {str(k)[:64]!r} is not a plain value")
        m = get_method(r["method"])
        params = m.resolve(r["params"])               # every value checked (types, bounds), unknown names refused
        accs = r["accs"]
        if not isinstance(accs, dict) or list(accs) != tasks:
            raise ValueError(f"merge {i} of the history: its accuracies do not match the pool's tasks")
        accs = {t: _unit(accs[t], f"merge {i}: accuracy of {t!r}") for t in tasks}
        out.append({"method": m.name, "title": m.title, "params": params, "accs": accs,
                    "summary": normalised(accs, ft), "seconds": _unit(r["seconds"], f"merge {i}: seconds", 1e7)})
    return out


def restore_history(s: Session, data) -> int:
    """Put a stored history (:func:`history`, kept by the browser) back into a session that has no merges yet:
    its merges become the first rows of the comparison table (records without their updates: the tensors are not
    kept, so none of them is the current merge). Another pool's history is ignored. Returns how many rows were
    restored; ValueError (nothing changed) when the history is malformed. ``data`` may also be what
    :func:`remember` returns (several pools' tables): this pool's is restored."""
    if data is None:
        return 0
    pool = _need_pool(s)
    with s.lock:
        if s.merges:
            return 0
        tables = _stored_tables(data)
        fp = shared.content_fingerprint(pool)
        if len(tables) > 1 or (isinstance(data, dict) and data.get("version") == 2):
            tables = [x for x in tables if isinstance(x, dict) and x.get("fingerprint") == fp][-1:]
        if not tables:
            return 0
        recs = _check_history(tables[0], s)
        if not recs:
            return 0
        for i, r in enumerate(recs, 1):
            r["id"] = i
            r["restored"] = True
            r["config"] = {"method": r["method"], "params": dict(r["params"]), "pool": pool.name, "origin": s.origin,
                           "tasks": list(pool.task_names), "restored": "from the page before a reload"}
        s.merges.extend(recs)
        return len(recs)


def sample_texts(s: Session, k: int = 3, max_chars: int = 240) -> list[dict]:
    """``k`` test sentences of every task of a text pool, each of a different class where the task's first
    sentences allow: ``[{"task", "class", "sentence"}]`` (cut to ``max_chars`` for display: the model reads
    its first tokens only); empty for an image pool."""
    pool = _need_pool(s)
    if pool.modality != "text":
        return []
    out = []
    for t in pool.task_names:
        texts, y = pool.texts(t, "test")
        y = [int(c) for c in y[:64]]
        picks = [y.index(c) for c in list(dict.fromkeys(y))[:k]]
        picks += [i for i in range(len(y)) if i not in picks][:k - len(picks)]
        for i in picks:
            text = texts[i] if len(texts[i]) <= max_chars else texts[i][:max_chars].rstrip() + " …"
            out.append({"task": t, "class": pool.class_names[t][y[i]], "sentence": text})
    return out


def sample_images(s: Session, k: int = 4, size: int = 96) -> list[tuple[np.ndarray, str]]:
    """``k`` images of every task for display, of as many different classes as the task's samples have,
    upscaled (nearest) to about ``size`` pixels, captioned with the task and class (empty for a text pool)."""
    pool = _need_pool(s)
    if pool.modality == "text":
        return []
    out = []
    for t in pool.task_names:
        try:
            _, y, raw = pool.samples(t, max(64, k))
        except ValueError:
            continue
        y = y.tolist()
        first = list(dict.fromkeys(y))                      # classes in order of first appearance
        picks = [y.index(c) for c in first[:k]]
        picks += [i for i in range(len(y)) if i not in picks][:k - len(picks)]
        for i in picks:
            img = np.asarray(raw[i])
            f = max(1, size // max(img.shape[0], 1))
            img = np.repeat(np.repeat(img, f, axis=0), f, axis=1)
            out.append((img, f"{t}: {pool.class_names[t][int(y[i])]}"))
    return out


def load_uploaded(s: Session, base_path, task_paths, image_zips=None, *, arch: str = "auto", config=None,
                  preprocessor=None, head_width: int | None = None, normalisation: str | None = None,
                  demo_loader: Callable[[], Any] | None = None, progress: Progress | None = None,
                  heads=None, head_names=None, templates=None) -> dict:
    """Build a pool from uploaded files (:func:`esm_core.pools.upload.pool_from_upload`: the architecture
    and normalisation are read from ``config`` / chosen by ``arch``, never guessed) and make it the session's.
    The previous pool stays loaded when anything is refused, before anything is read when the checkpoint files
    alone already exceed the session's memory budget. The checked task checkpoints are kept in the session's
    folder (float32 safetensors) and read key by key when used, so the session holds the base in memory, not
    every task; they are deleted with the session or when another pool replaces this one."""
    paths = list(task_paths.values()) if isinstance(task_paths, dict) else list(task_paths or [])
    # one size per task, a file given for several tasks counted for each: each task is read and kept on its own
    sizes = [Path(p).stat().st_size for p in [base_path, *paths] if p is not None and Path(p).is_file()]
    base_size = Path(base_path).stat().st_size if base_path is not None and Path(base_path).is_file() else 0
    check_memory(sum(sizes), base_size, f"this upload ({len(sizes)} checkpoint files)")
    return _load_upload(s, lambda keep: pool_from_upload(
        base_path, task_paths, image_zips, arch=arch, config=config, preprocessor=preprocessor,
        head_width=head_width, normalisation=normalisation, demo_loader=demo_loader, progress=progress,
        keep_dir=keep, memory_budget=memory_budget(), working_copies=WORKING_COPIES, heads=heads,
        head_names=head_names, templates=templates))


def load_uploaded_text(s: Session, base_path, task_paths, text_files, *, config, tokenizer_files,
                       progress: Progress | None = None) -> dict:
    """A text pool from uploads (:func:`esm_core.pools.upload_text.text_pool_from_upload`: BERT-family sequence
    classifiers, their config.json and tokenizer, labelled sentences per task) made the session's pool. The
    previous pool stays loaded when anything is refused, before anything is read when the checkpoint and text
    files alone already exceed the session's memory budget (as for image uploads)."""
    paths = list(task_paths.values()) if isinstance(task_paths, dict) else list(task_paths or [])
    texts = list(text_files.values()) if isinstance(text_files, dict) else []
    # one size per task, a file given for several tasks counted for each (each task is read and kept on its own)
    sizes = [Path(p).stat().st_size for p in [base_path, *paths, *texts] if p is not None and Path(p).is_file()]
    base_size = Path(base_path).stat().st_size if base_path is not None and Path(base_path).is_file() else 0
    check_memory(sum(sizes), base_size, f"this upload ({len(sizes)} files)")
    return _load_upload(s, lambda keep: text_pool_from_upload(
        base_path, task_paths, text_files, config, tokenizer_files, progress=progress, keep_dir=keep,
        memory_budget=memory_budget(), working_copies=WORKING_COPIES))


def load_uploaded_hf_vit(s: Session, base_path, task_paths, image_zips, *, config, preprocessor=None,
                         progress: Progress | None = None) -> dict:
    """A pool of Hugging Face ViT image classifiers from uploads
    (:func:`esm_core.pools.hf_vit_pool.hf_vit_pool_from_upload`) made the session's pool; refused as image
    uploads are (the previous pool stays, nothing left behind)."""
    paths = list(task_paths.values()) if isinstance(task_paths, dict) else list(task_paths or [])
    sizes = [Path(p).stat().st_size for p in [base_path, *paths] if p is not None and Path(p).is_file()]
    base_size = Path(base_path).stat().st_size if base_path is not None and Path(base_path).is_file() else 0
    check_memory(sum(sizes), base_size, f"this upload ({len(sizes)} checkpoint files)")
    return _load_upload(s, lambda keep: hf_vit_pool_from_upload(
        base_path, task_paths, image_zips, config, preprocessor, progress=progress, keep_dir=keep,
        memory_budget=memory_budget(), working_copies=WORKING_COPIES))


def _load_upload(s: Session, build: Callable[[Path], tuple[Any, list[str]]]) -> dict:
    """``build(folder)`` → ``(pool, notes)`` with the checked task checkpoints written into a new ``pool-*``
    folder of the session (read lazily), then :func:`load_pool`; a refused upload leaves no folder behind."""
    keep = s.workdir / f"pool-{uuid.uuid4().hex[:8]}"
    try:
        pool, notes = build(keep)
        return load_pool(s, pool, "upload", notes, files=keep)
    except BaseException:
        shutil.rmtree(keep, ignore_errors=True)
        raise
