"""The built-in demo pool: a tiny open_clip ViT and six real 28×28 image tasks.

``esm-studio build-demo`` rebuilds it from scratch with fixed seeds (CPU, about
a quarter of an hour on 2 cores): it rasterises / reads the source data sets
(cached under ``~/.cache/esm-studio``), pre-trains the base image tower on
clip-art categories that no task uses, trains one frozen cosine head per task on
the *base* features of 20 examples per class (heads that know each class only
roughly, as CLIP's zero-shot heads do), and fine-tunes the whole image tower per
task with its head frozen (the CLIP recipe of the task-arithmetic papers, in
miniature).
:func:`load_demo_pool` reads the committed result from ``assets/demo/``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import load_file

from ..progress import Progress
from .. import settings
from ..checkpoints import save_safetensors
from ..models.openclip_vit import build_visual_tower, normalise_images, register_model_config, tower_state
from . import image_data as D
from .taskpool import TaskPool, cosine_head


DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo"
CACHE_DIR = settings.cache_dir()      # ESM_STUDIO_CACHE
MODEL_NAME = "esm-demo-vit"

# The tiny open_clip model: 28 px grey images (repeated to 3 channels), patch 7 → 16 tokens + class token.
MODEL_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 28, "layers": 4, "width": 128, "patch_size": 7, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# Clip-art task groups: class → folder prefixes under /usr/share/openclipart/svg.
CLIPART_LIVING = {
    "mammal": ["animals/mammals"], "bird": ["animals/birds"], "bug": ["animals/bugs"],
    "plant": ["plants"], "fruit": ["food/fruit"], "dessert": ["food/desserts"],
}
CLIPART_OBJECTS = {
    "music": ["recreation/music"], "weapon": ["tools/weapons"], "tool": ["tools"],
    "vehicle": ["transportation/vehicles"], "boat": ["transportation/boating"], "sport": ["recreation/sports"],
    "clothing": ["people/clothing"], "electronics": ["computer/hardware", "electronics"],
}
# Never used for pre-training: the task groups above and their close relatives.
PRETRAIN_EXCLUDE = ["animals", "plants", "food", "tools", "transportation/vehicles", "transportation/boating",
                    "recreation/music", "recreation/sports", "people/clothing", "computer/hardware", "electronics"]
# Loose files directly in these folders are mixed (cars, computers, ...): also never used for pre-training.
PRETRAIN_EXCLUDE_EXACT = ["transportation", "computer", "recreation"]

TASKS = ["fashion", "animals", "cvdigits", "skdigits", "clipart-living", "clipart-objects"]

RECIPE = {
    "seed": 0,
    "pretrain": {"steps": 2000, "batch": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup": 100,
                 "shift": 2, "flip": True, "min_class_size": 30, "max_per_class": 200, "task_frac": 0.0},
    "head": {"steps": 300, "batch": 256, "lr": 0.01, "scale": 30.0, "max_train": 10000, "shots": 20},
    "finetune": {"steps": 200, "batch": 128, "lr": 3e-4, "weight_decay": 0.1, "warmup": 20, "shift": 2},
    "splits": {"val_frac": 0.1, "val_max": 5000, "val_keep": 300, "test_frac": 0.2, "test_frac_clipart": 0.25,
               "test_keep": 1000, "samples": 16},
}


# ---------------------------------------------------------------- raw data

def _report(progress: Progress | None, frac: float, desc: str) -> None:
    if progress is not None:
        progress(frac, desc)


def load_raw(cache_dir: Path = CACHE_DIR, progress: Progress | None = None) -> dict:
    """All source images at 28×28 (uint8, white on black), cached in ``cache_dir/raw28.npz``."""
    cache = Path(cache_dir) / "raw28.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    out = {}
    fm = D.load_fashion_mnist()
    out["fashion_train_x"], out["fashion_train_y"] = fm["train"]
    out["fashion_test_x"], out["fashion_test_y"] = fm["test"]
    out["animals_x"], out["animals_y"] = D.load_animal_mnist()
    x, out["cvdigits_y"] = D.load_opencv_digits(_opencv_digits_path())
    out["cvdigits_x"] = D.fit_all(x, box=20)
    x, out["skdigits_y"] = D.load_sklearn_digits()
    out["skdigits_x"] = D.fit_all(x, box=20)
    imgs, paths = D.rasterise_clipart(cache=Path(cache_dir) / "clipart28.npz",
                                      progress=lambda f, d: _report(progress, 0.1 * f, d))
    out["clipart_x"], out["clipart_paths"] = imgs, np.array(paths)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **out)
    return out


def _opencv_digits_path() -> Path:
    """digits.png from Debian opencv-doc: the installed package, or an unpacked .deb under /tmp or the cache."""
    for p in (Path(D.OPENCV_DIGITS), Path("/tmp/opencv-doc") / D.OPENCV_DIGITS.lstrip("/"),
              CACHE_DIR / "opencv-doc" / D.OPENCV_DIGITS.lstrip("/")):
        if p.exists():
            return p
    raise FileNotFoundError("OpenCV digits.png not found: `apt-get install opencv-doc`, or `apt-get download "
                            f"opencv-doc && dpkg-deb -x opencv-doc_*.deb {CACHE_DIR / 'opencv-doc'}`")


def _clipart_task(raw: dict, groups: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    paths = [str(p) for p in raw["clipart_paths"]]
    idx = D.clipart_groups(paths, groups)
    names = list(groups)
    x = np.concatenate([raw["clipart_x"][idx[c]] for c in names])
    y = np.concatenate([np.full(len(idx[c]), i, np.int64) for i, c in enumerate(names)])
    return x, y, names


def pretrain_set(raw: dict, recipe: dict = RECIPE) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Clip art of every leaf folder outside the tasks' categories with enough images (capped per class)."""
    r = recipe["pretrain"]
    paths = [str(p) for p in raw["clipart_paths"]]
    folders = [p.rsplit("/", 1)[0] if "/" in p else "." for p in paths]
    excl = tuple(e.rstrip("/") for e in PRETRAIN_EXCLUDE)
    by: dict[str, list[int]] = {}
    for i, f in enumerate(folders):
        if f == "." or f in PRETRAIN_EXCLUDE_EXACT or any(f == e or f.startswith(e + "/") for e in excl):
            continue
        by.setdefault(f, []).append(i)
    rng = np.random.default_rng(recipe["seed"])
    names = sorted(f for f, v in by.items() if len(v) >= r["min_class_size"])
    xs, ys = [], []
    for c, f in enumerate(names):
        ids = np.array(by[f])
        if len(ids) > r["max_per_class"]:
            ids = np.sort(rng.choice(ids, r["max_per_class"], replace=False))
        xs.append(raw["clipart_x"][ids])
        ys.append(np.full(len(ids), c, np.int64))
    return np.concatenate(xs), np.concatenate(ys), names


def task_splits(raw: dict, recipe: dict = RECIPE) -> dict:
    """Per task: class names and the train / val / test / samples splits (uint8 images, int64 labels)."""
    s = recipe["splits"]
    seed = recipe["seed"]
    sources = {
        "fashion": (raw["fashion_train_x"], raw["fashion_train_y"], raw["fashion_test_x"], raw["fashion_test_y"],
                    D.FASHION_CLASSES),
        "animals": (raw["animals_x"], raw["animals_y"], None, None, D.ANIMAL_CLASSES),
        "cvdigits": (raw["cvdigits_x"], raw["cvdigits_y"], None, None, D.DIGIT_CLASSES),
        "skdigits": (raw["skdigits_x"], raw["skdigits_y"], None, None, D.DIGIT_CLASSES),
    }
    for name, groups in (("clipart-living", CLIPART_LIVING), ("clipart-objects", CLIPART_OBJECTS)):
        x, y, names = _clipart_task(raw, groups)
        sources[name] = (x, y, None, None, names)
    out = {}
    for t in TASKS:
        x, y, xt, yt, classes = sources[t]
        if xt is None:   # no official test split: a fixed stratified held-out part
            frac = s["test_frac_clipart"] if t.startswith("clipart") else s["test_frac"]
            keep, held = D.stratified_split(y, frac, seed=seed)
            x, y, xt, yt = x[keep], y[keep], x[held], y[held]
        rng = np.random.default_rng(seed)
        if len(xt) > s["test_keep"]:
            ids = np.sort(rng.choice(len(xt), s["test_keep"], replace=False))
            xt, yt = xt[ids], yt[ids]
        train_ids, val_ids = D.split_indices(len(x), s["val_frac"], s["val_max"], seed=seed)
        # The validation split is the held-out 10 % (≤ 5000); only a seeded subset of it is shipped.
        val_ship = val_ids
        if len(val_ids) > s["val_keep"]:
            val_ship = np.sort(np.random.default_rng(seed).choice(val_ids, s["val_keep"], replace=False))
        out[t] = {"classes": list(classes), "train": (x[train_ids], y[train_ids]), "val": (x[val_ship], y[val_ship]),
                  "val_full": len(val_ids), "test": (xt, yt),
                  "samples": _samples(xt, yt, s["samples"], len(classes))}
    return out


def _samples(x: np.ndarray, y: np.ndarray, k: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The first test images of each class in turn (round-robin), ``k`` in all."""
    order, per = [], [list(np.nonzero(y == c)[0]) for c in range(n_classes)]
    while len(order) < min(k, len(y)):
        for lst in per:
            if lst and len(order) < k:
                order.append(lst.pop(0))
    return x[order], y[order]


# ---------------------------------------------------------------- training

def _to_input(raw: np.ndarray) -> torch.Tensor:
    return normalise_images(raw, MEAN, STD)


def _augment(x: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to ``shift`` pixels (black fill) and optional horizontal flips."""
    n, _, h, w = x.shape
    if shift:
        fill = (0.0 - MEAN[0]) / STD[0]
        padded = torch.nn.functional.pad(x, (shift,) * 4, value=fill)
        off = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
        x = torch.stack([padded[i, :, off[i, 0]:off[i, 0] + h, off[i, 1]:off[i, 1] + w] for i in range(n)])
    if flip:
        m = torch.rand(n, generator=gen) < 0.5
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(visual, head_fn, params, x_u8: np.ndarray, y: np.ndarray, cfg: dict, seed: int, device,
           flip: bool = False, progress: Progress | None = None, desc: str = "") -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    x_all, y_all = _to_input(x_u8), torch.from_numpy(y)
    visual.train()
    loss_avg = float("nan")
    for step in range(cfg["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg["steps"], cfg["warmup"], cfg["lr"])
        ids = torch.randint(0, len(x_all), (cfg["batch"],), generator=gen)
        xb = _augment(x_all[ids], cfg["shift"], flip, gen).to(device)
        loss = torch.nn.functional.cross_entropy(head_fn(visual(xb)), y_all[ids].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and step % 50 == 0:
            loss_avg = float(loss.detach())
            progress(step / cfg["steps"], f"{desc} step {step}/{cfg['steps']} loss {loss_avg:.3f}")
    visual.eval()
    return loss_avg


@torch.no_grad()
def _features(visual, x_u8: np.ndarray, device, batch: int = 1000) -> torch.Tensor:
    visual.eval()
    return torch.cat([visual(_to_input(x_u8[i:i + batch]).to(device)).float().cpu()
                      for i in range(0, len(x_u8), batch)])


def _train_head(feats: torch.Tensor, y: np.ndarray, n_classes: int, cfg: dict, seed: int) -> torch.Tensor:
    """Cosine head (scale · normalised W · normalised f) on frozen features; returns the scaled head matrix."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(n_classes, feats.shape[1], generator=gen) * 0.1)
    opt = torch.optim.Adam([w], lr=cfg["lr"])
    f = torch.nn.functional.normalize(feats, dim=-1)
    yt = torch.from_numpy(y)
    for _ in range(cfg["steps"]):
        ids = torch.randint(0, len(f), (min(cfg["batch"], len(f)),), generator=gen)
        loss = torch.nn.functional.cross_entropy(f[ids] @ cosine_head(w, cfg["scale"]).T, yt[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cosine_head(w.detach(), cfg["scale"])


def _accuracy(visual, head: torch.Tensor, x_u8: np.ndarray, y: np.ndarray, device) -> float:
    f = torch.nn.functional.normalize(_features(visual, x_u8, device), dim=-1)
    return float(((f @ head.T).argmax(1).numpy() == y).mean())


def _sd(visual) -> dict[str, torch.Tensor]:
    return tower_state(visual)


def _package_info(dist: str) -> tuple[str, str]:
    try:
        md = metadata.metadata(dist)
        return metadata.version(dist), md.get("License") or md.get("License-Expression") or "see package"
    except metadata.PackageNotFoundError:
        return "not installed", "unknown"


def _deb_version(pkg: str) -> str:
    try:
        v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True,
                           timeout=10).stdout.strip()
        if not v:   # not installed (e.g. opencv-doc unpacked from a downloaded .deb): the archive's version
            out = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg], capture_output=True, text=True,
                                 timeout=10).stdout
            v = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Version:")), "")
        return v or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_sources(out: Path) -> None:
    """SOURCES: where every data set came from, its version and licence."""
    am_v, am_l = _package_info("animal-mnist")
    sk_v, _ = _package_info("scikit-learn")
    cs_v, cs_l = _package_info("cairosvg")
    lines = [
        "# Data behind the demo pool (package, version, licence, use)",
        f"debian:dataset-fashion-mnist\t{_deb_version('dataset-fashion-mnist')}\tMIT (Zalando Research)\t"
        "task 'fashion' (official train/test split)",
        f"pypi:animal-mnist\t{am_v}\t{am_l}\ttask 'animals' (silhouettes; gzip pickles of numpy arrays, read with "
        "an array-only unpickler at build time)",
        f"debian:opencv-doc\t{_deb_version('opencv-doc')}\tApache-2.0 (OpenCV samples/data/digits.png)\ttask 'cvdigits'",
        f"pypi:scikit-learn\t{sk_v}\tBSD-3-Clause (load_digits: UCI optical digits, CC BY 4.0)\ttask 'skdigits'",
        f"debian:openclipart-svg\t{_deb_version('openclipart-svg')}\tpublic domain (Open Clip Art Library)\t"
        "tasks 'clipart-living', 'clipart-objects'; pre-training of the base on all other categories",
        f"pypi:cairosvg\t{cs_v}\t{cs_l}\trasterising the clip art (tool only)",
    ]
    (out / "SOURCES").write_text("\n".join(lines) + "\n")


def build_demo(out: str | os.PathLike = DEMO_DIR, *, recipe: dict | None = None, device: str = "cpu",
               cache_dir: str | os.PathLike = CACHE_DIR, progress: Progress | None = None,
               reuse_base: str | os.PathLike | None = None) -> dict:
    """Build the demo pool into ``out`` with fixed seeds; returns the config written to ``out/config.json``.

    ``reuse_base``: a folder holding a ``base.safetensors`` (e.g. an earlier build) to skip pre-training."""
    recipe = copy.deepcopy(recipe or RECIPE)
    out = Path(out)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    seed = recipe["seed"]
    dev = torch.device(device)
    _report(progress, 0.0, "reading data")
    raw = load_raw(Path(cache_dir), progress)
    splits = task_splits(raw, recipe)
    px, py, pnames = pretrain_set(raw, recipe)
    frac = recipe["pretrain"].get("task_frac", 0.0)
    if frac:   # a disjoint share of the larger tasks' training images joins pre-training (own label space)
        xs, ys = [px], [py]
        for i, t in enumerate(TASKS):
            if t.startswith("clipart"):
                continue
            x, y = splits[t]["train"]
            keep, pre = D.split_indices(len(x), frac, seed=seed + 300 + i)
            xs.append(x[pre])
            ys.append(y[pre] + len(pnames))
            pnames = pnames + [f"{t}:{c}" for c in splits[t]["classes"]]
            splits[t]["train"] = (x[keep], y[keep])
        px, py = np.concatenate(xs), np.concatenate(ys)

    register_model_config(MODEL_NAME, MODEL_CONFIG)
    torch.manual_seed(seed)
    visual = build_visual_tower(MODEL_NAME, device=dev)
    pre_head = torch.nn.Linear(MODEL_CONFIG["embed_dim"], len(pnames)).to(dev)
    pr = recipe["pretrain"]
    if reuse_base is not None:
        base = {k: v.float() for k, v in load_file(str(Path(reuse_base) / "base.safetensors")).items()}
        visual = build_visual_tower(MODEL_NAME, base, device=dev)
    else:
        _train(visual, pre_head, list(visual.parameters()) + list(pre_head.parameters()), px, py, pr, seed, dev,
               flip=pr["flip"], progress=lambda f, d: _report(progress, 0.1 + 0.4 * f, d), desc="pre-training")
    base = _sd(visual)

    heads, info = {}, {}
    for i, t in enumerate(TASKS):
        _report(progress, 0.5, f"head for {t}")
        x, y = splits[t]["train"]
        cap, shots = recipe["head"]["max_train"], recipe["head"].get("shots")
        rng = np.random.default_rng(seed + i)
        if shots:   # a few examples per class only (like CLIP's zero-shot heads, which know each class vaguely)
            ids = np.sort(np.concatenate([rng.choice(np.nonzero(y == c)[0], shots, replace=False)
                                          for c in range(len(splits[t]["classes"]))]))
        else:
            ids = np.sort(rng.choice(len(x), min(cap, len(x)), replace=False))
        heads[t] = _train_head(_features(visual, x[ids], dev), y[ids], len(splits[t]["classes"]), recipe["head"],
                               seed=seed + 100 + i)
    for i, t in enumerate(TASKS):
        ft = build_visual_tower(MODEL_NAME, base, device=dev)
        head = heads[t].to(dev)
        x, y = splits[t]["train"]
        fr = recipe["finetune"]
        _train(ft, lambda f: torch.nn.functional.normalize(f, dim=-1) @ head.T, list(ft.parameters()), x, y, fr,
               seed + 200 + i, dev, progress=lambda f, d: _report(progress, 0.55 + 0.4 * (i + f) / len(TASKS), d),
               desc=f"fine-tuning {t}")
        sd = _sd(ft)
        save_safetensors({k: v.half() for k, v in sd.items()}, out / "tasks" / f"{t}.safetensors")
        info[t] = {"zeroshot_val": _accuracy(visual, heads[t], *splits[t]["val"], dev),
                   "finetuned_val": _accuracy(ft, heads[t], *splits[t]["val"], dev)}
    save_safetensors({k: v.half() for k, v in base.items()}, out / "base.safetensors")
    save_safetensors({t: h.float().cpu() for t, h in heads.items()}, out / "heads.safetensors")
    arrays = {}
    for t in TASKS:
        for split in ("val", "test", "samples"):
            arrays[f"{t}/{split}/x"], arrays[f"{t}/{split}/y"] = splits[t][split]
    np.savez_compressed(out / "data.npz", **arrays)
    (out / f"{MODEL_NAME}.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    config = {
        "name": "demo", "model_name": MODEL_NAME, "model_config": MODEL_CONFIG, "mean": MEAN, "std": STD,
        "tasks": TASKS, "class_names": {t: splits[t]["classes"] for t in TASKS},
        "split_sizes": {t: {"train": len(splits[t]["train"][1]), "val_full": splits[t]["val_full"],
                            "val": len(splits[t]["val"][1]), "test": len(splits[t]["test"][1])} for t in TASKS},
        "pretrain_classes": pnames, "pretrain_images": len(py), "recipe": recipe, "build_accuracy": info,
        "build": {"seconds": round(time.time() - t0, 1), "device": str(dev), "torch": torch.__version__,
                  "python": platform.python_version(), "threads": torch.get_num_threads()},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_sources(out)
    _report(progress, 1.0, f"demo pool written to {out} in {time.time() - t0:.0f} s")
    return config


# ---------------------------------------------------------------- loading

_LOADED: dict[str, TaskPool] = {}


def load_demo_pool(path: str | os.PathLike = DEMO_DIR, *, fresh: bool = False) -> TaskPool:
    """The committed demo pool (``assets/demo``), loaded once per process (``fresh=True`` reloads)."""
    path = Path(path)
    key = str(path.resolve())
    if key in _LOADED and not fresh:
        return _LOADED[key]
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no demo pool at {path} (config.json missing): run `esm-studio build-demo`")
    cfg = json.loads(cfg_file.read_text())
    register_model_config(cfg["model_name"], cfg["model_config"])
    base = {k: v.float() for k, v in load_file(str(path / "base.safetensors")).items()}
    tasks = {t: {k: v.float() for k, v in load_file(str(path / "tasks" / f"{t}.safetensors")).items()}
             for t in cfg["tasks"]}
    heads = load_file(str(path / "heads.safetensors"))
    z = np.load(path / "data.npz", allow_pickle=False)
    data = {t: {s: (z[f"{t}/{s}/x"], z[f"{t}/{s}/y"]) for s in ("val", "test", "samples")} for t in cfg["tasks"]}
    pool = TaskPool(name=cfg.get("name", "demo"), model_name=cfg["model_name"], base=base, tasks=tasks,
                    heads={t: heads[t].float() for t in cfg["tasks"]}, class_names=cfg["class_names"], data=data,
                    mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), meta={"path": str(path), "config": cfg})
    _LOADED[key] = pool
    return pool
