"""The BERT-family adapter (esm_core.models.bert) on tiny random BERT / RoBERTa / DistilBERT models built in code."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from esm_core import apply_updates, merge, merge_updates  # noqa: E402
from esm_core.models import bert  # noqa: E402

CONFIGS = {
    "bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 48, "vocab_size": 60, "max_position_embeddings": 40},
    "roberta": {"model_type": "roberta", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 48, "vocab_size": 60, "max_position_embeddings": 40, "pad_token_id": 1},
    "distilbert": {"model_type": "distilbert", "dim": 32, "hidden_dim": 48, "n_layers": 2, "n_heads": 2,
                   "vocab_size": 60, "max_position_embeddings": 40},
}
LINEAR_NAMES = {
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"],
    "distilbert": ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1",
                   "ffn.lin2"],
}
LINEAR_NAMES["roberta"] = LINEAR_NAMES["bert"]
LAYERS = {"bert": "encoder.layer", "roberta": "encoder.layer", "distilbert": "transformer.layer"}


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(bert.config_of(CONFIGS[family])).eval()


def sd_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_roles_and_layer_types(family):
    sd = sd_of(tiny(family))
    roles = bert.roles_of(sd)
    lt = bert.layer_types_of(sd)
    # six linear weights per layer, each with its canonical type, all MATRIX
    assert len(lt) == 12
    for i in range(2):
        for name, t in zip(LINEAR_NAMES[family], bert.LAYER_TYPES):
            k = f"{LAYERS[family]}.{i}.{name}.weight"
            assert lt[k] == t and roles[k] == bert.MATRIX
            assert bert.block_index(k) == i
            assert bert.short_key(k) == f"{i} · {t}"
            assert roles[k[: -len("weight")] + "bias"] == bert.OWN          # §8: biases stay each task's own
    assert roles["embeddings.word_embeddings.weight"] == bert.VECTOR     # averaged by the baselines (ESM: TSV-M, §8)
    assert roles["embeddings.LayerNorm.weight"] == bert.VECTOR
    assert roles["embeddings.LayerNorm.bias"] == bert.OWN
    if family != "distilbert":
        assert roles["pooler.dense.weight"] == bert.OWN                 # a head: not read by mean pooling
    assert set(bert.esd_keys(sd)) == set(lt)                              # ESD on all six types
    routed = bert.routed_keys(sd)
    assert {bert.layer_type(k) for k in routed} == {bert.QUERY, bert.KEY, bert.VALUE, bert.INTERMEDIATE}
    assert bert.matches(sd)


def test_roles_with_prefix_heads_and_buffers():
    torch.manual_seed(0)
    cls = transformers.AutoModelForSequenceClassification.from_config(
        bert.config_of({**CONFIGS["roberta"], "num_labels": 3}))
    sd = sd_of(cls)
    sd["roberta.embeddings.position_ids"] = torch.arange(40)[None]        # what old checkpoints hold
    assert bert.prefix_of(sd) == "roberta."
    assert bert.matches(sd)
    roles = bert.roles_of(sd)
    assert roles["roberta.embeddings.position_ids"] == bert.SKIP
    assert roles["classifier.dense.weight"] == bert.OWN and roles["classifier.out_proj.weight"] == bert.OWN
    assert roles["roberta.encoder.layer.1.intermediate.dense.weight"] == bert.MATRIX
    assert bert.layer_type("roberta.encoder.layer.1.attention.self.value.weight") == bert.VALUE
    assert bert.input_group("roberta.encoder.layer.1.attention.self.value.weight") == \
        "roberta.encoder.layer.1.attention.self.query.weight"
    assert bert.input_group("transformer.layer.0.attention.k_lin.weight") == "transformer.layer.0.attention.q_lin.weight"
    assert bert.input_group("encoder.layer.0.intermediate.dense.weight") == "encoder.layer.0.intermediate.dense.weight"
    # the classifier model builds into the bare encoder with the same weights
    m = bert.build(sd, {**CONFIGS["roberta"], "num_labels": 3})
    k = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(m.state_dict()[k], sd["roberta." + k])


def test_matches_rejects_other_layouts():
    vit_like = {"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2),
                "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(8, 2)}
    assert not bert.matches(vit_like)
    sd = sd_of(tiny("bert"))
    assert not bert.matches({k: v for k, v in sd.items() if "layer.1.output.dense" not in k})   # incomplete layer
    mixed = dict(sd)
    mixed["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(32, 32)          # two prefixes
    assert not bert.matches(mixed)
    assert not bert.matches({**sd, "decoder.weight": torch.zeros(2, 2)})                     # unknown key


@pytest.mark.parametrize("family", list(CONFIGS))
def test_module_for_key_is_the_linear_of_that_weight(family):
    m = tiny(family)
    sd = m.state_dict()
    keys = list(bert.layer_types_of(sd))
    assert len(keys) == 12
    for k in keys:
        mod = bert.module_for_key(m, k)
        assert isinstance(mod, torch.nn.Linear)
        assert mod.weight.data_ptr() == sd[k].data_ptr()
    prefixed = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert."}[family] + keys[0]
    assert bert.module_for_key(m, prefixed) is bert.module_for_key(m, keys[0])
    with pytest.raises(ValueError):
        bert.module_for_key(m, "embeddings.LayerNorm.weight")


@pytest.mark.parametrize("family", list(CONFIGS))
def test_build_round_trip_and_refuses_mismatched_shapes(family):
    m = tiny(family, seed=3)
    sd = sd_of(m)
    b = bert.build({k: v.half() for k, v in sd.items()}, CONFIGS[family])
    ids = torch.tensor([[5, 7, 9, 11, 3]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.allclose(bert.features(b, batch), bert.features(m, batch), atol=2e-2)
    wrong = dict(CONFIGS[family])
    if family == "distilbert":
        wrong["hidden_dim"] = 64
    else:
        wrong["intermediate_size"] = 64
    with pytest.raises(ValueError) as e:
        bert.build(sd, wrong)
    msg = str(e.value)
    name = "ffn.lin1" if family == "distilbert" else "intermediate.dense"
    assert f"layer.0.{name}.weight" in msg and "shape mismatch" in msg
    missing = {k: v for k, v in sd.items() if "layer.1." not in k}
    with pytest.raises(ValueError, match="missing keys"):
        bert.build(missing, CONFIGS[family])
    with pytest.raises(ValueError, match="unexpected keys"):
        bert.build({**sd, "encoder.extra.weight": torch.zeros(2)}, CONFIGS[family])
    with pytest.raises(ValueError, match="model_type"):
        bert.build(sd, {k: v for k, v in CONFIGS[family].items() if k != "model_type"})


def test_build_without_pooler():
    sd = {k: v for k, v in sd_of(tiny("bert")).items() if not k.startswith("pooler.")}
    m = bert.build(sd, CONFIGS["bert"])
    assert not any(k.startswith("pooler.") for k in m.state_dict())


def _tokenizer(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    return transformers.BertTokenizer(str(tmp_path / "vocab.txt"))


def test_tokenize_and_features_exclude_padding(tmp_path):
    tok = _tokenizer(tmp_path)
    m = tiny("bert", seed=1)
    batch = bert.tokenize(tok, ["the cat", "the dog sat on a mat and ran"], max_length=8)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 8)                             # truncated to max_length
    mask = bert.token_mask(batch)
    assert mask[0].tolist() == [True] * 4 + [False] * 4                   # [CLS] the cat [SEP] + padding
    alone = bert.tokenize(tok, ["the cat"], max_length=8)
    f_batch = bert.features(m, batch)
    f_alone = bert.features(m, alone)
    assert torch.allclose(f_batch[0], f_alone[0], atol=1e-5)
    # a plain mean over all positions (padding included) differs: the mask matters
    with torch.no_grad():
        h = m(**batch).last_hidden_state
    assert not torch.allclose(h[0].mean(0), f_batch[0], atol=1e-3)


def test_layer_inputs_exclude_padding(tmp_path):
    tok = _tokenizer(tmp_path)
    m = tiny("bert", seed=2)
    batch = bert.tokenize(tok, ["the cat", "the dog sat on a mat"], max_length=16)
    keys = bert.routed_keys(bert.layer_types_of(m.state_dict()))
    X = bert.layer_inputs(m, batch, keys)
    n_real = int(bert.token_mask(batch).sum())
    assert n_real < batch["input_ids"].numel()
    for k in keys:
        assert X[k].shape == (n_real, 32)
    # Q, K and V of a layer read the same input
    q = "encoder.layer.1.attention.self.query.weight"
    assert torch.equal(X[q], X["encoder.layer.1.attention.self.value.weight"])
    # per-sample means over real tokens equal those of each sentence run alone
    means = bert.layer_inputs(m, batch, keys, per_sample=True)
    alone = bert.layer_inputs(m, bert.tokenize(tok, ["the cat"], max_length=16), keys, per_sample=True)
    assert means[q].shape == (2, 32)
    assert torch.allclose(means[q][0], alone[q][0], atol=1e-5)
    assert torch.allclose(alone[q][0], bert.layer_inputs(m, bert.tokenize(tok, ["the cat"]), [q])[q].mean(0),
                          atol=1e-5)


def test_merges_run_with_adapter_roles(tmp_path):
    base_m = tiny("bert", seed=0)
    base = sd_of(base_m)
    tasks = {}
    for i, name in enumerate(["a", "b", "c"]):
        g = torch.Generator().manual_seed(10 + i)
        tasks[name] = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                       for k, v in base.items()}
    roles = bert.roles_of(base)
    lt = bert.layer_types_of(base)
    ta = merge("ta", base, tasks, alpha=0.3, roles=roles, layer_types=lt)
    own = [k for k, r in roles.items() if r == bert.OWN]
    assert own and all(torch.equal(ta[k], base[k]) for k in own)          # the export keeps the base's biases
    k = "encoder.layer.0.intermediate.dense.weight"
    expect = base[k] + 0.3 * sum(t[k] - base[k] for t in tasks.values())
    assert torch.allclose(ta[k], expect, atol=1e-6)
    # §8 evaluation of task "b": merged weights with b's own biases / heads
    ev = bert.with_own(ta, tasks["b"], roles)
    assert torch.equal(ev["encoder.layer.0.intermediate.dense.bias"], tasks["b"]["encoder.layer.0.intermediate.dense.bias"])
    assert torch.equal(ev[k], ta[k])
    # ESM with ESD on all six types, inputs probed without padding, α on every key
    tok = _tokenizer(tmp_path)
    batch = bert.tokenize(tok, ["the cat sat", "a dog ran on the mat", "the mat"], max_length=16)
    ek = bert.esd_keys(base)
    inputs = {}
    for name, sd in tasks.items():
        m = bert.build(sd, CONFIGS["bert"])
        inputs[name] = bert.layer_inputs(m, batch, ek)
    info = {}
    ups = merge_updates("esm", base, tasks, roles=roles, layer_types=lt, inputs=inputs, esd_keys=ek, alpha=1.0,
                        info=info)
    assert set(info["esm"]["esd_keys"]) == set(ek) and len(ek) == 12
    assert set(info["esm"]["betas"]) == set(ek)                           # inter-layer scaling over the six types
    assert not any(k_ in ups for k_ in own)
    merged = apply_updates(base, bert.scale_updates(ups, 0.5))
    for k_ in ups:
        assert torch.allclose(merged[k_], base[k_] + 0.5 * ups[k_], atol=1e-6)
    from esm_core.merging.svd import tsv_merge_matrix
    emb = "embeddings.word_embeddings.weight"                              # a 2-D table: TSV-M (k ≥ 1) × α (§8)
    D = torch.stack([t[emb] - base[emb] for t in tasks.values()])
    assert torch.allclose(merged[emb], base[emb] + 0.5 * tsv_merge_matrix(D, 1), atol=1e-6)
    ln = "embeddings.LayerNorm.weight"                                     # LayerNorm: mean of task vectors × α
    assert torch.allclose(merged[ln], base[ln] + 0.5 * torch.stack([t[ln] - base[ln] for t in tasks.values()]).mean(0),
                          atol=1e-6)
