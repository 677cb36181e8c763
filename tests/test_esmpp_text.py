"""ESM++ on BERT-family text encoders (methods §7 on §8): routed Q/K/V/intermediate layers, masked routing means,
modes, biases, save/load, experts from text statistics. Tiny random BERT built in code; nothing downloads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from esm_core.checkpoints import CheckpointError, save_safetensors  # noqa: E402
from esm_core.esmpp import (Experts, RoutedLinear, build_experts, build_routed, load_esmpp, load_routed,  # noqa: E402
                            routed_keys_of, routing_accuracy, save_esmpp)
from esm_core.merging.esd import esd_exact, esd_truncate  # noqa: E402
from esm_core.merging.stats import stats_from_inputs  # noqa: E402
from esm_core.models import bert  # noqa: E402

CFG = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 32, "vocab_size": 50, "max_position_embeddings": 32}
TASKS = ["a", "b", "c"]
ATOL = 2e-5


# ---------------------------------------------------------------- helpers

def encoder(sd) -> bert.TextEncoder:
    return bert.TextEncoder(bert.build(sd, CFG))


@pytest.fixture(scope="module")
def base_sd():
    torch.manual_seed(0)
    m = transformers.AutoModel.from_config(bert.config_of(CFG)).eval()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def task_sds(base_sd, seed=0, scale=0.1):
    """Fine-tuned models: every float tensor moved by ``scale`` times its own spread (biases and LayerNorm
    parameters, whose spread is 0, by ``scale``): biases too, they are each task's own (§8)."""
    g = torch.Generator().manual_seed(seed)

    def moved(v):
        if not v.is_floating_point():
            return v.clone()
        spread = float(v.std()) if v.numel() > 1 else 0.0
        return v + scale * (spread if spread > 0 else 1.0) * torch.randn(v.shape, generator=g)
    return {t: {k: moved(v) for k, v in base_sd.items()} for t in TASKS}


def random_experts(base_sd, keys, rank=3, scale=0.3, seed=0, protos=None) -> Experts:
    """Random factors; Q, K and V of a layer get the same prototypes (they read the same input)."""
    g = torch.Generator().manual_seed(seed)
    A, B, P = {}, {}, {}
    for k in keys:
        d_out, d_in = base_sd[k].shape
        A[k] = scale * torch.randn(len(TASKS), rank, d_in, generator=g)
        B[k] = torch.randn(len(TASKS), d_out, rank, generator=g) / d_out ** 0.5
        grp = bert.input_group(k)
        P[k] = P[grp] if grp in P else F.normalize(torch.randn(len(TASKS), d_in, generator=g), dim=-1)
    if protos is not None:
        P = {k: protos[bert.input_group(k)] for k in keys}
    return Experts(tasks=list(TASKS), keys=list(keys), rank=rank, A=A, B=B, prototypes=P)


def packed(lengths, seed=1, lo=1, hi=50, pad=0):
    """Packed (N, 2, L) inputs with the given real lengths, padded (id ``pad``, mask 0) to the longest."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(lo, hi, (n,), generator=g)
        mask[i, :n] = 1
    return bert.pack({"input_ids": ids, "attention_mask": mask})


def trimmed(x, i):
    """Sample i of packed inputs alone, without its padding."""
    n = int(x[i, 1].sum())
    return x[i:i + 1, :, :n]


def dense_state(merged, experts, task, own=None):
    """W_ESM + B_t A_t on every routed key (and a task's own biases when ``own`` is given)."""
    sd = dict(merged) if own is None else bert.with_own(merged, own, bert.roles_of(merged))
    for k in experts.keys:
        sd[k] = sd[k] + experts.delta(k, task)
    return sd


@pytest.fixture(scope="module")
def routed(base_sd):
    keys = routed_keys_of(base_sd)
    return build_routed(base_sd, random_experts(base_sd, keys), encoder)


# ---------------------------------------------------------------- keys, groups, building

def test_routed_keys_and_input_groups(base_sd, routed):
    keys = routed_keys_of(base_sd)                        # "auto" finds the bert family's ROUTED_TYPES
    assert len(keys) == 8 and {bert.layer_type(k) for k in keys} == set(bert.ROUTED_TYPES)
    groups = bert.routing_groups(keys)
    assert [g for g, _ in groups] == ["encoder.layer.0.attention.self.query.weight",
                                      "encoder.layer.0.intermediate.dense.weight",
                                      "encoder.layer.1.attention.self.query.weight",
                                      "encoder.layer.1.intermediate.dense.weight"]
    assert [len(m) for _, m in groups] == [3, 1, 3, 1]
    assert routed.keys == [g for g, _ in groups]          # one decision (and log entry) per input group
    hf = routed.visual.model
    for k in keys:                                        # replaced in place, parameter names kept
        mod = hf.get_submodule(k[: -len(".weight")])
        assert isinstance(mod, RoutedLinear)
        assert torch.equal(dict(hf.named_parameters())[k], base_sd[k])
    assert routed.config["family"] == "bert" and routed.config["model_config"]["hidden_size"] == 16


def test_zero_experts_equal_the_plain_encoder(base_sd):
    ex = random_experts(base_sd, routed_keys_of(base_sd), scale=0.0)
    r = build_routed(base_sd, ex, encoder)
    plain = encoder(base_sd)
    x = packed([6, 4, 2])
    with torch.no_grad():
        want = plain(x)
        for mode in ("route", "base", "fixed:b"):
            torch.testing.assert_close(r(x, mode=mode), want, rtol=0, atol=ATOL)
    assert r.last_log.cos.shape == (3, 4, 3)


OTHER = {
    "roberta": {"model_type": "roberta", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 32, "vocab_size": 50, "max_position_embeddings": 40, "pad_token_id": 1},
    "distilbert": {"model_type": "distilbert", "dim": 16, "hidden_dim": 32, "n_layers": 2, "n_heads": 2,
                   "vocab_size": 50, "max_position_embeddings": 32},
}


@pytest.mark.parametrize("family", list(OTHER))
def test_roberta_and_distilbert_route_their_own_layer_names(family):
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in
          transformers.AutoModel.from_config(bert.config_of(OTHER[family])).state_dict().items()}

    def enc(s):
        return bert.TextEncoder(bert.build(s, OTHER[family]))
    keys = routed_keys_of(sd)
    assert len(keys) == 8 and len(bert.routing_groups(keys)) == 4
    r = build_routed(sd, random_experts(sd, keys), enc)
    x = packed([6, 4, 2], lo=2, pad=1 if family == "roberta" else 0)
    with torch.no_grad():
        torch.testing.assert_close(r(x, mode="fixed:c"), enc(dense_state(sd, r.experts, "c"))(x), rtol=0, atol=ATOL)
        out = r(x)
        for i in range(3):
            torch.testing.assert_close(r(trimmed(x, i)), out[i:i + 1], rtol=0, atol=ATOL)


# ---------------------------------------------------------------- routing on non-padding tokens

def test_padded_batch_routes_like_the_unpadded_samples(routed, base_sd):
    x = packed([7, 3, 5], seed=4)
    with torch.no_grad():
        out = routed(x)
        log = routed.last_log
        for i in range(3):
            torch.testing.assert_close(routed(trimmed(x, i)), out[i:i + 1], rtol=0, atol=ATOL)
            one = routed.last_log
            assert torch.equal(one.routed[0], log.routed[i])
            torch.testing.assert_close(one.cos[0], log.cos[i], rtol=0, atol=1e-5)
    # the first group's input is the embedding output: x̄ is its mean over real tokens only
    batch = bert.unpack(x)
    first = bert.layer_inputs(encoder(base_sd).model, batch, [routed.keys[0]], per_sample=True)[routed.keys[0]]
    torch.testing.assert_close(log.pooled[0], first, rtol=0, atol=1e-5)
    emb = encoder(base_sd).model.embeddings(input_ids=batch["input_ids"])
    assert not torch.allclose(emb.mean(1)[1], first[1], atol=1e-3)     # the plain mean would differ


def test_mask_that_does_not_fit_is_refused(routed):
    from esm_core.esmpp.model import _Router
    r = _Router(1)
    r.mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="token mask"):
        r.decide(0, torch.randn(2, 4, 16), F.normalize(torch.randn(3, 16), dim=-1))


# ---------------------------------------------------------------- modes

def test_fixed_mode_equals_the_dense_expert_model(routed, base_sd):
    x = packed([6, 4, 2])
    with torch.no_grad():
        for t in TASKS:
            want = encoder(dense_state(base_sd, routed.experts, t))(x)
            torch.testing.assert_close(routed(x, mode=f"fixed:{t}"), want, rtol=0, atol=ATOL)
            assert routed.last_log.chosen.unique().tolist() == [TASKS.index(t)]
        torch.testing.assert_close(routed(x, mode="base"), encoder(base_sd)(x), rtol=0, atol=ATOL)
        assert (routed.last_log.chosen == -1).all()


def test_oracle_forces_the_true_task(routed):
    x = packed([6, 4, 2])
    with torch.no_grad():
        out = routed(x, true_task=["c", "a", "b"], mode="oracle")
        log = routed.last_log
        assert log.chosen.tolist() == [[2] * 4, [0] * 4, [1] * 4] and log.true.tolist() == [2, 0, 1]
        for i, t in enumerate(["c", "a", "b"]):
            torch.testing.assert_close(out[i:i + 1], routed(trimmed(x, i), mode=f"fixed:{t}"), rtol=0, atol=ATOL)
        with pytest.raises(ValueError, match="true task"):
            routed(x, mode="oracle")
        with routed.using(mode="oracle", true_task="b"), routed.logging() as collected:
            routed(x)
            routed(x[:1])
        assert collected.n == 4 and collected.chosen.unique().tolist() == [1]
    assert routed.mode == "route" and routed._router.mask is None and routed._router.shared is None


def test_route_mode_shares_one_decision_across_q_k_v(base_sd):
    """Prototypes = the pooled inputs of sample 0 / 1 run with expert a / b everywhere: routing must pick a / b
    in every group, and then Q, K and V all use it (the output equals the fixed-expert output)."""
    keys = routed_keys_of(base_sd)
    probe = build_routed(base_sd, random_experts(base_sd, keys), encoder)
    x = packed([6, 3], seed=7)
    g = torch.Generator().manual_seed(5)
    protos = {grp: F.normalize(torch.randn(3, 16, generator=g), dim=-1) for grp in probe.keys}
    with torch.no_grad():
        for i, t in enumerate(["a", "b"]):
            probe(trimmed(x, i), mode=f"fixed:{t}")
            for li, grp in enumerate(probe.keys):
                protos[grp][TASKS.index(t)] = F.normalize(probe.last_log.pooled[li][0], dim=-1)
        r = build_routed(base_sd, random_experts(base_sd, keys, protos=protos), encoder)
        out = r(x)
        assert r.last_log.chosen.tolist() == [[0] * 4, [1] * 4]
        torch.testing.assert_close(r.last_log.cos[0, :, 0], torch.ones(4), rtol=0, atol=1e-5)
        for i, t in enumerate(["a", "b"]):
            torch.testing.assert_close(out[i:i + 1], r(trimmed(x, i), mode=f"fixed:{t}"), rtol=0, atol=ATOL)
        assert not torch.allclose(r(x[:1], mode="fixed:a"), r(x[:1], mode="fixed:b"), atol=1e-4)


# ---------------------------------------------------------------- each task's own biases

def test_load_own_puts_a_tasks_biases_into_the_routed_model(base_sd):
    keys = routed_keys_of(base_sd)
    r = build_routed(base_sd, random_experts(base_sd, keys), encoder)
    own = task_sds(base_sd)["b"]
    x = packed([6, 4, 2])
    with torch.no_grad():
        before = r(x, mode="fixed:b")
        bert.load_own(r.visual.model, own)
        params = dict(r.visual.model.named_parameters())
        q = "encoder.layer.1.attention.self.query.bias"
        assert torch.equal(params[q], own[q]) and not torch.equal(own[q], base_sd[q])
        after = r(x, mode="fixed:b")
        assert not torch.allclose(before, after, atol=1e-4)
        torch.testing.assert_close(after, encoder(dense_state(base_sd, r.experts, "b", own=own))(x),
                                   rtol=0, atol=ATOL)
        torch.testing.assert_close(r(x, mode="base"), encoder(bert.with_own(base_sd, own, bert.roles_of(base_sd)))(x),
                                   rtol=0, atol=ATOL)
    assert torch.equal(r.merged_sd[q], base_sd[q])                   # the saved merge is untouched


# ---------------------------------------------------------------- save / load

def test_save_load_round_trip_rebuilds_the_text_model(tmp_path, routed, base_sd):
    path = save_esmpp(tmp_path / "t.safetensors", routed.merged_sd, routed.experts, {**routed.config, "alpha": 0.4})
    again = load_routed(path)
    assert again.config["family"] == "bert" and again.config["alpha"] == 0.4 and again.keys == routed.keys
    x = packed([6, 4, 2])
    with torch.no_grad():
        for mode in ("route", "fixed:c", "base"):
            assert torch.equal(again(x, mode=mode), routed(x, mode=mode))
            assert torch.equal(again.last_log.cos, routed.last_log.cos)
    merged, ex, cfg = load_esmpp(path, base=base_sd)
    assert ex.keys == routed.experts.keys and cfg["model_config"]["num_hidden_layers"] == 2
    plain = {k: v for k, v in cfg.items() if k not in ("family", "model_config", "esmpp")}
    save_esmpp(tmp_path / "nofamily.safetensors", merged, ex, plain)
    with pytest.raises(CheckpointError, match="build_visual"):
        load_routed(tmp_path / "nofamily.safetensors")
    assert torch.equal(load_routed(tmp_path / "nofamily.safetensors", encoder)(x), routed(x))
    save_safetensors(base_sd, tmp_path / "plain.safetensors", {"method": "ta"})
    with pytest.raises(CheckpointError, match="not an ESM"):
        load_routed(tmp_path / "plain.safetensors")


# ---------------------------------------------------------------- experts from text statistics

def proxy_stats(tasks, keys, proxies):
    """Stats of each task's inputs inside its own fine-tuned model, padding rows excluded (§8)."""
    inputs = {}
    for t, sd in tasks.items():
        inputs[t] = bert.layer_inputs(encoder(sd).model, bert.unpack(proxies[t]), keys)
    return stats_from_inputs(inputs), inputs


def test_build_experts_on_text_stats_is_the_esd_of_the_residual(base_sd):
    tasks = task_sds(base_sd, seed=3)
    keys = routed_keys_of(base_sd)
    proxies = {t: packed([8, 5, 3, 6], seed=10 + i) for i, t in enumerate(TASKS)}
    stats, inputs = proxy_stats(tasks, keys, proxies)
    assert inputs["a"][keys[0]].shape == (8 + 5 + 3 + 6, 16)         # real tokens only
    merged = {k: torch.stack([tasks[t][k] for t in TASKS]).mean(0) for k in base_sd}
    r = 3
    ex = build_experts(merged, tasks, stats, rank=r)
    assert ex.keys == keys
    for k in keys:
        for i, t in enumerate(TASKS):
            st = stats["tasks"][t][k] if "tasks" in stats else stats[t][k]
            delta = (tasks[t][k] - merged[k]).double()
            P, _ = esd_exact(delta, st.gram, st.n)
            b, a = ex.B[k][i].double(), ex.A[k][i].double()
            torch.testing.assert_close(b @ b.mT, P[:, :r] @ P[:, :r].mT, rtol=0, atol=1e-5)   # top-r directions
            torch.testing.assert_close(a, b.mT @ delta, rtol=0, atol=1e-5)                    # At = Btᵀ δWt
            torch.testing.assert_close(b @ a, esd_truncate(delta, P, r), rtol=0, atol=1e-5)
            want = F.normalize(inputs[t][k].double().mean(0), dim=0)     # mean over non-padding tokens
            torch.testing.assert_close(ex.prototypes[k][i].double(), want, rtol=0, atol=1e-5)
        grp = bert.input_group(k)
        torch.testing.assert_close(ex.prototypes[k], ex.prototypes[grp], rtol=0, atol=1e-6)   # Q = K = V input


def test_tasks_with_different_inputs_route_to_their_own_expert(base_sd):
    """Task a's sentences use tokens 2–6, task b's 40–44, whose embeddings lie apart (± a shift along one
    direction): every group routes each test sentence of a mixed, padded batch to its task."""
    base_sd = dict(base_sd)
    emb = base_sd["embeddings.word_embeddings.weight"].clone()
    u = F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(9)), dim=0)
    emb[2:7] += 0.1 * u
    emb[40:45] -= 0.1 * u
    base_sd["embeddings.word_embeddings.weight"] = emb
    tasks = {t: sd for t, sd in task_sds(base_sd, seed=8).items() if t != "c"}
    ranges = {"a": (2, 7), "b": (40, 45)}
    keys = routed_keys_of(base_sd)
    proxies = {t: packed([8, 6, 7, 5, 8, 4], seed=20 + i, lo=ranges[t][0], hi=ranges[t][1])
               for i, t in enumerate(tasks)}
    stats, _ = proxy_stats(tasks, keys, proxies)
    merged = {k: (tasks["a"][k] + tasks["b"][k]) / 2 for k in base_sd}
    ex = build_experts(merged, tasks, stats, rank=4)
    r = build_routed(merged, ex, encoder)
    xa = packed([6, 8, 3], seed=30, lo=2, hi=7)
    xb = packed([5, 7, 8], seed=31, lo=40, hi=45)
    L = max(xa.shape[2], xb.shape[2])
    x = torch.cat([F.pad(xa, (0, L - xa.shape[2])), F.pad(xb, (0, L - xb.shape[2]))])   # one mixed, padded batch
    with torch.no_grad():
        out = r(x, true_task=["a"] * 3 + ["b"] * 3)
    assert routing_accuracy(r.last_log).tolist() == [1.0] * 4
    with torch.no_grad():
        torch.testing.assert_close(out, r(x, true_task=["a"] * 3 + ["b"] * 3, mode="oracle"), rtol=0, atol=ATOL)


# ---------------------------------------------------------------- the pool pipeline dispatches on the module

class FakeTextPool:
    """The parts of a text TaskPool that build_esmpp uses: build_model returns a bert.TextEncoder."""
    family = "bert"

    def __init__(self, base, tasks):
        self.name, self.base, self.tasks = "fake-text", base, tasks

    @property
    def task_names(self):
        return list(self.tasks)

    def build_model(self, sd, device="cpu"):
        return encoder(sd).to(device)


def test_build_esmpp_on_a_text_pool(base_sd):
    from esm_core.evaluation.esmpp import build_esmpp
    tasks = task_sds(base_sd, seed=12)
    all_keys = bert.esd_keys(base_sd)                        # ESM's ESD runs on all six types (§8)
    proxies = {t: packed([8, 5, 6], seed=40 + i) for i, t in enumerate(TASKS)}
    stats, _ = proxy_stats(tasks, all_keys, proxies)
    routed = build_esmpp(FakeTextPool(base_sd, tasks), stats, rank=2, alpha=0.5, device="cpu")
    assert isinstance(routed.visual, bert.TextEncoder) and routed.config["family"] == "bert"
    assert routed.experts.keys == routed_keys_of(base_sd) and len(routed.keys) == 4
    x = packed([6, 4])
    with torch.no_grad():
        assert routed(x).shape == (2, 16)
