"""Checkpoint reading, validation and saving (esm_core/checkpoints.py)."""
from __future__ import annotations

import enum
import json
import os
import pickle
import sys
import types

import pytest
import open_clip
import torch

from esm_core.checkpoints import (CheckpointError, hf_clip_vision_to_open_clip, load_checkpoint, read_config,
                                  save_safetensors, visual_only)

W, BLOCKS = 8, 2   # width and depth of the hand-made visual tower


def tiny_visual(seed: int = 0, width: int = W, blocks: int = BLOCKS) -> dict[str, torch.Tensor]:
    """A hand-made open_clip-named visual tower (shapes like open_clip's, tiny)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"visual.class_embedding": r(width), "visual.positional_embedding": r(5, width),
          "visual.proj": r(width, 4), "visual.conv1.weight": r(width, 3, 2, 2),
          "visual.ln_pre.weight": r(width), "visual.ln_pre.bias": r(width)}
    for i in range(blocks):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": r(width), p + "ln_1.bias": r(width),
                   p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                   p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                   p + "ln_2.weight": r(width), p + "ln_2.bias": r(width),
                   p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
                   p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width)})
    sd.update({"visual.ln_post.weight": r(width), "visual.ln_post.bias": r(width)})
    return sd


def assert_same(a: dict, b: dict) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_with_config(tmp_path):
    sd = tiny_visual()
    sd["visual.proj"] = sd["visual.proj"].t().contiguous().t()          # non-contiguous view
    assert not sd["visual.proj"].is_contiguous()
    cfg = {"method": "ta", "params": {"alpha": 0.3}, "tasks": {"a": "a.pt"}}
    out = save_safetensors(sd, tmp_path / "m.safetensors", cfg)
    assert out == tmp_path / "m.safetensors"
    assert_same(load_checkpoint(out), sd)
    assert read_config(out) == cfg
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["esm_studio_config"]) == cfg
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]             # no temp file left


def test_save_without_config_and_shared_tensors(tmp_path):
    t = torch.arange(6.0)
    out = save_safetensors({"a": t, "b": t, "c": t[:3]}, tmp_path / "s.safetensors")
    assert read_config(out) is None
    back = load_checkpoint(out)
    assert torch.equal(back["a"], t) and torch.equal(back["b"], t) and torch.equal(back["c"], t[:3])


def test_save_refuses_other_names_and_empty(tmp_path):
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_safetensors(tiny_visual(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="empty"):
        save_safetensors({}, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    import esm_core.checkpoints as st          # save_safetensors calls the save_file it imported
    target = tmp_path / "m.safetensors"
    save_safetensors({"x": torch.ones(3)}, target, {"v": 1})

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"x": torch.zeros(3)}, target, {"v": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.safetensors"]                      # temp file removed
    assert torch.equal(load_checkpoint(target)["x"], torch.ones(3)) and read_config(target) == {"v": 1}


# --------------------------------------------------------------------------- plain torch files


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "model_prefix_with_name"])
def test_plain_state_dicts_and_containers(tmp_path, wrap):
    sd = tiny_visual()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
           "model": {"model": sd, "step": 10},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()},
           "model_prefix_with_name": {**{f"model.{k}": v for k, v in sd.items()}, "model_name": "ViT-B-32"}}[wrap]
    path = tmp_path / f"{wrap}.pth"
    torch.save(obj, path)
    assert_same(load_checkpoint(path), sd)
    assert_same(load_checkpoint(path, base=tiny_visual(1)), sd)


def test_text_tower_keys_dropped_only_for_visual_base(tmp_path):
    sd = tiny_visual()
    full = {**{f"model.{k}": v for k, v in sd.items()}, "model.token_embedding.weight": torch.randn(10, 4),
            "model.ln_final.weight": torch.ones(4), "model.logit_scale": torch.tensor(4.6)}
    torch.save(full, tmp_path / "full.pt")
    assert_same(load_checkpoint(tmp_path / "full.pt", base=tiny_visual(1)), sd)
    assert len(load_checkpoint(tmp_path / "full.pt")) == len(sd) + 3       # kept without a base
    assert_same(visual_only(load_checkpoint(tmp_path / "full.pt")), sd)


def test_bare_vision_transformer_keys_get_visual_prefix(tmp_path):
    sd = tiny_visual()
    torch.save({k[len("visual."):]: v for k, v in sd.items()}, tmp_path / "bare.bin")
    assert_same(load_checkpoint(tmp_path / "bare.bin", base=tiny_visual(1)), sd)


# --------------------------------------------------------------------------- pickled whole modules


class Mode(enum.Enum):      # stands in for torchvision's InterpolationMode (pickled via REDUCE of a class)
    BICUBIC = "bicubic"


def _fake_module(name: str):
    """Register a fake module ``name`` (and its parents) in sys.modules; returns it and a cleanup function."""
    parts = name.split(".")
    added = []
    for i in range(1, len(parts) + 1):
        n = ".".join(parts[:i])
        if n not in sys.modules:
            sys.modules[n] = types.ModuleType(n)
            added.append(n)
    return sys.modules[name], lambda: [sys.modules.pop(n, None) for n in added]


def _place(mod, obj, name):
    obj.__module__, obj.__qualname__, obj.__name__ = mod.__name__, name, name
    setattr(mod, name, obj)
    return obj


def save_image_encoder(path, sd_seed=0):
    """torch.save a whole task_vectors-like ``src.modeling.ImageEncoder`` built from toy classes; returns its state dict."""
    mod, cleanup = _fake_module("src.modeling")
    try:
        def convert_to_rgb(x):       # a function the pickle only *refers to* (like open_clip's _convert_to_rgb)
            return x

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ln_1 = torch.nn.LayerNorm(W)
                self.attn = torch.nn.MultiheadAttention(W, 2, batch_first=True)
                self.mlp = torch.nn.Sequential()
                self.mlp.add_module("c_fc", torch.nn.Linear(W, 4 * W))
                self.mlp.add_module("gelu", torch.nn.GELU())
                self.mlp.add_module("c_proj", torch.nn.Linear(4 * W, W))
                self.ln_2 = torch.nn.LayerNorm(W)

        class Visual(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = torch.nn.Conv2d(3, W, 2, 2, bias=False)
                self.class_embedding = torch.nn.Parameter(torch.randn(W))
                self.positional_embedding = torch.nn.Parameter(torch.randn(5, W))
                self.ln_pre = torch.nn.LayerNorm(W)
                self.transformer = torch.nn.Module()
                self.transformer.resblocks = torch.nn.ModuleList([Block() for _ in range(BLOCKS)])
                self.ln_post = torch.nn.LayerNorm(W)
                self.proj = torch.nn.Parameter(torch.randn(W, 4))
                self.register_buffer("scratch", torch.zeros(3), persistent=False)   # not in state_dict

        class CLIP(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.visual = Visual()
                self.token_embedding = torch.nn.Embedding(10, 4)
                self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
                self.register_buffer("attn_mask", torch.ones(3, 3))

        class ImageEncoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = CLIP()
                self.train_preprocess = [Mode.BICUBIC, convert_to_rgb, (0.5, 0.5)]
                self.cache_dir = "/somewhere"

        for obj, n in ((convert_to_rgb, "convert_to_rgb"), (Block, "Block"), (Visual, "Visual"), (CLIP, "CLIP"),
                       (ImageEncoder, "ImageEncoder")):
            _place(mod, obj, n)
        torch.manual_seed(sd_seed)
        enc = ImageEncoder()
        with torch.no_grad():
            for p in enc.parameters():
                p.normal_()
        torch.save(enc, path)
        return {k[len("model."):]: v.detach().clone() for k, v in enc.state_dict().items()}
    finally:
        cleanup()


def test_pickled_module_read_through_stubs(tmp_path):
    expected = save_image_encoder(tmp_path / "finetuned.pt")
    assert "src" not in sys.modules and "src.modeling" not in sys.modules
    sd = load_checkpoint(tmp_path / "finetuned.pt")
    assert "src.modeling" not in sys.modules                                # nothing was imported
    assert_same(sd, expected)
    assert "visual.scratch" not in sd and "attn_mask" in sd
    # with a visual-only base, the text-tower entries are dropped before the check
    base = visual_only(expected)
    assert_same(load_checkpoint(tmp_path / "finetuned.pt", base=base), base)


def test_open_clip_image_encoder(tmp_path, open_clip_tiny):
    """A real (tiny) open_clip CLIP inside a task_vectors-like ImageEncoder, with torchvision transforms."""
    model, train_pre, val_pre = open_clip_tiny
    mod, cleanup = _fake_module("src.modeling")
    try:
        class ImageEncoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model, self.train_preprocess, self.val_preprocess = model, train_pre, val_pre

        _place(mod, ImageEncoder, "ImageEncoder")
        torch.save(ImageEncoder(), tmp_path / "zeroshot.pt")
    finally:
        cleanup()
    base = visual_only(model.state_dict())
    sd = load_checkpoint(tmp_path / "zeroshot.pt", base=base)
    assert_same(sd, base)
    assert len(load_checkpoint(tmp_path / "zeroshot.pt")) == len(model.state_dict())


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory):
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}
    d = tmp_path_factory.mktemp("oc")
    (d / "esm-test-tiny-ckpt.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(d / "esm-test-tiny-ckpt.json"))
    torch.manual_seed(0)
    return open_clip.create_model_and_transforms("esm-test-tiny-ckpt", pretrained=None)


# --------------------------------------------------------------------------- malicious pickles


def _write_marker(path):
    with open(path, "w") as f:
        f.write("pwned")


class CallsFunction:
    marker = ""

    def __reduce__(self):
        return (_write_marker, (self.marker,))


class CallsSystem:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("cls,named", [(CallsFunction, "_write_marker"), (CallsSystem, "system")])
@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw_pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path, cls, named, fmt):
    marker = tmp_path / "MARKER"
    evil = cls()
    evil.marker = str(marker)
    obj = {"visual.proj": torch.zeros(2, 2), "payload": evil}
    if fmt == "raw_pickle":
        (tmp_path / "evil.pt").write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, tmp_path / "evil.pt", _use_new_zipfile_serialization=fmt == "zip")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil\.pt") as e:
        load_checkpoint(tmp_path / "evil.pt")
    if fmt != "raw_pickle":          # a raw pickle fails earlier, on torch's own storage global
        assert named in str(e.value)
    assert not marker.exists()


def test_legacy_torch_save_state_dict(tmp_path):
    sd = tiny_visual()
    torch.save({"state_dict": sd}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert_same(load_checkpoint(tmp_path / "old.pth", base=tiny_visual(1)), sd)


# --------------------------------------------------------------------------- Hugging Face CLIPVisionModel


def open_clip_to_hf(sd: dict, with_projection: bool = True) -> dict:
    """Inverse of the converter, written independently: open_clip visual names → HF CLIPVisionModel names."""
    out = {"vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
           "vision_model.embeddings.position_ids": torch.arange(sd["visual.positional_embedding"].shape[0])[None],
           "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
           "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
           "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
           "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"]}
    if with_projection:
        out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    n = 1 + max(int(k.split(".")[3]) for k in sd if ".resblocks." in k)
    for i in range(n):
        o, h = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[o + f"attn.in_proj_{kind}"].chunk(3, dim=0)
            out.update({h + f"self_attn.q_proj.{kind}": q.clone(), h + f"self_attn.k_proj.{kind}": k.clone(),
                        h + f"self_attn.v_proj.{kind}": v.clone(),
                        h + f"self_attn.out_proj.{kind}": sd[o + f"attn.out_proj.{kind}"],
                        h + f"layer_norm1.{kind}": sd[o + f"ln_1.{kind}"],
                        h + f"layer_norm2.{kind}": sd[o + f"ln_2.{kind}"],
                        h + f"mlp.fc1.{kind}": sd[o + f"mlp.c_fc.{kind}"],
                        h + f"mlp.fc2.{kind}": sd[o + f"mlp.c_proj.{kind}"]})
    return out


def test_hf_clip_vision_round_trip_is_exact(tmp_path, open_clip_tiny):
    visual = {k: v.detach().clone() for k, v in visual_only(open_clip_tiny[0].state_dict()).items()}
    hf = open_clip_to_hf(visual)
    assert_same(hf_clip_vision_to_open_clip(hf), visual)
    save_safetensors(hf, tmp_path / "model.safetensors")
    assert_same(load_checkpoint(tmp_path / "model.safetensors", base=visual), visual)


def test_hf_vision_model_without_projection_keeps_base_proj(tmp_path):
    base, task = tiny_visual(0), tiny_visual(1)
    save_safetensors(open_clip_to_hf(task, with_projection=False), tmp_path / "model.safetensors")
    sd = load_checkpoint(tmp_path / "model.safetensors", base=base)
    assert torch.equal(sd["visual.proj"], base["visual.proj"])
    assert_same({k: v for k, v in sd.items() if k != "visual.proj"},
                {k: v for k, v in task.items() if k != "visual.proj"})
    assert "visual.proj" not in load_checkpoint(tmp_path / "model.safetensors")     # no base: nothing invented


def test_hf_unknown_or_incomplete_keys_refused():
    hf = open_clip_to_hf(tiny_visual())
    with pytest.raises(CheckpointError, match="vision_model.encoder.layers.0.mystery"):
        hf_clip_vision_to_open_clip({**hf, "vision_model.encoder.layers.0.mystery": torch.zeros(1)})
    del hf["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match="layer 1"):
        hf_clip_vision_to_open_clip(hf)


# --------------------------------------------------------------------------- refusals


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kw)
    assert path.name in str(e.value)
    return str(e.value)


def test_refuses_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "w.txt").write_text("hello")
    assert "extension" in _error(tmp_path / "w.txt")
    assert "no such file" in _error(tmp_path / "nope.pt")


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_refuses_truncated_and_garbage(tmp_path, ext):
    good = tmp_path / f"good{ext}"
    if ext == ".pt":
        torch.save(tiny_visual(), good)
    else:
        save_safetensors(tiny_visual(), good)
    data = good.read_bytes()
    (tmp_path / f"cut{ext}").write_bytes(data[: len(data) // 2])
    _error(tmp_path / f"cut{ext}")
    (tmp_path / f"junk{ext}").write_bytes(b"this is not a checkpoint at all" * 10)
    _error(tmp_path / f"junk{ext}")
    (tmp_path / f"empty{ext}").write_bytes(b"")
    assert "empty" in _error(tmp_path / f"empty{ext}")


def test_refuses_mismatched_content_and_extension(tmp_path):
    torch.save(tiny_visual(), tmp_path / "x.safetensors")
    assert ".pt" in _error(tmp_path / "x.safetensors")
    save_safetensors(tiny_visual(), tmp_path / "y.safetensors")
    os.replace(tmp_path / "y.safetensors", tmp_path / "y.pt")
    assert "safetensors" in _error(tmp_path / "y.pt")


def test_refuses_empty_and_non_tensor_files(tmp_path):
    torch.save({}, tmp_path / "empty.pt")
    assert "empty state dict" in _error(tmp_path / "empty.pt")
    torch.save({"model_name": "ViT-B-32", "epoch": 3, "cfg": {"lr": 0.1}}, tmp_path / "junk.pt")
    assert "no tensors" in _error(tmp_path / "junk.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    assert "list" in _error(tmp_path / "list.pt")


def test_refuses_wrong_architecture(tmp_path):
    base = tiny_visual()
    torch.save(tiny_visual(width=4), tmp_path / "small.pt")
    assert "shape mismatch" in _error(tmp_path / "small.pt", base=base)
    torch.save(tiny_visual(blocks=1), tmp_path / "shallow.pt")
    assert "missing keys: visual.transformer.resblocks.1" in _error(tmp_path / "shallow.pt", base=base)


def test_refuses_nan_and_non_float(tmp_path):
    sd = tiny_visual()
    sd["visual.ln_pre.bias"][1] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    assert "visual.ln_pre.bias" in _error(tmp_path / "nan.pt", base=tiny_visual())
    assert "NaN" in _error(tmp_path / "nan.pt")                               # also without a base
    sd = tiny_visual()
    sd["visual.proj"] = sd["visual.proj"].to(torch.int64)
    torch.save(sd, tmp_path / "int.pt")
    assert "dtype mismatch" in _error(tmp_path / "int.pt", base=tiny_visual())


def test_refuses_files_over_the_size_limit(tmp_path):
    torch.save(tiny_visual(), tmp_path / "big.pt")
    assert "limit" in _error(tmp_path / "big.pt", max_bytes=100)
    assert load_checkpoint(tmp_path / "big.pt", max_bytes=None)                # no limit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite_on_every_placement(dtype):
    """device.all_finite (the extremes by aminmax) answers exactly as torch.isfinite(t).all(): NaN, +inf and
    -inf anywhere, alone or together, in contiguous and strided views, 0-d and empty tensors."""
    from esm_core.device import all_finite
    g = torch.Generator().manual_seed(0)
    cases = [torch.empty(0, dtype=dtype), torch.tensor(1.5, dtype=dtype), torch.tensor(float("nan"), dtype=dtype)]
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 17, 299):
            x = torch.randn(20, 15, generator=g).to(dtype)
            x.view(-1)[where] = bad
            cases += [x, x.mT, x[::2]]
    x = torch.randn(20, 15, generator=g).to(dtype)
    x[3, 4], x[5, 6] = float("inf"), float("nan")
    cases += [x, torch.randn(20, 15, generator=g).to(dtype).mT]
    for c in cases:
        assert all_finite(c) == bool(torch.isfinite(c).all()), c
    assert sum(not all_finite(c) for c in cases) > 20
