"""Issue 12: hostile inputs posted to the running app over HTTP (gradio_client), one session attacking while
another works. Each attack must get a clear refusal, leave the server's memory bounded (resident size of this
process, which serves the app), write no files, and leave the other session's pool and merges working."""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio_client  # noqa: E402
import httpx  # noqa: E402

from esm_core.checkpoints import save_safetensors  # noqa: E402
from fake_pool import launch_app, slow_merges, tiny_image_zip  # noqa: E402
from test_app_http import _client, _values  # noqa: E402
from test_hostile_library import _save_chain  # noqa: E402

h = gradio_client.handle_file


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _cfg_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("esm-studio-cfg-*")}


@pytest.fixture(scope="module")
def app(pool):
    demo, url = launch_app(lambda: pool)
    victim = _client(url)
    victim.predict(api_name="/init")
    victim.predict("ta", *_values("ta", alpha=0.4), api_name="/merge")
    attacker = _client(url)              # one attacking session for every case (the app caps sessions at 8)
    attacker.predict(api_name="/init")
    yield url, victim, attacker
    demo.close()


def _lying_zip(path: Path) -> Path:
    big = b"\0" * (64 * 1024 ** 2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("cat/a.png", big)
        for n in ("cat/b.png", "dog/c.png", "dog/d.png"):
            z.writestr(n, b"x")
    raw = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = raw.find(sig)
        raw[i + off:i + off + 4] = (100).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    return path


def _upload(c, base, tasks, zips=(), names="", arch="auto", head=0, norm=""):
    return lambda: c.predict(h(str(base)), [h(str(t)) for t in tasks], names, [h(str(z)) for z in zips], arch,
                                [], head, norm, api_name="/load_upload")


def _cases(pool, d: Path) -> dict:
    """name → (files to upload, upload kwargs, the refusal expected)."""
    W, L = 2048, 16                                                 # (1) a 1.9 KB file describing a huge tower
    huge = {"visual.conv1.weight": torch.zeros(W, 0, 32, 32), "visual.positional_embedding": torch.zeros(50, 0)}
    for i in range(L):
        huge[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.zeros(4 * W, 0)
    save_safetensors(huge, d / "huge.safetensors")
    base64 = {k: v.double() for k, v in pool.base.items()}          # (6) finite in float64, inf in float32
    task64 = dict(base64)
    k = next(k for k in base64 if k.endswith("mlp.c_fc.weight"))
    task64[k] = task64[k].clone()
    task64[k][0, 0] = 1e300
    save_safetensors(base64, d / "base64.safetensors")
    save_safetensors(task64, d / "overflow.safetensors")
    save_safetensors(pool.base, d / "base.safetensors")
    for t in ("alpha", "beta"):
        save_safetensors(pool.tasks[t], d / f"{t}.safetensors")
    _save_chain(d / "deep.pt", 5000)                                  # (8) a 5,000-deep pickled module
    zips = [tiny_image_zip(d / "alpha.zip"), tiny_image_zip(d / "beta.zip")]
    good = [d / "alpha.safetensors", d / "beta.safetensors"]
    return {
        "huge": ((d / "huge.safetensors", [d / "huge.safetensors"] * 2, [tiny_image_zip(d / "a.zip"), tiny_image_zip(d / "b.zip")]),
                 dict(names="a,b", arch="infer", head=64, norm="clip"), r"M parameters, more than|does not fit"),
        "named_giant": ((d / "base.safetensors", good, zips), dict(names="alpha,beta", arch="ViT-bigG-14"),
                        r"does not fit the open_clip ViT-bigG-14|M parameters"),
        "lying_zip": ((d / "base.safetensors", good, [d / "alpha.zip", _lying_zip(d / "beta.zip")]),
                      dict(names="alpha,beta", arch="infer", head=16, norm="half"), r"beta.*a\.png"),
        "overflow": ((d / "base64.safetensors", [d / "overflow.safetensors", d / "base64.safetensors"], zips),
                     dict(names="alpha,beta", arch="infer", head=16, norm="half"), r"float32"),
        "path_name": ((d / "base.safetensors", good, zips), dict(names="../alpha,beta"), r"task names must be"),
        "deep_pickle": ((d / "base.safetensors", [d / "deep.pt", good[1]], zips),
                        dict(names="alpha,beta", arch="infer", head=16, norm="half"),
                        r"deep\.pt: modules nested more than 100 levels deep"),
    }


@pytest.mark.parametrize("case", ["huge", "named_giant", "lying_zip", "overflow", "path_name", "deep_pickle"])
def test_hostile_upload_refused_bounded_and_isolated(app, pool, tmp_path, case):
    _, victim, attacker = app
    (base, tasks, zips), kw, match = _cases(pool, tmp_path)[case]
    dirs = _cfg_dirs()
    go = _upload(attacker, base, tasks, zips, **kw)
    before = _rss_mib()
    with pytest.raises(Exception, match=match):
        go()
    assert _rss_mib() - before < 300                              # resident size bounded (MiB)
    assert _cfg_dirs() <= dirs                                     # no temporary config folders left
    # the other session still merges with its own pool (nothing global changed)
    plot, note, table = victim.predict("esm", *_values("esm", alpha=0.5), api_name="/merge")
    assert table["data"][-1][1] == "ESM"


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_parameters_refused(app, bad):
    # JSON has no NaN, so gradio_client posts it as a string; the server must refuse it, not merge with it (a raw
    # JSON NaN number reaches Param.check, which refuses it: test_hostile_library.py, session level)
    _, _, c = app
    with pytest.raises(Exception, match="finite|Expected a `float`"):
        c.predict("ta", *_values("ta", alpha=bad), api_name="/merge")


# ----------------------------------------------------------------------------- work nobody waits for any more
SLOW_STEPS = 3000                  # progress reports of the slowed merge below (10 ms each: 30 s if never stopped)


@pytest.fixture
def slow_merge(monkeypatch):
    return slow_merges(monkeypatch, "dare_ta", SLOW_STEPS)


def _unchanged(rec) -> bool:
    """The session of the stopped merge holds the merges and the current merge it held before it."""
    s = rec["session"]
    with s.lock:                                   # taken once the stopped merge has let go of it
        return [r["id"] for r in s.merges] == rec["merges_before"] and s.current is rec["current_before"]


def _rows(c) -> int:
    _, _, table = c.predict("ta", *_values("ta", alpha=0.35), api_name="/merge")
    return len(table["data"])


def _raw_call(http, api: str, data: list, session: str) -> str:
    """POST one event of ``session`` to the app's plain HTTP API; its event id."""
    return http.post(f"/gradio_api/call/{api}", json={"data": data, "session_hash": session}).json()["event_id"]


def _raw_result(http, api: str, event: str) -> str:
    return http.get(f"/gradio_api/call/{api}/{event}").text


def test_disconnected_client_stops_its_merge(app, slow_merge):
    """A client (plain HTTP, like a browser tab) starts a merge and goes away, its event stream closed: the
    merge stops at its next progress report instead of running to its end."""
    url = app[0]
    session = f"gone-{os.getpid()}"
    with httpx.Client(base_url=url, timeout=60) as http:
        assert "event: complete" in _raw_result(http, "init", _raw_call(http, "init", [], session))
        event = _raw_call(http, "merge", ["dare_ta", *_values("dare_ta", seed=101)], session)
        with http.stream("GET", f"/gradio_api/call/merge/{event}"):
            assert slow_merge["started"].wait(60)
        at_disconnect = slow_merge["steps"]
    assert slow_merge["ended"].wait(60)
    assert slow_merge["steps"] < SLOW_STEPS                 # it stopped instead of running to its end
    print(f"\nsteps after the disconnect: {slow_merge['steps'] - at_disconnect} of {SLOW_STEPS - at_disconnect}")
    assert _unchanged(slow_merge)


def test_cancel_button_stops_the_merge_and_keeps_the_session(app, slow_merge):
    _, _, c = app
    rows = _rows(c)
    job = c.submit("dare_ta", *_values("dare_ta", seed=102), api_name="/merge")
    assert slow_merge["started"].wait(60)
    c.predict(api_name="/cancel")
    kept = job.result(timeout=60)                           # the outputs are left as they were: no change
    assert kept == ({"__type__": "update"},) * 3
    assert slow_merge["steps"] < SLOW_STEPS
    assert _unchanged(slow_merge)
    assert _rows(c) == rows + 1                             # the cancelled merge left no row; the next one works


def _index(method: str, name: str) -> int:
    """Position of a method parameter in the merge endpoint's inputs (after the method)."""
    from esm_core.merging import METHODS
    i = 1
    for m in METHODS.values():
        for p in m.params:
            if (m.name, p.name) == (method, name):
                return i
            i += 1
    raise KeyError(name)


def _raw_json(api: str, data: list, at: int, token: str, session: str) -> str:
    """The request body as raw JSON text with ``token`` (NaN, Infinity: not JSON, but Python's parser and
    gradio's take them) at ``data[at]``."""
    data = list(data)
    data[at] = "__HOSTILE__"
    return json.dumps({"data": data, "session_hash": session}).replace('"__HOSTILE__"', token)


def _post_raw(http, api: str, body: str) -> str:
    r = http.post(f"/gradio_api/call/{api}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return http.get(f"/gradio_api/call/{api}/{r.json()['event_id']}").text


RAW_CASES = {   # (endpoint, its inputs, the hostile position, what the refusal names)
    "alpha": ("merge", ["ta", *_values("ta")], _index("ta", "alpha"), "alpha"),
    "eig_exp": ("merge", ["esm", *_values("esm")], _index("esm", "eig_exp"), "eig_exp"),
    "rank": ("merge", ["esm", *_values("esm")], _index("esm", "rank"), "rank"),
    "alpha_curve": ("alpha_curve", ["ties", *_values("ties")], _index("ties", "k"), "'k'|k&#x27;"),
    "spectra": ("spectra", [0.25, "ESD energy kept at k", None, None], 0, "rank fraction"),
    "route": ("route", [8, "samples of the pool's tasks", 2, None, False, ""], 0, "expert rank"),
    "export": ("export_esmpp", [8], 0, "expert rank"),
}


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("case", list(RAW_CASES))
def test_raw_json_non_finite_numbers_refused(app, case, token):
    """NaN / Infinity posted as raw JSON numbers (gradio_client cannot send them) to the plain HTTP API: each
    is refused with a message that says what is wrong, and the session keeps its merges."""
    url = app[0]
    session = f"raw-json-{os.getpid()}"
    api, data, at, names = RAW_CASES[case]
    with httpx.Client(base_url=url, timeout=60) as http:
        assert "event: complete" in _post_raw(http, "init", json.dumps({"data": [], "session_hash": session}))
        ok = _post_raw(http, "merge", json.dumps({"data": ["ta", *_values("ta", alpha=0.45)], "session_hash": session}))
        rows = len(json.loads(ok.split("data: ", 1)[1].splitlines()[0])[3]["data"])
        out = _post_raw(http, api, _raw_json(api, data, at, token, session))
        assert out.startswith("event: error"), out[:300]
        # ours names the input; gradio's bounds check (before the handler) names the value and the bound
        assert re.search(rf"({names}).*(finite|of type int, got nan)|Value -?inf is (greater|less) than",
                         out), out[:300]
        again = _post_raw(http, "merge", json.dumps({"data": ["ta", *_values("ta", alpha=0.45)],
                                                     "session_hash": session}))
        assert len(json.loads(again.split("data: ", 1)[1].splitlines()[0])[3]["data"]) == rows + 1  # nothing added


# ----------------------------------------------------------------------------- uploads that never finish
def _upload_folder_files() -> set[str]:
    """The files directly in gradio's upload folder (where an upload is streamed before it is kept)."""
    from gradio.utils import get_upload_folder
    folder = Path(get_upload_folder())
    return {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()


def _wait_until(cond, seconds: float = 30) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_aborted_upload_leaves_no_file(app):
    """A client starts uploading a 50 MB checkpoint, sends 200 KB and hangs up. Gradio streams the body into a
    temporary file of its upload folder; that partial file must go at once (gradio alone keeps it for good:
    it is none of the app's tracked files, so no delete_cache sweep removes it)."""
    host, port = app[0].split("//")[1].strip("/").split(":")
    head = (b'--B0\r\nContent-Disposition: form-data; name="files"; filename="base.safetensors"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    before = _upload_folder_files()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B0\r\n"
                  + f"Content-Length: {len(head) + 50_000_000}\r\n\r\n".encode() + head + b"\0" * 200_000)
        assert _wait_until(lambda: _upload_folder_files() - before)     # the partial file is on disk ...
        partial = _upload_folder_files() - before
    assert _wait_until(lambda: not (partial & _upload_folder_files())), partial   # ... and gone after the hang-up


def test_over_limit_upload_leaves_no_file_and_stale_files_are_swept(pool):
    """An upload above max_file_size is refused (413) and leaves nothing in the upload folder; the app deletes
    its older uploads and exports on a schedule (delete_cache)."""
    from esm_core.app.common import DELETE_CACHE
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import app as app_module
    demo = app_module.make_demo(lambda: pool)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                            **{**app_module.launch_kwargs(), "max_file_size": "64kb"})
    try:
        before = _upload_folder_files()
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/gradio_api/upload", files={"files": ("base.safetensors", b"\0" * 1_000_000)})
        assert r.status_code == 413 and "maximum allowed size" in r.text
        assert not (_upload_folder_files() - before)
        assert demo.delete_cache == DELETE_CACHE == (15 * 60, 60 * 60)
    finally:
        demo.close()
