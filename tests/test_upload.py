"""Uploads are read, never guessed, and hostile ones are refused before any work (pools/upload.py)."""
from __future__ import annotations

import io
import resource
import zipfile

import open_clip
import pytest
import torch
from PIL import Image

from esm_core import studio as S
from esm_core.checkpoints import save_safetensors
from esm_core.models import openclip_vit as vit
from esm_core.pools import upload as U
from esm_core.pools.demo import DEMO_DIR
from fake_pool import tiny_image_zip

DEMO_TASKS = ("cvdigits", "skdigits")
N_IMAGES = 120


def _demo_zip(demo_pool, task, path, n=N_IMAGES):
    """The first ``n`` test images of a demo task as a zip of class folders named so that they sort
    in the demo's class order ("00", "01", ...)."""
    x, y = demo_pool.data[task]["test"]
    with zipfile.ZipFile(path, "w") as z:
        for i, (img, c) in enumerate(zip(x[:n], y[:n])):
            b = io.BytesIO()
            Image.fromarray(img).save(b, "PNG")
            z.writestr(f"{int(c):02d}/{i}.png", b.getvalue())
    return path


def test_auto_never_guesses_and_lists_the_candidates(demo_pool):
    with pytest.raises(U.ArchitectureChoice) as e:
        U.resolve_architecture(demo_pool.base)
    values = [v for v, _ in e.value.candidates]
    assert values[0] == "demo" and "infer" in values and "head width 32" in e.value.candidates[0][1]
    with pytest.raises(ValueError, match="needs the attention head width"):
        U.resolve_architecture(demo_pool.base, arch="infer")


def test_demo_checkpoints_uploaded_with_their_images_give_the_demo_accuracy(demo_pool, tmp_path):
    zips = {t: _demo_zip(demo_pool, t, tmp_path / f"{t}.zip") for t in DEMO_TASKS}
    s = S.new_session("cpu")
    try:
        info = S.load_uploaded(s, DEMO_DIR / "base.safetensors",
                               {t: DEMO_DIR / "tasks" / f"{t}.safetensors" for t in DEMO_TASKS}, zips, arch="demo")
        assert "head width 32" in info["notes"][0] and "(0.5, 0.5, 0.5)" in info["notes"][0]
        up = s.pool
        for t in DEMO_TASKS:
            # every uploaded image (val ∪ test halves), the uploaded model, the demo's own head ...
            xs = [up.inputs(t, sp) for sp in ("val", "test")]
            x, y = torch.cat([a for a, _ in xs]), torch.cat([b for _, b in xs])
            got = _acc(up.build_model(up.tasks[t]), demo_pool.heads[t], x, y)
            # ... against the built-in demo on the same images
            xd, yd = demo_pool.inputs(t, "test")
            want = _acc(demo_pool.build_model(demo_pool.tasks[t]), demo_pool.heads[t], xd[:N_IMAGES], yd[:N_IMAGES])
            assert got == pytest.approx(want, abs=1e-9), t
            assert want > 0.7
    finally:
        S.close(s)


@torch.no_grad()
def _acc(visual, head, x, y) -> float:
    f = torch.nn.functional.normalize(visual(x).float(), dim=-1)
    return float(((f @ head.T).argmax(-1) == y).float().mean())


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_zero_element_tensors_cannot_make_the_server_build_a_huge_model(tmp_path):
    # 1.9 KB of headers describing a width-2048, 16-block tower: refused before anything is built
    W, L = 2048, 16
    sd = {"visual.conv1.weight": torch.zeros(W, 0, 32, 32), "visual.positional_embedding": torch.zeros(50, 0)}
    for i in range(L):
        sd[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.zeros(4 * W, 0)
    save_safetensors(sd, tmp_path / "base.safetensors")
    for t in ("a", "b"):
        save_safetensors(sd, tmp_path / f"{t}.safetensors")
    zips = {t: tiny_image_zip(tmp_path / f"{t}.zip") for t in "ab"}
    before = _rss_kib()
    with pytest.raises(ValueError, match="M parameters, more than|does not fit"):
        U.pool_from_upload(tmp_path / "base.safetensors", {t: tmp_path / f"{t}.safetensors" for t in "ab"}, zips,
                           arch="infer", head_width=64, normalisation="clip")
    assert _rss_kib() - before < 200 * 1024                 # peak RSS grew by less than 200 MiB


def test_a_large_named_architecture_is_refused_before_it_is_built(demo_pool, monkeypatch):
    before = _rss_kib()
    with pytest.raises(ValueError, match="does not fit the open_clip ViT-bigG-14|M parameters, more than"):
        U.resolve_architecture(demo_pool.base, arch="ViT-bigG-14")
    assert _rss_kib() - before < 200 * 1024


def test_an_uploaded_config_is_bounded_and_never_registered(demo_pool):
    n_models = len(open_clip.list_models())
    cfg = {"embed_dim": 64, "quick_gelu": True, "vision_cfg": {"image_size": 28, "layers": 4, "width": 128,
                                                                 "patch_size": 7, "head_width": 32},
           "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    got, mean, std, _ = U.resolve_architecture(demo_pool.base, config=cfg)
    assert got["vision_cfg"]["head_width"] == 32 and mean == std == (0.5, 0.5, 0.5)
    assert len(open_clip.list_models()) == n_models              # no global registry write
    for bad, match in ((dict(cfg, vision_cfg={**cfg["vision_cfg"], "width": 10 ** 9}), "width"),
                       (dict(cfg, vision_cfg={**cfg["vision_cfg"], "head_width": 48}), "does not divide"),
                       (dict(cfg, preprocess_cfg={"mean": [0.5] * 3, "std": [0, 1, 1]}), "std must be positive"),
                       (dict(cfg, vision_cfg={**cfg["vision_cfg"], "layers": 3}), None)):
        if match is None:                                       # a valid config of another architecture
            with pytest.raises(ValueError, match="does not fit"):
                U.resolve_architecture(demo_pool.base, config=bad)
            continue
        with pytest.raises(ValueError, match=match):
            U.resolve_architecture(demo_pool.base, config=bad)


def test_a_zip_whose_headers_lie_is_not_inflated(tmp_path, monkeypatch):
    monkeypatch.setattr(U, "MAX_ENTRY_BYTES", 1024 ** 2)
    big = b"\0" * (64 * 1024 ** 2)                             # 64 MiB of zeros, deflates to ~64 KiB
    p = tmp_path / "lie.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("cat/a.png", big)
        z.writestr("cat/b.png", b"x")
        z.writestr("dog/c.png", b"x")
        z.writestr("dog/d.png", b"x")
    raw = bytearray(p.read_bytes())                            # make every header claim 100 bytes
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = raw.find(sig)
        raw[i + off:i + off + 4] = (100).to_bytes(4, "little")
    p.write_bytes(bytes(raw))
    before = _rss_kib()
    with pytest.raises(ValueError, match=r"'cat/a.png' (cannot be read|cannot be decoded|inflates)"):
        U.read_image_zip(p, 16, "t")
    assert _rss_kib() - before < 48 * 1024                     # far less than the 64 MiB inside
    honest = tmp_path / "big.zip"
    with zipfile.ZipFile(honest, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("cat/a.png", big[: 2 * 1024 ** 2])
        z.writestr("cat/b.png", b"x")
        z.writestr("dog/c.png", b"x")
        z.writestr("dog/d.png", b"x")
    with pytest.raises(ValueError, match="inflates to more than"):
        U.read_image_zip(honest, 16, "t")


def test_shapes_are_checked_on_the_meta_device():
    shapes = vit.expected_shapes("ViT-L-14")
    assert shapes["visual.conv1.weight"] == (1024, 3, 14, 14) and len(shapes) > 100


def test_a_hugging_face_config_gives_the_exact_architecture():
    hf = {"model_type": "clip_vision_model", "hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 4,
          "patch_size": 7, "image_size": 28, "intermediate_size": 512, "projection_dim": 64, "hidden_act": "quick_gelu"}
    base = {k: torch.zeros(s) for k, s in vit.expected_shapes(U._demo_config(), True).items()}
    cfg, mean, std, note = U.resolve_architecture(base, config=hf, preprocessor={"image_mean": [0.5] * 3,
                                                                                 "image_std": [0.25] * 3})
    assert cfg["vision_cfg"]["head_width"] == 32 and cfg["quick_gelu"] and std == (0.25,) * 3
    assert "Hugging Face" in note
    with pytest.raises(ValueError, match="heads do not divide"):
        U.resolve_architecture(base, config={**hf, "num_attention_heads": 3})
