import json

import pytest
import torch

from esm_core.models import openclip_vit as vit
from esm_core.probe import LayerStats, probe, probe_pool, stats_from_inputs, task_layer_stats

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                        "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_visual(tmp_path_factory):
    import open_clip
    d = tmp_path_factory.mktemp("cfg")
    (d / "esm-probe-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d / "esm-probe-tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("esm-probe-tiny", pretrained=None)
    return model.visual.eval()


def _manual_inputs(visual, images):
    """Layer inputs by stepping through the open_clip ViT by hand (no hooks)."""
    rec = {}
    with torch.no_grad():
        x = visual._embeds(images)
        for i, blk in enumerate(visual.transformer.resblocks):
            p = f"visual.transformer.resblocks.{i}."
            a = blk.ln_1(x)
            rec[p + vit.IN_PROJ] = a
            x = x + blk.ls_1(blk.attention(q_x=a))
            b = blk.ln_2(x)
            rec[p + vit.C_FC] = b
            h = blk.mlp.gelu(blk.mlp.c_fc(b))
            rec[p + vit.C_PROJ] = h
            x = x + blk.ls_2(blk.mlp.c_proj(h))
        out = visual._pool(x)[0] @ visual.proj
    return rec, out


def test_probe_matches_manual_forward(tiny_visual):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 32, 32, generator=g)
    rec, out = _manual_inputs(tiny_visual, images)
    torch.testing.assert_close(out, tiny_visual(images), rtol=1e-5, atol=1e-5)  # the manual path is the model's
    stats = probe(tiny_visual, images, batch_size=2)          # 3 batches: streaming accumulation
    assert set(stats) == set(rec) and len(stats) == 6
    for key, x in rec.items():
        X = x.reshape(-1, x.shape[-1]).double()
        st = stats[key]
        assert isinstance(st, LayerStats)
        assert st.n == 5 * 17                                 # 16 patches + class token per image
        assert st.gram.dtype == torch.float64 and st.gram.shape == (X.shape[1],) * 2
        torch.testing.assert_close(st.gram, X.T @ X, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.mean, X.mean(0), rtol=1e-6, atol=1e-7)
    assert stats["visual.transformer.resblocks.1.mlp.c_proj.weight"].gram.shape == (256, 256)


def test_probe_removes_hooks_even_on_error(tiny_visual):
    with pytest.raises(Exception):
        probe(tiny_visual, torch.randn(2, 3, 16, 16))         # wrong image size: the forward fails
    for blk in tiny_visual.transformer.resblocks:
        assert not blk.attn._forward_pre_hooks and not blk.mlp.c_fc._forward_pre_hooks
        assert not blk.mlp.c_proj._forward_pre_hooks
    probe(tiny_visual, torch.randn(1, 3, 32, 32))
    assert not tiny_visual.transformer.resblocks[0].attn._forward_pre_hooks


def test_probe_subset_of_types_and_bad_input(tiny_visual):
    st = probe(tiny_visual, torch.randn(2, 3, 32, 32), layer_types=(vit.C_FC,))
    assert sorted(st) == [f"visual.transformer.resblocks.{i}.mlp.c_fc.weight" for i in range(2)]
    with pytest.raises(ValueError, match="cannot record"):
        probe(tiny_visual, torch.randn(2, 3, 32, 32), layer_types=(vit.OUT_PROJ,))
    with pytest.raises(ValueError, match="N×C×H×W"):
        probe(tiny_visual, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="VisionTransformer"):
        probe(torch.nn.Linear(2, 2), torch.randn(1, 3, 32, 32))


class FakePool:
    """The two TaskPool methods probe_pool uses, over the tiny model with per-task weights."""

    def __init__(self, visual):
        self.visual = visual
        base = {"visual." + k: v.clone() for k, v in visual.state_dict().items()}
        self.tasks = {}
        for i, name in enumerate(["a", "b"]):
            g = torch.Generator().manual_seed(10 + i)
            self.tasks[name] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                                for k, v in base.items()}
        self.task_names = list(self.tasks)
        self.built = []

    def proxy(self, task, n=32, seed=0):
        g = torch.Generator().manual_seed(seed * 100 + self.task_names.index(task))
        ids = torch.randperm(50, generator=g)[:n].tolist()
        return torch.randn(n, 3, 32, 32, generator=g), ids

    def build_model(self, state_dict, device="cpu"):
        import copy
        v = copy.deepcopy(self.visual)
        v.load_state_dict({k[len("visual."):]: t for k, t in state_dict.items()})
        self.built.append(state_dict)
        return v.to(device).eval()


def test_probe_pool_uses_each_tasks_own_model_and_proxy(tiny_visual):
    pool = FakePool(tiny_visual)
    seen = []
    stats = probe_pool(pool, n=3, seed=2, device="cpu", progress=lambda f, d: seen.append(f))
    assert set(stats["tasks"]) == {"a", "b"} and stats["n"] == 3 and stats["seed"] == 2
    assert pool.built == [pool.tasks["a"]]            # built once; task b's weights loaded into it (same stats below)
    for name in ("a", "b"):
        x, ids = pool.proxy(name, 3, 2)
        assert stats["proxy_ids"][name] == ids
        ref = probe(pool.build_model(pool.tasks[name]), x)
        for key, st in ref.items():
            torch.testing.assert_close(stats["tasks"][name][key].gram, st.gram)
    assert seen[-1] == 1.0
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.allclose(stats["tasks"]["a"][key].gram, stats["tasks"]["b"][key].gram)
    assert task_layer_stats(stats, "a", key) is stats["tasks"]["a"][key]
    with pytest.raises(ValueError, match="no task 'c'"):
        task_layer_stats(stats, "c", key)
    with pytest.raises(ValueError, match="no layer"):
        task_layer_stats(stats, "a", "visual.nope")


def test_stats_from_inputs():
    X = torch.randn(4, 6, 3, dtype=torch.float64)
    st = stats_from_inputs({"t": {"w": X}})["tasks"]["t"]["w"]
    Xf = X.reshape(-1, 3)
    assert st.n == 24
    torch.testing.assert_close(st.gram, Xf.T @ Xf)
    torch.testing.assert_close(st.mean, Xf.mean(0))
    with pytest.raises(ValueError, match="rows × d_in"):
        stats_from_inputs({"t": {"w": torch.ones(3)}})


def test_stats_keep_the_cheaper_of_rows_and_gram():
    """Rows (float32 for float32 inputs) while they take no more memory than the float64 Gram, then the Gram."""
    g = torch.Generator().manual_seed(3)
    few = torch.randn(30, 16, generator=g)                   # 30 · 4 B ≤ 16 · 8 B per column: rows
    many = torch.randn(40, 16, generator=g)                  # 40 · 4 B > 128 B: Gram
    stats = stats_from_inputs({"t": {"few": few, "many": many, "f64": few.double()[:12]}})["tasks"]["t"]
    st = stats["few"]
    assert st.rows is not None and st.rows.dtype == torch.float32 and st.n == 30
    assert st.nbytes < 16 * 16 * 8 + 16 * 8
    torch.testing.assert_close(st.gram, few.double().T @ few.double(), rtol=1e-12, atol=1e-12)
    assert st.gram.dtype == torch.float64
    assert st.factor() is None                                # 30 rows > 16 inputs: no cheaper factor than G's
    st64 = stats["f64"]
    assert st64.rows is not None and st64.rows.dtype == torch.float64 and st64.factor().shape == (16, 12)
    sm = stats["many"]
    assert sm.rows is None and sm.gram.dtype == torch.float64 and sm.n == 40
    torch.testing.assert_close(sm.gram, many.double().T @ many.double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sm.mean, many.double().mean(0), rtol=1e-12, atol=1e-12)
    # streaming: rows first, switching to the Gram when they grow past it, same statistics
    from esm_core.probe import _Accumulator
    a = _Accumulator()
    for chunk in many.split(7):
        a.add(chunk)
    r = a.result()
    assert r.rows is None
    torch.testing.assert_close(r.gram, sm.gram, rtol=1e-12, atol=1e-12)
    assert st.fingerprint() == st.fingerprint() and st.fingerprint() != sm.fingerprint()


def test_spilled_statistics_read_back_exactly_and_release_their_memory(tmp_path):
    """spill(): the Gram or rows go to a file and leave memory; every access reads them back bit for bit, the
    fingerprint, n and mean stay; an ESD from spilled statistics equals one from held statistics."""
    import pickle

    from esm_core.merging.esd import esd
    from esm_core.merging.stats import spill_stats, stats_nbytes
    g = torch.Generator().manual_seed(5)
    x = {"rows": torch.randn(10, 16, generator=g), "gram": torch.randn(40, 16, generator=g),
         "f64": torch.randn(12, 16, generator=g).double()}
    stats = stats_from_inputs({"t": x})
    held = {k: (st.gram.clone(), st.factor(), st.fingerprint(), st.d_in, st.mean.clone())
            for k, st in stats["tasks"]["t"].items()}
    before = stats_nbytes(stats)
    freed = spill_stats(stats, tmp_path / "spill")
    assert freed > 0 and stats_nbytes(stats) == before - freed
    assert stats_nbytes(stats) == sum(16 * 8 for _ in x)            # the means stay
    assert spill_stats(stats, tmp_path / "spill") == 0                # idempotent
    shared = {"tasks": {"a": {"q": stats["tasks"]["t"]["rows"], "k": stats["tasks"]["t"]["rows"]},
                        "b": {"q": stats["tasks"]["t"]["rows"]}}}      # one entry under 3 names (text Q/K/V)
    assert stats_nbytes(shared) == 16 * 8
    assert len(list((tmp_path / "spill").glob("*.npy"))) == 3 and not list((tmp_path / "spill").glob("*.tmp"))
    delta = torch.randn(6, 16, generator=g)
    for k, st in stats["tasks"]["t"].items():
        gram, factor, fp, d_in, mean = held[k]
        assert st.spilled and st.nbytes == 16 * 8
        assert torch.equal(st.gram, gram) and st.fingerprint() == fp and st.d_in == d_in
        assert torch.equal(st.mean, mean)
        assert (st.factor() is None) == (factor is None)
        if factor is not None:
            assert torch.equal(st.factor(), factor)
        P0, lam0, _ = esd(delta, gram, st.n, factor=factor)
        P1, lam1, _ = esd(delta, None if st.factor() is not None else st.gram, st.n, factor=st.factor())
        assert torch.equal(P0, P1) and torch.equal(lam0, lam1)
        again = pickle.loads(pickle.dumps(st))                        # sessions pickle (ZeroGPU)
        assert again.spilled and torch.equal(again.gram, gram)
    st = stats["tasks"]["t"]["rows"]
    st.gram = held["rows"][0]                                         # replacing the data un-spills
    assert not st.spilled and st.nbytes > 16 * 8
