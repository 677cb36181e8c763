"""ESM++ routing (methods §7): experts, routed layers, per-sample routing, decision log, save/load."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esm_core.models import openclip_vit as vit
from esm_core.checkpoints import CheckpointError, save_safetensors
from esm_core.merging.esd import esd, esd_truncate
from esm_core.esmpp import (DecisionLog, Experts, RoutedAttention, RoutedLinear, build_experts, build_routed,
                            confusion, load_esmpp, majority_task, routed_keys_of, routing_accuracy, routing_embedding,
                            save_esmpp)
from esm_core.esmpp.model import _Router
from esm_core.evaluation.esmpp import build_esmpp, evaluate_routed, expert_scores

MODEL = "esmpp-test-tiny"
CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                       "head_width": 32},
       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TASKS = ["a", "b", "c"]


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def model_name(tmp_path_factory):
    import open_clip
    path = tmp_path_factory.mktemp("cfg") / f"{MODEL}.json"
    path.write_text(json.dumps(CFG))
    open_clip.add_model_config(path)
    return MODEL


def make_build_visual(name):
    import open_clip

    def build(sd):
        logging.disable(logging.WARNING)          # "no pretrained weights loaded"
        try:
            visual = open_clip.create_model(name, pretrained=None).visual
        finally:
            logging.disable(logging.NOTSET)
        visual.load_state_dict({k[len("visual."):]: v for k, v in sd.items()})
        return visual.eval()
    return build


@pytest.fixture(scope="module")
def base_sd(model_name):
    import open_clip
    torch.manual_seed(0)
    logging.disable(logging.WARNING)
    try:
        visual = open_clip.create_model(model_name, pretrained=None).visual
    finally:
        logging.disable(logging.NOTSET)
    return {f"visual.{k}": v.detach().clone() for k, v in visual.state_dict().items()}


def gram_stats(x: torch.Tensor) -> SimpleNamespace:
    """LayerStats-shaped statistics of rows x (n × d_in)."""
    x = x.to(torch.float64)
    return SimpleNamespace(gram=x.mT @ x, n=x.shape[0], mean=x.mean(0))


def random_experts(base_sd, keys, rank=3, scale=0.05, seed=0, protos=None) -> Experts:
    g = torch.Generator().manual_seed(seed)
    A, B, P = {}, {}, {}
    for k in keys:
        d_out, d_in = base_sd[k].shape
        A[k] = scale * torch.randn(len(TASKS), rank, d_in, generator=g)
        B[k] = torch.randn(len(TASKS), d_out, rank, generator=g) / d_out ** 0.5
        P[k] = F.normalize(torch.randn(len(TASKS), d_in, generator=g), dim=-1)
        if protos is not None:                     # (drawn anyway, so that A and B do not depend on protos)
            P[k] = protos[k]
    return Experts(tasks=list(TASKS), keys=list(keys), rank=rank, A=A, B=B, prototypes=P,
                   base_params=sum(v.numel() for v in base_sd.values()))


def images(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    if n > 1:
        x[1] = 3 * x[1] + 2                        # a clearly different second image
    return x


def task_sds(base_sd, seed=0, rank=2):
    """Fine-tuned models: base + a rank-`rank` update on every matrix key (small)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in TASKS:
        sd = {}
        for k, v in base_sd.items():
            if v.ndim == 2:
                u = torch.randn(v.shape[0], rank, generator=g)
                w = torch.randn(rank, v.shape[1], generator=g)
                sd[k] = v + 0.02 * u @ w / v.shape[1] ** 0.5
            else:
                sd[k] = v.clone()
        out[t] = sd
    return out


# ---------------------------------------------------------------- routed linear layer

def make_linear(kind="route", fixed=None, d_out=6, d_in=5, r=2, seed=0, protos=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    A = torch.randn(len(TASKS), r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(len(TASKS), d_out, r, generator=g, dtype=torch.float64)
    P = F.normalize(torch.randn(len(TASKS), d_in, generator=g, dtype=torch.float64), dim=-1) if protos is None \
        else protos
    router = _Router(1)
    router.kind, router.fixed = kind, fixed
    return RoutedLinear(W, b, A, B, P, router, 0), W, b, A, B, P


def test_routed_linear_equals_dense_reference_for_fixed_task():
    for t in range(len(TASKS)):
        lin, W, b, A, B, _ = make_linear("fixed", t)
        x = torch.randn(4, 7, 5, dtype=torch.float64)
        dense = x @ (W + B[t] @ A[t]).mT + b                     # (W_ESM + B_t A_t) x + b
        torch.testing.assert_close(lin(x), dense, rtol=1e-12, atol=1e-12)


def test_routed_linear_base_mode_is_the_plain_layer():
    lin, W, b, *_ = make_linear("base")
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(lin(x), x @ W.mT + b, rtol=1e-12, atol=1e-12)


def test_sample_whose_mean_input_is_a_prototype_routes_to_that_task():
    P = torch.eye(3, 5, dtype=torch.float64)                  # prototypes e0, e1, e2
    lin, W, b, A, B, _ = make_linear("route", protos=P)
    lin.router.records = [None]
    # sample 0: tokens average to 2·e2; sample 1: average to 0.5·e1 (tokens themselves differ)
    noise = torch.randn(2, 4, 5, dtype=torch.float64)
    noise = noise - noise.mean(1, keepdim=True)
    x = noise + torch.stack([2 * P[2], 0.5 * P[1]])[:, None, :]
    y = lin(x)
    cos, routed, chosen, pooled = lin.router.records[0]
    assert routed.tolist() == [2, 1] and chosen.tolist() == [2, 1]
    torch.testing.assert_close(cos[0, 2].double(), torch.tensor(1.0, dtype=torch.float64))
    for i, t in enumerate([2, 1]):                             # each sample used its own expert
        torch.testing.assert_close(y[i], x[i] @ (W + B[t] @ A[t]).mT + b, rtol=1e-12, atol=1e-12)


def test_routed_linear_refuses_factors_that_do_not_fit():
    W = torch.zeros(6, 5)
    with pytest.raises(ValueError, match="do not fit"):
        RoutedLinear(W, None, torch.zeros(3, 2, 4), torch.zeros(3, 6, 2), torch.zeros(3, 5), _Router(1), 0)
    with pytest.raises(ValueError, match="prototypes"):
        RoutedLinear(W, None, torch.zeros(3, 2, 5), torch.zeros(3, 6, 2), torch.zeros(2, 5), _Router(1), 0)


# ---------------------------------------------------------------- routed attention

@pytest.mark.parametrize("batch_first", [True, False])
def test_routed_attention_with_zero_experts_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ref.load_state_dict(mha.state_dict())
    T, r = 3, 2
    lin = RoutedLinear(mha.in_proj_weight, mha.in_proj_bias, torch.zeros(T, r, 16), torch.zeros(T, 48, r),
                       F.normalize(torch.randn(T, 16), dim=-1), _Router(1), 0)
    att = RoutedAttention(mha, lin).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    with torch.no_grad():
        want = ref(x, x, x, need_weights=False)[0]
        got, w = att(x, x, x, need_weights=False)
        assert w is None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        fmask = torch.randn(5, 5)                                 # additive float mask (as open_clip passes it)
        torch.testing.assert_close(att(x, x, x, need_weights=False, attn_mask=fmask)[0],
                                   ref(x, x, x, need_weights=False, attn_mask=fmask)[0], rtol=1e-5, atol=1e-5)
        bmask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)  # True = not allowed (MHA convention)
        torch.testing.assert_close(att(x, x, x, need_weights=False, attn_mask=bmask)[0],
                                   ref(x, x, x, need_weights=False, attn_mask=bmask)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="self-attention"):
        att(x, torch.randn_like(x), x)


def test_zero_experts_tower_equals_the_merged_tower(model_name, base_sd):
    keys = routed_keys_of(base_sd)
    assert len(keys) == 4 and {vit.layer_type(k) for k in keys} == set(vit.ROUTED_TYPES)
    ex = random_experts(base_sd, keys, scale=0.0)
    build = make_build_visual(model_name)
    routed = build_routed(base_sd, ex, build)
    plain = build(base_sd)
    x = images(3)
    with torch.no_grad():
        want = plain(x)
        for mode in ("route", "base", "fixed:b"):
            torch.testing.assert_close(routed(x, mode=mode), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the routed model

@pytest.fixture(scope="module")
def matched(model_name, base_sd):
    """A routed tower whose prototypes of task 'a' / 'b' are the pooled layer inputs of image 0 / image 1
    when that image runs with expert a / b at every layer (so routing must pick a for image 0, b for 1)."""
    keys = routed_keys_of(base_sd)
    build = make_build_visual(model_name)
    x = images(2)
    probe_model = build_routed(base_sd, random_experts(base_sd, keys), build)
    protos = {k: F.normalize(torch.randn(len(TASKS), base_sd[k].shape[1], generator=torch.Generator().manual_seed(5)),
                             dim=-1) for k in keys}
    with torch.no_grad():
        for i, t in enumerate(["a", "b"]):
            probe_model(x[i:i + 1], mode=f"fixed:{t}")
            for li, k in enumerate(probe_model.keys):
                protos[k][TASKS.index(t)] = F.normalize(probe_model.last_log.pooled[li][0], dim=-1)
    routed = build_routed(base_sd, random_experts(base_sd, keys, protos=protos), build)
    return routed, x


def test_mixed_batch_routes_each_sample_on_its_own(matched):
    routed, x = matched
    with torch.no_grad():
        out = routed(x)
        log = routed.last_log
        assert log.chosen[0].tolist() == [0] * 4 and log.chosen[1].tolist() == [1] * 4
        cos = log.cos
        assert float((cos[0, :, 0] - cos[0, :, 1:].amax(-1)).min()) > 1e-3     # a clear decision, not a tie
        torch.testing.assert_close(cos[0, :, 0], torch.ones(4), rtol=0, atol=1e-5)
        torch.testing.assert_close(cos[1, :, 1], torch.ones(4), rtol=0, atol=1e-5)
        for i, t in enumerate(["a", "b"]):
            torch.testing.assert_close(out[i:i + 1], routed(x[i:i + 1]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[i:i + 1], routed(x[i:i + 1], mode=f"fixed:{t}"), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(routed(x[0:1], mode="fixed:a"), routed(x[0:1], mode="fixed:b"))


def test_oracle_mode_uses_the_given_tasks(matched):
    routed, x = matched
    with torch.no_grad():
        out = routed(x, true_task=["c", "a"], mode="oracle")
        log = routed.last_log
        assert log.chosen.tolist() == [[2] * 4, [0] * 4]
        assert log.true.tolist() == [2, 0]
        assert log.routed[:, 0].tolist() == [0, 1]                       # what the router would have done
        torch.testing.assert_close(out[0:1], routed(x[0:1], mode="fixed:c"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:2], routed(x[1:2], mode="fixed:a"), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="true task"):
            routed(x, mode="oracle")
        with pytest.raises(ValueError, match="2 samples"):
            routed(x, true_task=["a"], mode="oracle")
        with pytest.raises(ValueError, match="no expert for task"):
            routed(x, true_task="zzz")
        with pytest.raises(ValueError, match="unknown routing mode"):
            routed(x, mode="soft")
        with routed.using(mode="oracle", true_task="b"):
            routed(x)
            assert routed.last_log.chosen.unique().tolist() == [1]
        assert routed.mode == "route" and routed.true_task is None


def test_base_mode_applies_no_expert(matched, model_name, base_sd):
    routed, x = matched
    with torch.no_grad():
        out = routed(x, mode="base")
        assert (routed.last_log.chosen == -1).all()
        torch.testing.assert_close(out, make_build_visual(model_name)(base_sd)(x), rtol=1e-5, atol=1e-5)


def test_decision_log_contents_and_collection(matched):
    routed, x = matched
    with torch.no_grad(), routed.logging() as log, routed.logging(keep_inputs=True) as full:
        routed(x, true_task=["a", "c"])
        routed(x[:1])
    L, T = 4, 3
    assert log.n == 3 and log.cos.shape == (3, L, T) and log.chosen.shape == (3, L) and log.pooled is None
    assert torch.equal(log.routed, log.cos.argmax(-1)) and torch.equal(log.chosen, log.routed)
    assert log.true.tolist() == [0, 2, -1]
    assert full.pooled is not None and [p.shape for p in full.pooled] == [(3, 64)] * 4
    assert log.keys == routed.keys and log.tasks == TASKS
    assert routed.last_log.n == 1 and routed._collectors == []
    acc = routing_accuracy(log)                       # sample 0 (a) routes to a, sample 1 (c) routes to b
    assert acc.tolist() == [0.5] * 4
    cm = confusion(log, layer=0)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    assert int(confusion(log).sum()) == 2 * L


def test_log_statistics_on_a_hand_made_log():
    routed = torch.tensor([[0, 0, 1], [1, 2, 2], [2, 2, 2], [0, 1, 1]])
    true = torch.tensor([0, 2, 2, -1])
    cos = F.one_hot(routed, 3).float()
    log = DecisionLog(tasks=TASKS, keys=["l0", "l1", "l2"], cos=cos, routed=routed, chosen=routed, true=true)
    torch.testing.assert_close(routing_accuracy(log), torch.tensor([2 / 3, 1.0, 2 / 3], dtype=torch.float64))
    assert confusion(log, "l1").tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 2]]
    assert confusion(log).tolist() == [[2, 1, 0], [0, 0, 0], [0, 1, 5]]
    top, share = majority_task(log)
    assert top.tolist() == [0, 2, 2, 1]
    torch.testing.assert_close(share, torch.tensor([2 / 3, 2 / 3, 1.0, 2 / 3], dtype=torch.float64))
    log.true = torch.full((4,), -1)
    with pytest.raises(ValueError, match="true task"):
        routing_accuracy(log)


def test_expert_scores_pick_the_expert_that_fits_the_label(matched):
    routed, x = matched
    head = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = {t: routed(x, mode=f"fixed:{t}") for t in TASKS}
    y = (feats["c"] @ head.T).argmax(-1)
    s = expert_scores(routed, x, y, lambda f: f @ head.T, batch_size=1)
    assert s.shape == (2, 3)
    for j, t in enumerate(TASKS):
        want = torch.log_softmax((feats[t] @ head.T).double(), -1).gather(1, y[:, None])[:, 0]
        torch.testing.assert_close(s[:, j], want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- building the experts

def test_expert_of_full_rank_reproduces_the_finetuned_layer(base_sd):
    keys = routed_keys_of(base_sd)
    tasks = task_sds(base_sd, rank=2)                  # residual δW = Wt − W_ESM has rank 2 on every key
    g = torch.Generator().manual_seed(7)
    stats = {t: {k: gram_stats(torch.randn(40, base_sd[k].shape[1], generator=g) + 0.3) for k in keys}
             for t in TASKS}
    ex = build_experts(base_sd, tasks, stats, rank=4)
    for k in keys:
        d_out, d_in = base_sd[k].shape
        assert ex.A[k].shape == (3, 4, d_in) and ex.B[k].shape == (3, d_out, 4)
        for t in TASKS:
            torch.testing.assert_close(base_sd[k] + ex.delta(k, t), tasks[t][k], rtol=0, atol=1e-6)
    # rank 1 < rank(δW): B = top ESD direction, A = Bᵀ δW, i.e. the ESD truncation P̂P̂ᵀδW
    ex1 = build_experts(base_sd, tasks, stats, rank=1, routed_keys=keys[:1])
    k, t = keys[0], "b"
    delta = (tasks[t][k] - base_sd[k]).double()
    P = esd(delta, stats[t][k].gram, stats[t][k].n).P
    torch.testing.assert_close(ex1.delta(k, t).double(), esd_truncate(delta, P, 1), rtol=0, atol=1e-6)
    b = ex1.B[k][1].double()
    torch.testing.assert_close(b.mT @ b, torch.eye(1, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(ex1.A[k][1].double(), b.mT @ delta, rtol=0, atol=1e-6)
    # prototypes are the L2-normalised input means
    torch.testing.assert_close(ex.prototypes[k][2].double(), F.normalize(stats["c"][k].mean, dim=0),
                               rtol=0, atol=1e-6)


def test_build_experts_reads_each_task_layer_once(tmp_path, base_sd):
    """From lazy checkpoints (the app's pools): each routed layer of each task is read from disk once, not a
    second time for its shape, and the experts equal those built from the tensors in memory."""
    from esm_core.lazy import LazyCheckpoint
    keys = routed_keys_of(base_sd)
    tasks = task_sds(base_sd, rank=2)
    lazy = {}
    for t in TASKS:
        save_safetensors(tasks[t], tmp_path / f"{t}.safetensors")
        lazy[t] = LazyCheckpoint(tmp_path / f"{t}.safetensors")
    g = torch.Generator().manual_seed(3)
    stats = {t: {k: gram_stats(torch.randn(40, base_sd[k].shape[1], generator=g)) for k in keys} for t in TASKS}
    ex = build_experts(base_sd, lazy, stats, rank=3)
    assert all(sorted(lazy[t].read_keys) == sorted(keys) for t in TASKS)
    want = build_experts(base_sd, tasks, stats, rank=3)
    assert all(torch.equal(ex.A[k], want.A[k]) and torch.equal(ex.B[k], want.B[k]) for k in keys)


def test_build_experts_refuses_bad_input(base_sd):
    keys = routed_keys_of(base_sd)
    tasks = task_sds(base_sd)
    stats = {t: {k: gram_stats(torch.randn(10, base_sd[k].shape[1])) for k in keys} for t in TASKS}
    with pytest.raises(ValueError, match="rank"):
        build_experts(base_sd, tasks, stats, rank=0)
    with pytest.raises(ValueError, match="no routed layers"):
        build_experts(base_sd, tasks, stats, routed_keys=[])
    with pytest.raises(ValueError, match="task 'c'"):
        build_experts(base_sd, tasks, {t: stats[t] for t in ["a", "b"]})
    bad = {t: dict(s) for t, s in stats.items()}
    bad["a"][keys[0]] = SimpleNamespace(gram=stats["a"][keys[0]].gram, n=10, mean=torch.zeros(64))
    with pytest.raises(ValueError, match="zero"):
        build_experts(base_sd, tasks, bad)


def test_storage_accounting_for_known_shapes(base_sd):
    keys = routed_keys_of(base_sd)                    # 2 blocks × (in_proj 192×64, c_fc 256×64)
    st = random_experts(base_sd, keys, rank=4).storage()
    factors = 2 * (4 * (192 + 64) + 4 * (256 + 64))
    assert st["factors_per_task"] == factors == 4608
    assert st["prototypes_per_task"] == 4 * 64
    assert st["per_task"] == factors + 256 and st["total"] == 3 * (factors + 256)
    base = sum(v.numel() for v in base_sd.values())
    assert st["share_total"] == pytest.approx(3 * (factors + 256) / base)
    # ViT-B/32: 82,944·r factor parameters per task (methods §7)
    vk = [f"visual.transformer.resblocks.{i}.{t}" for i in range(12) for t in vit.ROUTED_TYPES]
    shapes = {vit.IN_PROJ: (2304, 768), vit.C_FC: (3072, 768)}
    r = 32
    A = {k: torch.empty(8, r, 768, device="meta") for k in vk}
    B = {k: torch.empty(8, shapes[vit.layer_type(k)][0], r, device="meta") for k in vk}
    P = {k: torch.empty(8, 768, device="meta") for k in vk}
    vb = Experts(tasks=[str(i) for i in range(8)], keys=vk, rank=r, A=A, B=B, prototypes=P).storage()
    assert vb["factors_per_task"] == 82_944 * r and vb["share_total"] is None


# ---------------------------------------------------------------- save / load

def test_save_load_round_trip_is_exact(tmp_path, matched, model_name, base_sd):
    routed, x = matched
    path = save_esmpp(tmp_path / "m.safetensors", base_sd, routed.experts, {"alpha": 0.7, "rank": 3})
    assert not [p for p in tmp_path.iterdir() if p.name != "m.safetensors"]        # no temp file left
    merged, ex, cfg = load_esmpp(path, base=base_sd)
    assert cfg["alpha"] == 0.7 and cfg["esmpp"]["tasks"] == TASKS
    assert set(merged) == set(base_sd) and all(torch.equal(merged[k], base_sd[k]) for k in base_sd)
    assert ex.tasks == TASKS and ex.keys == routed.experts.keys and ex.rank == 3
    for k in ex.keys:
        assert torch.equal(ex.A[k], routed.experts.A[k]) and torch.equal(ex.B[k], routed.experts.B[k])
        assert torch.equal(ex.prototypes[k], routed.experts.prototypes[k])
    again = build_routed(merged, ex, make_build_visual(model_name))
    with torch.no_grad():
        assert torch.equal(again(x), routed(x))
        assert torch.equal(again.last_log.chosen, routed.last_log.chosen)


def test_routed_model_keeps_one_copy_of_the_merged_weights(model_name, base_sd):
    """``merged_sd`` (what save_esmpp writes) is the tower's own tensors, equal to the merged state dict given."""
    keys = routed_keys_of(base_sd)
    merged = {k: v.clone() for k, v in base_sd.items()}
    routed = build_routed(merged, random_experts(base_sd, keys), make_build_visual(model_name))
    own = {p.data_ptr() for p in routed.visual.parameters()}
    assert set(routed.merged_sd) == set(base_sd)
    assert all(torch.equal(routed.merged_sd[k], base_sd[k]) for k in base_sd)
    shared = [k for k, v in routed.merged_sd.items() if v.data_ptr() in own]
    assert len(shared) == len([k for k in base_sd if base_sd[k].is_floating_point()]) > 0
    assert all(routed.merged_sd[k].data_ptr() != merged[k].data_ptr() for k in merged)


def test_load_refuses_files_that_do_not_fit(tmp_path, matched, base_sd):
    routed, _ = matched
    path = save_esmpp(tmp_path / "m.safetensors", base_sd, routed.experts)
    from safetensors.torch import load_file
    from esm_core.checkpoints import read_config
    tensors, cfg = load_file(str(path)), read_config(path)
    key = routed.experts.keys[1]
    bad = dict(tensors)
    bad[f"esmpp.B.{key}"] = torch.zeros(3, 7, 3)
    save_safetensors(bad, tmp_path / "bad.safetensors", cfg)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_esmpp(tmp_path / "bad.safetensors")
    missing = {k: v for k, v in tensors.items() if k != f"esmpp.A.{key}"}
    save_safetensors(missing, tmp_path / "missing.safetensors", cfg)
    with pytest.raises(CheckpointError, match="missing"):
        load_esmpp(tmp_path / "missing.safetensors")
    other = dict(base_sd)
    k0 = "visual.proj"
    other[k0] = torch.zeros(64, 16)
    with pytest.raises(CheckpointError, match="proj"):
        load_esmpp(path, base=other)
    save_safetensors(base_sd, tmp_path / "plain.safetensors", {"method": "ta"})
    with pytest.raises(CheckpointError, match="not an ESM\\+\\+ file"):
        load_esmpp(tmp_path / "plain.safetensors")


# ---------------------------------------------------------------- 2-D view

def test_routing_embedding_small_inputs_use_pca(matched):
    routed, x = matched
    with torch.no_grad(), routed.logging(keep_inputs=True) as log:
        routed(x, true_task=["a", "b"])
    emb = routing_embedding(log, 2, routed.experts, seed=0)
    assert emb["method"] == "pca" and "PCA" in emb["note"]
    assert emb["points"].shape == (2, 2) and emb["prototype_points"].shape == (3, 2)
    assert emb["true"] == ["a", "b"] and emb["routed"] == ["a", "b"] and emb["layer"] == routed.keys[2]
    # image 0 sits on prototype a (cosine 1): same point in the map
    assert abs(emb["points"][0] - emb["prototype_points"][0]).max() < 1e-4
    again = routing_embedding(log, routed.keys[2], routed.experts, seed=0)
    assert (again["points"] == emb["points"]).all()
    with pytest.raises(ValueError, match="keep_inputs"):
        with torch.no_grad(), routed.logging() as plain:
            routed(x)
        routing_embedding(plain, 0, routed.experts)


def test_routing_embedding_from_plain_tensors_routes_by_cosine():
    protos = torch.eye(3, 4)
    pts = torch.tensor([[0.1, 2.0, 0.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    emb = routing_embedding(pts, 0, protos, tasks=TASKS)
    assert emb["routed"] == ["b", "c"] and emb["true"] == [None, None]
    with pytest.raises(ValueError, match="do not fit"):
        routing_embedding(pts, 0, torch.eye(3, 5), tasks=TASKS)
    with pytest.raises(ValueError, match="'umap' or 'pca'"):
        routing_embedding(pts, 0, protos, tasks=TASKS, method="tsne")


def test_routing_embedding_pca_on_request_with_many_points():
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    pts = torch.cat([protos[i] + 0.1 * torch.randn(10, 8, generator=g) for i in range(3)])
    emb = routing_embedding(pts, "l", protos, tasks=TASKS, method="pca")
    assert emb["method"] == "pca" and emb["points"].shape == (30, 2) and emb["prototype_points"].shape == (3, 2)
    z = torch.cat([F.normalize(pts.double(), dim=-1), F.normalize(protos.double(), dim=-1)])
    zc = (z - z.mean(0)).numpy()
    coords = np.concatenate([emb["points"], emb["prototype_points"]])
    # orthonormal projection onto the top-2 principal plane: the variance kept equals the top-2 singular values²
    s = np.linalg.svd(zc, compute_uv=False)
    assert np.allclose((coords ** 2).sum(), (s[:2] ** 2).sum())
    assert np.allclose(coords.mean(0), 0, atol=1e-12)


@pytest.mark.slow
def test_routing_embedding_umap_is_deterministic():
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    pts = torch.cat([protos[i] + 0.1 * torch.randn(10, 8, generator=g) for i in range(3)])
    a = routing_embedding(pts, "l", protos, tasks=TASKS, seed=1)
    b = routing_embedding(pts, "l", protos, tasks=TASKS, seed=1)
    assert a["method"] == "umap" and a["points"].shape == (30, 2)
    assert (a["points"] == b["points"]).all() and (a["prototype_points"] == b["prototype_points"]).all()


# ---------------------------------------------------------------- whole pipeline on a (fake) TaskPool

class FakePool:
    """The parts of a TaskPool that build_esmpp / evaluate_routed use."""

    def __init__(self, name, base, tasks, build):
        self.name, self.base, self.tasks, self._build = name, base, tasks, build
        g = torch.Generator().manual_seed(11)
        self._x = {t: torch.randn(6, 3, 32, 32, generator=g) * (1 + i) for i, t in enumerate(tasks)}
        self._y = {t: torch.randint(0, 4, (6,), generator=g) for t in tasks}
        self._heads = {t: torch.randn(4, 32, generator=g) for t in tasks}
        self.cache = {}

    @property
    def task_names(self):
        return list(self.tasks)

    def build_model(self, sd, device="cpu"):
        return self._build(sd).to(device)

    def inputs(self, task, split="test"):
        return self._x[task], self._y[task]

    def logits(self, task, features):
        return features @ self._heads[task].T


def test_build_esmpp_and_evaluate_routed_on_a_pool(tmp_path, model_name, base_sd):
    from esm_core.evaluation import evaluate, merged_state
    from esm_core.probe import probe
    build = make_build_visual(model_name)
    pool = FakePool("fake", base_sd, task_sds(base_sd, rank=3), build)
    stats = {"tasks": {t: probe(build(pool.tasks[t]), pool.inputs(t)[0][:4]) for t in TASKS}, "n": 4, "seed": 0,
             "proxy_ids": {t: [0, 1, 2, 3] for t in TASKS}}
    from esm_core.merging.cache import DecompositionCache
    cache = DecompositionCache()                    # the second ESM merge below reuses the decompositions
    seen = []
    routed = build_esmpp(pool, stats, rank=4, alpha=0.5, device="cpu", cache=cache,
                         progress=lambda f, d: seen.append(f))
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    assert routed.config["alpha"] == 0.5 and routed.config["rank"] == 4 and routed.config["method"] == "esm++"
    want = merged_state(pool, "esm", None, 0.5, stats=stats, cache=cache, device="cpu")
    assert all(torch.equal(routed.merged_sd[k], want[k]) for k in want)
    assert routed.experts.keys == routed_keys_of(base_sd) and routed.experts.rank == 4
    given = build_esmpp(pool, stats, rank=4, alpha=0.5, device="cpu", cache=cache, merged=dict(want))
    assert all(torch.equal(given.merged_sd[k], want[k]) for k in want)       # the merged weights given, kept
    assert all(torch.equal(given.experts.A[k], routed.experts.A[k]) for k in routed.experts.keys)
    with pytest.raises(ValueError, match="needs the α"):
        build_esmpp(pool, stats, rank=4, device="cpu", merged=dict(want))
    with pytest.raises(ValueError, match="pool's keys"):
        build_esmpp(pool, stats, rank=4, alpha=0.5, device="cpu", merged={k: want[k] for k in list(want)[1:]})
    accs, log = evaluate_routed(pool, routed, "test", mode="oracle", batch_size=4)
    assert log.n == 18 and log.true.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert torch.equal(log.chosen, log.true[:, None].expand(-1, 4))
    for t in TASKS:
        with routed.using(mode=f"fixed:{t}"):
            assert accs[t] == evaluate(pool, routed, "test", [t])[t]
    accs_r, log_r = evaluate_routed(pool, routed, "test")
    assert set(accs_r) == set(TASKS) and routing_accuracy(log_r).shape == (4,)
    merged, ex, cfg = load_esmpp(save_esmpp(tmp_path / "p.safetensors", routed.merged_sd, routed.experts,
                                            routed.config), base=base_sd)
    assert cfg["alpha"] == 0.5 and cfg["proxy"]["ids"]["a"] == [0, 1, 2, 3]


def test_build_experts_decomposes_on_one_torch_thread_and_restores_the_count(base_sd, monkeypatch):
    """SciPy's LAPACK carries the threads of the expert ESDs; torch is set to one thread meanwhile (its spinning
    workers slowed them) and gets its count back afterwards, also when the build fails."""
    import esm_core.esmpp.experts as experts_mod
    keys = routed_keys_of(base_sd)
    tasks = task_sds(base_sd, rank=2)
    stats = {t: {k: gram_stats(torch.randn(40, base_sd[k].shape[1])) for k in keys} for t in TASKS}
    seen, real = [], experts_mod.esd

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)

    monkeypatch.setattr(experts_mod, "esd", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_experts(base_sd, tasks, stats, rank=2)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="zero"):
            bad = {t: dict(s) for t, s in stats.items()}
            bad["b"][keys[0]] = SimpleNamespace(gram=stats["b"][keys[0]].gram, n=40, mean=torch.zeros(64))
            build_experts(base_sd, tasks, bad, rank=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
