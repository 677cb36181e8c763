"""Lazy checkpoints (esm_core/lazy.py): read only the keys asked; merging from paths equals merging from dicts."""
import pytest
import torch
from safetensors.torch import save_file

import esm_core
from esm_core.checkpoints import CheckpointError
from esm_core.lazy import LazyCheckpoint
from esm_core.probe import stats_from_inputs

from test_esm import _case


@pytest.fixture()
def files(tmp_path):
    base, tasks, inputs = _case(T=3)
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    paths = {}
    for name, sd in tasks.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(paths[name]))
    return base, tasks, inputs, tmp_path / "base.safetensors", paths


def test_lazy_reads_only_the_keys_asked(files):
    base, tasks, _, base_path, paths = files
    ck = LazyCheckpoint(paths["task0"])
    assert set(ck) == set(base) and len(ck) == len(base) and ck.reads == 0
    k = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert ck.shape(k) == tuple(base[k].shape) and ck.dtype(k) == torch.float32
    assert ck.meta()[k].device.type == "meta" and ck.reads == 0        # metadata: nothing read
    assert k in ck and "nope" not in ck
    torch.testing.assert_close(ck[k], tasks["task0"][k], rtol=0, atol=0)
    assert ck.reads == 1 and ck.read_keys == [k]
    with pytest.raises(KeyError):
        ck["nope"]
    assert ck.fingerprint(k) == LazyCheckpoint(paths["task0"]).fingerprint(k)
    assert ck.fingerprint(k) != ck.fingerprint("visual.proj")


@pytest.mark.parametrize("method,extra", [("ta", {}), ("ties", {}), ("tsv_m", {}), ("esm", {"rank": 3})])
def test_merge_from_paths_equals_merge_from_dicts(files, method, extra):
    base, tasks, inputs, base_path, paths = files
    kw = dict(extra)
    if method == "esm":
        kw["stats"] = stats_from_inputs(inputs)
    want = esm_core.merge(method, base, tasks, **kw)
    got = esm_core.merge(method, str(base_path), {n: str(p) for n, p in paths.items()}, **kw)
    lazy = {n: LazyCheckpoint(p) for n, p in paths.items()}
    got2 = esm_core.merge_updates(method, LazyCheckpoint(base_path), lazy, **kw)
    want2 = esm_core.merge_updates(method, base, tasks, **kw)
    assert set(got) == set(want) and set(got2) == set(want2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    for k in want2:
        torch.testing.assert_close(got2[k], want2[k], rtol=0, atol=0)
    for ck in lazy.values():                                   # read key by key, never the whole file at once
        assert ck.reads >= len(ck) and set(ck.read_keys) == set(ck)


def test_lazy_merge_streams_one_key_at_a_time(files):
    """While a method works on one key, no task has been asked for a key it has not reached yet."""
    base, tasks, _, base_path, paths = files
    lazy = {n: LazyCheckpoint(p) for n, p in paths.items()}
    order = list(base)
    seen = []

    def progress(frac, desc):
        key = desc.split(": ", 1)[-1]
        if key in base:
            seen.append(key)
            reached = order.index(key)
            for ck in lazy.values():
                assert all(order.index(k) <= reached for k in ck.read_keys), key

    esm_core.merge_updates("ta", base, lazy, check=False, progress=progress)
    assert seen                                                # the check ran


def test_lazy_task_is_checked_from_its_header(files, tmp_path):
    base, tasks, _, base_path, paths = files
    bad = dict(tasks["task1"])
    bad["visual.proj"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        esm_core.merge("ta", base, {"a": str(paths["task0"]), "bad": str(tmp_path / "bad.safetensors")})
    nan = dict(tasks["task1"])
    nan["visual.proj"] = torch.full_like(nan["visual.proj"], float("nan"))
    save_file({k: v.contiguous() for k, v in nan.items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite"):
        esm_core.merge("ta", base, {"nan": str(tmp_path / "nan.safetensors")})
    with pytest.raises(ValueError, match="path to a .safetensors"):
        esm_core.merge("ta", base, {"x": 3})
