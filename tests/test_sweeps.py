"""Sweeps (esm_core.evaluation.sweeps), ESM's ``directions`` knob, the ``esm-studio sweep`` command."""
from __future__ import annotations

import pytest
import torch

import esm_core
from esm_core.models import openclip_vit as vit

from test_esm import _case, _polar_svd, _upd


# ---------------------------------------------------------------------------
# ESM with directions="svd": the formula written out with torch.linalg.svd
# ---------------------------------------------------------------------------


def _ref_esm_svd(base, tasks, alpha=1.0, rank=0, p_task=2.0, p_dim=2.0, p_layer=2.0, eig=0.15, f=2.0):
    """ESM (SPEC §6) with each task's directions P the left singular vectors of ΔWt and λ = s² — every other
    step as in the ESD version; TSV-M keys and the mean of the other keys as there."""
    names = list(tasks)
    T = len(names)
    ups, esd_keys = {}, vit.esd_keys(base)
    for key, b in base.items():
        Ds = [tasks[n][key].double() - b.double() for n in names]
        if key in esd_keys:
            m, n_in = Ds[0].shape
            k = rank or m // T
            norms = [float(d.norm()) for d in Ds]
            us, vs = [], []
            for t in range(T):
                U, s, _ = torch.linalg.svd(Ds[t], full_matrices=True)     # all m left singular vectors
                lam = torch.zeros(m, dtype=torch.float64)
                lam[: s.numel()] = s ** 2
                Ph = U[:, :k]
                e = (lam[:k] / lam[:k].mean()) ** eig
                e = e / e.mean()
                us.append(Ph * e)
                vs.append(e[:, None] * (Ph.T @ Ds[t]) * (norms[t] / (sum(norms) / T)) ** p_task)
            Uc, V = torch.cat(us, 1), torch.cat(vs, 0)
            c = V.norm(dim=0) / V.norm(dim=0).mean()
            V = V * c ** p_dim
            ups[key] = f * (_polar_svd(Uc) * torch.linalg.svdvals(Uc).mean()) @ (
                _polar_svd(V) * torch.linalg.svdvals(V).mean())
        elif b.ndim == 2:
            k = int(min(b.shape) / T)
            svs = [torch.linalg.svd(d, full_matrices=False) for d in Ds]
            Uc = torch.cat([u[:, :k] for u, _, _ in svs], 1)
            sc = torch.cat([s[:k] for _, s, _ in svs])
            Vc = torch.cat([vh[:k] for _, _, vh in svs], 0)
            ups[key] = (_polar_svd(Uc) * sc) @ _polar_svd(Vc)
        else:
            ups[key] = sum(Ds) / T
    for typ in vit.LAYER_TYPES:
        ks = [k for k in ups if vit.layer_type(k) == typ]
        nrm = {k: float(ups[k].norm()) for k in ks}
        mean = sum(nrm.values()) / len(ks)
        for k in ks:
            ups[k] = ups[k] * (nrm[k] / mean) ** p_layer
    return {k: (alpha * v if k in esd_keys else v) for k, v in ups.items()}


@pytest.mark.parametrize("params", [{}, {"rank": 2, "alpha": 0.7},
                                    {"p_task": 0.0, "p_dim": 0.0, "p_layer": 0.0},
                                    {"p_task": 1.0, "p_dim": 3.0, "eig_exp": 0.4, "p_layer": 0.5}])
def test_svd_directions_equal_the_formula_written_out(params):
    base, tasks, _ = _case(T=3)
    got = _upd(esm_core.merge("esm", base, tasks, directions="svd", **params), base)   # no statistics given
    ref = _ref_esm_svd(base, tasks, alpha=params.get("alpha", 1.0), rank=params.get("rank", 0),
                       p_task=params.get("p_task", 2.0), p_dim=params.get("p_dim", 2.0),
                       p_layer=params.get("p_layer", 2.0), eig=params.get("eig_exp", 0.15))
    assert set(got) == set(ref)
    for k in ref:
        err = float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
        assert err < 1e-5, (k, err)


def test_svd_directions_beyond_the_rank_of_the_update():
    """T = 1 on a 12 × 8 c_fc: k = 12 > rank(ΔW) = 8, the last 4 directions have λ = 0 (completed, zero weight)."""
    base, tasks, _ = _case(T=1)
    got = _upd(esm_core.merge("esm", base, tasks, directions="svd"), base)
    ref = _ref_esm_svd(base, tasks)
    for k in ref:
        err = float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
        assert err < 3e-5, (k, err)


def test_svd_and_esd_directions_differ_and_are_cached_apart():
    base, tasks, inputs = _case(T=2)
    cache = esm_core.merging.esm.new_cache()
    info = {}
    a = esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache)
    b = esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache, directions="svd", info=info)
    c = esm_core.merge("esm", base, tasks, inputs=inputs, directions="svd")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.allclose(a[key], b[key])
    assert info["esm"]["directions"] == "svd"
    for k in b:
        assert torch.equal(b[k], c[k])
    with pytest.raises(ValueError, match="directions"):
        esm_core.merge("esm", base, tasks, inputs=inputs, directions="pca")
