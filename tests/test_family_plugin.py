"""A model family is one module plus one registration line: a toy family (tests/toy_family.py, written against
the protocol only) runs through the probe, ESM++'s routed model and an ESM++ file's rebuild unchanged."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import toy_family
from esm_core import models
from esm_core.esmpp import Experts, build_routed, load_routed, save_esmpp
from esm_core.probe import probe

D, N, TASKS = 6, 2, ["a", "b"]


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(models, "FAMILIES", {**models.FAMILIES, **models.register(toy_family)})   # the one line
    return toy_family


def _sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in toy_family.Toy(D, N).state_dict().items()}


def _experts(sd, rank=2):
    g = torch.Generator().manual_seed(3)
    keys = toy_family.esd_keys(sd)
    return Experts(tasks=TASKS, keys=keys, rank=rank,
                   A={k: torch.randn(2, rank, D, generator=g) for k in keys},
                   B={k: torch.randn(2, D, rank, generator=g) for k in keys},
                   prototypes={k: F.normalize(torch.randn(2, D, generator=g), dim=-1) for k in keys},
                   base_params=sum(v.numel() for v in sd.values()))


def test_register_refuses_a_module_that_lacks_protocol_names():
    import types
    half = types.ModuleType("half")
    half.NAME, half.matches = "half", toy_family.matches
    with pytest.raises(ValueError, match="lacks .*'build_model'"):
        models.register(half)
    with pytest.raises(ValueError, match="two model families are named 'toy'"):
        models.register(toy_family, toy_family)


def test_the_probe_records_a_registered_familys_layer_inputs(registered):
    sd = _sd()
    model = toy_family.build_model(sd, {"d": D, "n": N})
    assert models.family_of(sd) is toy_family and models.family_of_model(model) is toy_family
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(1))
    stats = probe(model, x, batch_size=2)
    # literal inputs: block 0 reads x, block 1 reads x + tanh(fc0(x))
    x1 = x + torch.tanh(x @ sd["blocks.0.fc.weight"].T + sd["blocks.0.fc.bias"])
    for key, inp in (("blocks.0.fc.weight", x), ("blocks.1.fc.weight", x1)):
        X = inp.reshape(-1, D).double()
        assert stats[key].n == 12
        torch.testing.assert_close(stats[key].gram, X.T @ X, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[key].mean, X.mean(0), rtol=1e-6, atol=1e-7)


def test_esmpp_routes_a_registered_family_and_rebuilds_it_from_its_file(registered, tmp_path):
    sd = _sd()
    ex = _experts(sd)
    routed = build_routed(sd, ex, lambda s: toy_family.build_model(s, {"d": D, "n": N}))
    assert routed.config == {"model_config": {"d": D, "n": N}, "family": "toy"}
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(2))
    for t, name in enumerate(TASKS):                  # a fixed expert = the dense model W + B_t A_t
        dense = {k: (v + ex.B[k][t] @ ex.A[k][t] if k in ex.keys else v) for k, v in sd.items()}
        with torch.no_grad():
            torch.testing.assert_close(routed(x, mode=f"fixed:{name}"),
                                       toy_family.build_model(dense, {"d": D, "n": N})(x), rtol=1e-5, atol=1e-5)
    path = save_esmpp(tmp_path / "toy.safetensors", routed.merged_sd, ex, routed.config)
    again = load_routed(path)                         # no build_visual=: the family rebuilds it
    with torch.no_grad():
        assert torch.equal(again(x), routed(x)) and torch.equal(again.last_log.chosen, routed.last_log.chosen)
