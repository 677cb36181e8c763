"""Writing a merged model as files the ecosystem loads: one writer for the app's Export view and the CLI.

:func:`write_export` writes, by the target's name and the model family:

* ``*.safetensors`` — the plain merged state dict (the historical format), its recipe in the metadata;
* a **transformers folder** (BERT-family text encoders, Llama-style decoders, Hugging Face ViTs):
  ``config.json``, ``model.safetensors`` (the bare ``*Model`` layout: ``BertModel``, ``LlamaModel`` /
  ``Qwen2Model`` / ``MistralModel``, ``ViTModel``), the tokenizer files, ``heads/<task>.safetensors`` (each
  task's classifier and its own biases, methods §8), ``merge_recipe.json`` and a model card ``README.md`` —
  ``transformers.AutoModel.from_pretrained(folder)`` loads it;
* an **open_clip folder**: ``open_clip_config.json`` + ``open_clip_model.safetensors`` (the merged image
  tower and the base's text tower) that ``open_clip.create_model_and_transforms("local-dir:" + folder)``
  loads (a registered model name also loads it with ``pretrained=<folder>/open_clip_model.safetensors``);
  when the base had no text tower, the image tower alone as ``open_clip_image_tower.safetensors``;
  ``heads/<task>.safetensors`` (C × D zero-shot / frozen heads, class names in the metadata), the recipe
  and the card.

Every file is written float32 (unless ``dtype`` says otherwise) with mode 0644 (less the umask); the
recipe's metadata layout is the same whoever writes it: the recipe given + ``esm_studio`` (its version),
``versions`` (torch, safetensors, transformers, open_clip, esm_studio), ``format``, ``family``, ``dtype``.
A folder is written to a temporary folder beside the target and renamed into place: nothing
half-written stays behind. Free disk space is checked before anything is written.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from huggingface_hub import HfApi, get_token

from . import __version__, settings
from .checkpoints import CheckpointError, read_config, save_safetensors, strict_json_dumps
from .models import FAMILIES, OWN, bert, family_of, hf_vit, openclip_vit

FORMATS = ("safetensors", "transformers", "open_clip")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FILE_MODE = 0o644
DIR_MODE = 0o755
RECIPE_FILE = "merge_recipe.json"
CARD_FILE = "README.md"
OPEN_CLIP_FULL = "open_clip_model.safetensors"
OPEN_CLIP_VISUAL = "open_clip_image_tower.safetensors"
MAX_TOKENIZER_BYTES = 64 * 1024 ** 2       # all tokenizer files of one export together
DISK_MARGIN = 64 * 1024 ** 2               # free space kept beyond the export's own size
_AUTO_MODEL = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
               "camembert": "CamembertModel", "distilbert": "DistilBertModel"}


def folder_format(family: str) -> str | None:
    """The folder format of a family's exports — also the library that loads them (the card's ``library_name``):
    its ``FOLDER_FORMAT`` (``"transformers"``, ``"open_clip"``), None for a family that writes only a file."""
    fam = FAMILIES.get(family)
    return getattr(fam, "FOLDER_FORMAT", None) if fam is not None and hasattr(fam, "FOLDER_WRITER") else None


def _folder_formats() -> dict[str, str]:
    return {n: f for n in FAMILIES if (f := folder_format(n))}


# ---------------------------------------------------------------- what is recorded

def versions() -> dict[str, str | None]:
    """Versions of the libraries that wrote (and will read) an export; None for one not installed."""
    out: dict[str, str | None] = {"esm_studio": __version__}
    for name, dist in (("torch", "torch"), ("safetensors", "safetensors"), ("transformers", "transformers"),
                       ("open_clip", "open_clip_torch")):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def family_for_keys(state_dict) -> str:
    """The family of a state dict's key names (``"bert"``, ``"openclip_vit"``, ...), ``"unknown"`` for none."""
    fam = family_of(state_dict)
    return fam.NAME if fam is not None else "unknown"


def family_of_pool(pool) -> str:
    """The model family of a pool: its ``family`` (text pools), else the open_clip ViT (image pools)."""
    return str(getattr(pool, "family", openclip_vit.NAME))


def model_name_of(pool) -> str:
    """The base model's name as a model card states it: a model name, or a short label of an uploaded config."""
    name = getattr(pool, "model_name", None)
    if isinstance(name, Mapping):
        return str(name.get("_name") or "open_clip model from an uploaded config")
    return str(name) if name else "unknown"


def base_of(pool) -> dict:
    """The pool's base state dict, with its CLIP text tower when the pool kept one (``pool.meta["text_tower"]``,
    tensors under open_clip's names): an open_clip export then holds the full CLIP model."""
    text = (getattr(pool, "meta", None) or {}).get("text_tower")
    if isinstance(text, Mapping) and all(isinstance(v, torch.Tensor) for v in text.values()):
        return {**text, **pool.base}
    return pool.base


def rebuild_info_of(pool) -> dict:
    """What an ESM++ file of ``pool`` records so that its model is rebuilt from the file alone
    (:func:`esm_core.esmpp.io.save_esmpp`'s ``model=``): an open_clip tower's model config (the full dict, also
    for a registered name), QuickGELU and the image normalisation (``preprocess``: mean, std); text families
    record theirs when the routed model is built."""
    if family_of_pool(pool) != openclip_vit.NAME:
        return {}
    cfg = {k: v for k, v in openclip_vit.model_config(pool.model_name).items() if not k.startswith("_")}
    return {"family": openclip_vit.NAME, "model_config": cfg, "quick_gelu": getattr(pool, "quick_gelu", None),
            "preprocess": {"mean": list(getattr(pool, "mean", openclip_vit.CLIP_MEAN)),
                           "std": list(getattr(pool, "std", openclip_vit.CLIP_STD))}}


def text_family(family: str):
    """The family module of a text family (``MODALITY == "text"``: BERT, Llama-style decoders, ...), else None."""
    fam = FAMILIES.get(family)
    return fam if fam is not None and getattr(fam, "MODALITY", None) == "text" else None


def model_info_of(pool) -> dict:
    """What :func:`write_export` needs to know about a pool's model (duck-typed: any pool of this library)."""
    family = family_of_pool(pool)
    if family == hf_vit.NAME:
        return {"model_config": dict(pool.model_config), "preprocess": dict(pool.preprocess), "name": pool.model_name}
    if text_family(family) is not None:
        return {"model_config": dict(pool.model_config), "tokenizer": pool.tokenizer,
                "pooling": getattr(pool, "pooling", "mean"), "max_length": int(getattr(pool, "max_length", 64)),
                "name": pool.model_name}
    return {"model": pool.model_name, "quick_gelu": getattr(pool, "quick_gelu", None),
            "text_cfg": (getattr(pool, "meta", None) or {}).get("text_cfg"),       # an upload's CLIP text tower
            "mean": list(getattr(pool, "mean", openclip_vit.CLIP_MEAN)),
            "std": list(getattr(pool, "std", openclip_vit.CLIP_STD))}


def heads_of(pool) -> dict[str, dict]:
    """Each task's head file content: the head's tensors, its class names and (text families, methods §8)
    the task's own biases under ``encoder.<key>`` — ``<key>`` the exported model's own name (the bare
    ``AutoModel``'s, the family's ``strip_prefix``), so ``model.load_state_dict(own, strict=False)`` turns the
    merged model into that task's model."""
    fam = text_family(family_of_pool(pool))
    bare = getattr(fam, "strip_prefix", lambda k: k)
    out = {}
    for t in pool.task_names:
        h = pool.heads[t]
        entry: dict[str, Any] = {"class_names": list(pool.class_names[t])}
        if isinstance(h, torch.Tensor):
            entry["weight"] = h
        else:
            entry.update(h)
        if fam is not None:
            for k, v in fam.encoder_state(pool.tasks[t]).items():
                if fam.key_role(k, v) == OWN:
                    entry[f"encoder.{bare(k)}"] = v
        out[t] = entry
    return out


# ---------------------------------------------------------------- helpers

def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    """The config.json name of an export's dtype (``"float32"``, ...): transformers 5 loads a folder in it."""
    return {v: k for k, v in DTYPES.items()}[dtype]


def _cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _bytes(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(v.numel() * (size if v.is_floating_point() else v.element_size()) for v in sd.values())


def _check_space(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if need + DISK_MARGIN > free:
        raise ValueError(f"{what}: needs about {need / 2 ** 20:,.0f} MiB and {folder} has "
                      f"{free / 2 ** 20:,.0f} MiB free; nothing was written")


def _safe_task(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-.")
    if not s:
        raise ValueError(f"task name {name!r} cannot name a file")
    return s


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _modes(root: Path) -> None:
    """0644 files, 0755 folders (less the umask), whatever created them (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *(root.rglob("*") if root.is_dir() else ())]:
        os.chmod(p, (DIR_MODE if p.is_dir() else FILE_MODE) & ~umask)


def export_format(out: str | os.PathLike, family: str, format: str = "auto") -> str:
    """The format ``out`` gets: a ``.safetensors`` name → the plain file; else the family's folder format."""
    if format not in ("auto", *FORMATS):
        raise ValueError(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    is_file = Path(out).suffix.lower() == ".safetensors"
    if format == "auto":
        format = "safetensors" if is_file else (folder_format(family) or "")
        if not format:
            raise ValueError(f"no folder format for model family {family!r}; known: {sorted(_folder_formats())} "
                             "(write a .safetensors file instead)")
    if (format == "safetensors") != is_file:
        raise ValueError(f"{Path(out).name}: format {format!r} writes "
                         f"{'a .safetensors file' if format == 'safetensors' else 'a folder'}; name the target so")
    if format != "safetensors" and folder_format(family) != format:
        raise ValueError(f"format {format!r} does not fit model family {family!r} "
                         f"(it writes {folder_format(family) or 'only a .safetensors file'})")
    return format


# ---------------------------------------------------------------- the model card

def _yaml_str(s: str) -> str:
    return json.dumps(str(s))               # a JSON string is a valid YAML scalar


def _base_name(recipe: Mapping, model_info: Mapping) -> str:
    for v in (recipe.get("base_model"), model_info.get("name"), model_info.get("model"), recipe.get("base")):
        if isinstance(v, str) and v:
            return v
    return "unknown"


def model_card(recipe: Mapping, *, family: str, model_info: Mapping, results: Mapping | None = None,
               command: str | None = None, files: list[str] | None = None, fmt: str = "transformers") -> str:
    """The export's ``README.md``: YAML front matter (``base_model``, ``tags``, ``library_name``) and a body
    with the recipe, per-task accuracies (with n and intervals when known) and the reproducing command."""
    method = str(recipe.get("method", "merge"))
    lib = folder_format(family) or "safetensors"
    base = _base_name(recipe, model_info)
    lines = ["---", f"base_model: {_yaml_str(base)}", "tags:", "- merge", f"- {_yaml_str(method)}",
             "- esm-studio", f"library_name: {lib}", "---", "",
             f"# {method} merge of {len(recipe.get('tasks') or [])} fine-tuned models", "",
             f"Merged with ESM Studio {__version__} from the base model `{base}`.", ""]
    lines += ["## Recipe", "", "| | |", "|---|---|", f"| method | `{method}` |"]
    for k, v in (recipe.get("params") or {}).items():
        lines.append(f"| {k} | `{v}` |")
    tasks = recipe.get("tasks") or []
    names = list(tasks) if not isinstance(tasks, Mapping) else [f"{k} ({v})" for k, v in tasks.items()]
    lines.append(f"| tasks | {', '.join(map(str, names))} |")
    if recipe.get("base"):
        lines.append(f"| base | `{recipe['base']}` |")
    proxy = recipe.get("proxy")
    if isinstance(proxy, Mapping):
        ids = proxy.get("ids")
        n_ids = sum(len(v) for v in ids.values()) if isinstance(ids, Mapping) else None
        lines.append(f"| proxy samples | {proxy.get('n')} per task, seed {proxy.get('seed')}"
                     + (f" ({n_ids} ids in `{RECIPE_FILE}`)" if n_ids else "") + " |")
    v = versions()
    lines.append("| versions | " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + " |")
    lines.append("")
    lines += ["## Accuracy", ""]
    per_task = (results or {}).get("tasks") if isinstance(results, Mapping) else None
    if per_task:
        split = results.get("split", "test")
        lines += [f"Top-1 accuracy on the {split} split ({results.get('note', 'the studio')}); interval: "
                  f"{results.get('interval', '95 % Wilson')}.", "",
                  "| task | accuracy % | n | interval % |", "|---|---|---|---|"]
        for t, r in per_task.items():
            acc = r.get("acc")
            lo, hi = r.get("low"), r.get("high")
            iv = f"{100 * lo:.1f} – {100 * hi:.1f}" if lo is not None and hi is not None else "–"
            lines.append(f"| {t} | {'–' if acc is None else f'{100 * acc:.1f}'} | {r.get('n', '–')} | {iv} |")
        if results.get("mean") is not None:
            lines.append(f"| mean | {100 * results['mean']:.2f} | | |")
        lines.append("")
    else:
        lines += ["Not evaluated when it was written (the command line merges checkpoint files without data; "
                  "`esm-studio eval` measures a pool's accuracy).", ""]
    lines += ["## Use", ""]
    if fmt == "transformers" and family == hf_vit.NAME:
        lines += ["```python", "from transformers import AutoImageProcessor, AutoModel",
                  "model = AutoModel.from_pretrained(\"<this folder>\")",
                  "processor = AutoImageProcessor.from_pretrained(\"<this folder>\")",
                  "features = model(**processor(images=image, return_tensors=\"pt\")).last_hidden_state[:, 0]",
                  "```", "",
                  "Features are the first ([CLS]) token of the last hidden state, what a "
                  "`ViTForImageClassification` head reads. `heads/<task>.safetensors` holds each task's own "
                  "classifier (`weight`, `bias`; class names in the metadata): logits = features @ weight.T + bias.",
                  ""]
    elif fmt == "transformers" and model_info.get("pooling") == "last":          # a decoder's sequence classifier
        lines += ["```python", "import torch", "from transformers import AutoModel, AutoTokenizer",
                  "model = AutoModel.from_pretrained(\"<this folder>\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")",
                  "batch = tokenizer([\"a sentence\"], return_tensors=\"pt\", padding=True)",
                  "hidden = model(**batch).last_hidden_state",
                  "ids, pad = batch[\"input_ids\"], model.config.pad_token_id",
                  "real = (ids != pad) if pad is not None else batch[\"attention_mask\"].bool()",
                  "last = (torch.arange(ids.shape[1]) * real).argmax(1)",
                  "features = hidden[torch.arange(ids.shape[0]), last]", "```", "",
                  "Features are the last hidden state at the rightmost token that is not padding, what a "
                  "`*ForSequenceClassification` `score` head reads (the tokenizer pads on the right). "
                  "`heads/<task>.safetensors` holds each task's `score` (`weight`, and `bias` when it has one; "
                  "logits = features @ weight.T (+ bias); class names in the metadata) and (keys `encoder.*`) its "
                  "own biases: loading those into the model (`strict=False`) gives that task's model (methods §8).",
                  ""]
    elif fmt == "transformers":
        pooling = model_info.get("pooling", "mean")
        lines += ["```python", "from transformers import AutoModel, AutoTokenizer",
                  "model = AutoModel.from_pretrained(\"<this folder>\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")",
                  "batch = tokenizer([\"a sentence\"], return_tensors=\"pt\", padding=True)",
                  "hidden = model(**batch).last_hidden_state",
                  ("features = (hidden * batch[\"attention_mask\"][..., None]).sum(1) / "
                   "batch[\"attention_mask\"].sum(1, keepdim=True)" if pooling == "mean"
                   else "features = hidden[:, 0]"), "```", "",
                  f"Features are the {'mean of the last hidden state over real tokens' if pooling == 'mean' else 'first token of the last hidden state'}. "
                  "`heads/<task>.safetensors` holds each task's classifier and (keys `encoder.*`) its own "
                  "biases: loading those into the model (`strict=False`) gives that task's model (methods §8).",
                  ""]
    elif fmt == "open_clip":
        full = OPEN_CLIP_FULL in (files or [])
        if full:
            lines += ["```python", "import open_clip",
                      "model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:<this folder>\")",
                      "features = model.encode_image(preprocess(image)[None])", "```", ""]
            name = model_info.get("model")
            if isinstance(name, str):
                lines += [f"With open_clip's registered name: `open_clip.create_model_and_transforms("
                          f"\"{name}\", pretrained=\"<this folder>/{OPEN_CLIP_FULL}\""
                          + (", force_quick_gelu=True" if model_info.get("quick_gelu") else "") + ")`.", ""]
        else:
            lines += [f"The base had no text tower: `{OPEN_CLIP_VISUAL}` holds the merged **image tower alone** "
                      f"(keys `{openclip_vit.PREFIX}*`). Build the model from `open_clip_config.json` and load it into "
                      "`model.visual`:", "", "```python", "import json, open_clip, torch",
                      "from safetensors.torch import load_file",
                      "cfg = json.load(open(\"open_clip_config.json\"))[\"model_cfg\"]",
                      "model = open_clip.model.CLIP(**cfg)",
                      f"sd = load_file(\"{OPEN_CLIP_VISUAL}\")",
                      "tower = getattr(model, " + repr(openclip_vit.PREFIX[:-1]) + ")",
                      "tower.load_state_dict({k.split('.', 1)[1]: v for k, v in sd.items()})", "```", ""]
        lines += ["`heads/<task>.safetensors`: each task's head (`weight`, classes × embedding; class names "
                  "in the file's metadata): logits = normalised features @ weight.T.", ""]
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    lines += [f"The full recipe (every parameter, proxy sample ids, versions) is in `{RECIPE_FILE}` and in the "
              "weights file's metadata.", ""]
    return "\n".join(lines)


def front_matter(text: str) -> dict:
    """The simple YAML front matter :func:`model_card` writes (``key: value`` and ``- item`` lists), parsed
    without a YAML library."""
    if not text.startswith("---\n"):
        raise ValueError("no front matter: the card does not start with '---'")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("front matter is not closed by '---'")
    out: dict[str, Any] = {}
    key = None
    for line in text[4:end].splitlines():
        if line.startswith("- ") and key is not None:
            out.setdefault(key, [])
            out[key].append(_scalar(line[2:]))
        elif ":" in line:
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            out[key] = _scalar(val) if val else []
        elif line.strip():
            raise ValueError(f"front matter line not understood: {line!r}")
    return out


def _scalar(s: str):
    s = s.strip()
    if s.startswith('"'):
        return json.loads(s)
    return s


# ---------------------------------------------------------------- writers per family

def _write_heads(folder: Path, heads: Mapping[str, Any] | None, class_names: Mapping | None,
                 dtype: torch.dtype) -> None:
    if not heads:
        return
    (folder / "heads").mkdir()
    for t, h in heads.items():
        entry = dict(h) if isinstance(h, Mapping) else {"weight": h}
        names = entry.pop("class_names", None) or (class_names or {}).get(t)
        tensors = {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
        extra = {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
        meta = {"task": t, "class_names": list(names) if names is not None else None, **extra}
        save_safetensors(_cast(tensors, dtype), folder / "heads" / f"{_safe_task(t)}.safetensors", meta)


def _write_transformers(folder: Path, merged_sd, base_sd, model_info: Mapping, config: dict,
                        dtype: torch.dtype) -> list[str]:
    if not isinstance(model_info.get("model_config"), Mapping):
        raise ValueError("a transformers export needs the model's config.json (model_info['model_config'])")
    cfg = bert.config_of(model_info["model_config"])
    bert.check_shapes(merged_sd, cfg)                           # the weights fit the config before writing
    cfg.architectures = [_AUTO_MODEL.get(cfg.model_type, "AutoModel")]
    cfg.dtype = _dtype_name(dtype)                               # transformers loads a folder in its config's dtype
    sd = _cast(bert.encoder_state(merged_sd), dtype)
    save_safetensors(sd, folder / "model.safetensors", config)   # metadata "format": "pt", as transformers wants
    cfg.to_json_file(str(folder / "config.json"))
    _write_tokenizer(folder, model_info)
    return sorted(p.name for p in folder.iterdir())


def _write_decoder(folder: Path, merged_sd, base_sd, model_info: Mapping, config: dict,
                   dtype: torch.dtype) -> list[str]:
    """A transformers folder of a Llama-style decoder (the family ``config["family"]``): the bare ``LlamaModel`` /
    ``Qwen2Model`` / ``MistralModel`` that ``AutoModel.from_pretrained(folder)`` builds, in ``dtype`` (the config
    says it: transformers loads a folder in its config's dtype), and the tokenizer. Features: its last hidden state
    at the rightmost non-padding token, what the task's ``score`` (its head file) reads."""
    import transformers
    fam = FAMILIES[config["family"]]
    if not isinstance(model_info.get("model_config"), Mapping):
        raise ValueError("a transformers export needs the model's config.json (model_info['model_config'])")
    sd = fam.convert(merged_sd, "the merged model")              # the pool's key layout (a CLI base may be bare)
    cfg, tcfg = fam.check_shapes(sd, model_info["model_config"])  # the weights fit the config before writing
    names = transformers.models.auto.modeling_auto.MODEL_MAPPING_NAMES     # model_type → its bare *Model
    tcfg.architectures = [names.get(cfg["model_type"], "AutoModel")]
    tcfg.dtype = _dtype_name(dtype)
    bare = {fam.strip_prefix(k): v for k, v in fam.encoder_state(sd).items()}
    save_safetensors(_cast(bare, dtype), folder / "model.safetensors", config)
    tcfg.to_json_file(str(folder / "config.json"))
    _write_tokenizer(folder, model_info)
    return sorted(p.name for p in folder.iterdir())


# sentences a written tokenizer is checked on: words, digits, punctuation, accents, other scripts, runs of spaces
TOKENIZER_PROBE = ("The quick brown fox jumps over the lazy dog.", "a purple zebra! 0123456789 (x, y) = [1; 2]",
                   "Ünïcödé straße — café ½ 日本語のテキスト 😀", "  two  spaces\tand a tab\nand a new line  ")


def _check_tokenizer_reloads(folder: Path, tok) -> None:
    """What ``AutoTokenizer.from_pretrained(folder)`` reads back (config.json already written: transformers may pick
    the tokenizer class from its ``model_type``, e.g. a Qwen2 one) must tokenise as ``tok`` and pad as it does;
    ValueError naming both classes otherwise (the folder is then not written)."""
    from transformers import AutoTokenizer
    back = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    same = (back.pad_token_id == tok.pad_token_id
            and getattr(back, "padding_side", "right") == getattr(tok, "padding_side", "right")
            and all(back(s)["input_ids"] == tok(s)["input_ids"] for s in TOKENIZER_PROBE))
    if not same:
        raise ValueError(f"the tokenizer written ({type(tok).__name__}) reads back through transformers' "
                         f"AutoTokenizer as a {type(back).__name__} that tokenises or pads differently (the config's "
                         "model_type chooses the class): the export would not reproduce the pool's inputs; nothing "
                         "was written")


def _write_tokenizer(folder: Path, model_info: Mapping) -> None:
    """The tokenizer beside the model: a pool's tokenizer (``save_pretrained``) or the CLI's tokenizer files
    (copied; bounded in size)."""
    tok, files = model_info.get("tokenizer"), model_info.get("tokenizer_files")
    if tok is not None:
        tok.save_pretrained(str(folder))
        _check_tokenizer_reloads(folder, tok)
    elif files:
        total = sum(Path(p).stat().st_size for p in files.values())
        if total > MAX_TOKENIZER_BYTES:
            raise ValueError(f"tokenizer files hold {total / 2 ** 20:.0f} MiB, more than the "
                             f"{MAX_TOKENIZER_BYTES // 2 ** 20} MiB accepted")
        for name, p in files.items():
            if Path(name).name != name or name in ("config.json", "model.safetensors", CARD_FILE, RECIPE_FILE):
                raise ValueError(f"tokenizer file name {name!r} is not a plain tokenizer file name")
            shutil.copyfile(p, folder / name)


def _write_vit(folder: Path, merged_sd, base_sd, model_info: Mapping, config: dict,
               dtype: torch.dtype) -> list[str]:
    """A Hugging Face ``ViTModel`` folder: ``AutoModel.from_pretrained(folder)`` builds it; the features are its
    last hidden state's first token (what a ``ViTForImageClassification`` head reads)."""
    if not isinstance(model_info.get("model_config"), Mapping):
        raise ValueError("a ViT export needs the model's config.json (model_info['model_config'])")
    cfg = hf_vit.check_config(model_info["model_config"])
    hf_vit.check_shapes(merged_sd, cfg)                          # the weights fit the config before writing
    vc = hf_vit.vit_config(cfg)
    vc.architectures = ["ViTModel"]
    vc.dtype = _dtype_name(dtype)
    sd = {hf_vit.strip_prefix(k): v for k, v in hf_vit.encoder_state(merged_sd).items()}
    save_safetensors(_cast(sd, dtype), folder / "model.safetensors", config)
    vc.to_json_file(str(folder / "config.json"))
    pre = model_info.get("preprocess")
    if isinstance(pre, Mapping):
        size = int(pre["size"])
        _write_text(folder / "preprocessor_config.json", strict_json_dumps({
            "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": int(pre.get("resample", 2)), "do_rescale": True, "rescale_factor": float(pre["rescale"]),
            "do_normalize": True, "image_mean": list(pre["mean"]), "image_std": list(pre["std"])},
            "preprocessor config", indent=2) + "\n")
    return sorted(p.name for p in folder.iterdir())


def _clip_keys(cfg: Mapping) -> set[str]:
    """The state dict keys of the full open_clip CLIP of ``cfg`` (built on the meta device: nothing drawn)."""
    import open_clip.model as ocm
    kw = {k: v for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}
    with torch.device("meta"):
        return set(ocm.CLIP(**kw).state_dict())


def _write_open_clip(folder: Path, merged_sd, base_sd, model_info: Mapping, config: dict,
                     dtype: torch.dtype) -> list[str]:
    if model_info.get("model") is None:
        raise ValueError("an open_clip export needs the model's name or config (model_info['model'])")
    cfg = {k: v for k, v in openclip_vit.model_config(model_info["model"]).items()
           if not k.startswith("_") and k != "preprocess_cfg"}            # an upload's label and normalisation
    if model_info.get("quick_gelu") is not None:
        cfg["quick_gelu"] = bool(model_info["quick_gelu"])
    if "text_cfg" not in cfg and isinstance(model_info.get("text_cfg"), Mapping):
        cfg["text_cfg"] = dict(model_info["text_cfg"])          # an uploaded base's text tower, read for its heads
    pre = openclip_vit.PREFIX                                    # the image tower's keys
    visual = {k: v for k, v in merged_sd.items() if k.startswith(pre)}
    if not visual:
        raise ValueError(f"an open_clip export needs the image tower's keys ({pre}*) in the merged state dict")
    full = {**{k: v for k, v in (base_sd or {}).items() if not k.startswith(pre)},
            **{k: v for k, v in merged_sd.items() if not k.startswith(pre)}, **visual}
    text = cfg.get("text_cfg")
    sized = isinstance(text, Mapping) and all(isinstance(text.get(f, 0), int) and 0 <= text.get(f, 0) <= hi
                                              for f, hi in (("layers", 64), ("width", 8192), ("heads", 1024),
                                                            ("context_length", 4096), ("vocab_size", 1_048_576)))
    has_text = len(full) > len(visual)                           # the base kept a text tower
    want = _clip_keys(cfg) if sized and has_text else set()     # a config's text tower is built (meta) only bounded
    if want and want <= set(full):
        name, sd = OPEN_CLIP_FULL, {k: full[k] for k in sorted(want)}
    else:
        name, sd = OPEN_CLIP_VISUAL, visual
    pre = {"mean": list(model_info.get("mean") or openclip_vit.CLIP_MEAN),
           "std": list(model_info.get("std") or openclip_vit.CLIP_STD)}
    save_safetensors(_cast(sd, dtype), folder / name, config)
    _write_text(folder / "open_clip_config.json",
                strict_json_dumps({"model_cfg": cfg, "preprocess_cfg": pre}, "open_clip config", indent=2) + "\n")
    return sorted(p.name for p in folder.iterdir())


# a family's FOLDER_WRITER → the writer(folder, merged_sd, base_sd, model_info, config, dtype) -> [file names]. A new
# family names one of these (and its FOLDER_FORMAT) in its module; a new kind of folder adds a writer here.
WRITERS: dict[str, Callable[..., list[str]]] = {"transformers-encoder": _write_transformers,
                                                "transformers-vit": _write_vit,
                                                "transformers-decoder": _write_decoder,
                                                "open_clip": _write_open_clip}


# ---------------------------------------------------------------- the one writer

def write_export(out: str | os.PathLike, merged_sd: Mapping[str, torch.Tensor], *,
                 base_sd: Mapping[str, torch.Tensor] | None, family: str, model_info: Mapping, recipe: Mapping,
                 results: Mapping | None = None, format: str = "auto", dtype: str = "float32",
                 heads: Mapping[str, Any] | None = None, class_names: Mapping[str, list[str]] | None = None,
                 command: str | None = None) -> Path:
    """Write a merged model (see the module's docstring for the formats). Returns the file or folder.

    A folder target must not exist (or be an empty folder); it is built beside it and renamed into place.
    Raises ValueError naming what is wrong (format, family, dtype, config, tokenizer, target) before writing.
    """
    out = Path(out)
    fmt = export_format(out, family, format)
    dt = _dtype(dtype)
    if not merged_sd:
        raise ValueError("nothing to export: the merged state dict is empty")
    config = {**dict(recipe), "esm_studio": __version__, "versions": versions(), "format": fmt,
              "family": family, "dtype": dtype}
    strict_json_dumps(config, "merge recipe")                    # NaN / inf refused before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    need = _bytes(merged_sd, dt) + (_bytes({k: v for k, v in (base_sd or {}).items() if k not in merged_sd}, dt)
                                    if fmt == "open_clip" else 0)
    _check_space(out.parent, need, out.name)
    if fmt == "safetensors":
        p = save_safetensors(_cast(merged_sd, dt), out, config)
        _modes(p)
        return p
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists; give a new folder name")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    try:
        files = WRITERS[FAMILIES[family].FOLDER_WRITER](tmp, merged_sd, base_sd, model_info, config, dt)
        _write_heads(tmp, heads, class_names, dt)
        _write_text(tmp / RECIPE_FILE, strict_json_dumps(config, "merge recipe", indent=2, default=str) + "\n")
        _write_text(tmp / CARD_FILE, model_card(config, family=family, model_info=model_info, results=results,
                                                command=command, files=files, fmt=fmt))
        _modes(tmp)
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_export(path: str | os.PathLike) -> dict | None:
    """The recipe of an export: a folder's ``merge_recipe.json``, a file's metadata, or a JSON config.
    Files written before the unified layout (``esm_studio_version`` / ``esm_studio`` only) read the same way:
    ``versions`` is filled from what they hold."""
    p = Path(path)
    if p.is_dir():
        f = p / RECIPE_FILE
        if not f.is_file():
            raise CheckpointError(f"{p.name}: not an ESM Studio export folder (no {RECIPE_FILE})")
        cfg = json.loads(f.read_text())
    elif p.suffix == ".json":
        cfg = json.loads(p.read_text())
    else:
        cfg = read_config(p)
    if isinstance(cfg, dict):
        old = cfg.get("esm_studio") or cfg.get("esm_studio_version")
        cfg.setdefault("esm_studio", old)
        cfg.setdefault("versions", {"esm_studio": old})
    return cfg


def zip_folder(folder: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """``folder`` as ``<folder>.zip`` (its files under the folder's name), written to a temporary name and
    renamed; mode 0644."""
    folder = Path(folder)
    out = Path(out) if out is not None else folder.parent / f"{folder.name}.zip"
    _check_space(out.parent, sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()), out.name)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    z.write(f, f"{folder.name}/{f.relative_to(folder).as_posix()}")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _modes(out)
    return out


# ---------------------------------------------------------------- what the command line knows

TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")


def check_target(out: str | os.PathLike, format: str = "auto") -> None:
    """Refuse, before any work, a target that cannot be written: a bad format, or a folder that exists."""
    out = Path(out)
    if format not in ("auto", *FORMATS):
        raise ValueError(f"--format must be 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    is_file = out.suffix.lower() == ".safetensors"
    if out.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".zip", ".json", ".npz", ".h5"):
        raise ValueError(f"--out {str(out)!r}: merged models are written as a .safetensors file or as a folder "
                         "(a name without a file extension)")
    if format == "safetensors" and not is_file:
        raise ValueError(f"--out {str(out)!r}: format 'safetensors' writes a .safetensors file; name it so")
    if format not in ("auto", "safetensors") and is_file:
        raise ValueError(f"--out {str(out)!r}: format {format!r} writes a folder; give a folder name")
    if not is_file and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} already exists; give a new folder name")


def model_info_from_files(family: str, base_path: str | os.PathLike, model: str | None = None) -> dict:
    """The model info of a folder export from files: a text model's ``config.json`` (``model``, or the one next to
    the base checkpoint) and the tokenizer files next to that config; an open_clip model's registered name or
    config file (``model``: a name, an ``open_clip_config.json`` or a model config ``.json``)."""
    fam = text_family(family)
    if fam is not None:
        cfg_path = Path(model) if model else Path(base_path).parent / "config.json"
        if cfg_path.is_dir():
            cfg_path = cfg_path / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"a transformers folder needs the model's config.json: none at {cfg_path} "
                             "(give --model <config.json>, or write a .safetensors file)")
        if cfg_path.stat().st_size > 1024 ** 2:
            raise ValueError(f"{cfg_path}: more than 1 MiB, not a model config.json")
        try:
            config = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path}: not a JSON model config ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path}: must be a JSON object, got {type(config).__name__}")
        files = {n: cfg_path.parent / n for n in TOKENIZER_NAMES if (cfg_path.parent / n).is_file()}
        info = {"model_config": config, "tokenizer_files": files, "name": config.get("_name_or_path") or None}
        if fam is bert:
            bert.check_config_values(config, str(cfg_path))
            return info
        try:
            checked = fam.check_config(config)                    # the family's own bounds, before any weight is read
        except ValueError as e:
            msg = str(e).removeprefix("config.json: ")
            raise ValueError(f"{cfg_path}: {msg}") from None
        return {**info, "model_config": checked, "pooling": getattr(fam, "SEQUENCE_POOLING", None)}
    if family == openclip_vit.NAME:
        if not model:
            raise ValueError("an open_clip folder needs the model: give --model <open_clip model name or config "
                             ".json> (or write a .safetensors file)")
        p = Path(model)
        if p.suffix.lower() == ".json" and p.is_file():
            if p.stat().st_size > 1024 ** 2:
                raise ValueError(f"{p}: more than 1 MiB, not an open_clip model config")
            raw = json.loads(p.read_text())
            cfg = raw.get("model_cfg", raw) if isinstance(raw, dict) else None
            pre = raw.get("preprocess_cfg", {}) if isinstance(raw, dict) else {}
            cfg = openclip_vit.check_config(openclip_vit.model_config(cfg if isinstance(cfg, Mapping) else {}))
            return {"model": cfg, "quick_gelu": cfg.get("quick_gelu"), "mean": pre.get("mean"), "std": pre.get("std"),
                    "name": p.stem}
        cfg = openclip_vit.model_config(model)                        # ValueError: unknown name
        return {"model": model, "quick_gelu": cfg.get("quick_gelu")}
    raise ValueError(f"no folder format for model family {family!r}; write a .safetensors file")


# ---------------------------------------------------------------- pushing to the Hugging Face Hub

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
HUB_CHECK_SECONDS = 15.0          # the first call to the Hub (who am I): an offline machine fails within this


class PushError(ValueError):
    """An export cannot be pushed: bad target, no token, offline, or the Hub refused."""


def files_to_push(path: str | os.PathLike) -> list[str]:
    """The files an upload of ``path`` sends (relative names): an export folder's files, or the one file.
    Refuses what is not an export (no ``merge_recipe.json`` / no ESM Studio metadata)."""
    p = Path(path)
    if p.is_dir():
        if not (p / RECIPE_FILE).is_file() or not (p / CARD_FILE).is_file():
            raise PushError(f"{p}: not an ESM Studio export folder (no {RECIPE_FILE} and {CARD_FILE}); "
                            "write one with `esm-studio merge --out <folder>` or the app's Export view")
        files = sorted(f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file())
        hidden = [f for f in files if any(part.startswith(".") for part in f.split("/"))]
        if hidden:
            raise PushError(f"{p}: holds hidden or partial files {hidden[:3]}; push a finished export folder")
        return files
    if p.is_file() and p.suffix.lower() == ".safetensors":
        if read_config(p) is None:
            raise PushError(f"{p.name}: no ESM Studio recipe in its metadata: not an export")
        return [p.name]
    raise PushError(f"{p}: no such export folder or .safetensors file")


def _stored_token() -> str | None:
    """huggingface_hub's stored login (``hf auth login``), or None."""
    return get_token()


def _hf_api(token: str):
    return HfApi(token=token)


def hub_token(token: str | None = None, *, stored: bool = True) -> str:
    """The token a push uses: ``token``, else (``stored``) ``HF_TOKEN``, else huggingface_hub's stored login;
    refuses at once without one, or when ``HF_HUB_OFFLINE`` is set."""
    if settings.hub_offline():
        raise PushError("HF_HUB_OFFLINE is set: this machine does not reach the Hugging Face Hub; unset it to push")
    token = (token or "").strip() or None
    if token is not None and (any(c.isspace() or ord(c) < 32 for c in token) or len(token) > 512):
        raise PushError("the Hub token must be one word (no spaces), as https://huggingface.co/settings/tokens "
                        "shows it")
    if token is None and not stored:
        raise PushError("paste your own Hugging Face token (write access) to push from this server: it does not "
                        "lend its own")
    token = token or settings.hf_token()
    if not token:
        token = _stored_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN (a token with write access, "
                        "https://huggingface.co/settings/tokens) or log in once with `hf auth login`")
    return token


def _within(seconds: float, fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` in a daemon thread, waited for at most ``seconds`` (the Hub client has no timeout of its own)."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:            # handed to the caller
            box["error"] = e
    t = threading.Thread(target=run, daemon=True, name="esm-studio-hub")
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise PushError(f"{what}: the Hugging Face Hub did not answer within {seconds:g} s (offline?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def push_export(path: str | os.PathLike, repo: str, *, private: bool = False, token: str | None = None,
                api=None, check_seconds: float = HUB_CHECK_SECONDS,
                message: str | None = None) -> dict:
    """Upload an export (folder or .safetensors file) to the model repository ``repo`` (``user/name``), created
    when missing, through huggingface_hub's API. Everything that can be refused is refused before the first
    network call (target, files, token); the first call (who the token belongs to) is bounded in time, so an
    offline machine fails at once. ``api``: an ``HfApi``-like object (tests). Returns ``{"url", "repo",
    "files"}``."""
    if not isinstance(repo, str) or not _REPO_ID.match(repo.strip()):
        raise PushError(f"--repo must be a Hub model id 'user/name' (letters, digits, '-', '_', '.'), "
                        f"got {str(repo)[:80]!r}")
    repo = repo.strip()
    p = Path(path)
    files = files_to_push(p)
    token = hub_token(token)
    if api is None:
        api = _hf_api(token)
    try:
        _within(check_seconds, lambda: api.whoami(token=token), "checking the token")
        api.create_repo(repo, private=bool(private), exist_ok=True, repo_type="model", token=token)
        msg = message or f"ESM Studio export ({(read_export(p) or {}).get('method', 'merge')})"
        if p.is_dir():
            info = api.upload_folder(folder_path=str(p), repo_id=repo, repo_type="model", commit_message=msg,
                                     token=token)
        else:
            info = api.upload_file(path_or_fileobj=str(p), path_in_repo=p.name, repo_id=repo, repo_type="model",
                                   commit_message=msg, token=token)
    except PushError:
        raise
    except Exception as e:                 # the network's and the Hub's errors, said in one line
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise PushError(f"push to {repo} failed: {type(e).__name__}: {text}") from None
    url = getattr(info, "repo_url", None) or f"https://huggingface.co/{repo}"
    return {"url": str(url), "repo": repo, "files": files}
