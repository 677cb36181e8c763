"""Issue 23, item 1: the merge table comes back after a page reload for every pool — the demo, the text pool and
an uploaded pool — not only for the pool a page starts with. The browser keeps one table per pool
(``studio.session.remember``), matched to a pool by a sampled fingerprint of its content; tested through the Pool
view's handlers (``save_history`` after a table change, ``restore_history`` after the page load and after a load)."""
from __future__ import annotations

import json
import shutil

import pytest

from esm_core import studio as S
from esm_core.app import pool as pool_view
from esm_core.checkpoints import save_safetensors
from esm_core.studio import session as SS
from esm_core.studio import shared
from fake_pool import FAKE_TASKS


def _browser(x):
    """What comes back from the browser: plain JSON."""
    return json.loads(json.dumps(x))


def _methods(s) -> list[str]:
    return [r["method"] for r in s.merges]


@pytest.fixture
def upload_files(pool, tmp_path):
    d = tmp_path / "up"
    d.mkdir()
    save_safetensors(pool.base, d / "base.safetensors")
    for t in FAKE_TASKS[:2]:
        save_safetensors(pool.tasks[t], d / f"{t}.safetensors")
    return d


def _upload(s, d, pool):
    return S.load_uploaded(s, d / "base.safetensors", {t: d / f"{t}.safetensors" for t in FAKE_TASKS[:2]}, {},
                           arch="infer", head_width=16, normalisation="half", demo_loader=lambda: pool)


def test_each_pools_table_survives_a_reload(pool, tiny_text_pool_dir, upload_files, tmp_path):
    s = S.new_session("cpu", live_per_task=8)
    s2 = S.new_session("cpu", live_per_task=8)
    try:
        stored = None
        S.load_demo(s, loader=lambda: pool)                         # the page's start pool
        S.merge(s, "ta", {"alpha": 0.5})
        stored = _browser(pool_view.save_history(s, stored))
        S.load_text(s, tiny_text_pool_dir[0])                        # then the text pool
        S.merge(s, "ta", {"alpha": 0.3})
        S.merge(s, "ties", {"alpha": 0.4})
        stored = _browser(pool_view.save_history(s, stored))
        text_rows = S.comparison_rows(s)
        _upload(s, upload_files, pool)                               # then an upload
        S.merge(s, "ta", {"alpha": 0.2})
        stored = _browser(pool_view.save_history(s, stored))
        assert stored["version"] == 2 and len(stored["pools"]) == 3
        assert "updates" not in json.dumps(stored)

        # the page is reloaded: a new session starts on the demo pool and gets the demo's table back
        S.load_demo(s2, loader=lambda: pool)
        pool_view.restore_history(s2, stored)
        assert _methods(s2) == ["ta"] and s2.merges[0]["params"]["alpha"] == 0.5
        # loading the text pool brings back its table (before: only the start pool's came back)
        S.load_text(s2, tiny_text_pool_dir[0])
        pool_view.restore_history(s2, stored)
        assert _methods(s2) == ["ta", "ties"] and S.comparison_rows(s2) == text_rows     # row for row
        # uploading the same files again (other paths, another session folder) brings back the upload's table
        again = tmp_path / "again"
        shutil.copytree(upload_files, again)
        _upload(s2, again, pool)
        pool_view.restore_history(s2, stored)
        assert _methods(s2) == ["ta"] and s2.merges[0]["params"]["alpha"] == 0.2
        # a new merge on it is kept beside the other pools' tables, not in place of them
        S.merge(s2, "ties", {"alpha": 0.6})
        stored2 = _browser(pool_view.save_history(s2, stored))
        assert len(stored2["pools"]) == 3
        assert [len(h["merges"]) for h in stored2["pools"]] == [1, 2, 2]          # demo, text, upload (last)
    finally:
        S.close(s)
        S.close(s2)


def test_an_upload_of_other_content_under_the_same_names_gets_no_table(pool, upload_files, tmp_path):
    s = S.new_session("cpu", live_per_task=8)
    s2 = S.new_session("cpu", live_per_task=8)
    try:
        _upload(s, upload_files, pool)
        S.merge(s, "ta", {"alpha": 0.2})
        stored = _browser(pool_view.save_history(s, None))
        other = tmp_path / "other"
        shutil.copytree(upload_files, other)
        changed = {k: v.clone() for k, v in pool.tasks["alpha"].items()}
        k = next(k for k in changed if k.endswith("mlp.c_fc.weight"))
        changed[k] += 0.01                                           # another fine-tuning of the same task
        save_safetensors(changed, other / "alpha.safetensors")
        _upload(s2, other, pool)
        assert shared.content_fingerprint(s2.pool) != shared.content_fingerprint(s.pool)
        pool_view.restore_history(s2, stored)
        assert s2.merges == []
    finally:
        S.close(s)
        S.close(s2)


def test_the_store_keeps_the_most_recent_pools_only(pool, sess):
    S.merge(sess, "ta", {"alpha": 0.5})
    h = SS.history(sess)
    olds = [{**h, "fingerprint": f"old{i}"} for i in range(SS.HISTORY_POOLS)]
    stored = SS.remember(sess, {"version": 2, "pools": olds})
    assert len(stored["pools"]) == SS.HISTORY_POOLS
    assert stored["pools"][-1]["fingerprint"] == shared.content_fingerprint(sess.pool)
    assert [p["fingerprint"] for p in stored["pools"][:-1]] == ["old1", "old2", "old3"]
    s2 = S.new_session("cpu", live_per_task=16)
    try:
        S.load_demo(s2, loader=lambda: pool)
        with pytest.raises(ValueError, match="at most 4 pools"):
            SS.restore_history(s2, {"version": 2, "pools": olds * 2})
        assert SS.restore_history(s2, stored) == 1 and _methods(s2) == ["ta"]
    finally:
        S.close(s2)
    assert SS.remember(sess, {"version": 2, "pools": "junk"})["pools"] == [h]   # a malformed store is replaced


def test_a_stored_table_without_its_pools_fingerprint_is_not_restored(pool, sess):
    """A table stored before tables were keyed by content (or edited) names the pool but not its content: it is
    not put into a pool that merely has the same name and tasks."""
    S.merge(sess, "ta", {"alpha": 0.5})
    h = _browser(SS.history(sess))
    h.pop("fingerprint")
    s2 = S.new_session("cpu", live_per_task=16)
    try:
        S.load_demo(s2, loader=lambda: pool)
        assert SS.restore_history(s2, h) == 0 and s2.merges == []
        h["fingerprint"] = shared.content_fingerprint(pool)
        assert SS.restore_history(s2, h) == 1
    finally:
        S.close(s2)


def test_the_fingerprint_is_cheap_and_follows_content(pool):
    a = shared.content_fingerprint(pool)
    assert a == shared.content_fingerprint(pool)                     # cached in the pool's meta
    import dataclasses
    p2 = dataclasses.replace(pool, meta={}, cache={},
                             tasks={**pool.tasks, "alpha": {k: v + (1e-3 if v.is_floating_point() else 0)
                                                            for k, v in pool.tasks["alpha"].items()}})
    assert shared.content_fingerprint(p2) != a
    p3 = dataclasses.replace(pool, meta={}, cache={})
    assert shared.content_fingerprint(p3) == a                       # same content, another object
