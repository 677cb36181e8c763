"""Saving and loading an ESM++ bundle: the static merge + expert factors + prototypes in one .safetensors."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file

from ..checkpoints import CheckpointError, check_compatible, read_config, save_safetensors
from .. import models
from .experts import Experts
from .model import RoutedModel, build_routed

FACTOR_PREFIX = "esmpp."          # tensor names of the factors in a saved ESM++ file


def save_esmpp(path: str | Path, merged_sd: Mapping[str, torch.Tensor], experts: Experts,
               config: dict | None = None, *, model: Mapping | None = None) -> Path:
    """Write merged weights + expert factors + prototypes as one ``.safetensors`` (atomic).

    Factor tensors are named ``esmpp.A.<key>``, ``esmpp.B.<key>``,
    ``esmpp.proto.<key>``; the metadata holds ``config`` plus
    ``config["esmpp"] = {"tasks", "keys", "rank", "base_params"}``. ``model``: what rebuilds the model from
    the file alone when the routed model's config does not hold it already (an open_clip tower's
    ``{"family", "model_config", "quick_gelu"}``: :func:`esm_core.package.rebuild_info_of` gives it for a pool),
    so that :func:`load_routed` needs no ``build_visual=``.
    """
    if merged_sd is None:
        raise ValueError("save_esmpp needs the merged state dict")
    clash = [k for k in merged_sd if k.startswith(FACTOR_PREFIX)]
    if clash:
        raise ValueError(f"merged state dict keys may not start with {FACTOR_PREFIX!r}: {clash[:3]}")
    tensors = dict(merged_sd)
    for k in experts.keys:
        tensors[f"{FACTOR_PREFIX}A.{k}"] = experts.A[k]
        tensors[f"{FACTOR_PREFIX}B.{k}"] = experts.B[k]
        tensors[f"{FACTOR_PREFIX}proto.{k}"] = experts.prototypes[k]
    cfg = {**dict(model or {}), **dict(config or {})}
    cfg["esmpp"] = {"tasks": list(experts.tasks), "keys": list(experts.keys), "rank": int(experts.rank),
                    "base_params": experts.base_params}
    return save_safetensors(tensors, path, cfg)


def load_esmpp(path: str | Path, base: Mapping[str, torch.Tensor] | None = None
               ) -> tuple[dict[str, torch.Tensor], Experts, dict]:
    """Read a file written by :func:`save_esmpp`: ``(merged state dict, Experts, config)``.

    Refuses (:class:`CheckpointError`, naming the key) a file that is not an
    ESM++ file, whose factors or prototypes do not fit their layer or the task
    count, or whose merged weights do not fit ``base`` (keys, shapes, dtypes).
    """
    p = Path(path)
    cfg = read_config(p)
    meta = (cfg or {}).get("esmpp")
    if not isinstance(meta, Mapping) or not {"tasks", "keys", "rank"} <= set(meta):
        raise CheckpointError(f"{p.name}: not an ESM++ file (no 'esmpp' entry in its metadata)")
    tensors = load_file(str(p))
    merged = {k: v for k, v in tensors.items() if not k.startswith(FACTOR_PREFIX)}
    tasks, keys, T = list(meta["tasks"]), list(meta["keys"]), len(meta["tasks"])
    A, B, protos = {}, {}, {}
    for k in keys:
        if k not in merged or merged[k].ndim != 2:
            raise CheckpointError(f"{p.name}: routed layer {k!r} has no 2-D merged weight")
        d_out, d_in = merged[k].shape
        parts = {}
        for part in ("A", "B", "proto"):
            name = f"{FACTOR_PREFIX}{part}.{k}"
            if name not in tensors:
                raise CheckpointError(f"{p.name}: missing {name!r}")
            parts[part] = tensors[name]
        a, b, pr = parts["A"], parts["B"], parts["proto"]
        r = a.shape[1] if a.ndim == 3 else -1
        if a.ndim != 3 or tuple(a.shape) != (T, r, d_in) or tuple(b.shape) != (T, d_out, r) \
                or tuple(pr.shape) != (T, d_in):
            raise CheckpointError(f"{p.name}: expert of {k!r} does not fit the {d_out}×{d_in} layer and {T} tasks: "
                                  f"A {tuple(a.shape)}, B {tuple(b.shape)}, prototypes {tuple(pr.shape)}")
        A[k], B[k], protos[k] = a, b, pr
    extra = sorted(k for k in tensors if k.startswith(FACTOR_PREFIX)
                   and k.split(".", 2)[-1] not in A)
    if extra:
        raise CheckpointError(f"{p.name}: factors of layers not listed in the metadata: {extra[:3]}")
    if base is not None:
        check_compatible(base, merged, p.name)
    experts = Experts(tasks=tasks, keys=keys, rank=int(meta["rank"]), A=A, B=B, prototypes=protos,
                      base_params=meta.get("base_params"))
    return merged, experts, cfg


def load_routed(path: str | Path, build_visual: Callable[[Mapping[str, torch.Tensor]], torch.nn.Module] | None = None,
                *, device: str | torch.device = "cpu", base: Mapping[str, torch.Tensor] | None = None) -> RoutedModel:
    """A routed model from a file written by :func:`save_esmpp` (with the config of a :class:`RoutedModel`).

    A model whose family records how to rebuild it (``config["family"]`` and the family's ``saved_config``
    entries, as :func:`build_routed` writes them: a text encoder's ``model_config``, a ``config.json`` dict;
    nothing is downloaded or unpickled) is rebuilt by its family; any other model needs
    ``build_visual(merged_sd) -> module`` (e.g. ``pool.build_model``)."""
    merged, experts, cfg = load_esmpp(path, base=base)
    if build_visual is None:
        fam = models.FAMILIES.get(cfg.get("family")) if isinstance(cfg.get("family"), str) else None
        if fam is None:
            raise CheckpointError(f"{Path(path).name}: the file does not record a model family that rebuilds its "
                                  "model; pass build_visual= to rebuild its model")

        def build_visual(sd):
            try:
                return fam.rebuild(sd, cfg)
            except ValueError as e:
                raise CheckpointError(f"{Path(path).name}: its {fam.NAME} model cannot be rebuilt from the file ({e}); "
                                      "pass build_visual= to rebuild its model") from None
    cfg = {k: v for k, v in cfg.items() if k != "esmpp"}
    return build_routed(merged, experts, build_visual, device=device, config=cfg)
