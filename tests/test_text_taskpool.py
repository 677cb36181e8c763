"""TextTaskPool: the built text pool through the same code paths as an image pool (evaluation, probe, α
policy, merges), with §8's rules: each task's own biases, padding excluded, the recorded proxy sentences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from esm_core.evaluation import evaluate, reference_accuracies
from esm_core.evaluation.runs import evaluate_method
from esm_core.models import bert
from esm_core.pools import text_build as tb
from esm_core.pools.text_pool import TextTaskPool, load_text_task_pool
from esm_core.probe import probe_pool


@pytest.fixture(scope="module")
def tpool(tiny_text_pool_dir):
    return load_text_task_pool(tiny_text_pool_dir[0])


def test_inputs_are_packed_tokens_with_mask(tpool):
    x, y = tpool.inputs("colours", "test")
    texts, labels = tpool.texts("colours", "test")
    assert x.dtype == torch.int64 and x.shape[:2] == (len(texts), 2) and torch.equal(y, torch.as_tensor(labels))
    assert int(x[:, 1].sum()) == int(bert.token_mask(bert.tokenize(tpool.tokenizer, texts, 16)).sum())
    with pytest.raises(ValueError, match="split"):
        tpool.texts("colours", "train")
    with pytest.raises(ValueError, match="no task"):
        tpool.inputs("nope")
    with pytest.raises(ValueError, match=r"\(N, 2, L\)"):
        bert.unpack(torch.zeros(3, 16))


def test_reference_accuracies_equal_the_recorded_ones(tpool, tiny_text_pool_dir):
    """Zero-shot = base + heads with the base's own biases; fine-tuned = each task's model: both as recorded."""
    cfg = tiny_text_pool_dir[1]
    ref = reference_accuracies(tpool, "test", device="cpu")
    for t in tpool.task_names:
        assert ref["finetuned"][t] == pytest.approx(cfg["accuracy"][t]["finetuned_test"])
        assert ref["zeroshot"][t] == pytest.approx(cfg["accuracy"][t]["zeroshot_test"])


def test_own_biases_are_put_in_per_task(tpool):
    """Evaluating a state dict with the base's biases scores each task with that task's own biases (§8)."""
    roles = bert.roles_of(tpool.base)
    mixed = {k: (tpool.base[k] if roles[k] == bert.OWN else tpool.tasks["animals"][k]) for k in tpool.base}
    got = evaluate(tpool, mixed, "test", ["animals"], device="cpu")["animals"]
    want = evaluate(tpool, tpool.tasks["animals"], "test", ["animals"], device="cpu")["animals"]
    assert got == want
    enc = tpool.build_model(tpool.base)
    b = "encoder.layer.0.attention.self.query.bias"
    tpool.prepare(enc, "animals")
    assert torch.equal(enc.model.get_parameter(b).detach(), tpool.tasks["animals"][b])
    assert not torch.equal(tpool.tasks["animals"][b], tpool.base[b])


def _by_hand_stats(raw: dict, tok) -> dict:
    """§8 by hand: per task, the inputs of every ESD layer inside the task's own model on its recorded proxy
    sentences, padding tokens dropped (bert.layer_inputs), Q/K/V recorded once."""
    from esm_core.merging.stats import stats_from_inputs
    keys = bert.esd_keys(raw["base"])
    groups = {k: bert.input_group(k) for k in keys}
    out = {}
    for t, sd in raw["tasks"].items():
        model = bert.build(sd, raw["model_config"])
        texts = [raw["data"][t]["val"][0][i] for i in raw["data"][t]["proxy_ids"]]
        X = bert.layer_inputs(model, bert.tokenize(tok, texts, 16), list(dict.fromkeys(groups.values())))
        st = stats_from_inputs({t: X})["tasks"][t]
        out[t] = {k: st[g] for k, g in groups.items()}
    return {"tasks": out}


def test_probe_pool_equals_the_statistics_by_hand(tpool, tiny_text_pool_dir):
    """The generic probe on the text pool: padding-free rows of the six types on the recorded proxy sentences,
    Q/K/V sharing one entry."""
    st = probe_pool(tpool, n=len(tpool.data["colours"]["proxy_ids"]), device="cpu")
    raw = tb.load_text_pool(tiny_text_pool_dir[0])
    ref = _by_hand_stats(raw, tb.load_tokenizer(tiny_text_pool_dir[0]))
    for t in tpool.task_names:
        assert st["proxy_ids"][t] == [int(i) for i in tpool.data[t]["proxy_ids"]]
        assert set(st["tasks"][t]) == set(ref["tasks"][t]) and len(st["tasks"][t]) == 12
        for k, a in st["tasks"][t].items():
            b = ref["tasks"][t][k]
            assert a.n == b.n
            torch.testing.assert_close(a.gram, b.gram, rtol=1e-5, atol=1e-4)
        q = "encoder.layer.1.attention.self.query.weight"
        assert st["tasks"][t][q] is st["tasks"][t][q.replace("query", "key")]


def test_generic_evaluation_equals_the_rule_by_hand(tpool, tiny_text_pool_dir):
    """ESM through the generic evaluation (evaluate_method, the α policy's affine updates) scores what §8 says,
    computed by hand: the update at α = 1 scaled by α on every key, each task with its own biases and head."""
    stats = probe_pool(tpool, n=8, device="cpu")
    res = evaluate_method(tpool, "esm", alpha=0.7, stats=stats, device="cpu")
    raw = tb.load_text_pool(tiny_text_pool_dir[0])
    model = bert.build(raw["base"], raw["model_config"])
    from esm_core.merging import apply_updates, merge_updates
    ups = merge_updates("esm", raw["base"], raw["tasks"], alpha=1.0, stats=stats)
    merged = apply_updates(raw["base"], bert.scale_updates(ups, 0.7))
    tok, roles = tb.load_tokenizer(tiny_text_pool_dir[0]), bert.roles_of(raw["base"])
    want = {}
    for t in raw["tasks"]:
        bert.load_state(model, bert.with_own(merged, raw["tasks"][t], roles))
        want[t] = tb.accuracy(model, raw["heads"][t], tok, *raw["data"][t]["test"], max_length=16)
    assert {t: r["abs"] for t, r in res["tasks"].items()} == pytest.approx(want)


def test_subset_and_errors(tpool):
    sub = tpool.subset(["animals"])
    assert sub.task_names == ["animals"] and sub.base is tpool.base
    with pytest.raises(ValueError, match="no head"):
        TextTaskPool(name="x", model_config=tpool.model_config, base=tpool.base, tasks={"a": tpool.base}, heads={},
                     class_names={"a": ["p"]}, data={"a": {}}, tokenizer=tpool.tokenizer)
    x, ids = tpool.proxy("colours", n=4, seed=3)
    assert x.shape[0] == 4 and ids == sorted(ids)
    f = torch.zeros(2, 32)
    assert torch.equal(tpool.logits("colours", f), tpool.heads["colours"]["bias"].expand(2, -1))
    xs, ys, texts = tpool.samples("colours", 3)
    assert len(texts) == 3 and xs.shape[0] == 3 and isinstance(texts[0], str)
    assert np.all(ys.numpy() < 3)


def test_esmpp_on_the_text_pool(tpool):
    """ESM++ through the generic pipeline on the text pool: routed and oracle rows, routing accuracy per routed
    input group, each task scored with its own biases; the oracle row equals the dense model W_ESM + B_t A_t."""
    from esm_core.evaluation.esmpp import build_esmpp, evaluate_esmpp, evaluate_routed
    stats = probe_pool(tpool, n=8, device="cpu")
    rows = evaluate_esmpp(tpool, {"rank": 4}, alpha=0.8, stats=stats, device="cpu")
    assert set(rows) == {"esmpp-r4", "esmpp-r4-oracle"}
    ra = rows["esmpp-r4"]["routing_accuracy"]
    assert len(ra) == 4 and all(0.0 <= a <= 1.0 for a in ra.values())       # 2 layers × (QKV group, intermediate)
    routed = build_esmpp(tpool, stats, rank=4, alpha=0.8, device="cpu")
    accs, log = evaluate_routed(tpool, routed, "test", mode="oracle")
    assert accs == pytest.approx({t: r["abs"] for t, r in rows["esmpp-r4-oracle"]["tasks"].items()})
    assert bool((log.chosen == log.true[:, None]).all())
    for t in tpool.task_names:                          # oracle == the dense merged + expert model, own biases
        dense = dict(routed.merged_sd)
        for k in routed.experts.keys:
            dense[k] = dense[k] + routed.experts.delta(k, t)
        dense = bert.with_own(dense, tpool.tasks[t], bert.roles_of(tpool.base))
        want = evaluate(tpool, dense, "test", [t], device="cpu")[t]
        assert accs[t] == pytest.approx(want)


def test_prepare_none_restores_the_base_biases(tpool):
    enc = tpool.build_model(tpool.base)
    b = "encoder.layer.1.output.dense.bias"
    tpool.prepare(enc, "colours")
    assert torch.equal(enc.model.get_parameter(b).detach(), tpool.tasks["colours"][b])
    tpool.prepare(enc, None)
    assert torch.equal(enc.model.get_parameter(b).detach(), tpool.base[b])
