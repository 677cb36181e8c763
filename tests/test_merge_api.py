"""The public merge API (esm_core.merge / merge_updates) driven through the baseline methods."""
from __future__ import annotations

import pytest
import torch

from esm_core import CheckpointError, METHODS, merge, merge_updates
from esm_core.models import openclip_vit as vit

PLAIN = sorted(n for n, m in METHODS.items() if not m.needs_stats and n in
               ("average", "ta", "ties", "dare_ta", "dare_ties", "tsv_m", "iso_c", "iso_cts"))


def tiny(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sd = {"visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4, generator=g),
          "visual.transformer.resblocks.0.attn.in_proj_bias": torch.randn(12, generator=g),
          "visual.ln_post.weight": torch.randn(4, generator=g),
          "visual.proj": torch.randn(4, 3, generator=g)}
    return {k: v.to(dtype) for k, v in sd.items()}


def pool(T=2, dtype=torch.float32):
    base = tiny(0, dtype)
    tasks = {f"t{i}": {k: (v.float() + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i + 1)))
                       .to(dtype) for k, v in base.items()} for i in range(T)}
    return base, tasks


def test_all_baselines_registered_with_reference_grids():
    assert PLAIN == sorted(["average", "ta", "ties", "dare_ta", "dare_ties", "tsv_m", "iso_c", "iso_cts"])
    for n in ("ta", "ties", "dare_ta", "dare_ties"):
        assert METHODS[n].alpha_grid == (0.0, 1.0, 31)
    for n in ("tsv_m", "iso_c", "iso_cts"):
        assert METHODS[n].alpha_grid == (0.0, 3.0, 31)
    assert METHODS["ties"].resolve({}) == {"alpha": 0.3, "k": 20.0}
    assert METHODS["dare_ta"].resolve({}) == {"alpha": 0.3, "p": 0.9, "seed": 0}
    assert METHODS["tsv_m"].resolve({})["alpha"] == 1.0
    assert METHODS["iso_cts"].resolve({})["common_fraction"] == 0.8


@pytest.mark.parametrize("method", PLAIN)
def test_every_baseline_merges_every_float_key(method):
    base, tasks = pool(T=3)
    calls = []
    params = {"p": 0.5} if method.startswith("dare") else {}
    out = merge(method, base, tasks, progress=lambda f, d: calls.append(f), **params)
    assert set(out) == set(base)
    for k in base:
        assert out[k].shape == base[k].shape and out[k].dtype == base[k].dtype
        assert torch.isfinite(out[k]).all()
        assert not torch.equal(out[k], base[k])          # every key moved (DARE at p = 0.5 keeps some of each)
    assert calls and calls[-1] == pytest.approx(1.0) and all(0 <= c <= 1 for c in calls)


def test_unknown_method_and_parameters_are_refused():
    base, tasks = pool()
    with pytest.raises(ValueError, match="unknown method 'tiez'"):
        merge("tiez", base, tasks)
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['topk'\]"):
        merge("ties", base, tasks, topk=20)
    with pytest.raises(ValueError, match="'p' must be <= 0.99"):
        merge("dare_ta", base, tasks, p=1.0)
    with pytest.raises(ValueError, match="'common_fraction' must be <= 1.0"):
        merge("iso_cts", base, tasks, common_fraction=1.5)
    with pytest.raises(ValueError, match="no task checkpoints"):
        merge("ta", base, {})


def test_fp16_checkpoints_keep_their_dtype_and_maths_is_float32():
    base, tasks = pool(dtype=torch.float16)
    out = merge("ta", base, tasks, alpha=0.3)
    for k in base:
        assert out[k].dtype == torch.float16
        b = base[k].float()
        expect = (b + 0.3 * torch.stack([tasks[t][k].float() - b for t in tasks]).sum(0)).half()
        assert torch.equal(out[k], expect)
    # the same merge done in half precision throughout would differ somewhere
    k = "visual.transformer.resblocks.0.attn.in_proj_weight"
    half = base[k] + torch.tensor(0.3, dtype=torch.float16) * ((tasks["t0"][k] - base[k]) + (tasks["t1"][k] - base[k]))
    assert not torch.equal(half, out[k])


def test_int_buffers_are_skipped_and_copied_from_the_base():
    base, tasks = pool()
    base["visual.counter"] = torch.tensor([3, 4], dtype=torch.int64)
    for i, sd in enumerate(tasks.values()):
        sd["visual.counter"] = torch.tensor([10 + i, 20], dtype=torch.int64)
    for method in ("ta", "ties", "tsv_m"):
        up = merge_updates(method, base, tasks)
        assert "visual.counter" not in up
        out = merge(method, base, tasks)
        assert out["visual.counter"].tolist() == [3, 4] and out["visual.counter"].dtype == torch.int64


def test_incompatible_task_is_refused_with_the_key_named():
    base, tasks = pool()
    tasks["t1"]["visual.proj"] = torch.zeros(4, 5)
    with pytest.raises(CheckpointError, match="visual.proj"):
        merge("ta", base, tasks)
    base2, tasks2 = pool()
    del tasks2["t0"]["visual.ln_post.weight"]
    with pytest.raises(CheckpointError, match="ln_post.weight"):
        merge("tsv_m", base2, tasks2)
    base3, tasks3 = pool()
    tasks3["t0"]["visual.ln_post.weight"][0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        merge("ties", base3, tasks3)


def test_device_auto_works_here_and_bad_devices_are_refused():
    base, tasks = pool()
    a = merge("tsv_m", base, tasks, device="auto")
    b = merge("tsv_m", base, tasks, device="cpu")
    for k in base:     # identical here; on a CUDA machine "auto" picks the GPU (other SVD kernels)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        if not torch.cuda.is_available():
            assert torch.equal(a[k], b[k])
    with pytest.raises(ValueError, match="device"):
        merge("ta", base, tasks, device="tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            merge("ta", base, tasks, device="cuda")


def test_roles_given_explicitly_for_a_non_open_clip_state_dict():
    g = torch.Generator().manual_seed(0)
    base = {"encoder.q.weight": torch.randn(5, 4, generator=g), "encoder.q.bias": torch.randn(5, generator=g),
            "encoder.steps": torch.tensor(7)}
    tasks = {n: {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
             for n in ("x", "y")}
    mean_q = torch.stack([tasks[n]["encoder.q.weight"] - base["encoder.q.weight"] for n in tasks]).mean(0)
    # default roles: the 2-D weight is a MATRIX → Iso-C flattens its spectrum
    default = merge_updates("iso_c", base, tasks, alpha=1.0)
    assert not torch.allclose(default["encoder.q.weight"], mean_q)
    # explicit roles: treated as a plain vector → the mean; the int counter stays skipped
    roles = {"encoder.q.weight": vit.VECTOR, "encoder.q.bias": vit.VECTOR, "encoder.steps": vit.SKIP}
    up = merge_updates("iso_c", base, tasks, alpha=1.0, roles=roles)
    torch.testing.assert_close(up["encoder.q.weight"], mean_q)
    assert "encoder.steps" not in up
    # keys can also be left out of a merge by giving them the SKIP role
    up2 = merge_updates("ta", base, tasks, roles={**roles, "encoder.q.bias": vit.SKIP})
    assert set(up2) == {"encoder.q.weight"}
    with pytest.raises(ValueError, match="roles given"):
        merge_updates("ta", base, tasks, roles={"encoder.q.weight": vit.MATRIX})
