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


def _ref(base, tasks, inputs, alpha, p=2.0, eig=0.15, f=2.0):
    """§5–§8 written out with SVDs: ESD on all six linear types, inter-layer scaling over the six types,
    α on every merged key, biases and heads untouched (each task keeps its own), other floats averaged."""
    names = list(tasks)
    ups = {}
    for key, b in base.items():
        if not b.is_floating_point() or key.endswith(".bias") or key.startswith("pooler."):
            continue
        Ds = [tasks[n][key].double() - b.double() for n in names]
        if bert.layer_type(key) is None:
            ups[key] = sum(Ds) / T
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
