"""Uploaded text pools: sequence classifiers of a text family + labelled sentences → a :class:`TextTaskPool`.

Text families: BERT-family encoders (BERT, RoBERTa, DistilBERT, MiniLM) and Llama-style decoders (Llama, Qwen2,
Mistral). What comes from where — nothing is guessed:

* the family and key layout from the checkpoints' key names (:func:`text_family`; a family provides
  :data:`esm_core.models.protocol.TEXT_UPLOAD`);
* the architecture from the uploaded Hugging Face ``config.json`` (required; every shape of every
  checkpoint is checked against it before a model is built);
* the tokenizer from the uploaded tokenizer files (``tokenizer.json``, or ``vocab.txt`` / ``vocab.json`` +
  ``merges.txt``, with ``tokenizer_config.json``); never downloaded, no remote code, no regular expression of
  the upload's own (a known tokenizer's pre-tokenizer pattern is accepted verbatim); a decoder's tokenizer pads
  on the right with the pad token its ``score`` expects (:func:`esm_core.models.llama.prepare_tokenizer`);
* each task's classifier from its own checkpoint (§8: heads are each task's own): BERT's pooler +
  ``classifier``, RoBERTa's ``classifier.dense`` + ``classifier.out_proj``, DistilBERT's
  ``pre_classifier`` + ``classifier`` (features: the first token's last hidden state, as these heads read
  it); a decoder's ``score`` (features: the final hidden state of the last real token);
* labelled text per task: ``<task>.csv`` (a header with ``text`` and ``label``) or ``<task>.jsonl``
  (one ``{"text": ..., "label": ...}`` per line); labels are class indices (integers, or strings of
  digits) of the task's classifier. Half of each class becomes validation (proxy sentences, α), half test.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..progress import Progress, reporter
from ..adapters import is_adapter_path
from ..checkpoints import check_compatible, load_checkpoint, save_safetensors
from ..lazy import LazyCheckpoint
from .. import models
from ..models import bert
from ..models.protocol import TEXT_UPLOAD
from .heads import HeadSource
from .text_pool import TextTaskPool
from .. import settings
from .upload import NAME_OK, _split_val_test, upload_memory_budget


MAX_TEXT_FILE_BYTES = 16 * 1024 ** 2        # one task's labelled text
MAX_ROWS = 20_000                           # sentences per task
MAX_SENTENCE_CHARS = 4_000
MAX_TOKENIZER_BYTES = 32 * 1024 ** 2        # one tokenizer file (a tokenizer.json is a few MB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt")
TEXT_EXTS = (".csv", ".jsonl")
DEFAULT_MAX_LENGTH = 128
MAX_TASKS = 64                              # task checkpoints of one upload
MAX_CLASSES = 10_000                        # outputs of one task's classifier; labels are 0 .. classes - 1
MAX_ROW_DEPTH = 4                           # nesting of one jsonl row ({"text": ..., "label": ...} is 1)
MAX_TOKENIZER_DEPTH = 32                    # nesting of a tokenizer JSON file (a real tokenizer.json has ≤ 8)
TOKENIZE_CHUNK = 256                        # sentences per tokenizer call: Cancel is checked between calls
MAX_TOKENIZE_SECONDS = 180.0                # all tokenising of one upload (a fast BERT tokenizer needs a few s)
TOKEN_BYTES = 2 * 8                         # per token position of a packed input (ids + mask, int64)
# tokenizers component types a BERT-family tokenizer.json may use (by field; "Sequence" holds more of them).
# None of them runs a pattern of the uploader's: Split and Replace are accepted with a plain String pattern only.
TOKENIZER_TYPES = {
    "normalizer": {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip", "Prepend",
                   "Precompiled", "Nmt", "Replace", "Sequence"},
    "pre_tokenizer": {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation", "ByteLevel", "Metaspace",
                      "Digits", "UnicodeScripts", "CharDelimiterSplit", "Split", "Sequence"},
    "post_processor": {"TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteLevel", "Sequence"},
    "decoder": {"WordPiece", "ByteLevel", "Metaspace", "BPEDecoder", "CTC", "Fuse", "Strip", "ByteFallback",
                "Replace", "Sequence"},
    "model": {"WordPiece", "BPE", "Unigram", "WordLevel"},
}
_SEQUENCE_OF = {"normalizer": "normalizers", "pre_tokenizer": "pretokenizers", "post_processor": "processors",
                "decoder": "decoders"}
# tokenizer classes tokenizer_config.json may name: the plain tokenizer.json readers, and each text family's own
# (``TOKENIZER_CLASSES`` of the family whose SUPPORTED_TYPES hold the config's model_type)
GENERIC_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}
# The pre-tokenizer patterns of known tokenizers, accepted verbatim in a ``Split`` (any other regular expression is
# refused): these ship in every Llama 3 / Qwen2 / GPT-2-style tokenizer.json and run in linear time.
KNOWN_SPLIT_PATTERNS = {
    "Llama 3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "Qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "GPT-2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}

HEADS = bert.SEQUENCE_HEADS          # the BERT family's sequence-classification head layouts
task_head = bert.sequence_head      # a BERT-family task's own head from its checkpoint


def text_family(state_dict, name: str):
    """The text family of an uploaded base checkpoint, found from its key names (BERT-family encoders,
    Llama-style decoders): its module, which provides :data:`esm_core.models.protocol.TEXT_UPLOAD`. Refuses a
    checkpoint of no text family, or one the family cannot take as an upload."""
    fam = models.family_of(state_dict)
    if fam is None or fam.MODALITY != "text":
        shown = "an image model's" if fam is not None else "no text model's"
        raise ValueError(f"{name}: {shown} layout — a text pool takes BERT-family encoders (BERT, RoBERTa, "
                         "DistilBERT, MiniLM) or Llama-style decoders (Llama, Qwen2, Mistral) as "
                         f"*ForSequenceClassification checkpoints; found e.g. {sorted(state_dict)[:4]}")
    missing = [n for n in TEXT_UPLOAD if not hasattr(fam, n)]
    if missing:
        raise ValueError(f"{name}: {fam.DESCRIPTION} cannot be uploaded as a text pool yet (the family lacks "
                         f"{missing})")
    return fam


def head_classes(head: Mapping) -> int:
    """The number of classes of a task's head (``w2`` of a two-layer head, else ``weight``)."""
    return int((head["w2"] if "w2" in head else head["weight"]).shape[0])


def _bounded_read(path, limit: int, what: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{what} is larger than {limit // 1024 ** 2} MB")
    return raw


_DIGITS = re.compile(r"[0-9]{1,9}\Z")
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"')      # possessive: linear even on an unterminated string
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")


def _label(v, where: str) -> int:
    """A class index: a whole number (or a string of ASCII digits) from 0 to :data:`MAX_CLASSES` - 1."""
    if isinstance(v, str) and _DIGITS.match(v.strip()):
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int):
        shown = str(v)[:40] if isinstance(v, (str, int, float)) else type(v).__name__
        raise ValueError(f"{where}: label {shown!r} is not a class index (0, 1, ...): labels must be the "
                         "indices of the task classifier's outputs")
    if not 0 <= v < MAX_CLASSES:
        shown = str(v) if abs(v) < 10 ** 15 else f"{'-' if v < 0 else ''}about 10^{len(str(abs(v))) - 1}"
        raise ValueError(f"{where}: label {shown} is not a class index: labels are 0, 1, ... (at most "
                         f"{MAX_CLASSES - 1:,}), the indices of the task classifier's outputs")
    return v


def loads_bounded(text: str, what: str, max_depth: int):
    """``json.loads`` of an uploaded file or row with its nesting bounded *before* parsing (a deeply nested value
    would otherwise end in a RecursionError), NaN / Infinity refused. Raises ValueError naming ``what``."""
    if text.count("[") + text.count("{") > max_depth:        # only then can it be too deep: find out, linearly
        depth = 0
        for c in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):    # the brackets outside strings
            if c == "[" or c == "{":
                depth += 1
                if depth > max_depth:
                    raise ValueError(f"{what} is nested more than {max_depth} levels deep")
            else:
                depth -= 1
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except ValueError as e:                                  # NaN / Infinity (_refuse_constant)
        raise ValueError(f"{what}: {e}") from None


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
            obj = loads_bounded(line, f"{task}: {name} line {i}", MAX_ROW_DEPTH)
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


def _check_component(field: str, comp, path: str) -> None:
    if not isinstance(comp, dict):
        raise ValueError(f"tokenizer.json: {path} must be an object with a 'type'")
    kind = comp.get("type")
    if field == "model" and kind is None:
        return                                               # models run no pattern; old files omit the type
    if kind not in TOKENIZER_TYPES[field]:
        raise ValueError(f"tokenizer.json: {path} is of type {str(kind)[:60]!r}, which this server does not run "
                         f"for an uploaded tokenizer (accepted: {', '.join(sorted(TOKENIZER_TYPES[field]))})")
    if kind == "Sequence" and field in _SEQUENCE_OF:
        key = _SEQUENCE_OF[field]
        items = comp.get(key)
        if not isinstance(items, list):
            raise ValueError(f"tokenizer.json: {path} is a Sequence without a list '{key}'")
        for i, c in enumerate(items):
            _check_component(field, c, f"{path}.{key}[{i}]")
    if kind in ("Split", "Replace"):
        pattern = comp.get("pattern")
        if kind == "Split" and _known_regex(pattern):
            return
        if not (isinstance(pattern, dict) and set(pattern) == {"String"} and isinstance(pattern["String"], str)):
            shown = str(pattern.get("Regex") if isinstance(pattern, dict) and "Regex" in pattern else pattern)[:60]
            raise ValueError(f"tokenizer.json: {path} ({kind}) has the pattern {shown!r}, a regular expression: "
                             "this server runs no regular expression of an upload (a plain String pattern is "
                             "accepted, and the Llama 3 / Qwen2 / GPT-2 split patterns verbatim) — upload the "
                             "model's own tokenizer")


def _known_regex(pattern) -> bool:
    """True for ``{"Regex": p}`` with ``p`` one of :data:`KNOWN_SPLIT_PATTERNS`, character for character."""
    return (isinstance(pattern, dict) and set(pattern) == {"Regex"}
            and pattern["Regex"] in KNOWN_SPLIT_PATTERNS.values())


def check_tokenizer_json(obj: Mapping) -> None:
    """Refuse a ``tokenizer.json`` whose normaliser, pre-tokenizer, post-processor, decoder or model is not one of
    :data:`TOKENIZER_TYPES`, or that holds a regular expression anywhere in them (a pattern such as ``(a|a)*$``
    backtracks for seconds per sentence inside the tokenizer, where nothing can stop it). The message names the
    component and its path in the file."""
    for field in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        comp = obj.get(field)
        if comp is None and field != "model":
            continue
        _check_component(field, comp, field)
        if field == "model":
            continue                                         # a vocabulary may hold the token "Regex"
        stack = [(field, comp)]
        while stack:                                         # belt and braces: no "Regex" anywhere in them
            path, v = stack.pop()
            if isinstance(v, dict):
                if v.get("type") == "Split" and _known_regex(v.get("pattern")):
                    continue                                 # a known tokenizer's own pattern (checked above)
                if "Regex" in v:
                    raise ValueError(f"tokenizer.json: {path} holds a regular expression "
                                     f"({str(v['Regex'])[:60]!r}): this server runs no regular expression of an "
                                     "upload — upload the model's own BERT-family tokenizer")
                stack += [(f"{path}.{k}", x) for k, x in v.items()]
            elif isinstance(v, list):
                stack += [(f"{path}[{i}]", x) for i, x in enumerate(v)]


def tokenizer_classes(config: Mapping | None) -> tuple[str, set[str]]:
    """(what kind, the tokenizer classes accepted) for a model of ``config``'s ``model_type``: the text family's
    own classes and the plain tokenizer.json readers; every text family's for an unknown or absent type."""
    fams = [f for f in models.FAMILIES.values() if f.MODALITY == "text" and hasattr(f, "TOKENIZER_CLASSES")]
    mt = config.get("model_type") if isinstance(config, Mapping) else None
    mine = [f for f in fams if mt in getattr(f, "SUPPORTED_TYPES", ())]
    fams = mine or fams
    return (" or ".join(f.TOKENIZER_KIND for f in fams),
            set(GENERIC_TOKENIZER_CLASSES).union(*(f.TOKENIZER_CLASSES for f in fams)))


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
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if name not in paths:
                continue
            try:
                text = (tmp / name).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{name} is not UTF-8 text") from None
            obj = loads_bounded(text, name, MAX_TOKENIZER_DEPTH)             # strict JSON, nesting bounded
            if not isinstance(obj, dict):
                raise ValueError(f"{name} must be a JSON object")
            if name == "tokenizer.json":
                check_tokenizer_json(obj)                                    # no regular expression of the upload
            elif name == "tokenizer_config.json":                            # no code to fetch, no other files
                cls = obj.get("tokenizer_class")
                kind, accepted = tokenizer_classes(config)
                if cls is not None and cls not in accepted:
                    raise ValueError(f"tokenizer_config.json: tokenizer_class {str(cls)[:60]!r} is not a {kind} "
                                     f"tokenizer this server runs (accepted: {', '.join(sorted(accepted))})")
                for k in [k for k in obj if k in ("auto_map", "chat_template") or k.endswith(("_file", "_files"))]:
                    obj.pop(k)
                (tmp / name).write_text(json.dumps(obj))
        if config is not None:
            (tmp / "config.json").write_text(json.dumps({"model_type": str(config.get("model_type", ""))}))
        try:
            return AutoTokenizer.from_pretrained(str(tmp), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"the uploaded tokenizer files cannot be read ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_text_memory(texts_of: Mapping[str, tuple[list[str], np.ndarray]], base: Mapping[str, torch.Tensor],
                       max_length: int, in_memory_tasks: int, memory_budget: int | None,
                       working_copies: int = 0) -> None:
    """Refuse, before any task checkpoint is read, an upload whose tokenised sentences (at most ``max_length``
    tokens each, ids + mask), sentences, checkpoints held in memory and the session's model-sized working copies
    exceed the budget (:func:`esm_core.pools.upload.upload_memory_budget`, or ``memory_budget`` bytes)."""
    budget, copies = upload_memory_budget() if memory_budget is None else int(memory_budget), int(working_copies)
    base_bytes = sum(v.numel() * v.element_size() for v in base.values())
    rows = {t: len(x[0]) for t, x in texts_of.items()}
    text_bytes = sum(len(s) + 64 for texts, _ in texts_of.values() for s in texts)
    token_bytes = sum(rows.values()) * max_length * TOKEN_BYTES
    ckpt = base_bytes * (1 + in_memory_tasks)
    need = token_bytes + text_bytes + ckpt + copies * base_bytes
    if need > budget:
        raise ValueError(f"this upload ({len(rows)} tasks, {sum(rows.values()):,} sentences) needs about "
                         f"{_mib(need)}: {_mib(token_bytes)} of tokenised sentences ({max_length} tokens each), "
                         f"{_mib(text_bytes)} of text, {_mib(ckpt)} of checkpoints held, {copies} model-sized "
                         f"working copies of {_mib(base_bytes)} — more than the {_mib(budget)} a session may hold "
                         "(ESM_SESSION_MEMORY_MB): upload fewer tasks or sentences, or a smaller model")


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def _tokenize_upload(pool: TextTaskPool, rows: Mapping[str, int], report: Progress) -> None:
    """Tokenise every sentence of an uploaded pool now, in chunks; after each: ``report`` (Cancel, a client gone)
    and the time bound :data:`MAX_TOKENIZE_SECONDS` (ValueError naming the task and how far it got)."""
    total, start = max(1, sum(rows.values())), time.monotonic()
    last: dict = {}
    at = 0

    def check(task: str, split: str, done: int, n: int) -> None:
        nonlocal at
        at += done - last.get((task, split), 0)
        last[(task, split)] = done
        elapsed = time.monotonic() - start
        if elapsed > MAX_TOKENIZE_SECONDS:
            raise ValueError(f"task {task!r}: tokenising stopped after {elapsed:.0f} s at {at:,} of {total:,} "
                             f"sentences, more than the {MAX_TOKENIZE_SECONDS:.0f} s this server gives the "
                             "tokenizer of one upload: the uploaded tokenizer is too slow")
        report(0.6 + 0.38 * at / total, f"tokenising the sentences of {task} ({at:,} of {total:,})")

    report(0.6, "tokenising the sentences")
    pool.tokenize_all(check)


def text_pool_from_upload(base_path, task_paths: Mapping[str, str | Path], text_files: Mapping[str, str | Path],
                          config: Mapping, tokenizer_files: Mapping[str, str | Path], *,
                          max_length: int | None = None, progress: Progress | None = None,
                          keep_dir: str | Path | None = None,
                          memory_budget: int | None = None, working_copies: int = 0
                          ) -> tuple[TextTaskPool, list[str]]:
    """Build a text pool from uploads: ``(TextTaskPool, notes for the user)``. See the module docstring.

    ``keep_dir``: as for image uploads (:func:`esm_core.pools.upload.pool_from_upload`), each checked task
    encoder is written there (safetensors) and read lazily, key by key; without it every task is held.

    Bounded before the work: at most :data:`MAX_TASKS` tasks; every config field checked against the base
    checkpoint before a model is built (the family's ``check_shapes``); the memory of the tokenised
    sentences, the checkpoints held and the session's model-sized working copies checked against
    ``memory_budget`` (None: ``ESM_SESSION_MEMORY_MB`` or 8 GiB; ``working_copies`` model-sized copies counted
    besides, as for image uploads) before any task
    checkpoint is read; the tokenizer checked (:func:`check_tokenizer_json`) before it runs; tokenising done in
    chunks, each followed by ``progress`` (which may raise to stop: Cancel) and a check of
    :data:`MAX_TOKENIZE_SECONDS`."""
    report = reporter(progress)
    names = list(task_paths)
    if len(names) < 2:
        raise ValueError(f"merging needs at least two task checkpoints; got {len(names)}")
    if len(names) > MAX_TASKS:
        raise ValueError(f"{len(names)} task checkpoints: this server merges at most {MAX_TASKS} tasks of one upload")
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

    bert.check_config_values(config)                          # finite numbers, bounded ints and nesting

    texts_of = {}                                             # every task's sentences first: bounded, cheap
    for i, t in enumerate(names):
        report(0.02 + 0.08 * i / len(names), f"labelled text of {t}")
        texts_of[t] = read_labelled_text(text_files[t], t)
    report(0.1, "reading the base checkpoint")
    base_raw = load_checkpoint(base_path)
    fam = text_family(base_raw, Path(base_path).name)
    n_params = sum(v.numel() for v in base_raw.values())
    if n_params > (cap := settings.max_model_params()):   # ESM_MAX_MODEL_PARAMS
        raise ValueError(f"the base checkpoint holds {n_params / 1e6:.0f} M parameters, more than the "
                         f"{cap / 1e6:.0f} M this server merges")
    base_raw = fam.convert(base_raw, Path(base_path).name)
    base = {k: v.float() if v.is_floating_point() else v for k, v in fam.encoder_state(base_raw).items()}
    del base_raw
    fam.check_shapes(base, config, cap)         # config fields vs the checkpoint, before anything is built
    room = fam.max_tokens(config)
    ml = int(max_length or min(DEFAULT_MAX_LENGTH, room))
    if not 1 <= ml <= room:
        raise ValueError(f"config.json: max_position_embeddings leaves room for {room} tokens, not {ml}")
    _check_text_memory(texts_of, base, ml, 0 if keep_dir is not None else len(names), memory_budget,
                       working_copies)

    tasks, heads, lora_notes = {}, {}, []
    for i, t in enumerate(names):
        report(0.15 + 0.4 * i / len(names), f"reading task checkpoint {t}")
        name = Path(task_paths[t]).name
        adapter = is_adapter_path(task_paths[t])     # a PEFT LoRA folder / .zip: base + s·BA, its head (methods §1)
        raw = load_checkpoint(task_paths[t], base=base if adapter else None, base_name=Path(base_path).name,
                              notes=lora_notes)
        if not fam.matches(raw):
            raise ValueError(f"task {t!r}: not a checkpoint of the base's layout ({fam.DESCRIPTION})")
        raw = fam.convert(raw, name)
        heads[t] = fam.sequence_head(raw, t)
        enc = fam.encoder_state(raw)
        del raw
        check_compatible(base, enc, name)                   # keys, shapes, float-ness, finite values: as for images
        C = head_classes(heads[t])
        if C > MAX_CLASSES:
            raise ValueError(f"task {t!r}: its classifier has {C:,} outputs, more than the {MAX_CLASSES:,} classes "
                             "this server evaluates")
        y = texts_of[t][1]
        if int(y.max()) >= C:
            raise ValueError(f"task {t!r}: label {int(y.max())} but its classifier has {C} outputs (labels 0..{C - 1})")
        tasks[t] = {k: enc[k].float() if enc[k].is_floating_point() else enc[k] for k in base}
        del enc
        if keep_dir is not None:
            Path(keep_dir).mkdir(parents=True, exist_ok=True)
            tasks[t] = LazyCheckpoint(save_safetensors(tasks[t], Path(keep_dir) / f"task-{i}.safetensors"))
    report(0.58, "reading the tokenizer")
    tok = load_tokenizer_files(tokenizer_files, config)
    tok_notes = fam.prepare_tokenizer(tok, config)
    vocab = config.get("vocab_size")                         # checked against the embedding table above
    if isinstance(vocab, int) and len(tok) > vocab:
        raise ValueError(f"the uploaded tokenizer has {len(tok):,} tokens but config.json's vocab_size is "
                         f"{vocab:,}: it is another model's tokenizer")
    reads = "the last real token's final hidden state" if fam.SEQUENCE_POOLING == "last" else \
        "the first token's last hidden state"
    data, class_names, notes = {}, {}, [f"family: {config['model_type']} (from config.json; {fam.DESCRIPTION}); "
                                        f"features: {reads}; heads: each task's own classifier",
                                        *tok_notes, *lora_notes]
    for t in names:
        texts, y = texts_of[t]
        C = head_classes(heads[t])
        val, test = _split_val_test(y)
        proxy = val[np.sort(np.random.default_rng(0).choice(len(val), min(bert.PROXY_SAMPLES, len(val)),
                                                            replace=False))]
        data[t] = {"val": ([texts[j] for j in val], y[val]), "test": ([texts[j] for j in test], y[test]),
                   "proxy_ids": np.searchsorted(val, proxy)}
        class_names[t] = [f"class {c}" for c in range(C)]
        notes.append(f"{t}: {len(y)} sentences, {C} classes, split half validation / half test")
    pool = TextTaskPool(name="upload", model_config=dict(config), base=base, tasks=tasks, heads=heads,
                        class_names=class_names, data=data, tokenizer=tok, max_length=ml,
                        pooling=fam.SEQUENCE_POOLING, family=fam.NAME,
                        meta={"model": f"uploaded {config['model_type']}",
                              "head_sources": {t: HeadSource.OWN.value for t in names},       # the Pool view's table
                              "splits": {t: {"rule": "seeded half / half per class", "val": len(data[t]["val"][1]),
                                             "test": len(data[t]["test"][1])} for t in names}})
    _tokenize_upload(pool, {t: len(texts_of[t][0]) for t in names}, report)
    report(1.0, "pool ready")
    return pool, notes
