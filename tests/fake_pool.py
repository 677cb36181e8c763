"""A tiny random TaskPool for the app tests (tiny open_clip ViT, random weights, random images).

Used by tests/test_session.py, test_app_http.py and test_browser.py; it behaves
like :func:`esm_core.pools.demo.load_demo_pool`'s pool but builds in well under a second.
:func:`launch_app` starts the app (``app.py``) on a free local port for the
HTTP and browser tests.
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from esm_core.models.openclip_vit import build_visual_tower, register_model_config
from esm_core.pools.taskpool import TaskPool, cosine_head

FAKE_MODEL = "esm-test-fake-vit"
FAKE_CONFIG = {"embed_dim": 16, "quick_gelu": True,
               "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
FAKE_TASKS = ("alpha", "beta", "gamma")


def make_fake_pool(seed: int = 0, n_val: int = 24, n_test: int = 24, n_classes: int = 4, tasks=FAKE_TASKS) -> TaskPool:
    register_model_config(FAKE_MODEL, FAKE_CONFIG)
    torch.manual_seed(seed)
    visual = build_visual_tower(FAKE_MODEL)
    base = {f"visual.{k}": v.detach().clone().float() for k, v in visual.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed)
    sds, heads, names, data = {}, {}, {}, {}
    for i, t in enumerate(tasks):
        sds[t] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                  for k, v in base.items()}
        heads[t] = cosine_head(torch.randn(n_classes, FAKE_CONFIG["embed_dim"], generator=g))
        names[t] = [f"{t}-class{c}" for c in range(n_classes)]
        split = {}
        for sp, n in (("val", n_val), ("test", n_test), ("samples", 8)):
            split[sp] = (rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8),
                         rng.integers(0, n_classes, size=n).astype(np.int64))
        data[t] = split
    return TaskPool(name="fake", model_name=FAKE_MODEL, base=base, tasks=sds, heads=heads, class_names=names,
                    data=data)


def launch_app(pool_loader=None):
    """Launch ``app.py``'s app (``pool_loader``: the starting pool; None = the built-in demo) on a free
    local port without blocking; returns ``(demo, url)`` — call ``demo.close()`` when done."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # app.py lives at the repository root
    import app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.make_demo(pool_loader)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                            **app.launch_kwargs())
    return demo, url


def tiny_image_zip(path, classes=("cat", "dog"), per_class: int = 2, size: int = 8):
    """A zip of class folders with ``per_class`` small PNGs each (the smallest valid task upload)."""
    import io
    import zipfile

    from PIL import Image
    with zipfile.ZipFile(path, "w") as z:
        for c in classes:
            for i in range(per_class):
                b = io.BytesIO()
                Image.fromarray(np.full((size, size, 3), 60 * i, np.uint8)).save(b, "PNG")
                z.writestr(f"{c}/{i}.png", b.getvalue())
    return path


def slow_merges(monkeypatch, method: str, steps: int) -> dict:
    """Slow the app's merges with ``method`` (served by this process) down to ``steps`` progress reports of 10 ms
    before the real work, and record them: ``started`` / ``ended`` (events) when the slowed merge starts / stops
    for any reason, ``steps`` (how many reports ran), ``session`` (the server-side session), its merge ids and
    current merge before the slowed one (``merges_before``, ``current_before``)."""
    from esm_core import studio
    from esm_core.studio import live
    real, real_merge = live.A.affine_updates, studio.merge
    rec = {"steps": 0, "started": threading.Event(), "ended": threading.Event()}

    def merge(s, name, *args, **kw):
        if name == method:
            rec["session"], rec["merges_before"] = s, [r["id"] for r in s.merges]
            rec["current_before"] = s.current
        return real_merge(s, name, *args, **kw)

    def affine_updates(*args, progress=None, **kw):
        if args[2] != method:
            return real(*args, progress=progress, **kw)
        rec["started"].set()
        try:
            for i in range(steps):
                progress(i / steps, "a slow merge")
                rec["steps"] += 1
                time.sleep(0.01)
            return real(*args, progress=progress, **kw)
        finally:
            rec["ended"].set()
    monkeypatch.setattr(live.A, "affine_updates", affine_updates)
    monkeypatch.setattr(studio, "merge", merge)
    return rec
