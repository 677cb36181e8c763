"""Exports that load in the ecosystem (issue 27 items 4 and 8): a transformers folder that AutoModel loads, an
open_clip folder that create_model_and_transforms loads, the image tower alone named so, model cards, one
metadata layout and one file mode for the app and the CLI, nothing half-written, ESM++ image bundles that load
from the file alone. Tiny models built in code (registered offline); nothing downloads."""
from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import esm_core
from esm_core import cli, package
from esm_core import studio as S
from esm_core.checkpoints import CheckpointError, read_config, save_safetensors
from esm_core.esmpp import load_routed
from esm_core.merging import apply_updates
from esm_core.models import bert
from esm_core.models.openclip_vit import build_visual_tower
from fake_pool import FAKE_CONFIG, FAKE_MODEL, make_fake_pool

transformers = pytest.importorskip("transformers")

COMMON_KEYS = {"method", "params", "tasks", "base", "source", "esm_studio", "versions", "format", "family",
               "dtype"}


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _expected_mode(is_dir: bool = False) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o755 if is_dir else 0o644) & ~umask


def _full_clip_state() -> dict:
    """A full CLIP (image + text tower) of the tiny registered config, as open_clip names it."""
    torch.manual_seed(3)
    m = open_clip.create_model(FAKE_MODEL, force_quick_gelu=True)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.fixture
def clip_sess():
    """A session on the tiny image pool whose base kept its CLIP text tower (pool.meta["text_tower"])."""
    pool = make_fake_pool()
    full = _full_clip_state()
    pool.meta["text_tower"] = {k: v for k, v in full.items() if not k.startswith("visual.")}
    s = S.new_session("cpu", live_per_task=16, alpha_per_task=12)
    S.load_demo(s, loader=lambda: pool)
    yield s, pool
    S.close(s)


def _tower(pool, sd):
    return build_visual_tower(FAKE_MODEL, {k: v for k, v in sd.items() if k.startswith("visual.")},
                              quick_gelu=True)


# ---------------------------------------------------------------- open_clip

def test_open_clip_folder_loads_in_open_clip_with_the_studios_outputs(clip_sess):
    s, pool = clip_sess
    S.merge(s, "ties", {"alpha": 0.5, "k": 30})
    folder, zp = S.export_folder(s)
    merged = apply_updates(pool.base, s.current["updates"])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "heads", "merge_recipe.json",
                                                        "open_clip_config.json", "open_clip_model.safetensors"]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    want = _tower(pool, merged)(x)
    # any config (registered or not): local-dir
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    got = model.eval().encode_image(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # a registered name: pretrained= the checkpoint file (the base's text tower is in it)
    model2, _, _ = open_clip.create_model_and_transforms(FAKE_MODEL, pretrained=str(folder / package.OPEN_CLIP_FULL),
                                                         force_quick_gelu=True)
    torch.testing.assert_close(model2.eval().encode_image(x), want, rtol=0, atol=1e-6)
    for k, v in pool.meta["text_tower"].items():
        assert torch.equal(model2.state_dict()[k], v), k
    # the heads give the pool's logits
    from safetensors import safe_open
    with safe_open(str(folder / "heads" / "beta.safetensors"), "pt") as f:
        w = f.get_tensor("weight")
        meta = json.loads(f.metadata()["esm_studio_config"])
    assert meta["class_names"] == pool.class_names["beta"] and torch.equal(w, pool.heads["beta"])
    torch.testing.assert_close(F.normalize(got, dim=-1) @ w.T, pool.logits("beta", want), rtol=0, atol=1e-5)
    # the zip holds the same files under the folder's name
    with zipfile.ZipFile(zp) as z:
        names = sorted(z.namelist())
    assert names == sorted(f"{folder.name}/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*")
                           if p.is_file())
    assert _mode(zp) == _expected_mode()


def test_image_tower_alone_is_named_so_and_loads_into_the_clip_tower():
    pool = make_fake_pool()
    merged = {k: v + 0.01 for k, v in pool.base.items()}
    out = package.write_export(Path(pytest.importorskip("tempfile").mkdtemp()) / "tower", merged, base_sd=pool.base,
                               family="openclip_vit", model_info=package.model_info_of(pool),
                               recipe={"method": "ta", "params": {"alpha": 0.3}, "tasks": list(pool.task_names),
                                       "base": FAKE_MODEL, "source": "test"})
    assert (out / package.OPEN_CLIP_VISUAL).is_file() and not (out / package.OPEN_CLIP_FULL).exists()
    card = (out / "README.md").read_text()
    assert "image tower alone" in card
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.model.CLIP(**cfg).eval()
    from safetensors.torch import load_file
    sd = load_file(str(out / package.OPEN_CLIP_VISUAL))
    model.visual.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items()})   # as the card says
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.encode_image(x), _tower(pool, merged)(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- transformers

CFG = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 48, "vocab_size": 20, "max_position_embeddings": 32}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "green", "blue", "cat", "dog", "bird", "one", "two",
         "three", "happy", "sad", "the", "a", "is", "very"]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """A tiny random BERT written as a user has it: base / task checkpoints next to config.json + tokenizer."""
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = transformers.BertTokenizerFast(str(d / "vocab.txt"))
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    m = transformers.AutoModel.from_config(bert.config_of(CFG)).eval()
    base = {k: v.detach().clone() for k, v in m.state_dict().items()}
    (d / "config.json").write_text(json.dumps(CFG))
    g = torch.Generator().manual_seed(1)
    tasks = {}
    for t in ("colours", "animals"):
        tasks[t] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                    for k, v in base.items()}
        save_safetensors(tasks[t], d / f"{t}.safetensors")
    save_safetensors(base, d / "base.safetensors")
    return d, base, tasks, tok


def _features(model, tok, texts):
    batch = tok(texts, return_tensors="pt", padding=True)
    h = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return (h * mask).sum(1) / mask.sum(1), batch


def test_transformers_folder_from_the_cli_loads_in_automodel(text_files, capsys):
    d, base, tasks, tok = text_files
    out = d / "merged-ta"
    rc = cli.main(["merge", "--base", str(d / "base.safetensors"), "--task", f"colours={d / 'colours.safetensors'}",
                   "--task", f"animals={d / 'animals.safetensors'}", "--method", "ta", "--set", "alpha=0.4",
                   "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "README.md", "merge_recipe.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    model = transformers.AutoModel.from_pretrained(str(out)).eval()
    tok2 = transformers.AutoTokenizer.from_pretrained(str(out))
    merged = esm_core.merge("ta", base, tasks, alpha=0.4)
    studio_model = bert.TextEncoder(bert.build(merged, CFG), "mean").eval()   # what the studio evaluates
    texts = ["the red cat", "a very happy blue dog is"]
    feats, batch = _features(model, tok2, texts)
    packed = bert.pack({k: batch[k] for k in ("input_ids", "attention_mask")})
    torch.testing.assert_close(feats, studio_model(packed), rtol=0, atol=1e-5)
    assert tok2(texts)["input_ids"] == tok(texts)["input_ids"]
    cfg = package.read_export(out)
    assert COMMON_KEYS <= set(cfg) and cfg["format"] == "transformers" and cfg["source"] == "cli"
    assert cfg["versions"]["transformers"] == transformers.__version__
    card = (out / "README.md").read_text()
    fm = package.front_matter(card)
    assert fm == {"base_model": str(d / "base.safetensors"), "tags": ["merge", "ta", "esm-studio"],
                  "library_name": "transformers"}
    assert "esm-studio merge --base" in card and "Not evaluated" in card
    assert all(_mode(p) == _expected_mode(p.is_dir()) for p in [out, *out.rglob("*")])


def test_text_pool_export_holds_each_tasks_head_and_own_biases(text_files, tmp_path):
    d, base, tasks, tok = text_files
    from esm_core.pools.text_pool import TextTaskPool
    g = torch.Generator().manual_seed(2)
    heads = {t: {"weight": torch.randn(c, 32, generator=g), "bias": torch.randn(c, generator=g)}
             for t, c in (("colours", 3), ("animals", 2))}
    data = {t: {"val": (["the red cat"], [0]), "test": (["a blue dog"], [0]), "proxy_ids": [0]} for t in tasks}
    pool = TextTaskPool(name="tiny", model_config=CFG, base=base, tasks=tasks, heads=heads,
                        class_names={"colours": ["r", "g", "b"], "animals": ["cat", "dog"]}, data=data,
                        tokenizer=tok, max_length=16)
    merged = esm_core.merge("ta", base, tasks, alpha=0.4)
    out = package.write_export(tmp_path / "txt", merged, base_sd=base, family="bert",
                               model_info=package.model_info_of(pool), heads=package.heads_of(pool),
                               recipe={"method": "ta", "params": {"alpha": 0.4}, "tasks": list(tasks),
                                       "base": "tiny", "source": "test"})
    from safetensors.torch import load_file
    h = load_file(str(out / "heads" / "animals.safetensors"))
    assert torch.equal(h["weight"], heads["animals"]["weight"]) and torch.equal(h["bias"], heads["animals"]["bias"])
    own = {k[len("encoder."):]: v for k, v in h.items() if k.startswith("encoder.")}
    want = {k: v for k, v in bert.encoder_state(tasks["animals"]).items() if bert.key_role(k, v) == "own"}
    assert own.keys() == want.keys() and all(torch.equal(own[k], want[k]) for k in own)
    assert any(k.endswith(".bias") for k in own)
    # merged encoder + the task's own biases = the studio's model of that task (methods §8)
    model = transformers.AutoModel.from_pretrained(str(out)).eval()
    model.load_state_dict(own, strict=False)
    enc = pool.build_visual(merged) if hasattr(pool, "build_visual") else pool.build_model(merged)
    pool.prepare(enc, "animals")
    feats, batch = _features(model, tok, ["the red cat is happy"])
    packed = bert.pack({k: batch[k] for k in ("input_ids", "attention_mask")})
    torch.testing.assert_close(feats, enc(packed), rtol=0, atol=1e-5)
    # the folder loads in the dtype it was written in, whatever the uploaded config said (transformers 5 reads
    # config.json's dtype): float32 over a config naming float16, bfloat16 when asked for
    pool.model_config = {**CFG, "torch_dtype": "float16"}
    for dtype in ("float32", "bfloat16"):
        out = package.write_export(tmp_path / f"txt-{dtype}", merged, base_sd=base, family="bert",
                                   model_info=package.model_info_of(pool), dtype=dtype,
                                   recipe={"method": "ta", "params": {"alpha": 0.4}, "tasks": list(tasks),
                                           "base": "tiny", "source": "test"})
        loaded = transformers.AutoModel.from_pretrained(str(out))
        assert {p.dtype for p in loaded.parameters()} == {getattr(torch, dtype)}, dtype


def test_transformers_folder_needs_a_config(text_files, tmp_path):
    d, base, tasks, _ = text_files
    with pytest.raises(ValueError, match="config.json"):
        package.write_export(tmp_path / "x", base, base_sd=base, family="bert", model_info={},
                             recipe={"method": "ta"})
    assert list(tmp_path.iterdir()) == []                          # nothing left behind


# ---------------------------------------------------------------- one layout, one mode

def test_cli_and_app_write_the_same_layout_and_mode(sess, pool, tmp_path, capsys):
    S.merge(sess, "ta", {"alpha": 0.3})
    app_file = S.export_merged(sess)
    save_safetensors(pool.base, tmp_path / "base.safetensors")
    for t in pool.task_names:
        save_safetensors(pool.tasks[t], tmp_path / f"{t}.safetensors")
    cli_file = tmp_path / "cli.safetensors"
    rc = cli.main(["merge", "--base", str(tmp_path / "base.safetensors"),
                   *[x for t in pool.task_names for x in ("--task", f"{t}={tmp_path / f'{t}.safetensors'}")],
                   "--method", "ta", "--set", "alpha=0.3", "--device", "cpu", "--out", str(cli_file), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    a, c = read_config(app_file), read_config(cli_file)
    assert COMMON_KEYS <= set(a) and COMMON_KEYS <= set(c)
    for k in ("esm_studio", "versions", "format", "family", "dtype", "method", "params"):
        assert a[k] == c[k], k
    assert a["versions"]["torch"] == torch.__version__.split("+")[0] or a["versions"]["torch"]
    assert a["versions"]["open_clip"] == open_clip.__version__
    assert (a["source"], c["source"], a["format"], a["dtype"]) == ("studio", "cli", "safetensors", "float32")
    assert _mode(app_file) == _mode(cli_file) == _expected_mode()
    from safetensors import safe_open
    for p in (app_file, cli_file):
        with safe_open(str(p), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    # the same weights, whoever wrote them
    sa, sc = esm_core.load_checkpoint(app_file), esm_core.load_checkpoint(cli_file)
    for k in sa:
        torch.testing.assert_close(sa[k], sc[k], rtol=0, atol=1e-6)


def test_fp16_on_request_and_bad_dtype_refused(pool, tmp_path):
    merged = dict(pool.base)
    info = package.model_info_of(pool)
    p = package.write_export(tmp_path / "h.safetensors", merged, base_sd=pool.base, family="openclip_vit",
                             model_info=info, recipe={"method": "ta"}, dtype="float16")
    assert read_config(p)["dtype"] == "float16"
    assert esm_core.load_checkpoint(p)["visual.proj"].dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        package.write_export(tmp_path / "b.safetensors", merged, base_sd=None, family="openclip_vit",
                             model_info=info, recipe={"method": "ta"}, dtype="int8")


def test_older_files_read_back_with_versions(tmp_path):
    sd = {"w": torch.ones(2)}
    old_cli = save_safetensors(sd, tmp_path / "old_cli.safetensors", {"method": "ta", "esm_studio_version": "0.0.9"})
    old_app = save_safetensors(sd, tmp_path / "old_app.safetensors", {"method": "ta", "esm_studio": "0.0.8"})
    assert package.read_export(old_cli)["versions"] == {"esm_studio": "0.0.9"}
    assert package.read_export(old_app)["versions"] == {"esm_studio": "0.0.8"}
    assert S.read_export_config(old_app)["method"] == "ta"
    with pytest.raises(CheckpointError, match="not an ESM Studio export folder"):
        package.read_export(tmp_path)


# ---------------------------------------------------------------- nothing half-written, bounded before work

def test_a_failed_folder_export_leaves_nothing(pool, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(package, "_write_heads", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        package.write_export(tmp_path / "f", pool.base, base_sd=pool.base, family="openclip_vit",
                             model_info=package.model_info_of(pool), recipe={"method": "ta"},
                             heads=package.heads_of(pool))
    assert list(tmp_path.iterdir()) == []


def test_targets_and_space_refused_before_writing(pool, tmp_path, monkeypatch):
    info = package.model_info_of(pool)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        package.write_export(tmp_path / "taken", pool.base, base_sd=None, family="openclip_vit", model_info=info,
                             recipe={"method": "ta"})
    assert (tmp_path / "taken" / "x").read_text() == "mine"
    with pytest.raises(ValueError, match="does not fit model family"):
        package.write_export(tmp_path / "t", pool.base, base_sd=None, family="openclip_vit", model_info=info,
                             recipe={"method": "ta"}, format="transformers")
    with pytest.raises(ValueError, match="not a finite number"):
        package.write_export(tmp_path / "n.safetensors", pool.base, base_sd=None, family="openclip_vit",
                             model_info=info, recipe={"method": "ta", "params": {"alpha": float("nan")}})
    free = type("U", (), {"free": 10 * 2 ** 20})()
    monkeypatch.setattr(package.shutil, "disk_usage", lambda p: free)
    with pytest.raises(ValueError, match="MiB free; nothing was written"):
        package.write_export(tmp_path / "d", pool.base, base_sd=None, family="openclip_vit", model_info=info,
                             recipe={"method": "ta"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_refuses_a_folder_target_that_exists_before_loading(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    rc = cli.main(["merge", "--base", str(tmp_path / "missing.pt"), "--task", f"a={tmp_path / 'missing.pt'}",
                   "--method", "ta", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and "missing.pt" not in err
    rc = cli.main(["merge", "--base", str(tmp_path / "missing.pt"), "--task", f"a={tmp_path / 'missing.pt'}",
                   "--method", "ta", "--out", str(tmp_path / "x.safetensors"), "--format", "open_clip"])
    assert rc == 2 and "writes a folder" in capsys.readouterr().err


def test_cli_open_clip_folder_needs_the_model(pool, tmp_path, capsys):
    save_safetensors(pool.base, tmp_path / "base.safetensors")
    save_safetensors(pool.tasks["alpha"], tmp_path / "a.safetensors")
    argv = ["merge", "--base", str(tmp_path / "base.safetensors"), "--task", f"alpha={tmp_path / 'a.safetensors'}",
            "--method", "ta", "--device", "cpu", "--quiet"]
    rc = cli.main([*argv, "--out", str(tmp_path / "f")])
    assert rc == 2 and "--model" in capsys.readouterr().err and not (tmp_path / "f").exists()
    (tmp_path / "cfg.json").write_text(json.dumps(FAKE_CONFIG))           # an unregistered config file works too
    for i, (opt, model) in enumerate((("--model", FAKE_MODEL), ("--model", str(tmp_path / "cfg.json")),
                                      ("--config", str(tmp_path / "cfg.json")))):
        out = tmp_path / f"g{i}"
        assert cli.main([*argv, "--out", str(out), opt, model]) == 0, capsys.readouterr().err
        assert f"{opt} {model}" in (out / "README.md").read_text()
        assert (out / package.OPEN_CLIP_VISUAL).is_file()
        assert package.front_matter((out / "README.md").read_text())["library_name"] == "open_clip"


# ---------------------------------------------------------------- the model card

def test_model_card_front_matter_and_accuracy_table(clip_sess):
    s, pool = clip_sess
    S.merge(s, "ta", {"alpha": 0.3})
    folder, _ = S.export_folder(s)
    card = (folder / "README.md").read_text()
    fm = package.front_matter(card)
    assert fm == {"base_model": FAKE_MODEL, "tags": ["merge", "ta", "esm-studio"], "library_name": "open_clip"}
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        assert yaml.safe_load(card.split("---\n")[1]) == fm
    sizes = S.sample_sizes(s, "test")
    for t, acc in s.current["accs"].items():
        assert f"| {t} | {100 * acc:.1f} | {sizes[t]} |" in card
    assert "95 % Wilson" in card and "esm-studio eval --pool fake --method ta --alpha 0.3" in card
    recipe = json.loads((folder / "merge_recipe.json").read_text())
    assert recipe["method"] == "ta" and recipe["tasks"] == list(pool.task_names) and recipe["source"] == "studio"
    with pytest.raises(ValueError, match="no front matter"):
        package.front_matter("# title")
    S.merge(s, "ties", {"alpha": 0.5})                     # a second export replaces the first on disk
    folder2, zp2 = S.export_folder(s)
    assert sorted(p.name for p in folder2.parent.iterdir()) == sorted([folder2.name, zp2.name])


# ---------------------------------------------------------------- ESM++ image bundles from the file alone

def test_image_esmpp_bundle_loads_from_the_file_alone(sess, pool):
    p = S.export_esmpp(sess, rank=4)
    routed = load_routed(p)                               # no build_visual=: the file records the model
    x = pool.samples("alpha", 4)[0]
    in_session = S.esmpp_model(sess, 4)["model"]
    torch.testing.assert_close(routed(x), in_session(x), rtol=0, atol=1e-6)
    cfg = read_config(p)
    assert cfg["family"] == "openclip_vit" and cfg["model_config"]["vision_cfg"]["width"] == 32
    # the README's five lines: load a bundle, route one input
    from esm_core.models.openclip_vit import normalise_images
    model = load_routed(p)
    one = normalise_images(pool.data["beta"]["test"][0][:1], **model.config["preprocess"])
    features = model(one)
    routed_to = model.tasks[model.last_log.chosen[0, -1]]
    assert routed_to in pool.task_names and features.shape == (1, FAKE_CONFIG["embed_dim"])
    torch.testing.assert_close(one, pool.normalise(pool.data["beta"]["test"][0][:1]), rtol=0, atol=0)
    torch.testing.assert_close(features, in_session(one), rtol=0, atol=1e-6)
    # an older bundle without it still gets the clear error
    from esm_core.esmpp.io import load_esmpp, save_esmpp
    merged, experts, old = load_esmpp(p)
    old = {k: v for k, v in old.items() if k not in ("family", "model_config", "quick_gelu", "preprocess", "esmpp")}
    q = save_esmpp(p.with_name("old.safetensors"), merged, experts, old)
    with pytest.raises(CheckpointError, match="build_visual="):
        load_routed(q)


# ---------------------------------------------------------------- Hugging Face ViT

def test_hf_vit_pool_exports_a_vitmodel_folder(tmp_path):
    from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification, ViTModel
    from safetensors.torch import load_file
    from esm_core.pools.hf_vit_pool import build_hf_vit_pool
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)
    torch.manual_seed(0)
    base = ViTModel(ViTConfig(**cfg)).eval()
    base.save_pretrained(tmp_path / "base")
    own = {k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")}
    files, g = {}, torch.Generator().manual_seed(1)
    for i, (t, c) in enumerate((("a", 3), ("b", 2))):
        m = ViTForImageClassification(ViTConfig(**cfg, num_labels=c)).eval()
        m.vit.load_state_dict(own)
        with torch.no_grad():
            for p in m.vit.parameters():
                p.add_(0.03 * (i + 1) * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / t)
        files[t] = load_file(str(tmp_path / t / "model.safetensors"))
    pool = build_hf_vit_pool("tiny-vit", json.loads((tmp_path / "base" / "config.json").read_text()),
                             load_file(str(tmp_path / "base" / "model.safetensors")), files,
                             class_names={"a": ["x", "y", "z"], "b": ["u", "v"]})
    merged = esm_core.merge("ta", pool.base, pool.tasks, alpha=0.4)
    out = package.write_export(tmp_path / "vit", merged, base_sd=pool.base, family=package.family_of_pool(pool),
                               model_info=package.model_info_of(pool), heads=package.heads_of(pool),
                               recipe={"method": "ta", "params": {"alpha": 0.4}, "tasks": list(pool.task_names),
                                       "base": "tiny-vit", "source": "test"})
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "heads"} <= {p.name for p in out.iterdir()}
    model = transformers.AutoModel.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "ViTModel"
    raw = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = pool.encode(raw)
    studio_model = pool.build_model(merged)
    got = model(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(got, studio_model(x), rtol=0, atol=1e-5)
    proc = AutoImageProcessor.from_pretrained(str(out))                        # the same preprocessing
    torch.testing.assert_close(proc(images=list(raw), return_tensors="pt")["pixel_values"], x, rtol=0, atol=1e-5)
    h = load_file(str(out / "heads" / "b.safetensors"))
    torch.testing.assert_close(got @ h["weight"].T + h["bias"], pool.logits("b", studio_model(x)), rtol=0, atol=1e-5)
    assert package.front_matter((out / "README.md").read_text())["library_name"] == "transformers"
