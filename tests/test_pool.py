import json
from pathlib import Path

import numpy as np
import pytest
import torch

from esm_core.models.openclip_vit import build_visual_tower, normalise_images, register_model_config
from esm_core.pools import poolfile as P
from esm_core.pools.taskpool import TaskPool, cosine_head

TINY = "esm-test-tiny"
TINY_CFG = {"embed_dim": 4, "quick_gelu": True,
            "vision_cfg": {"image_size": 8, "layers": 1, "width": 16, "patch_size": 4, "head_width": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1}}
POOL_FILE = Path(__file__).resolve().parent.parent / "assets" / "pools" / "clip-vit-b32-8tasks.json"


def _tiny_sd(seed):
    register_model_config(TINY, TINY_CFG)
    torch.manual_seed(seed)
    v = build_visual_tower(TINY)
    return {f"visual.{k}": t.detach().clone() for k, t in v.state_dict().items()}


def _pool(data=None):
    base = _tiny_sd(0)
    heads = {"a": cosine_head(torch.randn(3, 4)), "b": cosine_head(torch.randn(2, 4))}
    return TaskPool(name="t", model_name=TINY, base=base, tasks={"a": _tiny_sd(1), "b": _tiny_sd(2)}, heads=heads,
                      class_names={"a": ["x", "y", "z"], "b": ["p", "q"]}, data=data or {})


def test_build_visual_loads_the_state_dict():
    pool = _pool()
    m = pool.build_model(pool.tasks["a"])
    assert not m.training
    assert torch.equal(m.state_dict()["conv1.weight"], pool.tasks["a"]["visual.conv1.weight"])
    assert type(m.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    out = m(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4)
    bad = dict(pool.base)
    bad.pop("visual.proj")
    with pytest.raises(ValueError, match="missing"):
        pool.build_model(bad)


def test_build_visual_copies_the_state_dict_without_drawing_an_init(monkeypatch):
    """The tower is built on the meta device and takes copies: the caller's tensors are never the module's (a
    later write to either leaves the other alone), and no random init is drawn for weights it then overwrites."""
    sd = _tiny_sd(1)
    drawn = []
    real = torch.nn.init.kaiming_uniform_                       # nn.Linear's init
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda *a, **k: (
        drawn.append((a[0] if a else k["tensor"]).device.type), real(*a, **k))[1])
    m = build_visual_tower(TINY, sd)
    assert drawn and set(drawn) == {"meta"}
    own = m.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k[len("visual."):]], v) and own[k[len("visual."):]].data_ptr() != v.data_ptr()
    assert all(p.requires_grad and p.device.type == "cpu" for p in m.parameters())
    sd["visual.proj"].add_(1.0)
    assert not torch.equal(m.proj, sd["visual.proj"])
    with pytest.raises(ValueError, match="unexpected"):
        build_visual_tower(TINY, {**sd, "visual.extra": torch.zeros(1)})
    shared = build_visual_tower(TINY, sd, share=True)              # share: the module holds the given tensors
    assert all(shared.state_dict()[k[len("visual."):]].data_ptr() == v.data_ptr() for k, v in sd.items())
    half = {k: v.double() for k, v in sd.items()}                  # (only where the dtype fits: else a copy)
    assert all(p.dtype == torch.float32 for p in build_visual_tower(TINY, half, share=True).parameters())


def test_images_are_normalised_and_cached():
    raw = np.array([[[0, 255], [51, 102]]] * 5, np.uint8).repeat(4, 1).repeat(4, 2)   # 5×8×8
    pool = _pool({"a": {"val": (raw, np.arange(5) % 3), "test": (raw[:2], np.array([0, 2]))}})
    x, y = pool.inputs("a", "val")
    assert x.shape == (5, 3, 8, 8) and y.dtype == torch.int64
    assert x[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0] and x[0, 1, 0, 7].item() == 1.0
    assert x[0, 2, 7, 0].item() == pytest.approx((51 / 255 - 0.5) / 0.5)
    assert pool.inputs("a", "val")[0] is x
    with pytest.raises(ValueError, match="no 'test' images"):
        pool.inputs("b", "test")
    with pytest.raises(ValueError, match="no task 'c'"):
        pool.inputs("c", "val")
    with pytest.raises(ValueError, match="split"):
        pool.inputs("a", "train")


def test_normalise_reads_read_only_and_float_images_without_touching_them():
    """Images from a zip or a memory map are read-only arrays: normalised without PyTorch's non-writable
    warning; a caller's float array is never written into."""
    import warnings
    raw = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    raw.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = normalise_images(raw, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 4, 4) and x[1, 2, 3, 3].item() == pytest.approx((95 / 255 - 0.5) / 0.5)
    f = raw.astype(np.float32)
    normalise_images(f, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert np.array_equal(f, raw.astype(np.float32))


def test_proxy_is_seeded_sorted_and_distinct():
    raw = np.arange(50, dtype=np.uint8)[:, None, None].repeat(8, 1).repeat(8, 2)
    pool = _pool({"a": {"val": (raw, np.zeros(50, np.int64))}})
    x, ids = pool.proxy("a", n=10, seed=3)
    assert ids == sorted(set(ids)) and len(ids) == 10
    assert pool.proxy("a", n=10, seed=3)[1] == ids and pool.proxy("a", n=10, seed=4)[1] != ids
    assert torch.equal(x, pool.inputs("a", "val")[0][ids])
    assert len(pool.proxy("a", n=500)[1]) == 50


def test_logits_are_cosine_times_scale():
    pool = _pool()
    f = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    w = pool.heads["a"]
    assert torch.allclose(w.norm(dim=1), torch.full((3,), 30.0))
    assert torch.allclose(pool.logits("a", f), torch.tensor([[0.6, 0.8, 0, 0]]) @ w.T)


def test_samples_and_subset():
    raw = np.zeros((6, 8, 8), np.uint8)
    pool = _pool({"a": {"test": (raw, np.arange(6) % 3)}})
    x, y, r = pool.samples("a", k=4)
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 1, 2, 0] and r.shape == (4, 8, 8)
    pool.cache["x"] = 1
    sub = pool.subset(["b"])
    assert sub.task_names == ["b"] and sub.base is pool.base and sub.heads["b"] is pool.heads["b"]
    assert set(sub.heads) == set(sub.class_names) == {"b"} and sub.cache == {} and sub.meta is not pool.meta
    with pytest.raises(ValueError):
        pool.subset(["b", "nope"])


def test_head_class_mismatch_is_refused():
    with pytest.raises(ValueError, match="2 rows but 3 class names"):
        TaskPool(name="t", model_name=TINY, base={}, tasks={"a": {}}, heads={"a": torch.ones(2, 4)},
                   class_names={"a": ["x", "y", "z"]})


# ---------------------------------------------------------------- pool files

def test_shipped_pool_file_parses():
    spec = P.load_pool_file(POOL_FILE)
    assert [t.name for t in spec.tasks] == ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb",
                                            "mnist", "dtd"]
    assert spec.model == "ViT-B-32-quickgelu" and spec.pretrained == "openai" and spec.quick_gelu is True
    assert all(t.checkpoint.startswith("hf:tanganke/clip-vit-base-patch32_") for t in spec.tasks)
    assert all(t.classes or t.classes_from for t in spec.tasks)


def _valid():
    return {"format": P.POOL_FORMAT, "name": "p", "model": {"open_clip": TINY, "pretrained": "w.safetensors"},
            "templates": ["a photo of a {}."], "tasks": [{"name": "a", "checkpoint": "a", "classes": ["x", "y"]}]}


@pytest.mark.parametrize("edit,msg", [
    (lambda o: o.update(format="v0"), "'format' must be"),
    (lambda o: o.pop("model"), "missing required field 'model'"),
    (lambda o: o["model"].pop("pretrained"), "missing required field 'pretrained'"),
    (lambda o: o.update(templates=["no placeholder"]), "without a '{}' placeholder"),
    (lambda o: o.update(tasks=[]), "'tasks' is empty"),
    (lambda o: o["tasks"].append(dict(o["tasks"][0])), "duplicate task name"),
    (lambda o: o["tasks"][0].pop("classes"), "either 'classes'"),
    (lambda o: o["tasks"][0].update(classes=["x", "x"]), "duplicate class names"),
    (lambda o: o["tasks"][0].update(chekpoint="typo"), "unknown field"),
    (lambda o: o["tasks"][0].update(checkpoint=3), "'checkpoint' must be str"),
])
def test_pool_file_errors(edit, msg):
    obj = _valid()
    edit(obj)
    with pytest.raises(P.PoolFileError, match=msg):
        P.parse_pool(obj, "x.json")


def test_pool_file_not_json(tmp_path):
    (tmp_path / "p.json").write_text("{nope")
    with pytest.raises(P.PoolFileError, match="not valid JSON"):
        P.load_pool_file(tmp_path / "p.json")
    with pytest.raises(P.PoolFileError, match="not found"):
        P.load_pool_file(tmp_path / "missing.json")


def _local_pool(tmp_path, hub_task=False):
    """A pool file whose base and tasks are local files standing in for the hub."""
    import open_clip
    from safetensors.torch import save_file
    register_model_config(TINY, TINY_CFG)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY, pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "base.safetensors"))
    tasks = []
    for i, name in enumerate(["a", "b"]):
        d = tmp_path / f"task_{name}"
        d.mkdir()
        sd = {k: v + 0.01 * (i + 1) for k, v in clip.state_dict().items() if k.startswith("visual.")}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        tasks.append({"name": name, "checkpoint": f"task_{name}", "classes": ["cat", "dog", "bird"][: 2 + i]})
    if hub_task:
        tasks.append({"name": "c", "checkpoint": "hf:someone/not-cached-anywhere", "classes": ["x", "y"]})
    obj = {"format": P.POOL_FORMAT, "name": "local", "model": {"open_clip": TINY, "pretrained": "base.safetensors"},
           "templates": ["a photo of a {}.", "a {}."], "tasks": tasks}
    (tmp_path / "pool.json").write_text(json.dumps(obj))
    return tmp_path / "pool.json", clip


def test_load_pool_from_local_folders(tmp_path):
    path, clip = _local_pool(tmp_path)
    pool = P.load_pool(path)
    assert pool.task_names == ["a", "b"]
    assert torch.allclose(pool.tasks["b"]["visual.proj"], clip.state_dict()["visual.proj"] + 0.02)
    assert torch.equal(pool.base["visual.proj"], clip.state_dict()["visual.proj"])
    assert pool.heads["a"].shape == (2, 4) and pool.heads["b"].shape == (3, 4)
    import open_clip
    expect = P.zero_shot_head(clip.eval(), open_clip.get_tokenizer(TINY), ["cat", "dog"], ["a photo of a {}.", "a {}."])
    assert torch.allclose(pool.heads["a"], expect, atol=1e-5)
    assert torch.allclose(pool.heads["a"].norm(dim=1), clip.logit_scale.exp().expand(2), atol=1e-4)
    with pytest.raises(ValueError, match="carries no 'test' images"):
        pool.inputs("a", "test")


def test_zero_shot_head_is_mean_of_normalised_text_embeddings():
    class Fake:
        logit_scale = torch.tensor(np.log(10.0))

        def encode_text(self, tokens):
            return tokens.float()
    tok = lambda texts: torch.tensor([[3.0, 4.0] if t.startswith("x") else [0.0, 2.0] for t in texts])  # noqa: E731
    head = P.zero_shot_head(Fake(), tok, ["c"], ["x {}", "y {}"])
    m = torch.tensor([0.6, 0.8]) / 2 + torch.tensor([0.0, 1.0]) / 2
    assert torch.allclose(head, 10 * m / m.norm())


def test_offline_failure_names_what_it_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    path, _ = _local_pool(tmp_path, hub_task=True)
    with pytest.raises(P.PoolFileError) as e:
        P.load_pool(path)
    msg = str(e.value)
    assert "someone/not-cached-anywhere" in msg and "HF_HUB_OFFLINE" in msg and "task 'c'" in msg


def test_resolve_checkpoint_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(P.PoolFileError, match="holds no"):
        P.resolve_checkpoint(str(tmp_path / "empty"))
    d = tmp_path / "two"
    d.mkdir()
    (d / "x.safetensors").write_bytes(b"")
    (d / "y.safetensors").write_bytes(b"")
    with pytest.raises(P.PoolFileError, match="several checkpoints"):
        P.resolve_checkpoint(str(d))
