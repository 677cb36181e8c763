"""The Hugging Face ViT family (ViTForImageClassification / ViTModel): keys, building, the pool's logits equal each
task's own Hugging Face model's, preprocessing, the probe, ESM as the image rule of methods §6 writes it, ESM++
oracle = the dense ``W_ESM + B_t A_t`` model, and refusals of hostile configs before anything is built.
Tiny random ViTs built offline with transformers; nothing downloads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

import esm_core  # noqa: E402
from esm_core import models  # noqa: E402
from esm_core.esmpp import Experts, build_routed  # noqa: E402
from esm_core.models import bert, hf_vit, openclip_vit  # noqa: E402
from esm_core.pools.heads import HeadSource  # noqa: E402
from esm_core.pools.hf_vit_pool import HFViTTaskPool, build_hf_vit_pool  # noqa: E402
from esm_core.probe import probe_pool  # noqa: E402

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
           patch_size=8)
CLASSES = {"a": 3, "b": 4, "c": 2}
N_IMG = 12


def _images(seed: int, n: int, classes: int, size: int = 32):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, classes, n).astype(np.int64)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A base ViTModel (with its pooler) and per-task ViTForImageClassification fine-tunes, saved with
    save_pretrained (the Hub's file layout) and read back as files."""
    root = tmp_path_factory.mktemp("hfvit")
    torch.manual_seed(0)
    base = ViTModel(ViTConfig(**CFG)).eval()
    base.save_pretrained(root / "base")
    own = {k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")}
    tuned = {}
    g = torch.Generator().manual_seed(1)
    for i, (t, C) in enumerate(CLASSES.items()):
        m = ViTForImageClassification(ViTConfig(**CFG, num_labels=C)).eval()
        m.vit.load_state_dict(own)
        with torch.no_grad():
            for p in m.vit.parameters():
                p.add_(0.03 * (i + 1) * torch.randn(p.shape, generator=g))
            m.classifier.weight.normal_(0, 0.5, generator=g)
        m.save_pretrained(root / t)
        tuned[t] = m
    files = {t: load_file(str(root / t / "model.safetensors")) for t in CLASSES}
    return {"root": root, "base": base, "tuned": tuned, "files": files,
            "config": json.loads((root / "base" / "config.json").read_text()),
            "base_file": load_file(str(root / "base" / "model.safetensors"))}


@pytest.fixture(scope="module")
def pool(hf) -> HFViTTaskPool:
    data = {t: {"val": _images(10 + i, N_IMG, C), "test": _images(20 + i, N_IMG, C)}
            for i, (t, C) in enumerate(CLASSES.items())}
    return build_hf_vit_pool("tiny-vit", hf["config"], hf["base_file"], hf["files"], data=data,
                             class_names={t: [f"{t}{j}" for j in range(C)] for t, C in CLASSES.items()})


# ---------------------------------------------------------------- keys and roles

def test_the_family_is_registered_and_found_from_the_key_names(pool, hf):
    assert models.FAMILIES["hf_vit"] is hf_vit
    assert models.family_of(pool.base) is hf_vit
    assert models.family_of(hf["files"]["a"]) is hf_vit               # the Hub layout, classifier included
    assert models.family_of(hf["base_file"]) is hf_vit                # a bare ViTModel file (no "vit." prefix)
    assert not bert.matches(pool.base) and not openclip_vit.matches(pool.base)
    roles = models.roles_of(hf["files"]["a"])
    q = "vit.encoder.layer.0.attention.attention.query"
    assert roles[q + ".weight"] == models.MATRIX
    assert roles[q + ".bias"] == models.VECTOR                        # image rule: biases merged like vectors
    assert roles["vit.encoder.layer.1.layernorm_after.weight"] == models.VECTOR
    assert roles["vit.embeddings.patch_embeddings.projection.weight"] == models.VECTOR   # 4-D
    assert roles["vit.embeddings.position_embeddings"] == models.VECTOR
    assert roles["classifier.weight"] == roles["classifier.bias"] == models.OWN
    assert sum(r == models.MATRIX for r in roles.values()) == 2 * 6
    types = models.layer_types_of(pool.base)
    assert sorted(set(types.values())) == sorted(hf_vit.LAYER_TYPES) and len(types) == 12
    assert hf_vit.short_key("vit.encoder.layer.1.intermediate.dense.weight") == "1 · ffn.intermediate"
    assert hf_vit.input_group("vit.encoder.layer.1.attention.attention.value.weight") == \
        "vit.encoder.layer.1.attention.attention.query.weight"
    assert hf_vit.ESD_TYPES == ("attn.query", "attn.key", "attn.value", "ffn.intermediate", "ffn.output")
    assert hf_vit.ROUTED_TYPES == ("attn.query", "attn.key", "attn.value", "ffn.intermediate")
    assert hf_vit.ALPHA_ON_ALL is False


def test_convert_reads_the_hub_layout_the_in_memory_layout_and_a_bare_vitmodel(hf):
    m = hf["tuned"]["a"]
    mem = hf_vit.convert(m.state_dict())              # transformers' own in-memory names (>= 5: layers.N.q_proj)
    assert set(mem) == set(hf["files"]["a"])
    for k, v in hf["files"]["a"].items():
        assert torch.equal(mem[k], v), k
    bare = hf_vit.convert(hf["base_file"], "base")
    assert all(k.startswith("vit.") for k in bare) and "vit.pooler.dense.weight" in bare
    assert "vit.pooler.dense.weight" not in hf_vit.encoder_state(bare)
    with pytest.raises(ValueError, match="base.pt: not a Hugging Face ViT checkpoint"):
        hf_vit.convert({"encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2)}, "base.pt")
    # a layer missing one of its six linears is no ViT
    broken = {k: v for k, v in hf["files"]["a"].items() if "layer.1.output.dense" not in k}
    assert not hf_vit.matches(broken)


# ---------------------------------------------------------------- the pool: logits and inputs

def test_the_pools_logits_of_each_task_equal_its_own_hugging_face_models(pool, hf):
    for t in CLASSES:
        x, y = pool.inputs(t, "test")
        assert x.shape == (N_IMG, 3, 32, 32) and y.shape == (N_IMG,)
        feats = pool.build_model(pool.tasks[t])(x)
        with torch.no_grad():
            ref = hf["tuned"][t](pixel_values=x).logits
        assert torch.equal(pool.logits(t, feats), ref), t
    x, _ = pool.inputs("a", "val")
    with torch.no_grad():                                      # the base: the [CLS] token after the final layernorm
        assert torch.equal(pool.build_model(pool.base)(x), hf["base"](pixel_values=x).last_hidden_state[:, 0])
    assert pool.family == "hf_vit" and pool.modality == "image" and pool.family_module is hf_vit
    assert set(pool.base) == set(pool.tasks["a"]) and not any(k.startswith("classifier") for k in pool.tasks["a"])
    assert pool.heads["b"]["weight"].shape == (4, 32)
    assert pool.meta["head_sources"] == {t: HeadSource.OWN.value for t in CLASSES} == {t: "own classifier"
                                                                                       for t in CLASSES}


def test_preprocessing_is_the_vit_image_processors(pool):
    from PIL import Image
    proc = transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                             image_std=[0.2, 0.3, 0.25])
    pre = hf_vit.check_preprocessor(proc.to_dict(), 32)
    assert pre["mean"] == (0.4, 0.5, 0.6) and pre["resample"] == 2
    raw, _ = _images(5, 4, 2, size=40)                         # not at the model's size: resized (bilinear)
    ref = proc([Image.fromarray(r) for r in raw], return_tensors="pt")["pixel_values"]
    p = HFViTTaskPool.__new__(HFViTTaskPool)
    p.preprocess = pre
    got = p.encode(raw)
    assert got.shape == ref.shape == (4, 3, 32, 32)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    raw32, _ = _images(6, 3, 2)
    ref32 = proc([Image.fromarray(r) for r in raw32], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(p.encode(raw32), ref32, atol=1e-6, rtol=0)


def test_preprocessor_refusals_name_the_field():
    with pytest.raises(ValueError, match="size 64 px differs from the model's image_size 32"):
        hf_vit.check_preprocessor({"size": {"height": 64, "width": 64}}, 32)
    with pytest.raises(ValueError, match="image_std must be positive"):
        hf_vit.check_preprocessor({"image_std": [0.5, 0, 0.5]}, 32)
    with pytest.raises(ValueError, match="image_mean must be three finite numbers"):
        hf_vit.check_preprocessor({"image_mean": [0.5, 0.5]}, 32)
    with pytest.raises(ValueError, match="not one square size"):
        hf_vit.check_preprocessor({"size": {"height": 32, "width": 16}}, 32)
    with pytest.raises(ValueError, match="resample"):
        hf_vit.check_preprocessor({"resample": 9}, 32)
    with pytest.raises(ValueError, match="not a finite number"):
        hf_vit.check_preprocessor(json.loads('{"rescale_factor": 1e400}'), 32)


# ---------------------------------------------------------------- hostile configs: refused before building

@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, "model_type 'bert' is not 'vit'"),
    ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers = 1000000000 must be a whole number from 1 to 128"),
    ({"hidden_size": 0}, "hidden_size = 0 must be a whole number"),
    ({"hidden_size": 32.5}, "hidden_size = 32.5 must be a whole number"),
    ({"num_attention_heads": 5}, "num_attention_heads = 5 does not divide hidden_size = 32"),
    ({"patch_size": 7}, "patch_size = 7 does not divide image_size = 32"),
    ({"image_size": 1024, "patch_size": 8}, "128 patches per side; at most 64"),
    ({"image_size": [32, 16]}, "image_size = \\[32, 16\\] is not square"),
    ({"num_channels": 1}, "num_channels = 1; only 3-channel"),
    ({"hidden_act": "os.system"}, "hidden_act = 'os.system' is not one of"),
    ({"layer_norm_eps": 2}, "layer_norm_eps = 2 must be a number between 0 and 1"),
    ({"hidden_dropout_prob": -1}, "hidden_dropout_prob = -1 must be a probability"),
    ({"qkv_bias": "yes"}, "qkv_bias = 'yes' must be true or false"),
    ({"intermediate_size": 10 ** 30}, "intermediate_size = about 10\\^30 is out of range"),
])
def test_a_hostile_config_is_refused_naming_the_field(hf, change, message):
    cfg = {**hf["config"], **change}
    with pytest.raises(ValueError, match=message):
        hf_vit.check_config(cfg)


def test_a_config_that_does_not_fit_the_checkpoint_is_refused_before_anything_is_built(hf, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("a model was built before the shapes were checked")
    monkeypatch.setattr(transformers, "ViTModel", no_build)
    sd = hf_vit.convert(hf["files"]["a"])
    with pytest.raises(ValueError, match="num_hidden_layers = 128 does not fit the checkpoint: it holds 2 layers"):
        hf_vit.build_model(sd, {**hf["config"], "num_hidden_layers": 128})
    with pytest.raises(ValueError, match="intermediate_size = 128 does not fit the checkpoint: "
                                         "vit.encoder.layer.0.intermediate.dense.weight has shape \\(64, 32\\)"):
        hf_vit.build_model(sd, {**hf["config"], "intermediate_size": 128})
    with pytest.raises(ValueError, match="shape mismatches \\['vit.embeddings.position_embeddings: checkpoint "
                                         "\\(1, 17, 32\\) vs config \\(1, 5, 32\\)"):
        hf_vit.build_model(sd, {**hf["config"], "image_size": 16})
    with pytest.raises(ValueError, match="missing keys \\['vit.encoder.layer.1.output.dense.bias'\\]"):
        hf_vit.build_model({k: v for k, v in sd.items() if k != "vit.encoder.layer.1.output.dense.bias"},
                           hf["config"])
    with pytest.raises(ValueError, match="about 0 M parameters, more than the 0 M"):
        hf_vit.build_model(sd, hf["config"], max_params=1000)
    bad = dict(sd)
    bad["vit.layernorm.weight"] = torch.zeros(32, dtype=torch.int64)
    with pytest.raises(ValueError, match="must be floating point: \\['vit.layernorm.weight'\\]"):
        hf_vit.build_model(bad, hf["config"])
    with pytest.raises(ValueError, match="unexpected keys \\['vit.extra'\\]"):
        hf_vit.build_model({**sd, "vit.extra": torch.zeros(1)}, hf["config"])


def test_pool_building_refuses_bad_tasks_naming_them(hf):
    files = dict(hf["files"])
    no_head = {k: v for k, v in files["b"].items() if not k.startswith("classifier")}
    with pytest.raises(ValueError, match="task 'b': no classifier"):
        build_hf_vit_pool("p", hf["config"], hf["base_file"], {**files, "b": no_head})
    wide = {**hf_vit.convert(hf["files"]["a"]), "vit.layernorm.weight": torch.ones(33)}
    with pytest.raises(ValueError, match="task 'a': checkpoint does not fit.*vit.layernorm.weight"):
        build_hf_vit_pool("p", hf["config"], hf["base_file"], {"a": wide})
    with pytest.raises(ValueError, match="task 'a': its classifier has 3 classes but 2 class names"):
        build_hf_vit_pool("p", hf["config"], hf["base_file"], {"a": files["a"]}, class_names={"a": ["x", "y"]})
    with pytest.raises(ValueError, match="labels of task 'c' \\(val\\) must lie in \\[0, 2\\)"):
        build_hf_vit_pool("p", hf["config"], hf["base_file"], {"c": files["c"]},
                          data={"c": {"val": (_images(0, 4, 2)[0], np.array([0, 1, 2, 0]))}})
    with pytest.raises(ValueError, match="expected uint8 N×32×32×3"):
        build_hf_vit_pool("p", hf["config"], hf["base_file"], {"c": files["c"]},
                          data={"c": {"val": _images(0, 4, 2, size=16)}})


# ---------------------------------------------------------------- probe and ESM (methods §5–§6, image rule)

def _inputs(pool, n=6):
    keys = hf_vit.esd_keys(pool.base)
    return {t: {k: v.double() for k, v in hf_vit.layer_inputs(pool.build_model(pool.tasks[t]),
                                                               pool.proxy(t, n)[0], keys).items()}
            for t in pool.task_names}


def test_the_probe_records_each_layers_input_once_per_input_group(pool):
    stats = probe_pool(pool, n=6, device="cpu")
    inputs = _inputs(pool)
    q = "vit.encoder.layer.1.attention.attention.query.weight"
    k = "vit.encoder.layer.1.attention.attention.key.weight"
    for t in pool.task_names:
        st = stats["tasks"][t]
        assert set(st) == set(hf_vit.esd_keys(pool.base))
        assert st[k] is st[q]                                   # Q, K, V read the same input: one record
        for key, X in inputs[t].items():
            assert st[key].n == X.shape[0] == 6 * 17           # every token of the 6 proxy images
            torch.testing.assert_close(st[key].gram, X.T @ X, rtol=1e-5, atol=1e-4)


def _polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _literal_esm(base, tasks, inputs, alpha, p=2.0, eig=0.15, f=2.0):
    """methods §5–§6 for an image family, written out with SVDs: ESD on Q, K, V, intermediate and output
    (k = ⌊d_out / T⌋); the attention output the TSV-M way (§3, k = ⌊min(m, n) / T⌋, coefficient 1); every other
    float key the mean of the task vectors (coefficient 1); inter-layer scaling per layer type over all six; α on
    the ESD keys only."""
    names, T = list(tasks), len(tasks)
    ups, esd = {}, set()
    for key, b in base.items():
        Ds = [tasks[n][key].double() - b.double() for n in names]
        typ = hf_vit.layer_type(key)
        if typ is None:
            ups[key] = sum(Ds) / T
        elif typ == hf_vit.ATTN_OUT:
            k = min(b.shape) // T
            svds = [torch.linalg.svd(d, full_matrices=False) for d in Ds]
            U = torch.cat([u[:, :k] for u, _, _ in svds], 1)
            s = torch.cat([s[:k] for _, s, _ in svds])
            V = torch.cat([vh[:k] for _, _, vh in svds], 0)
            ups[key] = _polar(U) @ torch.diag(s) @ _polar(V)
        else:
            esd.add(key)
            m = b.shape[0]
            k = m // T
            norms = [float(d.norm()) for d in Ds]
            us, vs = [], []
            for t, n in enumerate(names):
                X = inputs[n][key]
                _, s, Vh = torch.linalg.svd(X @ Ds[t].T, full_matrices=True)
                P = Vh.T
                lam = torch.zeros(m, dtype=torch.float64)
                lam[: s.numel()] = s ** 2 / (X.shape[0] - 1)
                e = (lam[:k] / lam[:k].mean()) ** eig
                e = e / e.mean()
                us.append(P[:, :k] * e)
                vs.append(e[:, None] * (P[:, :k].T @ Ds[t]) * norms[t] ** p)
            U, V = torch.cat(us, 1), torch.cat(vs, 0) / (sum(norms) / T) ** p
            c = V.norm(dim=0) / V.norm(dim=0).mean()
            V = V * c ** p
            ups[key] = f * (_polar(U) * torch.linalg.svdvals(U).mean()) @ (_polar(V) * torch.linalg.svdvals(V).mean())
    for typ in hf_vit.LAYER_TYPES:
        ks = [k for k in ups if hf_vit.layer_type(k) == typ]
        nrm = {k: float(ups[k].norm()) for k in ks}
        mean = sum(nrm.values()) / len(ks)
        for k in ks:
            ups[k] = ups[k] * (nrm[k] / mean) ** p
    return {k: (alpha * v if k in esd else v) for k, v in ups.items()}


def test_esm_on_the_vit_pool_equals_the_image_rule_written_out(pool):
    alpha = 0.4                                   # not 1: α on the ESD keys only shows
    inputs = _inputs(pool)
    got = esm_core.merge("esm", pool.base, pool.tasks, inputs=inputs, alpha=alpha, device="cpu")   # family found
    ref = _literal_esm(pool.base, pool.tasks, inputs, alpha)
    assert set(ref) == set(pool.base)
    for k, b in pool.base.items():
        err = float((got[k].double() - b.double() - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
        assert err < 1e-5, (k, err)


# ---------------------------------------------------------------- ESM++ (methods §7)

def _random_experts(pool, rank=2, seed=0) -> Experts:
    keys = [k for k in pool.base if hf_vit.layer_type(k) in hf_vit.ROUTED_TYPES]
    g = torch.Generator().manual_seed(seed)
    T = len(pool.task_names)
    A, B, P = {}, {}, {}
    for k in keys:
        d_out, d_in = pool.base[k].shape
        A[k] = 0.3 * torch.randn(T, rank, d_in, generator=g)
        B[k] = torch.randn(T, d_out, rank, generator=g) / d_out ** 0.5
        grp = hf_vit.input_group(k)
        P[k] = P[grp] if grp in P else F.normalize(torch.randn(T, d_in, generator=g), dim=-1)
    return Experts(tasks=list(pool.task_names), keys=keys, rank=rank, A=A, B=B, prototypes=P)


def test_esmpp_oracle_on_the_vit_pool_equals_the_dense_w_esm_plus_b_a_model(pool):
    merged = esm_core.merge("ta", pool.base, pool.tasks, alpha=0.3, device="cpu")
    experts = _random_experts(pool)
    routed = build_routed(merged, experts, pool.build_model)
    assert len(routed.keys) == 2 * 2                              # per layer: one Q/K/V decision + intermediate
    assert routed.keys[0] == "vit.encoder.layer.0.attention.attention.query.weight"
    for i, t in enumerate(pool.task_names):
        x, _ = pool.inputs(t, "test")
        dense = {k: (v + experts.B[k][i] @ experts.A[k][i] if k in experts.A else v) for k, v in merged.items()}
        with torch.no_grad():
            want = pool.logits(t, pool.build_model(dense)(x))
            got = pool.logits(t, routed(x, true_task=t, mode="oracle"))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert (routed.last_log.chosen == i).all()
    with torch.no_grad():                                           # mode "base": plain W_ESM
        x, _ = pool.inputs("a", "val")
        torch.testing.assert_close(routed(x, mode="base"), pool.build_model(merged)(x), atol=1e-6, rtol=0)


@pytest.mark.slow                                 # the whole pipeline: probe, α-fixed ESM, experts, evaluation
def test_esmpp_pipeline_on_the_vit_pool_builds_the_section_7_experts_and_routes(pool):
    from esm_core.evaluation.esmpp import build_esmpp, evaluate_routed
    routed = build_esmpp(pool, rank=2, alpha=0.3, device="cpu")
    merged = routed.merged_sd
    q = "vit.encoder.layer.1.attention.attention.query.weight"
    v = "vit.encoder.layer.1.attention.attention.value.weight"
    fc = "vit.encoder.layer.0.intermediate.dense.weight"
    assert set(routed.experts.keys) == {k for k in pool.base if hf_vit.layer_type(k) in hf_vit.ROUTED_TYPES}
    for i, t in enumerate(pool.task_names):
        x, _ = pool.proxy(t, 32)                          # 12 validation images: all of them
        X = hf_vit.layer_inputs(pool.build_model(pool.tasks[t]), x, [q, v, fc])
        for key in (q, v, fc):
            d = (pool.tasks[t][key] - merged[key]).double()          # §7.2: what ESM lost
            lam, P = torch.linalg.eigh(d @ (X[key].double().T @ X[key].double()) @ d.T)
            Pk = P[:, lam.argsort(descending=True)[:2]]              # §7.3: top-2 essential directions
            BA = routed.experts.B[key][i].double() @ routed.experts.A[key][i].double()
            torch.testing.assert_close(BA, Pk @ Pk.T @ d, atol=1e-4, rtol=1e-4)
        proto = F.normalize(X[q].double().mean(0), dim=0)            # §7.5: mean over all tokens, unit length
        torch.testing.assert_close(routed.experts.prototypes[q][i].double(), proto, atol=1e-5, rtol=1e-5)
    accs, log = evaluate_routed(pool, routed, "test", mode="oracle")
    assert set(accs) == set(pool.task_names) and (log.chosen == log.true[:, None]).all()


# ---------------------------------------------------------------- uploads (the Pool view's files)

def _zip(path, classes: int, per_class: int, seed: int, splits=None):
    """A zip of class folders of 32 px PNGs (or ``splits``: val/ and test/ folders of them)."""
    import io
    import zipfile
    from PIL import Image
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as z:
        for split in (splits or [None]):
            for c in range(classes):
                for j in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                    z.writestr(f"{split + '/' if split else ''}class{c}/img{j}.png", buf.getvalue())
    return path


@pytest.fixture(scope="module")
def upload_files(hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("vit-upload")
    root = hf["root"]
    zips = {t: _zip(d / f"{t}.zip", C, 4, 30 + i, splits=["val", "test"] if t == "c" else None)
            for i, (t, C) in enumerate(CLASSES.items())}
    pre = {"do_resize": True, "size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.4, 0.3],
           "image_std": [0.2, 0.25, 0.3], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}
    return {"base": root / "base" / "model.safetensors", "tasks": {t: root / t / "model.safetensors" for t in CLASSES},
            "zips": zips, "config": hf["config"], "pre": pre, "dir": d}


def test_an_uploaded_vit_pool_scores_each_task_with_its_own_model(hf, upload_files, tmp_path):
    from esm_core.lazy import LazyCheckpoint
    from esm_core.pools.hf_vit_pool import hf_vit_pool_from_upload
    u = upload_files
    pool, notes = hf_vit_pool_from_upload(u["base"], u["tasks"], u["zips"], u["config"], u["pre"],
                                          keep_dir=tmp_path / "keep")
    assert isinstance(pool.tasks["a"], LazyCheckpoint)              # written once, read key by key
    assert pool.class_names["b"] == ["class0", "class1", "class2", "class3"]
    assert len(pool.data["a"]["val"][1]) == len(pool.data["a"]["test"][1]) == 6        # 3 classes × 4, half each
    assert len(pool.data["c"]["val"][1]) == len(pool.data["c"]["test"][1]) == 8        # val/ and test/ as given
    assert any("val/ and test/ folders as given" in n for n in notes)
    assert pool.preprocess["mean"] == (0.5, 0.4, 0.3)
    for t in CLASSES:
        x, _ = pool.inputs(t, "test")
        with torch.no_grad():
            assert torch.equal(pool.logits(t, pool.build_model(pool.tasks[t])(x)),
                               hf["tuned"][t](pixel_values=x).logits), t


def test_a_refused_vit_upload_names_the_problem_and_leaves_nothing_behind(upload_files, tmp_path, monkeypatch):
    from esm_core.pools import hf_vit_pool as hp
    u, keep = upload_files, tmp_path / "keep"
    wrong = _zip(tmp_path / "a.zip", 5, 2, 0)
    with pytest.raises(ValueError, match="task 'a': its classifier has 3 classes but a.zip has 5 class folders"):
        hp.hf_vit_pool_from_upload(u["base"], u["tasks"], {**u["zips"], "a": wrong}, u["config"], keep_dir=keep)
    with pytest.raises(ValueError, match="no images for task\\(s\\) \\['b'\\]"):
        hp.hf_vit_pool_from_upload(u["base"], u["tasks"], {k: v for k, v in u["zips"].items() if k != "b"},
                                   u["config"], keep_dir=keep)
    read = []
    monkeypatch.setattr(hp, "load_checkpoint", lambda p, **k: read.append(p) or load_file(str(p)))
    with pytest.raises(ValueError, match="need .* once decoded.*more than the 0.1 MiB"):  # before any task is read
        hp.hf_vit_pool_from_upload(u["base"], u["tasks"], u["zips"], u["config"], keep_dir=keep,
                                   memory_budget=100_000)
    assert read == [u["base"]]
    with pytest.raises(ValueError, match="intermediate_size = 128"):       # config vs the base: no task read
        hp.hf_vit_pool_from_upload(u["base"], u["tasks"], u["zips"], {**u["config"], "intermediate_size": 128},
                                   keep_dir=keep)
    assert read == [u["base"]] * 2
    with pytest.raises(ValueError, match="hidden_act = 'bad' is not one of"):   # the config before any file
        hp.hf_vit_pool_from_upload(u["base"], u["tasks"], u["zips"], {**u["config"], "hidden_act": "bad"})
    assert read == [u["base"]] * 2
    assert not keep.exists()


def test_an_esmpp_file_of_the_vit_pool_rebuilds_its_model_without_the_pool(pool, tmp_path):
    from esm_core.esmpp import load_routed, save_esmpp
    merged = esm_core.merge("ta", pool.base, pool.tasks, alpha=0.3, device="cpu")
    routed = build_routed(merged, _random_experts(pool, seed=3), pool.build_model)
    assert routed.config["family"] == "hf_vit" and routed.config["model_config"]["hidden_size"] == 32
    path = save_esmpp(tmp_path / "vit-esmpp.safetensors", routed.merged_sd, routed.experts, routed.config)
    back = load_routed(path)                                      # the family rebuilds it from the file alone
    x, _ = pool.inputs("b", "test")
    with torch.no_grad():
        for mode in ("route", "oracle"):
            assert torch.equal(back(x, true_task="b", mode=mode), routed(x, true_task="b", mode=mode)), mode


def test_a_lora_vit_task_equals_the_same_task_given_dense(hf, upload_files, tmp_path):
    """A PEFT LoRA adapter (made offline with peft on the tiny ViT: q/v/fc1 targets, the classifier in
    modules_to_save) uploaded as task 'a' gives the pool the dense task W0 + (lora_alpha / r)·BA and its classifier:
    equal to the adapter merged by peft and uploaded as a dense file."""
    peft = pytest.importorskip("peft")
    from esm_core.pools.hf_vit_pool import hf_vit_pool_from_upload
    u = upload_files
    torch.manual_seed(5)
    m = ViTForImageClassification(ViTConfig(**CFG, num_labels=CLASSES["a"])).eval()
    m.vit.load_state_dict({k: v for k, v in hf["base"].state_dict().items() if not k.startswith("pooler.")})
    targets = ["q_proj", "v_proj", "fc1"] if hf_vit._native_layout() else ["query", "value", "intermediate.dense"]
    lm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                modules_to_save=["classifier"]))
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    lm.save_pretrained(tmp_path / "adapter")
    dense = lm.merge_and_unload().eval()
    dense.save_pretrained(tmp_path / "dense")
    pa, notes_a = hf_vit_pool_from_upload(u["base"], {**u["tasks"], "a": tmp_path / "adapter"}, u["zips"],
                                          u["config"], u["pre"])
    pd_, _ = hf_vit_pool_from_upload(u["base"], {**u["tasks"], "a": tmp_path / "dense" / "model.safetensors"},
                                     u["zips"], u["config"], u["pre"])
    assert any("LoRA adapter, 6 module(s) of rank 4" in n for n in notes_a)
    for k, v in pd_.tasks["a"].items():
        torch.testing.assert_close(pa.tasks["a"][k], v, atol=1e-6, rtol=0)
    for k in ("weight", "bias"):
        assert torch.equal(pa.heads["a"][k], pd_.heads["a"][k])
    x, _ = pa.inputs("a", "test")
    with torch.no_grad():
        torch.testing.assert_close(pa.logits("a", pa.build_model(pa.tasks["a"])(x)), dense(pixel_values=x).logits,
                                   atol=1e-5, rtol=1e-5)
