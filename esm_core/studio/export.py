"""The Export view's operations: the merged model, the ESM++ bundle and the merge config as files."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

from ..checkpoints import read_config, save_safetensors, strict_json_dumps
from ..esmpp import ESMPP, save_esmpp
from ..evaluation import sweeps
from ..merging import apply_updates
from .live import comparison_rows
from .routing import esmpp_model
from .session import Progress, Session, _need_pool
from . import viz


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "merge"


def export_merged(s: Session) -> Path:
    """The current merged model as .safetensors, its merge config in the metadata."""
    pool = _need_pool(s)
    if s.current is None:
        raise ValueError("merge first: there is no merged model to export")
    with s.lock:
        cur = s.current
        sd = apply_updates(pool.base, cur["updates"])
        name = _safe_name(f"{pool.name}-{cur['method']}-alpha{float(cur['params']['alpha']):.2f}-{cur['id']}")
        return save_safetensors(sd, s.workdir / f"{name}.safetensors", {**cur["config"], "summary": cur["summary"]})


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
    """The recipe stored with an exported file (safetensors metadata, or the JSON file itself)."""
    p = Path(path)
    if p.suffix == ".json":
        return json.loads(p.read_text())
    return read_config(p)


def export_esmpp(s: Session, rank: int = ESMPP.default("rank"), progress: Progress | None = None) -> Path:
    """The ESM++ bundle (static ESM merge + expert factors + prototypes) as one .safetensors."""
    pool = _need_pool(s)
    with s.lock:
        built = esmpp_model(s, rank, progress)
        m = built["model"]
        name = _safe_name(f"{pool.name}-esmpp-r{built['rank']}-alpha{built['alpha']:.2f}")
        return save_esmpp(s.workdir / f"{name}.safetensors", m.merged_sd, m.experts, m.config)


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
