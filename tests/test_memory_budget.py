"""Issue 12: a session's memory is bounded by its own budget (ESM_SESSION_MEMORY_MB), not only by the session cap."""
import numpy as np
import pytest
import torch

from esm_core import studio as S
from esm_core.studio import session as session_module
from fake_pool import make_fake_pool


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(1000)                                     # 4,000 bytes
    obj = {"a": a, "view": a[10:20], "again": [a], "b": np.zeros(100, np.float64), "n": 3, "s": "x"}
    assert S.tensor_bytes(obj) == 4000 + 800
    assert S.tensor_bytes(torch.nn.Linear(10, 10)) == (100 + 10) * 4
    lin = torch.nn.Linear(10, 10)
    lin.factor = torch.zeros(25)                              # a plain tensor attribute (ESM++ keeps some): counted
    assert S.tensor_bytes(lin) == (100 + 10 + 25) * 4
    seen: set = set()                                         # one storage across calls: counted by the first
    assert S.tensor_bytes(obj, seen=seen) == 4800 and S.tensor_bytes([a, obj["b"]], seen=seen) == 0
    assert S.tensor_bytes(torch.zeros(3), seen=seen) == 12


@pytest.mark.parametrize("raw, mib", [("", 8192), ("512", 512), (" 0.5 ", 0.5)])
def test_budget_from_the_environment(monkeypatch, raw, mib):
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", raw)
    assert S.memory_budget() == int(mib * 2 ** 20)


@pytest.mark.parametrize("raw", ["nan", "-3", "abc", "0"])
def test_a_bad_budget_is_refused_naming_the_variable(monkeypatch, raw):
    """A mistyped limit on a public server stops it with a clear error, never a silent fallback (esm_core.settings)."""
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", raw)
    with pytest.raises(ValueError, match="ESM_SESSION_MEMORY_MB must be a number"):
        S.memory_budget()


def test_a_pool_over_the_budget_is_refused_and_the_previous_one_stays(sess, pool, monkeypatch):
    need = S.tensor_bytes(pool) + session_module.WORKING_COPIES * S.tensor_bytes(pool.base)
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", str(need / 2 ** 20 * 0.9))
    other = make_fake_pool(seed=5)
    with pytest.raises(ValueError, match=r"needs about [\d.,]+ MiB.*more than the [\d.,]+ MiB a session may hold "
                                         r"\(ESM_SESSION_MEMORY_MB\)"):
        S.load_demo(sess, loader=lambda: other)
    assert sess.pool is pool                                  # nothing replaced
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", str(need / 2 ** 20 * 1.1))
    S.load_demo(sess, loader=lambda: other)                   # within the budget: loaded
    assert sess.pool is other


def test_an_upload_over_the_budget_is_refused_before_it_is_read(sess, pool, tmp_path, monkeypatch):
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", "1")
    files = []
    for name in ("base", "a", "b"):                           # not checkpoints at all: reading them would fail
        files.append(tmp_path / f"{name}.safetensors")
        files[-1].write_bytes(b"\0" * 300_000)
    with pytest.raises(ValueError, match=r"this upload \(3 checkpoint files\) needs about 3\.4 MiB.*"
                                         r"0\.9 MiB of checkpoints.*1\.0 MiB"):
        S.load_uploaded(sess, files[0], {"a": files[1], "b": files[2]})
    assert sess.pool is pool


def test_caches_are_trimmed_to_the_budget(sess, monkeypatch):
    for a, method in ((0.5, "esm"), (0.3, "ta"), (0.4, "ties")):
        S.merge(sess, method, {"alpha": a})
    assert len(sess.affine) == 3 and sess.cache is not None
    full = S.memory(sess)["total"]
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", str((full - 1) / 2 ** 20))   # just under what the session holds
    S.merge(sess, "ta", {"alpha": 0.6})                       # the next merge drops the oldest cached updates
    assert len(sess.affine) == 1 and S.memory(sess)["total"] < full
    assert [r["method"] for r in sess.merges] == ["esm", "ta", "ties", "ta"]   # no result is lost
    S.merge(sess, "esm", {"alpha": 0.5})                      # what was dropped is recomputed when needed
    assert sess.merges[-1]["summary"] == sess.merges[0]["summary"]


def test_trim_heap_leaves_no_garbage_behind():
    """trim_heap runs after every layer of the Spectra view: it must not leave ctypes reference cycles (a CDLL
    per call did) for the garbage collector, which the app never runs."""
    import gc
    from esm_core.device import trim_heap
    trim_heap()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            trim_heap()
        gc.collect()
        assert not [o for o in gc.garbage if type(o).__module__ == "ctypes" or "CDLL" in type(o).__name__]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_bound_heap_fragmentation_reads_its_setting_and_refuses_bad_values(monkeypatch):
    """The app's server maps allocations of ≥ 4 MiB apart (glibc); the environment can change or disable it."""
    from esm_core import device
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1
    monkeypatch.setattr(device, "_LIBC", [FakeLibc()])             # the C library, as opened once
    monkeypatch.delenv("ESM_STUDIO_MMAP_THRESHOLD_MIB", raising=False)
    assert device.bound_heap_fragmentation() == 4.0 and calls == [(-3, 4 * 2**20)]
    monkeypatch.setenv("ESM_STUDIO_MMAP_THRESHOLD_MIB", "8")
    assert device.bound_heap_fragmentation() == 8.0 and calls[-1] == (-3, 8 * 2**20)
    monkeypatch.setenv("ESM_STUDIO_MMAP_THRESHOLD_MIB", "0")
    assert device.bound_heap_fragmentation() is None and len(calls) == 2
    monkeypatch.setenv("ESM_STUDIO_MMAP_THRESHOLD_MIB", "lots")
    with pytest.raises(ValueError, match="ESM_STUDIO_MMAP_THRESHOLD_MIB"):
        device.bound_heap_fragmentation()
    with pytest.raises(ValueError, match="between 0 and 32"):
        device.bound_heap_fragmentation(64)


def test_app_server_bounds_heap_fragmentation_before_it_launches(monkeypatch):
    import esm_core.app as app
    order = []
    monkeypatch.setattr(app, "bound_heap_fragmentation", lambda: order.append("heap"))

    class Demo:
        def launch(self, **kw):
            order.append("launch")
    monkeypatch.setattr(app, "make_demo", lambda: Demo())
    app.main(port=1)
    assert order == ["heap", "launch"]
