"""The Export view's operations: the merged model, the ESM++ bundle and the merge config as files."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from .. import package
from ..checkpoints import strict_json_dumps
from ..esmpp import ESMPP, save_esmpp
from ..evaluation import sweeps
from ..evaluation.esmpp import wilson_interval
from ..merging import apply_updates, get_method
from .live import comparison_rows, sample_sizes
from .routing import esmpp_model
from .session import Progress, Session, _need_pool
from . import viz


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "merge"


def _recipe(s: Session, cur: Mapping) -> dict:
    """The current merge's recipe in the layout every export shares (the command line writes the same keys)."""
    pool = s.pool
    return {**cur["config"], "summary": cur["summary"], "base": package.model_name_of(pool), "source": "studio"}


def _results(s: Session, cur: Mapping) -> dict:
    """The model card's accuracy table: the live subset's accuracy per task, its n and 95 % Wilson interval."""
    sizes = sample_sizes(s, "test")
    tasks = {}
    for t, acc in cur["accs"].items():
        n = int(sizes.get(t, 0))
        lo, hi = wilson_interval(round(float(acc) * n), n) if n else (None, None)
        tasks[t] = {"acc": float(acc), "n": n, "low": lo, "high": hi}
    return {"split": "test", "tasks": tasks, "mean": float(cur["summary"]["mean_abs"]),
            "note": f"the studio's evaluation subset: at most {s.live_per_task} images per task, seed 0",
            "interval": "95 % Wilson"}


def _command(s: Session, cur: Mapping) -> str:
    """The command line that re-runs this merge on the same pool (for the built-in pools) or from files."""
    pool, m = s.pool, get_method(cur["method"])
    sets = [f"--set {p.name}={cur['params'][p.name]}" for p in m.params
            if p.name != "alpha" and cur["params"][p.name] != p.default]
    alpha = f"--alpha {float(cur['params']['alpha']):g}"
    if s.origin in ("demo", "text"):
        return " ".join(["esm-studio eval --pool", shlex.quote(str(pool.name)), "--method", cur["method"], alpha,
                         *sets])
    tasks = " ".join(f"--task {shlex.quote(str(t))}=<{t} checkpoint>" for t in pool.task_names)
    proxy = (" ".join(f"--proxy {shlex.quote(str(t))}=<{t} validation data>" for t in pool.task_names)
             if get_method(cur["method"]).needs_stats else "")
    return " ".join(x for x in ["esm-studio merge --recipe <this folder> --base <base checkpoint>", tasks, proxy,
                                "--out merged"] if x)


def export_merged(s: Session, dtype: str = "float32") -> Path:
    """The current merged model as one .safetensors, its recipe (and the versions) in the metadata."""
    pool = _need_pool(s)
    if s.current is None:
        raise ValueError("merge first: there is no merged model to export")
    with s.lock:
        cur = s.current
        sd = apply_updates(pool.base, cur["updates"])
        name = _safe_name(f"{pool.name}-{cur['method']}-alpha{float(cur['params']['alpha']):.2f}-{cur['id']}")
        return package.write_export(s.workdir / f"{name}.safetensors", sd, base_sd=package.base_of(pool),
                                    family=package.family_of_pool(pool), model_info=package.model_info_of(pool),
                                    recipe=_recipe(s, cur), dtype=dtype)


def export_folder(s: Session, dtype: str = "float32") -> tuple[Path, Path]:
    """The current merge as a folder that loads in its ecosystem (a transformers folder for text models, an
    open_clip folder for image models; heads, recipe and model card inside) and the same folder as a .zip.
    Returns ``(folder, zip)``."""
    pool = _need_pool(s)
    if s.current is None:
        raise ValueError("merge first: there is no merged model to export")
    with s.lock:
        cur = s.current
        name = _safe_name(f"{pool.name}-{cur['method']}-alpha{float(cur['params']['alpha']):.2f}-{cur['id']}")
        folder = s.workdir / "exports" / name
        shutil.rmtree(folder.parent, ignore_errors=True)   # the session keeps its latest model folder only (disk)
        sd = apply_updates(pool.base, cur["updates"])
        out = package.write_export(folder, sd, base_sd=package.base_of(pool), family=package.family_of_pool(pool),
                                   model_info=package.model_info_of(pool), recipe=_recipe(s, cur),
                                   results=_results(s, cur), dtype=dtype, heads=package.heads_of(pool),
                                   command=_command(s, cur))
        del sd
        return out, package.zip_folder(out)


def push_merged(s: Session, repo: str, private: bool = False, *, api=None, token: str | None = None,
                stored_token: bool = True) -> dict:
    """The current merge's export folder (:func:`export_folder`) uploaded to the Hub repository ``repo``.
    The repository id, the token and HF_HUB_OFFLINE are checked before the folder is written. ``stored_token``
    False (a public server): only ``token``, the visitor's own, is used — never the server's login."""
    _need_pool(s)
    if s.current is None:
        raise ValueError("merge first: there is no merged model to push")
    if not isinstance(repo, str) or not package._REPO_ID.match(repo.strip()):
        raise package.PushError(f"the Hub repository must be 'user/name', got {str(repo)[:80]!r}")
    token = package.hub_token(token, stored=stored_token)
    folder, _ = export_folder(s)
    return package.push_export(folder, repo, private=private, token=token, api=api)


def export_config(s: Session) -> Path:
    """The current merge's config (and its live accuracies) as JSON."""
    _need_pool(s)
    if s.current is None:
        raise ValueError("merge first: there is no merge config to export")
    cur = s.current
    p = s.workdir / f"{_safe_name(cur['method'])}-{cur['id']}-config.json"
    text = strict_json_dumps({**cur["config"], "summary": cur["summary"], "comparison": comparison_rows(s)},
                             "merge config", indent=2, default=str)      # strict JSON: NaN refused, not written
    p.write_text(text + "\n")
    return p


def read_export_config(path: str | Path) -> dict | None:
    """The recipe stored with an export (an export folder, safetensors metadata, or the JSON file itself); files
    written before the shared layout read the same way (``versions`` filled from the version they hold)."""
    return package.read_export(path)


def export_esmpp(s: Session, rank: int = ESMPP.default("rank"), progress: Progress | None = None) -> Path:
    """The ESM++ bundle (static ESM merge + expert factors + prototypes) as one .safetensors."""
    pool = _need_pool(s)
    with s.lock:
        built = esmpp_model(s, rank, progress)
        m = built["model"]
        name = _safe_name(f"{pool.name}-esmpp-r{built['rank']}-alpha{built['alpha']:.2f}")
        return save_esmpp(s.workdir / f"{name}.safetensors", m.merged_sd, m.experts, m.config,
                          model=package.rebuild_info_of(pool))


def export_sweep(result: Mapping, folder, stem: str | None = None) -> dict[str, str]:
    """Write ``{stem}.csv``, ``{stem}.json`` (rows and parameters), ``{stem}.html`` (the plotly figure) and
    ``{stem}.png`` (plotly's image where kaleido is installed, else a plain Pillow chart) into ``folder``. Each file is written to a temporary name and
    renamed, so none is left half-written. Returns ``{format: path}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or f"sweep-{result['kind']}"
    if not stem.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"file stem must be letters, digits, '-' or '_', got {stem!r}")
    fig = viz.sweep_figure(result)
    payload = {"csv": sweeps.to_csv(result).encode(),
               "json": json.dumps({k: result[k] for k in ("kind", "pool", "params", "rows", "seconds")},
                                  indent=1, default=str).encode(),
               "html": fig.to_html(include_plotlyjs="cdn", full_html=True).encode()}
    backend = sweeps.png_backend()
    if backend == "kaleido":
        payload["png"] = fig.to_image(format="png", width=900, height=500)
    elif backend == "pillow":
        payload["png"] = sweeps.png_pillow(result)
    out = {}
    for ext, data in payload.items():
        path = folder / f"{stem}.{ext}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        out[ext] = str(path)
    return out
