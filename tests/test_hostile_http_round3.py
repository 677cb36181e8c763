"""Issue 23, findings 7–12, over HTTP: each attack of the round posted to the running app (gradio_client or raw
requests), as the attacker did. Each must be refused with a message saying what is wrong, before the work it would
cost (nothing decoded, built, tokenised or read that the refusal makes useless), with the server's resident memory
bounded (this process serves the app), and the other session's pool and merges untouched. The library and session
versions of the same cases are in test_hostile_round3_images.py, test_hostile_round3_text.py and
test_session_round3.py."""
from __future__ import annotations

import html
import json
import os
import re
import threading
import uuid
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio_client  # noqa: E402
import httpx  # noqa: E402
import transformers  # noqa: E402

from esm_core import studio as S  # noqa: E402
from esm_core.checkpoints import save_safetensors  # noqa: E402
from esm_core.models import bert  # noqa: E402
from esm_core.pools import upload as U  # noqa: E402
from esm_core.pools import upload_text as UT  # noqa: E402
from fake_pool import launch_app  # noqa: E402
from test_app_http import _client, _values  # noqa: E402
from test_hostile_http import _rss_mib  # noqa: E402
from test_hostile_round3_images import _png_zip, _tower, _write_header  # noqa: E402
from test_hostile_round3_text import _fast_tokenizer_files, _split  # noqa: E402
from test_upload_text import _upload as _text_files  # noqa: E402

h = gradio_client.handle_file


@pytest.fixture(scope="module")
def app(pool):
    demo, url = launch_app(lambda: pool)
    victim = _client(url)
    victim.predict(api_name="/init")
    victim.predict("ta", *_values("ta", alpha=0.4), api_name="/merge")
    attacker = _client(url)                 # one attacking session for every case (the app caps sessions at 8)
    attacker.predict(api_name="/init")
    yield demo, url, victim, attacker
    demo.close()


def _victim_still_works(victim) -> None:
    """The other session merges on its own pool, and its table kept its earlier rows."""
    _, _, table = victim.predict("ties", *_values("ties", alpha=0.45), api_name="/merge")
    assert len(table["data"]) >= 2 and table["data"][-1][1] == "TIES-Merging" and table["data"][0][1] == "Task Arithmetic"


def _refused(go, match: str, grow_mib: float) -> str:
    """Run ``go`` (an HTTP call that must be refused): the error's text, after checking its message and that the
    server's resident memory grew by less than ``grow_mib``."""
    before = _rss_mib()
    with pytest.raises(Exception) as e:
        go()
    grown = _rss_mib() - before
    text = html.unescape(str(e.value))               # the app's toasts are HTML-escaped
    assert re.search(match, text), text
    assert grown < grow_mib, f"the server grew by {grown:.0f} MiB"
    return text


def _session_of(demo, session_hash: str):
    st = demo.state_holder.session_data.get(session_hash)
    return None if st is None else next((v for v in st.state_data.values() if isinstance(v, S.Session)), None)


def _text_upload(c, d: Path, config: dict, tok: dict[str, Path], tasks: dict, texts: dict):
    (d / "config.json").write_text(json.dumps(config))
    return lambda: c.predict(h(str(d / "base.safetensors")), [h(str(p)) for p in tasks.values()], "",
                             [h(str(p)) for p in texts.values()], "auto",
                             [h(str(d / "config.json")), *[h(str(p)) for p in tok.values()]], 0, "",
                             api_name="/load_upload")


# ----------------------------------------------------------------------------- 7: decoded pixels
def test_7_tiny_zips_for_a_1024_px_tower_are_refused_before_decoding(app, tmp_path, monkeypatch):
    """Before: a 93 KB upload (a tower declared with image_size 1024, 600 copies of one 1×1 PNG) took the server
    from 1.0 to 10.35 GB in 13 s. Now it is refused before any task checkpoint is read or any image decoded."""
    demo, _, victim, c = app

    def decoded(*a, **k):
        raise AssertionError("an image was decoded before the upload was refused")
    monkeypatch.setattr(U.Image, "open", decoded)
    base, tasks = _tower(tmp_path, 1024)
    zips = [_png_zip(tmp_path / f"{t}.zip", 600) for t in tasks]
    assert sum(z.stat().st_size for z in zips) < 300_000
    _refused(lambda: c.predict(h(str(base)), [h(str(p)) for p in tasks.values()], "", [h(str(z)) for z in zips],
                               "infer", [], 8, "clip", api_name="/load_upload"),
             r"reads 1024 px images; .*at most at 512×512 px", grow_mib=150)
    s = _session_of(demo, c.session_hash)
    assert s.pool.name == "fake" and not list(s.workdir.glob("pool-*"))      # the previous pool stays; no files
    _victim_still_works(victim)


# ----------------------------------------------------------------------------- 8: text config sizes
@pytest.fixture
def nothing_built(monkeypatch):
    def built(*a, **k):
        raise AssertionError("a model was built")
    monkeypatch.setattr(bert, "_expected_shapes", built)
    monkeypatch.setattr(transformers.AutoModel, "from_config", built)


def test_8_a_160000_layer_text_config_is_refused_before_anything_is_built(app, tmp_path, nothing_built):
    """Before: a 170-byte config.json with num_hidden_layers 160,000 grew the server to 10 GB in 9 minutes
    (10,000 layers: 26 s, +430 MB kept). Now every size field is checked against the checkpoint's own keys first."""
    _, _, victim, c = app
    paths, texts, cfg, tok = _text_files(tmp_path, "bert")
    for layers in (160_000, 10_000):
        _refused(_text_upload(c, tmp_path, {**cfg, "num_hidden_layers": layers}, tok, paths, texts),
                 rf"num_hidden_layers = {layers} must be a whole number from 1 to 128 \(the checkpoint: it holds 2 "
                 r"layers", grow_mib=100)
    _victim_still_works(victim)


# ----------------------------------------------------------------------------- 9: tokenizers
def test_9_a_backtracking_regex_tokenizer_is_refused_before_it_runs(app, tmp_path, monkeypatch):
    """Before: a tokenizer.json whose pre-tokenizer splits on ``(a|a)*$`` cost ≈ 0.3 s a sentence inside one
    tokenizer call, held both heavy slots and ran on after Cancel. Now no regular expression of an upload runs."""
    _, _, victim, c = app
    paths, texts, cfg, _ = _text_files(tmp_path, "bert")
    for i, f in enumerate(texts.values()):                       # the sentences: 21 × "a" + "!"
        f.write_text("".join(json.dumps({"text": "a" * 21 + "!", "label": j % 2}) + "\n" for j in range(24)))
    tok = _fast_tokenizer_files(tmp_path, lambda j: j.update(pre_tokenizer=_split({"Regex": "(a|a)*$"})))

    def ran(*a, **k):
        raise AssertionError("the uploaded tokenizer ran")
    monkeypatch.setattr(bert, "tokenize", ran)
    _refused(_text_upload(c, tmp_path, cfg, tok, paths, texts),
             r"tokenizer\.json: pre_tokenizer \(Split\) has the pattern '\(a\|a\)\*\$', a regular expression: this "
             r"server runs no regular expression of an upload", grow_mib=100)
    _victim_still_works(victim)


# ----------------------------------------------------------------------------- 10: closed sessions
def _heartbeat(url: str, sid: str, stop: threading.Event) -> threading.Thread:
    """A browser tab's heartbeat stream (its end is the tab closing)."""
    def run():
        with httpx.Client(base_url=url, timeout=None) as hb, hb.stream("GET", f"/gradio_api/heartbeat/{sid}") as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    break
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _post(http, api: str, data: list, session: str) -> str:
    r = http.post(f"/gradio_api/call/{api}", json={"data": data, "session_hash": session})
    assert r.status_code == 200, r.text
    return http.get(f"/gradio_api/call/{api}/{r.json()['event_id']}").text


def _wait_until(cond, seconds: float = 40) -> bool:
    import time
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_10_a_closed_tab_gives_its_place_and_folder_back_at_once(pool):
    """Before: a closed tab's state lived 3,600 s (gradio's override of the app's 20 minutes) and the gate freed its
    slot after 40 minutes, so 15 session folders existed under a cap of 8. Now, with a cap of 2: a third visitor is
    turned away while two tabs are open, and admitted as soon as one of them closes — its folder deleted and its
    tensors dropped at once."""
    import app as app_module
    demo = app_module.make_demo(lambda: pool, max_open=2)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **app_module.launch_kwargs())
    stops, sids = [threading.Event(), threading.Event()], [uuid.uuid4().hex[:11] for _ in range(3)]
    try:
        for sid, stop in zip(sids[:2], stops):
            _heartbeat(url, sid, stop)
        with httpx.Client(base_url=url, timeout=120) as http:
            for sid in sids[:2]:
                assert "event: complete" in _post(http, "init", [], sid)
            first = _session_of(demo, sids[0])
            assert first.workdir.is_dir() and len(demo.esm_gate) == 2
            assert "busy: 2 people are using it" in _post(http, "init", [], sids[2])     # the cap holds
            stops[0].set()                                                             # the first tab closes
            assert _wait_until(lambda: first.closed and not first.workdir.exists())
            assert first.pool is None and len(demo.esm_gate) == 1
            assert "event: complete" in _post(http, "init", [], sids[2])                # its place is given back
            assert len(demo.esm_gate) == 2
    finally:
        for stop in stops:
            stop.set()
        demo.close()


# ----------------------------------------------------------------------------- 11: accounting
@pytest.fixture
def no_checkpoint_read(monkeypatch):
    def read(*a, **k):
        raise AssertionError("a task checkpoint was read")
    monkeypatch.setattr(UT, "load_checkpoint", read)


def test_11_text_uploads_are_counted_against_the_budget_before_reading(app, tmp_path, monkeypatch,
                                                                      no_checkpoint_read):
    """Before: text uploads had no size check up front (40 tasks accepted under a 1.5 MB budget where image files
    were refused). Now the files are counted, per task, against the session's budget before anything is read."""
    _, _, victim, c = app
    paths, texts, cfg, tok = _text_files(tmp_path, "bert")
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", "0.01")  # two tasks' files alone exceed this session budget
    _refused(_text_upload(c, tmp_path, cfg, tok, paths, texts),
             r"this upload \(5 files\) needs about .* more than the 0\.0 MiB a session may hold", grow_mib=100)
    monkeypatch.delenv("ESM_SESSION_MEMORY_MB")
    _victim_still_works(victim)


@pytest.mark.slow
def test_11_text_uploads_are_capped_in_tasks_before_reading(app, tmp_path, no_checkpoint_read):
    """Before: no limit on the number of text tasks. Now one task more than the cap is refused before any task
    checkpoint is read (34 files posted: slow over HTTP)."""
    _, _, victim, c = app
    paths, texts, cfg, tok = _text_files(tmp_path, "bert")
    n = UT.MAX_TASKS + 1
    many_dir = tmp_path / "many"
    many_dir.mkdir()
    tasks, many_texts = {}, {}
    for i in range(n):                                   # each task its own files (the names give the tasks)
        tasks[f"t{i}"] = many_dir / f"t{i}.safetensors"
        tasks[f"t{i}"].write_bytes(paths["colours"].read_bytes())
        many_texts[f"t{i}"] = many_dir / f"t{i}.jsonl"
        many_texts[f"t{i}"].write_text(texts["colours"].read_text())
    (many_dir / "base.safetensors").write_bytes((tmp_path / "base.safetensors").read_bytes())
    _refused(_text_upload(c, many_dir, cfg, tok, tasks, many_texts),
             rf"{n} task checkpoints: this server merges at most {UT.MAX_TASKS} tasks", grow_mib=100)
    _victim_still_works(victim)


def _upload_files() -> set[Path]:
    from gradio.utils import get_upload_folder
    return {p for p in Path(get_upload_folder()).rglob("*") if p.is_file()}


def test_11_a_sessionless_upload_over_the_upload_space_is_refused_and_leaves_nothing(app, monkeypatch):
    """Before: a POST /gradio_api/upload without any session wrote 1 GB in 17 s that stayed until the hourly
    sweep. Now the upload folder's space is capped (ESM_UPLOAD_SPACE_MB, here 2 MiB above what it holds): a
    larger upload is refused as it arrives and leaves no file."""
    from esm_core.app import uploads
    from gradio.utils import get_upload_folder
    _, url, _, _ = app
    held = uploads.folder_bytes(get_upload_folder(), 0.0)
    monkeypatch.setenv("ESM_UPLOAD_SPACE_MB", str(held / 2 ** 20 + 2))
    before = _upload_files()
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/gradio_api/upload", files={"files": ("big.bin", b"\1" * 6_000_000)})
        assert r.status_code in (400, 413) and "upload space is full" in r.text
    assert not (_upload_files() - before)


# ----------------------------------------------------------------------------- 12: the low-severity cases
@pytest.mark.parametrize("label,says", [(2 ** 40, r"row 2: label 1099511627776 is not a class index"),
                                        (10 ** 30, r"row 2: label about 10\^30 is not a class index")])
def test_12_huge_labels_get_a_message_not_a_raw_overflow(app, tmp_path, label, says):
    """Before: labels 2⁴⁰ or 10³⁰ reached the user as a raw OverflowError text."""
    _, _, _, c = app
    paths, texts, cfg, tok = _text_files(tmp_path, "bert")
    texts["animals"].write_text(json.dumps({"text": "red cat", "label": 0}) + "\n"
                                + json.dumps({"text": "dog", "label": label}) + "\n")
    msg = _refused(_text_upload(c, tmp_path, cfg, tok, paths, texts), says, grow_mib=100)
    assert "OverflowError" not in msg and "MemoryError" not in msg


def test_12_deeply_nested_jsonl_gets_a_message_not_a_recursion_error(app, tmp_path):
    _, _, _, c = app
    paths, texts, cfg, tok = _text_files(tmp_path, "bert")
    texts["animals"].write_text('{"text": "a", "label": 0}\n{"text": "b", "label": ' + "[" * 100_000
                                + "]" * 100_000 + "}\n")
    msg = _refused(_text_upload(c, tmp_path, cfg, tok, paths, texts),
                   r"animals\.jsonl line 2 is nested more than 4 levels deep", grow_mib=100)
    assert "RecursionError" not in msg


def test_12_an_infinite_layer_norm_eps_is_refused(app, tmp_path, nothing_built):
    """Before: ``"layer_norm_eps": 1e400`` parsed as inf and the merge reported 100 % normalised."""
    _, _, _, c = app
    paths, texts, cfg, tok = _text_files(tmp_path, "bert")
    (tmp_path / "config.json").write_text(json.dumps(cfg)[:-1] + ', "layer_norm_eps": 1e400}')
    go = lambda: c.predict(h(str(tmp_path / "base.safetensors")), [h(str(p)) for p in paths.values()], "",  # noqa
                           [h(str(p)) for p in texts.values()], "auto",
                           [h(str(tmp_path / "config.json")), *[h(str(p)) for p in tok.values()]], 0, "",
                           api_name="/load_upload")
    _refused(go, r"config\.json: layer_norm_eps = inf is not a finite number", grow_mib=100)


def test_12_an_int32_weight_in_a_text_task_is_refused_as_for_images(app, tmp_path):
    """Before: an int32 weight in a text task was merged (image uploads refused it)."""
    from safetensors.torch import load_file
    _, _, _, c = app
    paths, texts, cfg, tok = _text_files(tmp_path, "bert")
    sd = load_file(str(paths["animals"]))
    k = "bert.encoder.layer.0.attention.self.query.weight"
    sd[k] = sd[k].to(torch.int32)
    save_safetensors(sd, paths["animals"])
    _refused(_text_upload(c, tmp_path, cfg, tok, paths, texts),
             r"animals\.safetensors' does not fit the base model — dtype mismatch \(float vs non-float\): "
             r"encoder\.layer\.0\.attention\.self\.query\.weight: torch\.int32", grow_mib=100)


def test_12_a_float8_task_is_refused_by_name(app, tmp_path):
    """Before: a float8 task reached the user as a raw NotImplementedError text."""
    from safetensors.torch import load_file, save_file
    _, _, _, c = app
    base, tasks = _tower(tmp_path, 32, patch=8)
    sd = load_file(str(tasks["b"]))
    sd["visual.proj"] = sd["visual.proj"].to(torch.float8_e4m3fn)
    save_file(sd, str(tasks["b"]))
    zips = [_png_zip(tmp_path / f"{t}.zip", 4) for t in tasks]
    msg = _refused(lambda: c.predict(h(str(base)), [h(str(p)) for p in tasks.values()], "",
                                     [h(str(z)) for z in zips], "infer", [], 8, "clip", api_name="/load_upload"),
                   r"b\.safetensors: unsupported tensor dtype for 'visual\.proj' \(F8_E4M3\)", grow_mib=100)
    assert "NotImplementedError" not in msg


def test_12_a_header_of_200000_empty_tensors_is_refused_from_the_header(app, tmp_path):
    """Before: a refused 84 MB safetensors of 1 M empty tensors kept +1.3 GB resident (33 s to refuse). Here an
    11 MB one (200,000 tensors): refused from its header's size, the memory bounded."""
    _, _, victim, c = app
    p = tmp_path / "many.safetensors"
    _write_header(p, 200_000)
    base, tasks = _tower(tmp_path, 32, patch=8)
    zips = [_png_zip(tmp_path / f"{t}.zip", 4) for t in tasks]
    _refused(lambda: c.predict(h(str(p)), [h(str(x)) for x in tasks.values()], "", [h(str(z)) for z in zips],
                               "infer", [], 8, "clip", api_name="/load_upload"),
             r"many\.safetensors: safetensors header of 1\d\.\d MiB, more than the 8 MiB", grow_mib=64)
    _victim_still_works(victim)


def test_12_a_task_file_rewritten_after_loading_stops_the_merge_clearly(app, pool, tmp_path):
    """Before: a lazily read task file rewritten with another shape gave a raw size-mismatch error (its size and
    mtime were never checked again). Now the merge stops naming the task and saying the file changed."""
    demo, _, _, c = app
    save_safetensors(pool.base, tmp_path / "base.safetensors")
    for t in ("alpha", "beta"):
        save_safetensors(pool.tasks[t], tmp_path / f"{t}.safetensors")
    c.predict(h(str(tmp_path / "base.safetensors")), [h(str(tmp_path / f"{t}.safetensors")) for t in ("alpha", "beta")],
              "", [], "infer", [], 16, "half", api_name="/load_upload")
    s = _session_of(demo, c.session_hash)
    kept = s.pool.tasks["beta"].path                                  # read lazily from the session's folder
    assert kept.parent.parent == s.workdir
    other = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.ndim == 2 else v for k, v in pool.tasks["beta"].items()}
    save_safetensors(other, kept)                                      # the same keys, other shapes
    msg = _refused(lambda: c.predict("ties", *_values("ties", alpha=0.35), api_name="/merge"),
                   r"task 'beta'.*changed on disk since it was loaded", grow_mib=100)
    assert "size mismatch" not in msg
    c.predict(api_name="/load_demo")                                   # the attacker's session works on
