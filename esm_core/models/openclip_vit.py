"""The open_clip ViT family: everything esm_core knows about open_clip image towers.

- key knowledge: which tensors are 2-D weight matrices, which are "non-matrix"
  (biases, LayerNorm, embeddings, conv patch embedding), which are never merged
  (integer/bool buffers), and the layer *type* of each transformer linear layer
  (for ESM's inter-layer scaling and for ESD / routing);
- building the image tower (from an open_clip model name or a config dict —
  no global registry write is needed for a config dict);
- the probe's hook points (which module's input is each weight's input);
- input preparation (uint8 images → normalised tensors).

Any other architecture can be merged by passing ``roles`` and ``layer_types``
explicitly to :func:`esm_core.merge`.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import open_clip
import torch

try:  # private helper of open_clip 3.x: builds only the image tower
    from open_clip.model import _build_vision_tower
except ImportError:  # pragma: no cover
    _build_vision_tower = None

from ..checkpoints import hf_clip_vision_to_open_clip, is_hf_clip_vision
from ..device import resolve_device
from .protocol import RecordPoint
from .roles import MATRIX, SKIP, VECTOR

NAME = "openclip_vit"

# Layer types of an open_clip ViT transformer block (methods §5-§7).
IN_PROJ = "attn.in_proj_weight"
OUT_PROJ = "attn.out_proj.weight"
C_FC = "mlp.c_fc.weight"
C_PROJ = "mlp.c_proj.weight"
LAYER_TYPES = (IN_PROJ, OUT_PROJ, C_FC, C_PROJ)
ESD_TYPES = (IN_PROJ, C_FC, C_PROJ)          # reference: out_proj goes the TSV-M way
ROUTED_TYPES = (IN_PROJ, C_FC)               # ESM++ routed layers

_BLOCK = re.compile(r"(?:^|\.)resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
# 2-D keys treated as non-matrix by the reference code.
_NON_MATRIX_2D = ("text_projection",)


def key_role(key: str, tensor: torch.Tensor) -> str:
    """Role of one state-dict entry: MATRIX, VECTOR or SKIP."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return SKIP
    if tensor.ndim == 2 and not any(s in key for s in _NON_MATRIX_2D):
        return MATRIX
    return VECTOR


def roles_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: key_role(k, v) for k, v in state_dict.items()}


def layer_type(key: str) -> str | None:
    """Layer type of a transformer linear weight ("mlp.c_fc.weight", ...), else None."""
    m = _BLOCK.search(key)
    return m.group(2) if m else None


def block_index(key: str) -> int | None:
    m = _BLOCK.search(key)
    return int(m.group(1)) if m else None


def layer_types_of(keys) -> dict[str, str]:
    """{key: layer type} for every transformer linear weight among ``keys``."""
    return {k: t for k in keys if (t := layer_type(k)) is not None}


def esd_keys(keys, types=ESD_TYPES) -> list[str]:
    """Keys whose layer type is in ``types`` (default: the reference ESD layers)."""
    return [k for k in keys if layer_type(k) in types]


def short_key(key: str) -> str:
    """``visual.transformer.resblocks.3.mlp.c_fc.weight`` → ``3 · mlp.c_fc``."""
    parts = key.split(".")
    if "resblocks" in parts:
        i = parts.index("resblocks")
        rest = ".".join(parts[i + 2:])
        for suf in (".weight", "_weight"):
            if rest.endswith(suf):
                rest = rest[: -len(suf)]
        return f"{parts[i + 1]} · {rest}"
    return key[len("visual."):] if key.startswith("visual.") else key


def matches(keys) -> bool:
    """True when ``keys`` hold open_clip transformer blocks (``resblocks.N.attn.in_proj_weight``, ...)."""
    return any(_BLOCK.search(k) for k in keys)


# ---------------------------------------------------------------- building the tower

_REGISTERED: dict[str, str] = {}


def register_model_config(name: str, config: Mapping[str, Any]) -> str:
    """Register an open_clip model config under ``name`` (``open_clip.add_model_config``); idempotent.

    For configs this project ships (the demo, tests). An uploaded architecture is
    never registered: pass its config dict to :func:`build_visual_tower` instead,
    so one session's upload cannot change what another session's name means."""
    text = json.dumps(dict(config), sort_keys=True)
    if _REGISTERED.get(name) == text and name in open_clip.list_models():
        return name
    with tempfile.TemporaryDirectory(prefix="esm-studio-cfg-") as d:
        (Path(d) / f"{name}.json").write_text(text)
        open_clip.add_model_config(Path(d) / f"{name}.json")
    _REGISTERED[name] = text
    return name


def model_config(model: str | Mapping[str, Any]) -> dict:
    """The open_clip config of ``model``: a registered model name, or a config dict (returned as is)."""
    if isinstance(model, Mapping):
        if "vision_cfg" not in model or "embed_dim" not in model:
            raise ValueError("an open_clip model config needs 'embed_dim' and 'vision_cfg'")
        return dict(model)
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model!r}")
    return cfg


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len("visual."):] if k.startswith("visual.") else k): v for k, v in state_dict.items()}


def build_visual_tower(model: str | Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None, *,
                       quick_gelu: bool | None = None, device: str | torch.device = "cpu", share: bool = False
                       ) -> torch.nn.Module:
    """The open_clip image tower of ``model`` (a model name or a config dict; no download), with ``state_dict``
    loaded (without a state dict: open_clip's random init).

    ``state_dict`` keys may carry the ``visual.`` prefix (it is stripped). The
    module is returned in eval mode on ``device``. ``quick_gelu`` overrides the
    config's activation (OpenAI-derived weights need QuickGELU). The module holds
    copies of ``state_dict``'s tensors unless ``share``: then it holds the tensors
    themselves wherever their dtype and device already fit (no second copy of the
    model; for a state dict the caller hands over and no longer writes into).
    """
    cfg = model_config(model)
    label = model if isinstance(model, str) else "uploaded"
    qg = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else bool(quick_gelu)
    if state_dict is not None and _build_vision_tower is not None:
        # every tensor comes from state_dict: build on the meta device (no random init — drawing ViT-B/32's 88 M
        # parameters only to overwrite them took 0.34 s and a model's worth of memory next to the state dict)
        with torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=qg)
        _load_exact(visual, state_dict, label, assign=True, copy=not share)
        if not any(t.is_meta for t in (*visual.parameters(), *visual.buffers())):
            return visual.to(resolve_device(device)).eval()
    if _build_vision_tower is not None:     # (a tensor the state dict does not carry: build with its init)
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=qg)
    else:  # pragma: no cover  (older/newer open_clip without the helper)
        visual = open_clip.create_model(label, pretrained=None, force_quick_gelu=qg).visual
    if state_dict is not None:
        _load_exact(visual, state_dict, label, assign=False, copy=True)
    return visual.to(resolve_device(device)).eval()


def _load_exact(visual: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], label: str, assign: bool,
                copy: bool) -> None:
    """``state_dict`` (``visual.`` prefix stripped) into ``visual``: exactly its keys, each in the module's dtype;
    ``assign``: the module takes the given tensors instead of copying into its own — copies of them when ``copy``,
    else the tensors themselves where the dtype fits."""
    sd = strip_prefix(state_dict)
    own = visual.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise ValueError(f"state dict does not fit the {label} image tower: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    visual.load_state_dict({k: v.to(own[k].dtype, copy=assign and copy) for k, v in sd.items()}, assign=assign)


_CFG_BOUNDS = {"image_size": (8, 1024), "layers": (1, 64), "width": (8, 4096), "patch_size": (1, 64),
               "head_width": (1, 4096)}


def check_config(cfg: Mapping[str, Any]) -> dict:
    """A bounded copy of an open_clip model config (uploaded JSON is hostile): numbers in range, head width
    dividing the width; raises ValueError naming the field. Only the image tower's fields are read."""
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("vision_cfg"), Mapping):
        raise ValueError("an open_clip model config needs a 'vision_cfg' object")
    v = dict(cfg["vision_cfg"])
    for name, (lo, hi) in _CFG_BOUNDS.items():
        val = v.get(name)
        if name == "head_width" and val is None:
            continue
        if isinstance(val, (list, tuple)) and name == "image_size" and len(val) == 2 and val[0] == val[1]:
            val = v[name] = val[0]
        if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
            raise ValueError(f"vision_cfg.{name} must be an integer in [{lo}, {hi}], got {val!r}")
    if v["width"] % v.get("head_width", 64):
        raise ValueError(f"vision_cfg.head_width {v.get('head_width', 64)} does not divide the width {v['width']}")
    ratio = v.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.25 <= float(ratio) <= 16:
        raise ValueError(f"vision_cfg.mlp_ratio must be a number in [0.25, 16], got {ratio!r}")
    embed = cfg.get("embed_dim")
    if isinstance(embed, bool) or not isinstance(embed, int) or not 1 <= embed <= 8192:
        raise ValueError(f"embed_dim must be an integer in [1, 8192], got {embed!r}")
    out = {"embed_dim": embed, "vision_cfg": v, "quick_gelu": bool(cfg.get("quick_gelu", False))}
    pre = cfg.get("preprocess_cfg")
    if isinstance(pre, Mapping) and "mean" in pre and "std" in pre:
        out["preprocess_cfg"] = {"mean": check_norm(pre["mean"], "mean"), "std": check_norm(pre["std"], "std")}
    return out


def check_norm(vals, what: str) -> tuple[float, float, float]:
    """Three finite per-channel numbers (a std strictly positive)."""
    if not isinstance(vals, (list, tuple)) or len(vals) != 3 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in vals):
        raise ValueError(f"{what} must be three finite numbers, got {vals!r}")
    if what == "std" and min(vals) <= 0:
        raise ValueError(f"std must be positive, got {vals!r}")
    return tuple(float(x) for x in vals)


def expected_shapes(model: str | Mapping[str, Any], quick_gelu: bool | None = None) -> dict[str, tuple[int, ...]]:
    """``{"visual.<key>": shape}`` of the image tower of ``model``, built on the meta device (no memory)."""
    cfg = model_config(model)
    qg = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else bool(quick_gelu)
    try:
        with torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=qg)
    except Exception as e:  # noqa: BLE001  (a hostile config can fail anywhere inside open_clip)
        raise ValueError(f"open_clip cannot build this image tower: {type(e).__name__}: {e}") from None
    return {f"visual.{k}": tuple(v.shape) for k, v in visual.state_dict().items()}


# ---------------------------------------------------------------- probe hook points

PROBED_TYPES = (IN_PROJ, C_FC, C_PROJ)   # layer types whose input the probe can record


def hook_points(visual: torch.nn.Module, key_prefix: str, layer_types) -> list[tuple[str, torch.nn.Module, str]]:
    """``[(weight key, module to hook, how)]`` for every block and layer type.

    ``how`` is "query" for ``attn.in_proj_weight`` (the first positional input of
    ``block.attn``: open_clip calls ``self.attn(q_x, k_x, v_x, ...)`` and in a ViT
    tower ``k_x = v_x = q_x``) and "input" for the MLP linears (their input).
    """
    try:
        blocks = visual.transformer.resblocks
    except AttributeError:
        raise ValueError("probe expects an open_clip VisionTransformer (visual.transformer.resblocks)") from None
    bad = [t for t in layer_types if t not in PROBED_TYPES]
    if bad:
        raise ValueError(f"probe cannot record the input of layer type(s) {bad}; supported: {list(PROBED_TYPES)}")
    points = []
    for i, blk in enumerate(blocks):
        for t in layer_types:
            key = f"{key_prefix}transformer.resblocks.{i}.{t}"
            if t == IN_PROJ:
                points.append((key, blk.attn, "query"))
            elif t == C_FC:
                points.append((key, blk.mlp.c_fc, "input"))
            else:
                points.append((key, blk.mlp.c_proj, "input"))
    return points


# ---------------------------------------------------------------- inputs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise_images(raw: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 images (N×H×W grey or N×H×W×3) → float N×3×H×W, ``(x / 255 − mean) / std`` per channel."""
    x = torch.from_numpy(np.array(raw, dtype=np.float32)).div_(255.0)   # a copy: raw may be read-only
    if x.ndim == 3:
        x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    elif x.ndim == 4 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be N×H×W or N×H×W×3, got shape {tuple(raw.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / sd).contiguous()


# ---------------------------------------------------------------- reading a tower's shapes (uploads)

def infer_config(sd: Mapping[str, torch.Tensor], head_width: int) -> dict:
    """An open_clip model config whose image tower fits the ``visual.*`` state dict ``sd``.

    Width, patch size, image size, depth, MLP ratio and output dimension are read
    from the shapes; the attention head width cannot be, so it must be given.
    """
    try:
        conv = sd["visual.conv1.weight"]
        pos = sd["visual.positional_embedding"]
    except KeyError as e:
        raise ValueError(f"cannot infer the architecture: the checkpoint has no {e.args[0]!r}") from None
    if conv.ndim != 4 or pos.ndim != 2:
        raise ValueError("cannot infer the architecture: conv1.weight must be 4-D and positional_embedding 2-D")
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = int(round(math.sqrt(max(pos.shape[0] - 1, 0))))
    if grid < 1 or grid * grid != pos.shape[0] - 1:
        raise ValueError(f"cannot infer the image size: {pos.shape[0]} positional embeddings is not 1 + a square")
    layers = len({block_index(k) for k in sd if block_index(k) is not None})
    if layers == 0:
        raise ValueError("cannot infer the architecture: no transformer blocks (visual.transformer.resblocks.*)")
    if head_width < 1 or width % head_width:
        raise ValueError(f"attention head width {head_width} does not divide the width {width}")
    fc = sd.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    mlp_ratio = float(fc.shape[0]) / width if fc is not None and width else 4.0
    embed = int(sd["visual.proj"].shape[1]) if "visual.proj" in sd and sd["visual.proj"].ndim == 2 else width
    return {"embed_dim": embed, "quick_gelu": True,
            "vision_cfg": {"image_size": grid * patch, "layers": layers, "width": width, "patch_size": patch,
                           "head_width": int(head_width), "mlp_ratio": mlp_ratio}}


def feature_width(sd: Mapping[str, torch.Tensor]) -> int:
    """The width of the tower's features (what a head reads): ``visual.proj``'s output, else the tower's width."""
    proj = sd.get("visual.proj")
    return int(proj.shape[1]) if proj is not None and proj.ndim == 2 else int(sd["visual.conv1.weight"].shape[0])


def tower_state(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A built tower's state under the pool's ``visual.*`` keys (detached CPU copies)."""
    return {state_key(k): v.detach().cpu().clone() for k, v in visual.state_dict().items()}


def tower_shapes(width: int, patch: int, mlp: int, image: int, out_dim: int, blocks: int) -> dict[str, tuple[int, ...]]:
    """Key → shape of an open_clip image tower (open_clip's key order) with ``blocks`` blocks, written out (no
    open_clip call: the benchmark's synthetic checkpoints)."""
    w = width
    tokens = (image // patch) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (tokens, w),
        "visual.proj": (w, out_dim),
        "visual.conv1.weight": (w, 3, patch, patch),
        "visual.ln_pre.weight": (w,),
        "visual.ln_pre.bias": (w,),
    }
    for i in range(blocks):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
            p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
            p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
            p + "mlp.c_fc.weight": (mlp, w), p + "mlp.c_fc.bias": (mlp,),
            p + "mlp.c_proj.weight": (w, mlp), p + "mlp.c_proj.bias": (w,),
        })
    shapes.update({"visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,)})
    return shapes


# ---------------------------------------------------------------- the family protocol (models/protocol.py)

DESCRIPTION = "open_clip ViT image tower (also Hugging Face CLIP vision checkpoints, renamed when read)"
MODALITY = "image"
FOLDER_FORMAT = "open_clip"  # exports: the folder format, also the library that loads it
FOLDER_WRITER = "open_clip"  # its writer in esm_core.package.WRITERS
ALPHA_ON_ALL = False          # α scales the merged update of every key the method merges (methods §6)
PREFIX = "visual."


def module_key(key: str) -> str | None:
    """Pool key → parameter name inside the built tower (the ``visual.`` prefix stripped)."""
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def state_key(name: str) -> str:
    """Parameter name inside the built tower → the pool's key (``visual.`` + name)."""
    return PREFIX + name


def convert(state_dict: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A checkpoint in a layout this family reads, under the pool's ``visual.*`` names: a Hugging Face CLIP
    vision state dict is renamed (q/k/v concatenated into ``in_proj``), a bare tower gets the prefix, a full
    open_clip CLIP model keeps its image tower; the family's own layout comes back unchanged."""
    sd = dict(state_dict)
    if is_hf_clip_vision(sd):
        return hf_clip_vision_to_open_clip(sd, name)
    if any(k.startswith(PREFIX) for k in sd):
        return {k: v for k, v in sd.items() if k.startswith(PREFIX)}
    if "conv1.weight" in sd and any(k.startswith("transformer.resblocks.") for k in sd):
        return {PREFIX + k: v for k, v in sd.items()}
    raise ValueError(f"{name}: not an open_clip ViT image tower (no 'visual.conv1.weight' / "
                     f"'transformer.resblocks.*' keys; found e.g. {sorted(sd)[:4]})")


def input_group(key: str) -> str:
    """Every routed / probed layer of a ViT block reads its own input: each key is its own group."""
    return key


_ORDER = {IN_PROJ: 0, C_FC: 1, C_PROJ: 2}


def routing_groups(keys) -> list[tuple[str, list[str]]]:
    """Routed keys in execution order (by block, then in_proj, c_fc, c_proj), one group each."""
    keys = list(keys)
    bad = [k for k in keys if block_index(k) is None or layer_type(k) not in _ORDER]
    if bad:
        raise ValueError(f"cannot route layer {bad[0]!r}: supported are {', '.join(_ORDER)} of open_clip "
                         "transformer blocks")
    return [(k, [k]) for k in sorted(keys, key=lambda k: (block_index(k), _ORDER[layer_type(k)]))]


def is_model(module: torch.nn.Module) -> bool:
    """True for an open_clip image tower (what :func:`build_model` returns)."""
    return isinstance(getattr(getattr(module, "transformer", None), "resblocks", None), torch.nn.ModuleList)


def _blocks(module: torch.nn.Module):
    if not is_model(module):
        raise ValueError("expected an open_clip VisionTransformer (visual.transformer.resblocks), got a "
                         f"{type(module).__name__}")
    return module.transformer.resblocks


def model_keys(module: torch.nn.Module) -> list[str]:
    """The pool keys of the tower's parameters and buffers."""
    return [state_key(k) for k in module.state_dict()]


def build_model(state_dict: Mapping[str, torch.Tensor], config, *, device: str | torch.device = "cpu",
                share: bool = False, quick_gelu: bool | None = None) -> torch.nn.Module:
    """The protocol's builder: :func:`build_visual_tower` (``config``: an open_clip model name or config dict)."""
    return build_visual_tower(config, state_dict, quick_gelu=quick_gelu, device=device, share=share)


def load_state(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Another checkpoint of the same shapes into a built tower (strict; pool keys)."""
    module.load_state_dict({module_key(k): v for k, v in state_dict.items()})


def load_own(module: torch.nn.Module, task: Mapping[str, torch.Tensor]) -> None:
    """No OWN keys in this family: nothing to put in."""


def saved_config(module: torch.nn.Module) -> dict:
    """Nothing recorded: an ESM++ file of a tower is rebuilt with the pool's builder (``build_visual=``)."""
    return {}


def rebuild(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> torch.nn.Module:
    """The tower from the open_clip model config an ESM++ file records (``config["model_config"]``, bounded by
    :func:`check_config`, and ``quick_gelu``; :func:`esm_core.esmpp.io.save_esmpp`'s ``model=``); a file without
    it is rebuilt with its pool's builder (``build_visual=``)."""
    cfg = config.get("model_config") if isinstance(config, Mapping) else None
    if not isinstance(cfg, Mapping):
        raise ValueError("the file records no open_clip model config; pass build_visual= (e.g. pool.build_model)")
    qg = config.get("quick_gelu")
    return build_visual_tower(check_config(cfg), state_dict, quick_gelu=None if qg is None else bool(qg))


def sample_mask(x: torch.Tensor) -> None:
    """Every token of an image counts (None); ``x`` must be a batch of images."""
    if x.ndim != 4:
        raise ValueError(f"images must be a N×C×H×W tensor, got shape {tuple(x.shape)}")
    return None


def record_points(module: torch.nn.Module, keys) -> list:
    """``[RecordPoint]`` of ``keys`` (pool keys of ``in_proj`` / ``c_fc`` / ``c_proj`` weights): in_proj's input
    is the query input of ``block.attn`` (open_clip calls ``self.attn(q_x, k_x, v_x, ...)``; in a ViT tower
    ``k_x = v_x = q_x``), the MLP linears' their own input."""
    blocks = _blocks(module)
    batch_first = bool(getattr(module.transformer, "batch_first", True))
    points = []
    for key in keys:
        t, b = layer_type(key), block_index(key)
        if t not in PROBED_TYPES:
            raise ValueError(f"probe cannot record the input of layer type {t or key!r}; supported: "
                             f"{list(PROBED_TYPES)}")
        if b >= len(blocks):
            raise ValueError(f"{key!r}: the model has only {len(blocks)} blocks")
        blk = blocks[b]
        if t == IN_PROJ:
            points.append(RecordPoint(key, blk.attn, "query", batch_first))
        else:
            points.append(RecordPoint(key, blk.mlp.c_fc if t == C_FC else blk.mlp.c_proj, "input", batch_first))
    return points


def route(module: torch.nn.Module, key: str, make) -> None:
    """Replace the linear layer of weight ``key`` by ``make(weight, bias, batch_first)``: ``mlp.c_fc`` /
    ``mlp.c_proj`` in place; ``attn.in_proj`` inside a :class:`RoutedAttention` that replaces ``block.attn``."""
    blocks = _blocks(module)
    t, b = layer_type(key), block_index(key)
    if t not in _ORDER:
        routing_groups([key])                                   # raises, naming the key
    if b >= len(blocks):
        raise ValueError(f"routed layer {key!r}: the model has only {len(blocks)} blocks")
    blk = blocks[b]
    if t == IN_PROJ:
        mha = blk.attn
        if not isinstance(mha, torch.nn.MultiheadAttention):
            raise ValueError(f"routed layer {key!r}: block attention is a {type(mha).__name__}, "
                             "not nn.MultiheadAttention")
        blk.attn = RoutedAttention(mha, make(mha.in_proj_weight, mha.in_proj_bias, True))
    else:
        name = "c_fc" if t == C_FC else "c_proj"
        old = getattr(blk.mlp, name)
        setattr(blk.mlp, name, make(old.weight, old.bias, bool(getattr(module.transformer, "batch_first", True))))


class RoutedAttention(torch.nn.Module):
    """Drop-in for open_clip's self-attention ``nn.MultiheadAttention`` with its packed ``in_proj`` replaced by
    a module (``in_proj(x) -> qkv``: ESM++'s routed linear).

    ``forward(query, key, value, need_weights=False, attn_mask=None)`` returns
    ``(output, None)`` like the original (attention weights are not computed).
    ``qkv = in_proj(x)``, heads split as in ``nn.MultiheadAttention``, scaled
    dot-product attention, ``out_proj``. Self-attention only (key and value
    must be the query tensor, or None).
    """

    def __init__(self, mha: torch.nn.MultiheadAttention, in_proj: torch.nn.Module):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("routed attention needs a MultiheadAttention with a packed in_proj_weight")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("routed attention does not support bias_k/bias_v or add_zero_attn")
        self.in_proj = in_proj
        self.out_proj = mha.out_proj
        self.num_heads = mha.num_heads
        self.embed_dim = mha.embed_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("ESM++ routed attention supports self-attention only (key = value = query)")
        if key_padding_mask is not None:
            raise NotImplementedError("ESM++ routed attention does not support key_padding_mask")
        x = query if self.batch_first else query.transpose(0, 1)         # (B, L, D)
        Bn, L, D = x.shape
        H = self.num_heads
        qkv = self.in_proj(x)                                            # (B, L, 3D)
        q, k, v = (z.reshape(Bn, L, H, D // H).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = ~mask                                             # MHA: True = masked; SDPA: True = kept
            if mask.ndim == 3:
                mask = mask.reshape(Bn, H, L, -1)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0)
        o = self.out_proj(o.transpose(1, 2).reshape(Bn, L, D))
        return (o if self.batch_first else o.transpose(0, 1)), None
