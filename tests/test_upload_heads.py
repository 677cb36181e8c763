"""Uploaded image tasks scored with real heads (uploaded, zero-shot from the base's text tower, or — flagged — class
means) and their val / test splits kept (pools/upload.py, pools/heads.py)."""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from esm_core import studio as S
from esm_core.app import pool as pool_view
from esm_core.checkpoints import save_safetensors
from esm_core.evaluation.accuracy import reference_accuracies
from esm_core.pools import heads as H
from esm_core.pools import upload as U
from esm_core.pools.demo import DEMO_DIR

# The README's "fine-tuned" and "zero-shot" rows (test split, %), which the demo's checkpoints must give again when
# uploaded with their own heads and their own val / test images.
README_FINETUNED = {"fashion": 78.4, "animals": 84.3, "cvdigits": 91.3, "skdigits": 95.5, "clipart-living": 48.7,
                    "clipart-objects": 40.7}
README_ZEROSHOT = {"fashion": 57.9, "animals": 62.1, "cvdigits": 55.4, "skdigits": 77.4, "clipart-living": 23.5,
                   "clipart-objects": 29.3}


def _png(img: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(img).save(b, "PNG")
    return b.getvalue()


def _folder(name: str) -> str:
    return name.replace("/", "_")


def _split_zip(path: Path, splits: dict, class_names: list[str]) -> Path:
    """A zip with ``<split>/<class folder>/<i>.png`` for ``splits = {split: (images, labels)}``."""
    with zipfile.ZipFile(path, "w") as z:
        for split, (x, y) in splits.items():
            for i, (img, c) in enumerate(zip(x, y)):
                z.writestr(f"{split}/{_folder(class_names[int(c)])}/{i:05d}.png", _png(np.asarray(img)))
    return path


def _head_file(path: Path, weight: torch.Tensor, names: list[str] | None) -> Path:
    save_file({"weight": weight.contiguous()}, str(path),
              metadata=None if names is None else {"class_names": json.dumps(names)})
    return path


# ----------------------------------------------------------------------------- the demo, uploaded with its own heads
@pytest.mark.slow
def test_demo_checkpoints_with_their_own_heads_and_splits_give_the_readme_accuracies(demo_pool, tmp_path):
    tasks = list(README_FINETUNED)
    zips, heads = {}, {}
    for t in tasks:
        names = demo_pool.class_names[t]
        zips[t] = _split_zip(tmp_path / f"{t}.zip", {s: demo_pool.data[t][s] for s in ("val", "test")}, names)
        heads[t] = _head_file(tmp_path / f"{t}.head.safetensors", demo_pool.heads[t], names)
    up, notes = U.pool_from_upload(DEMO_DIR / "base.safetensors",
                                   {t: DEMO_DIR / "tasks" / f"{t}.safetensors" for t in tasks}, zips, arch="demo",
                                   heads=heads)
    assert up.meta["head_sources"] == {t: "uploaded" for t in tasks} and up.meta["head_warning"] is None
    for t in tasks:
        assert up.class_names[t] == demo_pool.class_names[t]            # the head's order, not the folders'
        assert torch.equal(up.heads[t], demo_pool.heads[t])
        for s in ("val", "test"):          # the splits as given (listed class by class), labels in the head's order
            xd, yd = demo_pool.data[t][s]
            order = np.argsort([_folder(demo_pool.class_names[t][c]) for c in yd], kind="stable")
            np.testing.assert_array_equal(up.data[t][s][1], yd[order])
            np.testing.assert_array_equal(up.data[t][s][0][..., 0], xd[order])
        assert up.meta["splits"][t] == {"rule": "as given: the zip's val/ and test/ folders",
                                        "val": len(demo_pool.data[t]["val"][1]),
                                        "test": len(demo_pool.data[t]["test"][1]), "train": 0}
    assert any("fashion: " in n and "head: uploaded" in n and "as given" in n for n in notes)
    got = reference_accuracies(up, "test", device="cpu")
    want = reference_accuracies(demo_pool, "test", device="cpu")
    assert got == want                                                  # the same numbers, exactly
    assert {t: round(100 * got["finetuned"][t], 1) for t in tasks} == README_FINETUNED
    assert {t: round(100 * got["zeroshot"][t], 1) for t in tasks} == README_ZEROSHOT


# ----------------------------------------------------------------------------- a tiny CLIP with its text tower
TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PRE = {"mean": [0.5] * 3, "std": [0.5] * 3}
CLASSES = ["ankle_boot", "cat", "dog"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(folder, the CLIP model, its config): base.safetensors = the whole CLIP (text tower included), tasks a/b =
    the base with a perturbed image tower."""
    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**{k: v for k, v in TINY.items()}).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_safetensors(sd, d / "base.safetensors")
    for i, t in enumerate("ab"):
        g = torch.Generator().manual_seed(i + 1)
        save_safetensors({k: (v + 0.02 * torch.randn(v.shape, generator=g) if k.startswith("visual.") else v)
                          for k, v in sd.items()}, d / f"{t}.safetensors")
    return d, model, {**TINY, "preprocess_cfg": PRE}


def _images(n_per_class: int, seed: int, classes=CLASSES, size=16):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n_per_class * len(classes), size, size, 3), dtype=np.uint8)
    y = np.repeat(np.arange(len(classes)), n_per_class)
    return x, y


def _plain_zip(path: Path, x, y, classes=CLASSES) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for i, (img, c) in enumerate(zip(x, y)):
            z.writestr(f"{classes[int(c)]}/{i:04d}.png", _png(img))
    return path


def _upload(d: Path, zips, **kw):
    return U.pool_from_upload(d / "base.safetensors", {t: d / f"{t}.safetensors" for t in "ab"}, zips, **kw)


@torch.no_grad()
def _literal_zero_shot(model, classes, templates):
    rows = []
    for c in classes:
        e = model.encode_text(open_clip.tokenize([t.format(c) for t in templates]))
        e = e / e.norm(dim=-1, keepdim=True)
        m = e.mean(0)
        rows.append(m / m.norm())
    return torch.stack(rows) * model.logit_scale.exp()


def test_a_clip_base_with_its_text_tower_gives_the_zero_shot_head(tiny_clip, tmp_path):
    d, model, cfg = tiny_clip
    x, y = _images(3, 0)
    zips = {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}
    pool, notes = _upload(d, zips, config=cfg)
    assert pool.meta["head_sources"] == {"a": "zero-shot", "b": "zero-shot"} and pool.meta["head_warning"] is None
    want = _literal_zero_shot(model, ["ankle boot", "cat", "dog"], H.DEFAULT_TEMPLATES)   # "_" read as a space
    for t in "ab":
        assert pool.class_names[t] == CLASSES
        torch.testing.assert_close(pool.heads[t], want, rtol=0, atol=1e-6)
    assert pool.meta["templates"] == list(H.DEFAULT_TEMPLATES)
    # the user's templates ("{c}" or "{}"), e.g. from the Pool view's templates.txt
    pool, _ = _upload(d, zips, config=cfg, templates="a sketch of a {c}.\nthe {} itself.\n")
    torch.testing.assert_close(pool.heads["a"], _literal_zero_shot(model, ["ankle boot", "cat", "dog"],
                                                                   ["a sketch of a {}.", "the {} itself."]),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"prompt template 'no placeholder' must hold exactly one"):
        _upload(d, zips, config=cfg, templates=["no placeholder"])
    # an uploaded head wins over the zero-shot one, for its task only
    w = torch.randn(3, 16)
    pool, _ = _upload(d, zips, config=cfg, heads={"a": _head_file(tmp_path / "a.head.safetensors", w, CLASSES)})
    assert pool.meta["head_sources"] == {"a": "uploaded", "b": "zero-shot"}
    assert torch.equal(pool.heads["a"], w)


def test_the_zero_shot_head_equals_open_clips_own_scoring(tiny_clip, tmp_path):
    """The head is applied as normalise(image features) @ Wᵀ: the pool's logits are open_clip's get_logits."""
    d, model, cfg = tiny_clip
    x, y = _images(3, 1)
    pool, _ = _upload(d, {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}, config=cfg)
    xi, _ = pool.inputs("a", "test")
    visual = pool.build_model(pool.base)
    with torch.no_grad():
        got = pool.logits("a", visual(xi))
        tokens = open_clip.tokenize(["a photo of a ankle boot.", "a photo of a cat.", "a photo of a dog."])
        want, _ = model.get_logits(xi, tokens)
    one, _ = _upload(d, {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}, config=cfg,
                     templates=["a photo of a {}."])
    with torch.no_grad():
        torch.testing.assert_close(one.logits("a", visual(xi)), want, rtol=1e-5, atol=1e-4)
    assert got.shape == want.shape


def test_a_text_tower_the_config_does_not_describe_falls_back_and_says_why(tiny_clip, tmp_path):
    d, _, cfg = tiny_clip
    x, y = _images(2, 2)
    zips = {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}
    no_text = {k: v for k, v in cfg.items() if k != "text_cfg"}
    pool, notes = _upload(d, zips, config=no_text)
    assert pool.meta["head_sources"] == {"a": "class means", "b": "class means"}
    assert any("does not describe it (no text_cfg)" in n for n in notes)
    wrong = {**cfg, "text_cfg": {**cfg["text_cfg"], "layers": 3}}
    with pytest.raises(ValueError, match=r"text tower does not fit the config's text_cfg: missing"):
        _upload(d, zips, config=wrong)


# ----------------------------------------------------------------------------- splits
def test_a_zip_with_split_folders_keeps_its_splits_and_proxies_come_from_validation(tiny_clip, tmp_path):
    d, _, cfg = tiny_clip
    cfg = {k: v for k, v in cfg.items() if k != "text_cfg"}               # class means: train/ is used for them
    parts = {"train": _images(2, 10), "val": _images(3, 11), "test": _images(4, 12)}
    zips = {t: _split_zip(tmp_path / f"{t}.zip", parts, CLASSES) for t in "ab"}
    pool, notes = _upload(d, zips, config=cfg)
    for s in ("val", "test"):
        x, y = pool.data["a"][s]
        order = np.argsort(parts[s][1], kind="stable")                  # members are listed class by class
        np.testing.assert_array_equal(x, parts[s][0][order])
        np.testing.assert_array_equal(y, parts[s][1][order])
    assert pool.meta["splits"]["a"] == {"rule": "as given: the zip's val/ and test/ folders; train/ used for the "
                                                "class means", "val": 9, "test": 12, "train": 6}
    xv, _ = pool.inputs("a", "val")
    px, ids = pool.proxy("a", n=4, seed=0)
    assert torch.equal(px, xv[ids])                                     # proxy samples: validation images
    # the class means are the train/ images' (not validation's)
    visual = pool.build_model(pool.tasks["a"])
    xt = np.stack([parts["train"][0][parts["train"][1] == c] for c in range(3)]).reshape(-1, 16, 16, 3)
    want = U._centroid_head(visual, pool.normalise, xt, np.repeat(np.arange(3), 2), 3)
    torch.testing.assert_close(pool.heads["a"], want)
    rows = pool_view.task_rows(pool, [{"task": "a"}, {"task": "b"}])
    assert rows[0]["head"] == "class means ⚠ not comparable" and rows[0]["splits"].startswith("as given")
    assert "(train 6)" in rows[0]["splits"]


def test_a_zip_without_split_folders_is_split_by_the_stated_rule(tiny_clip, tmp_path):
    d, _, cfg = tiny_clip
    x, y = _images(4, 3)
    pool, notes = _upload(d, {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}, config=cfg)
    assert pool.meta["splits"]["a"] == {"rule": "seeded 50 / 50 per class (seed 0): half validation, half test",
                                        "val": 6, "test": 6, "train": 0}
    assert any(re.search(r"a: 12 images in 3 classes; splits seeded 50 / 50 .* 6 validation, 6 test; head: zero-shot",
                         n) for n in notes)


def test_split_folders_are_checked(tiny_clip, tmp_path):
    d, _, cfg = tiny_clip
    only_val = _split_zip(tmp_path / "v.zip", {"val": _images(2, 4)}, CLASSES)
    with pytest.raises(ValueError, match=r"task 'a'.* has a val/ folder but no test/ folder"):
        _upload(d, {"a": only_val, "b": only_val}, config=cfg)
    x, y = _images(2, 5)
    missing = _split_zip(tmp_path / "m.zip", {"val": (x, y), "test": (x[y < 2], y[y < 2])}, CLASSES)
    with pytest.raises(ValueError, match=r"class folders of val/ and test/ differ; only in val/: \['dog'\]"):
        _upload(d, {"a": missing, "b": missing}, config=cfg)
    stray = tmp_path / "s.zip"
    _split_zip(stray, {"val": (x, y), "test": (x, y)}, CLASSES)
    with zipfile.ZipFile(stray, "a") as z:
        z.writestr("cat/extra.png", _png(x[0]))
    with pytest.raises(ValueError, match=r"'cat/extra.png' is outside the split folders"):
        _upload(d, {"a": stray, "b": stray}, config=cfg)


def test_split_zips_count_only_what_is_decoded_before_decoding(tiny_clip, tmp_path, monkeypatch):
    """train/ images are decoded only for a class-means head; the memory check counts them then, and only then."""
    d, _, cfg = tiny_clip
    parts = {"train": _images(20, 20), "val": _images(1, 21), "test": _images(1, 22)}
    zips = {t: _split_zip(tmp_path / f"{t}.zip", parts, CLASSES) for t in "ab"}
    seen = {}
    real = U._check_upload_memory

    def spy(*a, **kw):
        seen.update(kw["counts"])
        return real(*a, **kw)
    monkeypatch.setattr(U, "_check_upload_memory", spy)
    _upload(d, zips, config=cfg)                                          # zero-shot: train/ ignored
    assert seen == {"a": 6, "b": 6}
    _upload(d, zips, config={k: v for k, v in cfg.items() if k != "text_cfg"})   # class means: train/ decoded
    assert seen == {"a": 66, "b": 66}

    def boom(*a, **k):
        raise AssertionError("an image was decoded before the upload was refused")
    monkeypatch.setattr(U.Image, "open", boom)
    with pytest.raises(ValueError, match=r"images of task 'a': 66 images at 16×16 px"):
        _upload(d, zips, config={k: v for k, v in cfg.items() if k != "text_cfg"}, memory_budget=50_000)


# ----------------------------------------------------------------------------- uploaded heads refused when wrong
def test_mismatched_heads_are_refused_naming_the_task_and_the_file(tiny_clip, tmp_path):
    d, _, cfg = tiny_clip
    x, y = _images(2, 6)
    zips = {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}
    nan = torch.randn(3, 16)
    nan[1, 2] = float("nan")
    cases = {
        "wrong C": (torch.randn(4, 16), CLASSES + ["bird"], r"4 classes \(rows\), but the images have 3 class folders"),
        "wrong D": (torch.randn(3, 8), CLASSES, r"8 columns, but the image tower's output width D is 16"),
        "names": (torch.randn(3, 16), ["ankle_boot", "cat", "wolf"],
                  r"class folder\(s\) \['dog'\] match no class name of the head \(unmatched names: \['wolf'\]"),
        "NaN": (nan, CLASSES, r"non-finite"),
        "no names": (torch.randn(3, 16), None, r"no class names"),
    }
    for what, (w, names, match) in cases.items():
        f = _head_file(tmp_path / "a.head.safetensors", w, names)
        with pytest.raises(ValueError, match=r"head of task 'a'.*a\.head\.safetensors.*" + match) as e:
            _upload(d, zips, config=cfg, heads={"a": f})
        assert what and "task 'a'" in str(e.value)
    with pytest.raises(ValueError, match=r"head file\(s\) for \['c'\], which are not among the task names"):
        _upload(d, zips, config=cfg, heads={"c": f})


def test_a_weights_only_pt_head_with_its_class_names_beside_it(tiny_clip, tmp_path):
    """A task_vectors-style head: weight + all-zero bias in a .pt, its class names in <task>.head.json (any order)."""
    d, _, cfg = tiny_clip
    x, y = _images(2, 7)
    zips = {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}
    w = torch.randn(3, 16)
    order = ["dog", "ankle_boot", "cat"]
    torch.save({"weight": w, "bias": torch.zeros(3)}, tmp_path / "a.head.pt")
    (tmp_path / "a.head.json").write_text(json.dumps({"class_names": order}))
    pool, _ = _upload(d, zips, config=cfg, heads={"a": tmp_path / "a.head.pt"})
    assert pool.class_names["a"] == order and torch.equal(pool.heads["a"], w)
    _, yv = pool.data["a"]["val"]
    folder_of = {i: CLASSES.index(order[i]) for i in range(3)}          # labels renumbered to the head's rows
    xs, ys = U.read_image_zip(zips["a"], 16, "a")[:2]
    val, _ = U._split_val_test(ys)
    np.testing.assert_array_equal([folder_of[int(v)] for v in yv], ys[val])
    torch.save({"weight": w, "bias": torch.ones(3)}, tmp_path / "a.head.pt")
    with pytest.raises(ValueError, match=r"head of task 'a' \(a.head.pt\): unexpected tensor 'bias'"):
        _upload(d, zips, config=cfg, heads={"a": tmp_path / "a.head.pt"})


# ----------------------------------------------------------------------------- the class-means warning on screen
def test_class_means_heads_are_flagged_in_the_pool_summary_and_the_comparison_table(tiny_clip, tmp_path):
    d, _, cfg = tiny_clip
    x, y = _images(3, 8)
    zips = {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}
    s = S.new_session("cpu")
    try:
        S.load_uploaded(s, d / "base.safetensors", {t: d / f"{t}.safetensors" for t in "ab"}, zips,
                        config={k: v for k, v in cfg.items() if k != "text_cfg"})
        md, table, _, _ = pool_view.pool_outputs(s)
        assert "⚠ a, b: head built from your images — not comparable to the model's own accuracy" in md
        assert list(table["head"]) == ["class means ⚠ not comparable"] * 2
        S.merge(s, "ta")
        rows = S.comparison_rows(s)
        assert rows[0]["heads"] == "⚠ a, b: " + H.CLASS_MEANS_WARNING
        # real heads: no warning anywhere
        S.load_uploaded(s, d / "base.safetensors", {t: d / f"{t}.safetensors" for t in "ab"}, zips, config=cfg)
        md, table, _, _ = pool_view.pool_outputs(s)
        assert "not comparable" not in md and list(table["head"]) == ["zero-shot"] * 2
        S.merge(s, "ta")
        assert "heads" not in S.comparison_rows(s)[0]
    finally:
        S.close(s)


def test_the_pool_views_data_box_sorts_heads_names_and_templates(tmp_path):
    files = []
    for n in ("a.zip", "a.head.safetensors", "a.b.head.pt", "a.b.head.json", "templates.txt", "b.zip"):
        (tmp_path / n).write_text("a photo of a {}." if n == "templates.txt" else "x")
        files.append(str(tmp_path / n))
    data, heads, names, templates = pool_view.split_head_files(files)
    assert [Path(p).name for p in data] == ["a.zip", "b.zip"]
    assert {k: Path(v).name for k, v in heads.items()} == {"a": "a.head.safetensors", "a.b": "a.b.head.pt"}
    assert {k: Path(v).name for k, v in names.items()} == {"a.b": "a.b.head.json"}
    assert templates == "a photo of a {}."
    (tmp_path / "stray.safetensors").write_text("x")
    with pytest.raises(ValueError, match=r"stray.safetensors: a head file is named <task>.head.safetensors"):
        pool_view.split_head_files([str(tmp_path / "stray.safetensors")])


# ----------------------------------------------------------------------------- a Hugging Face CLIPModel base
def test_a_hugging_face_clip_base_with_its_text_tower_gives_the_zero_shot_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=49408,
                max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, image_size=16,
                  patch_size=8, hidden_act="quick_gelu")
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "base.safetensors"))
    for i, t in enumerate("ab"):
        g = torch.Generator().manual_seed(i + 1)
        save_file({k: (v + 0.02 * torch.randn(v.shape, generator=g) if k.startswith("vision_model.") else v)
                   for k, v in sd.items()}, str(tmp_path / f"{t}.safetensors"))
    x, y = _images(2, 9)
    zips = {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}
    cfg = json.loads(config.to_json_string())
    pool, notes = _upload(tmp_path, zips, config=cfg, preprocessor={"image_mean": [0.5] * 3, "image_std": [0.5] * 3},
                          templates=["a photo of a {}.", "a {} in the wild."])
    assert pool.meta["head_sources"] == {"a": "zero-shot", "b": "zero-shot"}
    rows = []
    with torch.no_grad():                           # HF's own text features, tokens from open_clip's bundled BPE
        for c in ["ankle boot", "cat", "dog"]:
            ids = open_clip.tokenize([f"a photo of a {c}.", f"a {c} in the wild."])
            out = model.get_text_features(input_ids=ids)
            e = getattr(out, "pooler_output", out)
            e = e / e.norm(dim=-1, keepdim=True)
            rows.append(e.mean(0) / e.mean(0).norm())
    want = torch.stack(rows) * model.logit_scale.exp()
    torch.testing.assert_close(pool.heads["a"], want, rtol=0, atol=1e-5)
    no_text = {k: v for k, v in cfg.items() if k != "text_config"}
    pool, notes = _upload(tmp_path, zips, config=no_text, preprocessor={"image_mean": [0.5] * 3,
                                                                         "image_std": [0.5] * 3})
    assert pool.meta["head_sources"]["a"] == "class means" and any("no text_config" in n for n in notes)


# ----------------------------------------------------------------------------- the Pool view over HTTP
def test_the_pool_view_takes_heads_and_templates_with_the_data_and_lists_each_tasks_head(tiny_clip, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio_client
    from fake_pool import launch_app, make_fake_pool
    d, _, cfg = tiny_clip
    x, y = _images(2, 13)
    files = [_plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"]
    files.append(_head_file(tmp_path / "a.head.safetensors", torch.randn(3, 16), CLASSES))
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    files.append(tmp_path / "templates.txt")
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    fake = make_fake_pool()
    demo, url = launch_app(lambda: fake)
    try:
        c = gradio_client.Client(url, verbose=False)
        h = gradio_client.handle_file
        c.predict(api_name="/init")
        c.predict(h(str(d / "base.safetensors")), [h(str(d / "a.safetensors")), h(str(d / "b.safetensors"))], "",
                  [h(str(f)) for f in files], "auto", [h(str(tmp_path / "model.json"))], 0, "",
                  api_name="/load_upload")
        md, table, _, _ = c.predict(api_name="/load_upload_view")
        cols = table["headers"]
        rows = {r[0]: dict(zip(cols, r)) for r in table["data"]}
        assert rows["a"]["head"] == "uploaded" and rows["b"]["head"] == "zero-shot"
        assert rows["a"]["splits"].startswith("seeded 50 / 50 per class") and "not comparable" not in md
    finally:
        demo.close()


def test_the_text_towers_memory_is_known_from_the_config_before_it_is_built(tiny_clip):
    from esm_core.models import clip_text
    _, model, cfg = tiny_clip
    for c in (cfg, {**cfg, "text_cfg": {**cfg["text_cfg"], "layers": 3, "mlp_ratio": 2.0}}):
        tower = open_clip.model._build_text_tower(c["embed_dim"], c["text_cfg"], quick_gelu=True)
        assert clip_text.text_tower_bytes(c) == 4 * sum(p.numel() for p in tower.parameters())


def test_an_uploaded_clip_base_keeps_its_text_tower_for_a_full_open_clip_export(tiny_clip, tmp_path):
    """Zero-shot heads read the base's text tower; the pool keeps it, so an open_clip export of the upload is the
    whole CLIP model (merged image tower + the base's text tower) that open_clip loads."""
    from esm_core import package
    d, model, cfg = tiny_clip
    x, y = _images(3, 0)
    pool, _ = _upload(d, {t: _plain_zip(tmp_path / f"{t}.zip", x, y) for t in "ab"}, config=cfg)
    want = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    assert set(pool.meta["text_tower"]) == set(want)
    out = package.write_export(tmp_path / "export", pool.base, base_sd=package.base_of(pool), family="openclip_vit",
                               model_info=package.model_info_of(pool), recipe={"method": "none", "params": {},
                                                                               "tasks": ["a", "b"], "base": "base"})
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    for k, v in want.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    xi, _ = pool.inputs("a", "test")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(xi), pool.build_model(pool.base)(xi), rtol=0, atol=1e-6)
    # without zero-shot heads (an uploaded head for every task) the tower is not read, and not kept
    w = torch.randn(3, 16)
    pool2, _ = _upload(d, {t: _plain_zip(tmp_path / f"{t}2.zip", x, y) for t in "ab"}, config=cfg,
                       heads={t: _head_file(tmp_path / f"{t}.head.safetensors", w, CLASSES) for t in "ab"})
    assert "text_tower" not in pool2.meta
