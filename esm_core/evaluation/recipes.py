"""Merge recipes read back: what ``esm-studio merge --recipe`` and the Merge view's "load a recipe" repeat.

Every export holds its recipe (the method, its resolved parameters, the tasks, the base, the proxy samples of
an ESM merge): in a ``.safetensors`` file's metadata, in an export folder's ``merge_recipe.json``, or as the
Export view's config ``.json``; an ESM++ bundle holds its build record. A recipe is hostile input: it is
read bounded (:data:`MAX_RECIPE_BYTES`, nesting depth) as strict JSON (NaN / Infinity and duplicate keys
refused), only the keys listed in :data:`KNOWN_KEYS` are accepted, and every value goes through its schema
(the method's parameters through the method's :class:`~esm_core.schemas.Param`\\ s) before anything uses it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..merging import get_method
from ..pools.upload import NAME_OK
from ..pools.upload_text import loads_bounded
from ..schemas import ESMPP, INT_LIMIT

MAX_RECIPE_BYTES = 4 * 1024 ** 2     # a recipe file / metadata entry (the app's config JSON holds its table too)
MAX_DEPTH = 32
MAX_TASKS = 256
MAX_TEXT = 4096                      # longest path or name in a recipe
MAX_PROXY = 4096                     # the most proxy samples per task (esm_core.evaluation.proxy)
RECIPE_FILE = "merge_recipe.json"
METADATA_KEY = "esm_studio_config"
ESMPP_NAMES = ("esmpp", "esm++")
# the keys a recipe may hold: those used to repeat the merge ...
USED_KEYS = {"method", "params", "tasks", "base", "proxy", "visual_only", "model_args", "pool", "origin"}
# ... and those written beside them for the record (versions, the accuracies measured, the export's format)
RECORD_KEYS = {"esm_studio", "esm_studio_version", "versions", "format", "family", "dtype", "source", "summary",
               "comparison", "evaluation", "model", "restored", "command", "seconds", "id"}
ESMPP_KEYS = {"rank", "routed_types", "alpha", "esm_params", "alpha_curve", "esmpp", "recipe", "model"}
KNOWN_KEYS = USED_KEYS | RECORD_KEYS


@dataclass
class Recipe:
    """A checked recipe: ``method`` (a registered name, or "esmpp"), ``params`` resolved by its schema (ESM++:
    ESM's parameters and ESM++'s ``rank`` / ``routed_types``), the ordered ``tasks``, their files and the base's
    file when the recipe names them (the command line's do; the app's name its pool instead), and the proxy
    samples of a merge that probed (``{"n", "seed", "ids": {task: ids}, "sources": {task: path} | None}``)."""
    method: str
    params: dict
    tasks: list[str]
    task_files: dict[str, str] | None = None
    base: str | None = None
    proxy: dict | None = None
    pool: str | None = None
    origin: str | None = None
    visual_only: bool = False
    model_args: dict = field(default_factory=dict)

    @property
    def is_esmpp(self) -> bool:
        return self.method == "esmpp"

    def describe(self) -> str:
        """One line: the method and every parameter."""
        return f"{self.method}: " + ", ".join(f"{k}={v}" for k, v in self.params.items())


def _strict(text: str, what: str) -> Any:
    """Strict JSON: bounded nesting, NaN / Infinity refused, a key given twice in one object refused."""
    loads_bounded(text, what, MAX_DEPTH)                       # depth and constants first, with clear messages

    def pairs(kv):
        keys = [k for k, _ in kv]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"{what}: key(s) {twice[:5]} given twice in one object")
        return dict(kv)
    return json.loads(text, object_pairs_hook=pairs)


def _text(v, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(v, str) or not v or len(v) > limit or "\0" in v:
        raise ValueError(f"{where} must be a non-empty string of at most {limit} characters")
    return v


def _int(v, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{where} must be an integer from {lo} to {hi}, got {str(v)[:40]!r}")
    return v


def _plain_params(params, where: str) -> dict:
    if not isinstance(params, dict) or len(params) > 32:
        raise ValueError(f"{where} must be an object of at most 32 parameters")
    for k, v in params.items():
        if not isinstance(k, str) or len(k) > 64:
            raise ValueError(f"{where}: parameter name {str(k)[:64]!r} is not a short string")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where}: parameter {k!r} is not a finite number")
        if not (isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= MAX_TEXT)):
            raise ValueError(f"{where}: parameter {k!r} is not a plain value")
    return params


def _tasks(v) -> tuple[list[str], dict[str, str] | None]:
    if isinstance(v, list):
        names, files = v, None
    elif isinstance(v, dict):
        names, files = list(v), {}
        for k, p in v.items():
            files[k] = _text(p, f"recipe: the file of task {str(k)[:64]!r}")
    else:
        raise ValueError("recipe: 'tasks' must be a list of task names or an object {task: checkpoint file}")
    if not 1 <= len(names) <= MAX_TASKS:
        raise ValueError(f"recipe: 'tasks' must name 1 to {MAX_TASKS} tasks")
    bad = [str(n)[:64] for n in names if not isinstance(n, str) or not NAME_OK.fullmatch(n)]
    if bad:
        raise ValueError(f"recipe: task names must be 1-64 letters, digits, '_', '-' or '.'; not {bad[:5]}")
    if len(set(names)) != len(names):
        raise ValueError("recipe: a task is named twice")
    return list(names), files


def _proxy(v, tasks: list[str]) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, dict) or not set(v) <= {"n", "seed", "ids", "sources"}:
        raise ValueError("recipe: 'proxy' must be an object with n, seed, ids (and sources)")
    n = _int(v.get("n"), "recipe: proxy 'n'", 1, MAX_PROXY)
    seed = _int(v.get("seed"), "recipe: proxy 'seed'", 0, INT_LIMIT - 1)
    ids = v.get("ids")
    if not isinstance(ids, dict) or list(ids) != tasks:
        raise ValueError(f"recipe: proxy 'ids' must give each task's sample ids, for the tasks {tasks} in order")
    out_ids = {}
    for t, li in ids.items():
        if not isinstance(li, list) or not 1 <= len(li) <= n:
            raise ValueError(f"recipe: proxy ids of task {t!r} must be a list of 1 to n = {n} ids")
        li = [_int(i, f"recipe: a proxy id of task {t!r}", 0, INT_LIMIT - 1) for i in li]
        if li != sorted(set(li)):
            raise ValueError(f"recipe: proxy ids of task {t!r} must be increasing")
        out_ids[t] = li
    sources = v.get("sources")
    if sources is not None:
        if not isinstance(sources, dict) or list(sources) != tasks:
            raise ValueError(f"recipe: proxy 'sources' must give each task's data, for the tasks {tasks} in order")
        sources = {t: _text(p, f"recipe: proxy data of task {t!r}") for t, p in sources.items()}
    return {"n": n, "seed": seed, "ids": out_ids, "sources": sources}


def _model_args(v) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict) or not set(v) <= {"arch", "config", "preprocessor", "head_width", "normalisation",
                                                 "tokenizer"}:
        raise ValueError("recipe: 'model_args' may hold arch, config, preprocessor, head_width, normalisation, "
                         "tokenizer only")
    out = {k: _text(x, f"recipe: model_args {k!r}") for k, x in v.items() if k not in ("head_width", "tokenizer")}
    if "head_width" in v:
        out["head_width"] = _int(v["head_width"], "recipe: model_args 'head_width'", 1, 65_536)
    if "tokenizer" in v:                  # a text model's tokenizer files (esm-studio merge --tokenizer), in order
        files = v["tokenizer"]
        if not isinstance(files, list) or not 1 <= len(files) <= 8:
            raise ValueError("recipe: model_args 'tokenizer' must be a list of 1 to 8 tokenizer files")
        out["tokenizer"] = [_text(x, "recipe: a model_args tokenizer file") for x in files]
    return out


def _from_esmpp(obj: dict) -> dict:
    """An ESM++ bundle's build record as a recipe (its ``recipe`` entry when the command line wrote it)."""
    unknown = sorted(set(obj) - ESMPP_KEYS - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown[:8]} in the ESM++ bundle's record")
    if "recipe" in obj:
        if not isinstance(obj["recipe"], dict):
            raise ValueError("recipe: the ESM++ bundle's 'recipe' is not an object")
        return obj["recipe"]
    esm = obj.get("esm_params")
    if not isinstance(esm, dict):
        raise ValueError("recipe: the ESM++ bundle records no ESM parameters")
    own = {k: obj[k] for k in ("rank", "routed_types") if obj.get(k) is not None}     # absent: ESM++'s defaults
    return {"method": "esmpp", "params": {**esm, **own},
            **{k: obj[k] for k in ("tasks", "pool", "proxy") if k in obj and obj[k] is not None}}


def parse_recipe(obj: Any) -> Recipe:
    """A recipe object (parsed JSON) checked key by key; ValueError naming the first thing wrong."""
    if not isinstance(obj, dict):
        raise ValueError("recipe: not a JSON object")
    if "esmpp" in obj or obj.get("method") == "esm++":
        obj = _from_esmpp(obj)
        if not isinstance(obj, dict):
            raise ValueError("recipe: not a JSON object")
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown[:8]}; a recipe holds {sorted(KNOWN_KEYS)}")
    method = obj.get("method")
    if not isinstance(method, str) or len(method) > 64:
        raise ValueError("recipe: 'method' must name a merging method")
    params = _plain_params(obj.get("params", {}), "recipe: 'params'")
    if method in ESMPP_NAMES:
        own = {k: v for k, v in params.items() if k in {p.name for p in ESMPP.params}}
        rest = {k: v for k, v in params.items() if k not in own}
        method, params = "esmpp", {**get_method("esm").resolve(rest), **ESMPP.resolve(own)}
    else:
        m = get_method(method)                          # an unknown method is refused by name
        method, params = m.name, m.resolve(params)      # unknown parameters and bad values refused by the schema
    tasks, files = _tasks(obj.get("tasks"))
    base = obj.get("base")
    if base is not None and not isinstance(base, str):
        raise ValueError("recipe: 'base' must be the base checkpoint's file (or its model's name)")
    base = _text(base, "recipe: 'base'") if base is not None else None
    visual = obj.get("visual_only", False)
    if not isinstance(visual, bool):
        raise ValueError("recipe: 'visual_only' must be true or false")
    pool = obj.get("pool")
    origin = obj.get("origin")
    return Recipe(method=method, params=params, tasks=tasks, task_files=files, base=base,
                  proxy=_proxy(obj.get("proxy"), tasks),
                  pool=_text(pool, "recipe: 'pool'", 256) if pool is not None else None,
                  origin=_text(origin, "recipe: 'origin'", 64) if origin is not None else None,
                  visual_only=visual, model_args=_model_args(obj.get("model_args")))


def _metadata(path: Path) -> str:
    """The recipe text in a safetensors file's metadata, its header bounded before it is parsed."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name}: not a safetensors file")
        n = int.from_bytes(head, "little")
        if n > MAX_RECIPE_BYTES + 64 * 1024 ** 2:
            raise ValueError(f"{path.name}: its safetensors header is larger than the bound for a recipe file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path.name}: not a safetensors file (its header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    raw = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    if not isinstance(raw, str):
        raise ValueError(f"{path.name}: holds no merge recipe (no {METADATA_KEY} metadata): not an ESM Studio export")
    if len(raw) > MAX_RECIPE_BYTES:
        raise ValueError(f"{path.name}: its recipe is larger than {MAX_RECIPE_BYTES // 1024 ** 2} MiB")
    return raw


def read_recipe(path: str | Path) -> Recipe:
    """The recipe of an export: a ``.safetensors`` file (its metadata; an ESM++ bundle too), an export folder
    (its ``merge_recipe.json``) or a ``.json`` config. Read bounded and strict, then :func:`parse_recipe`."""
    p = Path(path)
    if p.is_dir():
        p = p / RECIPE_FILE
        if not p.is_file():
            raise ValueError(f"{p.parent.name}: not an ESM Studio export folder (no {RECIPE_FILE})")
    if not p.is_file():
        raise ValueError(f"recipe {p}: no such file")
    if p.suffix.lower() == ".safetensors":
        text = _metadata(p)
    elif p.suffix.lower() == ".json":
        if p.stat().st_size > MAX_RECIPE_BYTES:
            raise ValueError(f"recipe {p.name}: larger than {MAX_RECIPE_BYTES // 1024 ** 2} MiB")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"recipe {p.name}: not UTF-8 text") from None
    else:
        raise ValueError(f"recipe {p.name}: give an export (.safetensors or folder) or its config .json")
    return parse_recipe(_strict(text, f"recipe {p.name}"))


def pool_difference(recipe: Recipe, pool_name: str | None, task_names: list[str]) -> str | None:
    """Why ``recipe`` is not for the pool ``pool_name`` with ``task_names`` (a sentence), or None when it is."""
    if list(recipe.tasks) != list(task_names):
        missing = [t for t in recipe.tasks if t not in task_names]
        extra = [t for t in task_names if t not in recipe.tasks]
        if missing or extra:
            return (f"the recipe's tasks are {recipe.tasks}, this pool's {list(task_names)}"
                    + (f" (not in this pool: {missing})" if missing else "")
                    + (f" (not in the recipe: {extra})" if extra else ""))
        return f"the recipe's tasks are in another order: {recipe.tasks}, this pool's {list(task_names)}"
    if recipe.pool is not None and pool_name is not None and recipe.pool != pool_name:
        return f"the recipe was made on the pool {recipe.pool!r}, this is {pool_name!r}"
    return None


def proxy_difference(recipe: Recipe, ids: Mapping[str, list[int]] | None, n: int, seed: int) -> str | None:
    """Why the proxy samples ``ids`` (drawn with ``n``, ``seed``) are not the recipe's, or None."""
    if recipe.proxy is None:
        return None
    if (recipe.proxy["n"], recipe.proxy["seed"]) != (int(n), int(seed)):
        return (f"the recipe probed {recipe.proxy['n']} proxy samples per task with seed {recipe.proxy['seed']}, "
                f"this uses {n} with seed {seed}")
    if ids is not None:
        for t, want in recipe.proxy["ids"].items():
            if list(ids.get(t, [])) != list(want):
                return f"task {t!r}: the proxy samples differ from the recipe's (ids {list(ids.get(t, []))[:6]}… " \
                       f"vs {want[:6]}…)"
    return None
