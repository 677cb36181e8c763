"""The Llama-style decoder family (esm_core/models/llama.py) on tiny random configs built offline: the features
feed the task's own score head to the Hugging Face logits exactly, hostile configs are refused before anything is
built, every key has its role and layer type, and ESM with probed statistics equals the §5–§8 formula written out."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

import esm_core
from esm_core import models
from esm_core.models import bert, hf_vit, llama
from esm_core.probe import probe

CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=100, num_labels=3, pad_token_id=0)


def _hf(seed=0, cls=LlamaForSequenceClassification, config=LlamaConfig, **over):
    torch.manual_seed(seed)
    return cls(config(**{**CFG, **over})).eval()


def _config(hf):
    return hf.config.to_dict()


def _batch(left: bool, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randperm(99, generator=g)[:36] + 1).reshape(4, 9)    # distinct tokens: full-rank layer inputs
    mask = torch.ones_like(ids)
    for i, n in enumerate((9, 6, 3, 1)):          # real tokens per sentence; the rest is padding (id 0)
        pad = slice(0, 9 - n) if left else slice(n, 9)
        ids[i, pad], mask[i, pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
def test_features_times_score_are_the_hugging_face_logits(left):
    hf = _hf()
    sd = hf.state_dict()
    model = llama.build_model(sd, _config(hf))
    ids, mask = _batch(left)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = llama.logits(model(llama.pack({"input_ids": ids, "attention_mask": mask})), {"weight": sd["score.weight"]})
    assert torch.equal(got, want)
    assert models.family_of_model(model) is llama


def test_qwen2_with_its_qkv_biases_gives_its_logits_and_the_biases_are_own():
    hf = _hf(cls=Qwen2ForSequenceClassification, config=Qwen2Config)
    sd = hf.state_dict()
    assert models.family_of(sd) is llama
    roles = llama.roles_of(sd)
    assert roles["model.layers.0.self_attn.q_proj.bias"] == models.OWN
    model = llama.build_model(sd, _config(hf))
    ids, mask = _batch(True)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = llama.logits(model(llama.pack({"input_ids": ids, "attention_mask": mask})), {"weight": sd["score.weight"]})
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    other = {k: v + 1.0 if k.endswith(".bias") else v for k, v in sd.items()}
    llama.load_own(model, other)                     # a task's own biases go into the built module
    assert torch.equal(model.model.layers[1].self_attn.k_proj.bias, other["model.layers.1.self_attn.k_proj.bias"])


def test_the_family_passes_the_protocol_check_and_is_registered():
    models.check_family(llama)
    assert models.FAMILIES["llama"] is llama and llama.MODALITY == "text"


def test_roles_and_layer_types_of_every_key():
    sd = _hf().state_dict()
    roles, types = llama.roles_of(sd), llama.layer_types_of(sd)
    lin = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
           "self_attn.o_proj": "attn.output", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
           "mlp.down_proj": "mlp.down"}
    want_types = {f"model.layers.{i}.{n}.weight": t for i in range(2) for n, t in lin.items()}
    assert types == want_types
    for k in sd:
        want = (models.MATRIX if k in want_types else models.OWN if k == "score.weight" else models.VECTOR)
        assert roles[k] == want, k
    assert roles["model.embed_tokens.weight"] == roles["model.norm.weight"] == models.VECTOR
    assert llama.key_role("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4)) == models.SKIP
    assert llama.short_key("model.layers.1.mlp.up_proj.weight") == "1 · mlp.up"
    assert set(llama.ESD_TYPES) == set(llama.LAYER_TYPES) and len(llama.LAYER_TYPES) == 7
    assert llama.ALPHA_ON_ALL and llama.TSV_EVERY_2D and llama.TSV_MIN_RANK == 1
    # grouped-query attention: K and V narrower than Q
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)


def test_routing_groups_share_one_decision_per_input():
    sd = _hf().state_dict()
    groups = llama.routing_groups(llama.routed_keys(sd))
    p = "model.layers.{}."
    assert groups[0][1] == [p.format(0) + f"self_attn.{x}_proj.weight" for x in "qkv"]
    assert [g for g, _ in groups] == [p.format(0) + "self_attn.q_proj.weight", p.format(0) + "mlp.gate_proj.weight",
                                      p.format(1) + "self_attn.q_proj.weight", p.format(1) + "mlp.gate_proj.weight"]
    assert groups[1][1] == [p.format(0) + "mlp.gate_proj.weight", p.format(0) + "mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="not linear weights of a Llama-style decoder"):
        llama.routing_groups(["model.norm.weight"])


def test_matches_claims_no_other_familys_keys_and_converts_a_bare_model():
    sd = _hf().state_dict()
    assert llama.matches(sd) and models.family_of(sd) is llama
    from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification
    b = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=8)).state_dict()
    v = ViTForImageClassification(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=8, image_size=8, patch_size=4)).state_dict()
    assert not llama.matches(b) and not llama.matches(v)
    assert models.family_of(b) is bert and models.family_of(v) is hf_vit
    assert not llama.matches({k: x for k, x in sd.items() if "mlp.up_proj" not in k})    # a layer incomplete
    bare = {k[len("model."):]: x for k, x in sd.items() if k.startswith("model.")}
    assert llama.matches(bare)
    assert set(llama.convert(bare, "bare.safetensors")) == set(sd) - {"score.weight"}
    with pytest.raises(ValueError, match="b.safetensors: not a Llama-style decoder"):
        llama.convert(b, "b.safetensors")


@pytest.mark.parametrize("over, msg", [
    ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers = 1000000000 must be a whole number from 1 to 256"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": None}, "num_attention_heads = 5 does not divide hidden_size = 32"),
    ({"num_key_value_heads": 3}, "num_key_value_heads = 3 does not divide num_attention_heads = 4"),
    ({"hidden_size": 10 ** 30}, "hidden_size = .* out of range"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps = inf is not a finite number"),
    ({"model_type": "gemma"}, "model_type 'gemma' is not a Llama-style decoder"),
    ({"num_hidden_layers": 3}, "num_hidden_layers = 3 does not fit the checkpoint: it holds 2 layers"),
    ({"num_key_value_heads": 4}, r"num_key_value_heads × head_dim = 32 does not fit the checkpoint: "
                                 r"model.layers.0.self_attn.k_proj.weight has shape \(16, 32\)"),
    ({"intermediate_size": 48}, "intermediate_size = 48 does not fit the checkpoint"),
    ({"pad_token_id": 100}, "pad_token_id = 100 is not a token of the vocabulary"),
])
def test_hostile_configs_are_refused_before_anything_is_built(monkeypatch, over, msg):
    hf = _hf()
    sd = hf.state_dict()

    def never(*a, **k):
        raise AssertionError("a model or config was built for a refused config")
    monkeypatch.setattr(transformers.AutoModel, "from_config", never)
    monkeypatch.setattr(transformers.AutoConfig, "for_model", never)
    with pytest.raises(ValueError, match=msg):
        llama.build_model(sd, {**_config(hf), **over})


def test_checkpoint_mismatches_and_size_caps_are_named():
    hf = _hf()
    sd, cfg = hf.state_dict(), _config(hf)
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(31)
    with pytest.raises(ValueError, match=r"shape mismatches .*model.norm.weight: checkpoint \(31,\) vs config \(32,\)"):
        llama.build_model(bad, cfg)
    with pytest.raises(ValueError, match="unexpected keys .*lm_head.weight"):
        llama.build_model({**sd, "lm_head.weight": torch.zeros(100, 32)}, cfg)
    with pytest.raises(ValueError, match="M parameters, more than"):
        llama.build_model(sd, cfg, max_params=1000)
    with pytest.raises(ValueError, match="pooling must be 'last'"):
        llama.build_model(sd, cfg, pooling="mean")


def test_saved_config_rebuilds_the_same_module():
    hf = _hf()
    sd = hf.state_dict()
    model = llama.build_model(sd, _config(hf))
    again = llama.rebuild(sd, llama.saved_config(model))
    x = llama.pack(dict(zip(("input_ids", "attention_mask"), _batch(False))))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert llama.model_keys(model) == [k for k in sd if k != "score.weight"]


# ---------------------------------------------------------------- ESM on two tiny tasks


def _polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _tasks():
    base = _hf(0).state_dict()
    g = torch.Generator().manual_seed(5)
    tasks = {f"t{i}": {k: v + 0.02 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()}
             for i in range(2)}
    return base, tasks


def test_the_probe_records_qkv_once_and_leaves_padding_out():
    base, _ = _tasks()
    model = llama.build_model(base, _config(_hf(0)))
    ids, mask = _batch(True)
    stats = probe(model, llama.pack({"input_ids": ids, "attention_mask": mask}), batch_size=3)
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    assert stats[q] is stats[k] and stats[q].n == int(mask.sum())          # 19 real tokens, padding left out
    assert len(stats) == 14


def _esd_literal(Ds, X, k, p=2.0, eig=0.15, f=2.0):
    """§5–§6 steps 1–5 for one key written out with SVDs (ΔWt per task, the recorded inputs X per task)."""
    T = len(Ds)
    m = next(iter(Ds.values())).shape[0]
    norms = {n: float(d.norm()) for n, d in Ds.items()}
    us, vs = [], []
    for n, D in Ds.items():
        _, s, Vh = torch.linalg.svd(X[n] @ D.T, full_matrices=True)
        P = Vh.T
        lam = torch.zeros(m, dtype=torch.float64)
        lam[: s.numel()] = s ** 2 / (X[n].shape[0] - 1)
        e = (lam[:k] / lam[:k].mean()) ** eig
        e = e / e.mean()
        us.append(P[:, :k] * e)
        vs.append(e[:, None] * (P[:, :k].T @ D) * (norms[n] / (sum(norms.values()) / T)) ** p)
    U, V = torch.cat(us, 1), torch.cat(vs, 0)
    c = V.norm(dim=0) / V.norm(dim=0).mean()
    V = V * c ** p
    return f * (_polar(U) * torch.linalg.svdvals(U).mean()) @ (_polar(V) * torch.linalg.svdvals(V).mean())


def test_esm_with_probed_statistics_equals_the_formula_for_the_q_proj_keys():
    base, tasks = _tasks()
    cfg = _config(_hf(0))
    keys = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    stats, X = {}, {key: {} for key in keys}
    for n, (name, sd) in enumerate(tasks.items()):
        ids, mask = _batch(n % 2 == 0, seed=10 + n)        # one task left-padded, one right-padded
        x = llama.pack({"input_ids": ids, "attention_mask": mask})
        model = llama.build_model(sd, cfg)
        stats[name] = probe(model, x)
        rows = {}
        hs = [model.model.layers[i].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a, key=key: rows.__setitem__(key, a[0][mask.bool()].double())) for i, key in enumerate(keys)]
        with torch.no_grad():
            model(x)
        for h in hs:
            h.remove()
        for key in keys:
            X[key][name] = rows[key]
    alpha = 0.7
    got = esm_core.merge("esm", base, tasks, stats=stats, alpha=alpha)
    ups = {key: _esd_literal({n: tasks[n][key].double() - base[key].double() for n in tasks}, X[key],
                             k=base[key].shape[0] // 2) for key in keys}
    nrm = {key: float(u.norm()) for key, u in ups.items()}                  # §6.7 inter-layer over the q_proj keys
    mean = sum(nrm.values()) / 2
    for key in keys:
        want = alpha * ups[key] * (nrm[key] / mean) ** 2                   # §8: α on the merged key
        err = float((got[key].double() - base[key].double() - want).norm() / want.norm())
        assert err < 1e-5, (key, err)
    assert torch.equal(got["score.weight"], base["score.weight"])           # OWN: the base's value


def test_esmpp_fixed_experts_equal_the_dense_model_and_the_file_rebuilds_it(tmp_path):
    import torch.nn.functional as F
    from esm_core.esmpp import Experts, build_routed, load_routed, save_esmpp
    base, _ = _tasks()
    cfg = _config(_hf(0))
    keys = llama.routed_keys(base)
    g = torch.Generator().manual_seed(7)
    r, names = 4, ["a", "b"]
    ex = Experts(tasks=names, keys=keys, rank=r,
                 A={k: 0.1 * torch.randn(2, r, base[k].shape[1], generator=g) for k in keys},
                 B={k: 0.1 * torch.randn(2, base[k].shape[0], r, generator=g) for k in keys},
                 prototypes={k: P for P, (_, ms) in ((F.normalize(torch.randn(2, 32, generator=g), dim=-1), grp)
                                                      for grp in llama.routing_groups(keys)) for k in ms},
                 base_params=sum(v.numel() for v in base.values()))
    routed = build_routed(base, ex, lambda s: llama.build_model(s, cfg))
    assert routed.config["family"] == "llama" and routed.config["pooling"] == "last"
    assert len(llama.routing_groups(keys)) == 4           # per layer: Q/K/V one decision, gate/up one decision
    x = llama.pack(dict(zip(("input_ids", "attention_mask"), _batch(True))))
    with torch.no_grad():
        for t, name in enumerate(names):                   # a fixed expert = the dense model W + B_t A_t
            dense = {k: (v + ex.B[k][t] @ ex.A[k][t] if k in keys else v) for k, v in base.items()}
            torch.testing.assert_close(routed(x, mode=f"fixed:{name}"), llama.build_model(dense, cfg)(x),
                                       rtol=1e-5, atol=1e-5)
        path = save_esmpp(tmp_path / "llama.safetensors", routed.merged_sd, ex, routed.config)
        again = load_routed(path)                          # rebuilt from the file's config alone
        assert torch.equal(again(x), routed(x))


def test_mistral_with_a_sliding_window_gives_its_logits():
    from transformers import MistralConfig, MistralForSequenceClassification
    hf = _hf(cls=MistralForSequenceClassification, config=MistralConfig, sliding_window=4)
    sd = hf.state_dict()
    assert models.family_of(sd) is llama
    ids, mask = _batch(True)
    with torch.no_grad():
        got = llama.logits(llama.build_model(sd, _config(hf))(llama.pack({"input_ids": ids, "attention_mask": mask})),
                           {"weight": sd["score.weight"]})
        assert torch.equal(got, hf(input_ids=ids, attention_mask=mask).logits)


def test_without_a_pad_token_the_last_real_token_of_the_mask_is_read():
    hf = _hf(pad_token_id=None)
    sd = hf.state_dict()
    model = llama.build_model(sd, _config(hf))
    ids, mask = _batch(False)                       # right padding: causal attention leaves real tokens unchanged
    with torch.no_grad():
        got = llama.logits(model(llama.pack({"input_ids": ids, "attention_mask": mask})), {"weight": sd["score.weight"]})
        for i in range(ids.shape[0]):               # each sentence alone, unpadded (transformers' batch of one)
            n = int(mask[i].sum())
            one = hf(input_ids=ids[i:i + 1, :n]).logits
            torch.testing.assert_close(got[i:i + 1], one, rtol=1e-5, atol=1e-6)


def test_esmpp_end_to_end_on_probed_tasks_oracle_equals_the_dense_experts():
    from esm_core.esmpp import build_experts, build_routed
    base, tasks = _tasks()
    cfg = _config(_hf(0))
    stats, xs = {}, {}
    for n, (name, sd) in enumerate(tasks.items()):
        ids, mask = _batch(n % 2 == 0, seed=20 + n)
        xs[name] = llama.pack({"input_ids": ids, "attention_mask": mask})
        stats[name] = probe(llama.build_model(sd, cfg), xs[name])
    merged = esm_core.merge("esm", base, tasks, stats=stats, alpha=0.5)
    ex = build_experts(merged, tasks, stats, rank=4)
    assert sorted(ex.keys) == sorted(llama.routed_keys(base))
    # the prototypes of a group are one: Q/K/V (and gate/up) share one decision
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(ex.prototypes[q], ex.prototypes[k])
    routed = build_routed(merged, ex, lambda s: llama.build_model(s, cfg))
    with torch.no_grad():
        for t, name in enumerate(tasks):
            dense = {key: (v + ex.B[key][t] @ ex.A[key][t] if key in ex.keys else v) for key, v in merged.items()}
            torch.testing.assert_close(routed(xs[name], mode=f"fixed:{name}"), llama.build_model(dense, cfg)(xs[name]),
                                       rtol=1e-5, atol=1e-5)
        routed(xs["t0"])                                    # routed mode runs; every decision names a task
        assert routed.last_log.chosen.shape[0] == xs["t0"].shape[0]
