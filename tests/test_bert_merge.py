"""methods §8 on a BERT state dict with no explicit roles: esm_core.merge finds the family and follows §8."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

import esm_core
from esm_core import models
from esm_core.models import bert

T, N = 3, 24


def _case(seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=20, type_vocab_size=2)
    base = {k: v.detach().clone() for k, v in BertModel(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    tasks = {f"t{i}": {k: (v + 0.02 * (i + 1) * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                       for k, v in base.items()} for i in range(T)}
    keys = bert.esd_keys(base)
    inputs = {t: {k: torch.randn(N, base[k].shape[1], generator=g, dtype=torch.float64) for k in keys}
              for t in tasks}
    return base, tasks, inputs


def _polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _tsv_literal(Ds):
    """The reference's ``_tsv_process_2d_param`` written out (methods §3, §8): per task the SVD of ΔWt truncated to
    ``k = max(1, ⌊min(m, n) / T⌋)`` triplets, the blocks side by side, ``polar(U_cat) diag(s_cat) polar(V_catᵀ)``."""
    m, n = Ds[0].shape
    k = max(1, min(m, n) // len(Ds))
    us, ss, vs = [], [], []
    for d in Ds:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k])
    return (_polar(torch.cat(us, 1)) * torch.cat(ss)) @ _polar(torch.cat(vs, 0))


def _ref(base, tasks, inputs, alpha, p=2.0, eig=0.15, f=2.0):
    """§5–§8 written out with SVDs: ESD on all six linear types, inter-layer scaling over the six types,
    α on every merged key, biases and heads untouched (each task keeps its own), the embedding tables by TSV-M
    with k = max(1, ⌊min(m, n) / T⌋), the other floats (LayerNorm weights) averaged."""
    names = list(tasks)
    ups = {}
    for key, b in base.items():
        if not b.is_floating_point() or key.endswith(".bias") or key.startswith("pooler."):
            continue
        Ds = [tasks[n][key].double() - b.double() for n in names]
        if bert.layer_type(key) is None:
            ups[key] = _tsv_literal(Ds) if b.ndim == 2 else sum(Ds) / T
            continue
        m = b.shape[0]
        k = m // T
        norms = [float(d.norm()) for d in Ds]
        us, vs = [], []
        for t, n in enumerate(names):
            X = inputs[n][key]
            _, s, Vh = torch.linalg.svd(X @ Ds[t].T, full_matrices=True)
            P = Vh.T
            lam = torch.zeros(m, dtype=torch.float64)
            lam[: s.numel()] = s ** 2 / (N - 1)
            e = (lam[:k] / lam[:k].mean()) ** eig
            e = e / e.mean()
            us.append(P[:, :k] * e)
            vs.append(e[:, None] * (P[:, :k].T @ Ds[t]) * norms[t] ** p)
        U, V = torch.cat(us, 1), torch.cat(vs, 0) / (sum(norms) / T) ** p
        c = V.norm(dim=0) / V.norm(dim=0).mean()
        V = V * c ** p
        ups[key] = f * (_polar(U) * torch.linalg.svdvals(U).mean()) @ (_polar(V) * torch.linalg.svdvals(V).mean())
    for typ in bert.LAYER_TYPES:
        ks = [k for k in ups if bert.layer_type(k) == typ]
        nrm = {k: float(ups[k].norm()) for k in ks}
        mean = sum(nrm.values()) / len(ks)
        for k in ks:
            ups[k] = ups[k] * (nrm[k] / mean) ** p
    return {k: alpha * v for k, v in ups.items()}


def test_the_family_is_found_from_the_key_names():
    base, _, _ = _case()
    assert models.family_of(base) is bert
    roles = models.roles_of(base)
    assert roles["encoder.layer.0.attention.self.query.weight"] == models.MATRIX
    assert roles["encoder.layer.0.attention.self.query.bias"] == models.OWN
    assert roles["pooler.dense.weight"] == models.OWN
    assert roles["embeddings.LayerNorm.weight"] == models.VECTOR
    assert len(models.layer_types_of(base)) == 2 * 6


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_esm_on_bert_equals_the_section_8_formula(alpha):
    base, tasks, inputs = _case()
    got = esm_core.merge("esm", base, tasks, inputs=inputs, alpha=alpha)          # no roles, no esd_keys
    ref = _ref(base, tasks, inputs, alpha)
    for k, b in base.items():
        if k in ref:
            err = float((got[k].double() - b.double() - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
            assert err < 1e-5, (k, err)
        else:                                         # biases, pooler, integer buffers: the base's values
            assert torch.equal(got[k], b), k


def test_task_arithmetic_on_bert_leaves_biases_and_heads_to_the_tasks():
    base, tasks, _ = _case()
    got = esm_core.merge("ta", base, tasks, alpha=0.3)
    q = "encoder.layer.1.attention.self.query.weight"
    torch.testing.assert_close(got[q], base[q] + 0.3 * sum(tasks[t][q] - base[q] for t in tasks))
    for k in ("encoder.layer.1.attention.self.query.bias", "pooler.dense.weight"):
        assert torch.equal(got[k], base[k])


EMBEDDINGS = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
              "embeddings.token_type_embeddings.weight")


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_esm_merges_the_embedding_tables_as_the_reference_does(alpha):
    """methods §8 (the reference's RoBERTa code): ESM merges the word, position and token-type tables the TSV-M way
    with k = max(1, ⌊min(m, n) / T⌋) per task — the token-type table (2 × 16, T = 3) keeps 1 triplet per task where
    ⌊2 / 3⌋ = 0 would keep none — and α scales them; LayerNorm weights get the mean of the task vectors."""
    base, tasks, inputs = _case(seed=3)
    assert base["embeddings.token_type_embeddings.weight"].shape == (2, 16) and 2 // T == 0
    got = esm_core.merge_updates("esm", base, tasks, inputs=inputs, alpha=alpha)
    for key in EMBEDDINGS:
        want = alpha * _tsv_literal([tasks[n][key].double() - base[key].double() for n in tasks])
        assert float(want.norm()) > 0, key
        err = float((got[key].double() - want).norm() / want.norm())
        assert err < 1e-5, (key, err)
    ln = "embeddings.LayerNorm.weight"
    torch.testing.assert_close(got[ln].double(), alpha * sum(tasks[n][ln].double() - base[ln].double()
                                                             for n in tasks) / T, rtol=1e-6, atol=1e-7)


def test_the_baselines_keep_averaging_the_embedding_tables():
    """TSV-M, Iso-C and Iso-CTS treat the tables as the non-matrix keys they are to them (methods §8): the mean of
    the task vectors, times α."""
    base, tasks, _ = _case(seed=4)
    for method in ("tsv_m", "iso_c", "iso_cts"):
        got = esm_core.merge_updates(method, base, tasks, alpha=0.5)
        for key in EMBEDDINGS:
            want = 0.5 * sum(tasks[n][key] - base[key] for n in tasks) / T
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-7)


def test_the_tsv_rank_floor_is_the_text_family_s_only():
    from esm_core.merging.svd import tsv_merge_matrix, tsv_rank
    assert tsv_rank(2, 16, 3) == 0 and tsv_rank(2, 16, 3, min_rank=1) == 1 and tsv_rank(16, 40, 3, 1) == 5
    assert tsv_rank(2, 16, 3, min_rank=5) == 2                      # never more than min(m, n)
    D = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(tsv_merge_matrix(D)) == 0             # the ViT rule: ⌊2 / 3⌋ = 0 triplets
    torch.testing.assert_close(tsv_merge_matrix(D, 1).double(), _tsv_literal(list(D.double())), rtol=1e-5, atol=1e-6)
