"""Uploaded text pools: BERT-family sequence classifiers + labelled sentences → a :class:`TextTaskPool`.

What comes from where — nothing is guessed:

* the family and key layout from the checkpoints' key names (:func:`esm_core.models.bert.matches`);
* the architecture from the uploaded Hugging Face ``config.json`` (required; every shape of every
  checkpoint is checked against it before a model is built);
* the tokenizer from the uploaded tokenizer files (``tokenizer.json``, or ``vocab.txt`` / ``vocab.json`` +
  ``merges.txt``, with ``tokenizer_config.json``); never downloaded, no remote code;
* each task's classifier from its own checkpoint (§8: heads are each task's own): BERT's pooler +
  ``classifier``, RoBERTa's ``classifier.dense`` + ``classifier.out_proj``, DistilBERT's
  ``pre_classifier`` + ``classifier``; features = the last hidden state of the first token, as these
  heads read it;
* labelled text per task: ``<task>.csv`` (a header with ``text`` and ``label``) or ``<task>.jsonl``
  (one ``{"text": ..., "label": ...}`` per line); labels are class indices (integers, or strings of
  digits) of the task's classifier. Half of each class becomes validation (proxy sentences, α), half test.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from ..checkpoints import load_checkpoint, save_safetensors
from ..lazy import LazyCheckpoint
from ..models import bert
from .text_pool import TextTaskPool
from .upload import MAX_MODEL_PARAMS, NAME_OK, _split_val_test

Progress = Callable[[float, str], None]

MAX_TEXT_FILE_BYTES = 16 * 1024 ** 2        # one task's labelled text
MAX_ROWS = 20_000                           # sentences per task
MAX_SENTENCE_CHARS = 4_000
MAX_TOKENIZER_BYTES = 32 * 1024 ** 2        # one tokenizer file (a tokenizer.json is a few MB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt")
TEXT_EXTS = (".csv", ".jsonl")
DEFAULT_MAX_LENGTH = 128

# (first layer, second layer, activation) of each family's sequence-classification head, without the prefix
HEADS = (("pooler.dense", "classifier", "tanh"),                        # BERT, MiniLM
         ("classifier.dense", "classifier.out_proj", "tanh"),           # RoBERTa
         ("pre_classifier", "classifier", "relu"))                      # DistilBERT


def _bounded_read(path, limit: int, what: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{what} is larger than {limit // 1024 ** 2} MB")
    return raw


def _label(v, where: str) -> int:
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())):
        raise ValueError(f"{where}: label {str(v)[:40]!r} is not a class index (0, 1, ...): labels must be the "
                         "indices of the task classifier's outputs")
    return int(v)


def read_labelled_text(path, task: str) -> tuple[list[str], np.ndarray]:
    """Sentences and integer labels of ``<task>.csv`` / ``<task>.jsonl`` (bounded: size, rows, lengths)."""
    name = Path(path).name
    raw = _bounded_read(path, MAX_TEXT_FILE_BYTES, f"{task}: {name}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{task}: {name} is not UTF-8 text") from None
    rows: list[tuple[object, object]] = []
    if name.lower().endswith(".jsonl"):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_refuse_constant)
            except json.JSONDecodeError as e:
                raise ValueError(f"{task}: {name} line {i} is not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
                raise ValueError(f"{task}: {name} line {i} must be an object with 'text' and 'label'")
            rows.append((obj["text"], obj["label"]))
            if len(rows) > MAX_ROWS:
                break
    elif name.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "text" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise ValueError(f"{task}: {name} needs a header row with the columns 'text' and 'label' "
                             f"(found {reader.fieldnames})")
        try:
            for r in reader:
                rows.append((r["text"], r["label"]))
                if len(rows) > MAX_ROWS:
                    break
        except csv.Error as e:
            raise ValueError(f"{task}: {name} is not valid CSV ({e})") from None
    else:
        raise ValueError(f"{task}: {name}: labelled text must be a .csv or .jsonl file")
    if len(rows) > MAX_ROWS:
        raise ValueError(f"{task}: {name} has more than {MAX_ROWS:,} sentences")
    texts, labels = [], []
    for i, (t, lab) in enumerate(rows, 1):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{task}: {name} row {i}: empty or non-text 'text'")
        if len(t) > MAX_SENTENCE_CHARS:
            raise ValueError(f"{task}: {name} row {i}: a sentence of {len(t):,} characters (at most "
                             f"{MAX_SENTENCE_CHARS:,})")
        texts.append(t)
        labels.append(_label(lab, f"{task}: {name} row {i}"))
    y = np.asarray(labels, dtype=np.int64)
    if len(np.unique(y)) < 2 or np.bincount(y).max(initial=0) == len(y):
        raise ValueError(f"{task}: {name} needs sentences of at least two classes")
    return texts, y


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def task_head(sd: Mapping[str, torch.Tensor], task: str) -> dict:
    """The task's own classification head (two layers and their activation) from its checkpoint."""
    bare = {bert.strip_prefix(k): v for k, v in sd.items()}
    for first, second, act in HEADS:
        keys = [f"{first}.weight", f"{first}.bias", f"{second}.weight", f"{second}.bias"]
        if all(k in bare for k in keys):
            w1, b1, w2, b2 = (bare[k].float() for k in keys)
            if w1.ndim != 2 or w2.ndim != 2 or w2.shape[1] != w1.shape[0] or b1.shape != (w1.shape[0],) \
                    or b2.shape != (w2.shape[0],):
                raise ValueError(f"task {task!r}: its classification head has inconsistent shapes "
                                 f"({first}: {tuple(w1.shape)}, {second}: {tuple(w2.shape)})")
            return {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "act": act}
    raise ValueError(f"task {task!r}: its checkpoint has no sequence-classification head (BERT: pooler.dense + "
                     "classifier, RoBERTa: classifier.dense + classifier.out_proj, DistilBERT: pre_classifier + "
                     "classifier) — upload the *ForSequenceClassification checkpoint of each task")


def load_tokenizer_files(paths: Mapping[str, str | Path], config: Mapping | None = None):
    """A fast tokenizer from uploaded files (names from :data:`TOKENIZER_FILES` only; each bounded; local, no
    remote code). ``paths``: ``{file name: path}``; ``config``: the model's config.json (its ``model_type``
    tells which tokenizer a bare vocabulary belongs to)."""
    from transformers import AutoTokenizer
    bad = sorted(set(paths) - set(TOKENIZER_FILES))
    if bad:
        raise ValueError(f"unexpected tokenizer file(s) {bad}: accepted are {list(TOKENIZER_FILES)}")
    if not ({"tokenizer.json", "vocab.txt", "vocab.json"} & set(paths)):
        raise ValueError("no tokenizer: upload the model's tokenizer.json (or vocab.txt for BERT, vocab.json + "
                         "merges.txt for RoBERTa) with its tokenizer_config.json")
    tmp = Path(tempfile.mkdtemp(prefix="esm-studio-tok-"))
    try:
        for name, p in paths.items():
            (tmp / name).write_bytes(_bounded_read(p, MAX_TOKENIZER_BYTES, name))
        if "tokenizer_config.json" in paths:                   # strict JSON, and no code to fetch
            cfg = json.loads((tmp / "tokenizer_config.json").read_text(), parse_constant=_refuse_constant)
            if not isinstance(cfg, dict):
                raise ValueError("tokenizer_config.json must be a JSON object")
            cfg.pop("auto_map", None)
            (tmp / "tokenizer_config.json").write_text(json.dumps(cfg))
        if config is not None:
            (tmp / "config.json").write_text(json.dumps({"model_type": str(config.get("model_type", ""))}))
        try:
            return AutoTokenizer.from_pretrained(str(tmp), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"the uploaded tokenizer files cannot be read ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def text_pool_from_upload(base_path, task_paths: Mapping[str, str | Path], text_files: Mapping[str, str | Path],
                          config: Mapping, tokenizer_files: Mapping[str, str | Path], *,
                          max_length: int | None = None, progress: Progress | None = None,
                          keep_dir: str | Path | None = None) -> tuple[TextTaskPool, list[str]]:
    """Build a text pool from uploads: ``(TextTaskPool, notes for the user)``. See the module docstring.

    ``keep_dir``: as for image uploads (:func:`esm_core.pools.upload.pool_from_upload`), each checked task
    encoder is written there (safetensors) and read lazily, key by key; without it every task is held."""
    report = progress or (lambda f, d: None)
    names = list(task_paths)
    if len(names) < 2:
        raise ValueError(f"merging needs at least two task checkpoints; got {len(names)}")
    bad = [n for n in names if not isinstance(n, str) or not NAME_OK.fullmatch(n)]
    if bad:
        raise ValueError(f"task names must be 1-64 letters, digits, '_', '-' or '.'; not {bad}")
    missing = [n for n in names if n not in text_files]
    if missing:
        raise ValueError(f"no labelled text for task(s) {missing}: upload <task>.csv (columns text, label) or "
                         "<task>.jsonl per task")
    unknown = sorted(set(text_files) - set(names))
    if unknown:
        raise ValueError(f"labelled text for {unknown}, which are not among the task names {names}")
    if not isinstance(config, Mapping) or "model_type" not in config:
        raise ValueError("a text model needs its Hugging Face config.json (with 'model_type'): upload it with the "
                         "checkpoints — the architecture is never guessed")

    report(0.02, "reading the base checkpoint")
    base_raw = load_checkpoint(base_path)
    if not bert.matches(base_raw):
        raise ValueError(f"{Path(base_path).name}: not a BERT-family encoder (BERT, RoBERTa, DistilBERT, MiniLM): "
                         f"found e.g. {sorted(base_raw)[:4]}")
    n_params = sum(v.numel() for v in base_raw.values())
    if n_params > MAX_MODEL_PARAMS:
        raise ValueError(f"the base checkpoint holds {n_params / 1e6:.0f} M parameters, more than the "
                         f"{MAX_MODEL_PARAMS / 1e6:.0f} M this server merges")
    base = {k: v.float() if v.is_floating_point() else v for k, v in bert.encoder_state(base_raw).items()}
    bert.check_shapes(base, config, MAX_MODEL_PARAMS)        # config fields vs the checkpoint, before anything is built
    tasks, heads = {}, {}
    for i, t in enumerate(names):
        report(0.05 + 0.4 * i / len(names), f"reading task checkpoint {t}")
        raw = load_checkpoint(task_paths[t])
        if not bert.matches(raw):
            raise ValueError(f"task {t!r}: not a BERT-family checkpoint of the base's layout")
        heads[t] = task_head(raw, t)
        enc = bert.encoder_state(raw)
        if set(enc) != set(base) or any(tuple(enc[k].shape) != tuple(base[k].shape) for k in base):
            diff = sorted(set(enc) ^ set(base))[:4] or [k for k in base if tuple(enc[k].shape) != tuple(base[k].shape)][:4]
            raise ValueError(f"task {t!r} does not fit the base checkpoint (keys or shapes differ: {diff})")
        tasks[t] = {k: enc[k].float() if enc[k].is_floating_point() else enc[k] for k in base}
        del raw, enc
        if keep_dir is not None:
            Path(keep_dir).mkdir(parents=True, exist_ok=True)
            tasks[t] = LazyCheckpoint(save_safetensors(tasks[t], Path(keep_dir) / f"task-{i}.safetensors"))
    report(0.5, "reading the tokenizer")
    tok = load_tokenizer_files(tokenizer_files, config)
    ml = int(max_length or min(DEFAULT_MAX_LENGTH, int(config.get("max_position_embeddings", 512)) - 2))
    data, class_names, notes = {}, {}, [f"family: {config['model_type']} (from config.json); features: the first "
                                        "token's last hidden state; heads: each task's own classifier"]
    for i, t in enumerate(names):
        report(0.55 + 0.4 * i / len(names), f"labelled text of {t}")
        texts, y = read_labelled_text(text_files[t], t)
        C = heads[t]["w2"].shape[0]
        if int(y.max()) >= C:
            raise ValueError(f"task {t!r}: label {int(y.max())} but its classifier has {C} outputs (labels 0..{C - 1})")
        val, test = _split_val_test(y)
        proxy = val[np.sort(np.random.default_rng(0).choice(len(val), min(bert.PROXY_SAMPLES, len(val)),
                                                            replace=False))]
        data[t] = {"val": ([texts[j] for j in val], y[val]), "test": ([texts[j] for j in test], y[test]),
                   "proxy_ids": np.searchsorted(val, proxy)}
        class_names[t] = [f"class {c}" for c in range(C)]
        notes.append(f"{t}: {len(y)} sentences, {C} classes, split half validation / half test")
    pool = TextTaskPool(name="upload", model_config=dict(config), base=base, tasks=tasks, heads=heads,
                        class_names=class_names, data=data, tokenizer=tok, max_length=ml, pooling="cls",
                        meta={"model": f"uploaded {config['model_type']}"})
    report(1.0, "pool ready")
    return pool, notes
