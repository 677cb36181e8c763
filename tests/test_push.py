"""Pushing an export to the Hugging Face Hub (issue 27 item 6): the folder that would be uploaded, and the
refusals — bad repository id, not an export, offline, no token, a Hub that does not answer — each before any
upload. The Hub API is replaced by a recording fake: nothing reaches the network."""
from __future__ import annotations

import threading

import pytest

from esm_core import cli, package
from esm_core import studio as S
from esm_core.package import PushError


class FakeApi:
    """Records the calls push_export makes, in order; ``fail`` raises from the named call."""

    def __init__(self, fail: str | None = None, block: threading.Event | None = None):
        self.calls, self.fail, self.block = [], fail, block

    def _call(self, name, **kw):
        self.calls.append((name, kw))
        if self.block is not None and name == "whoami":
            self.block.wait(30)
        if self.fail == name:
            raise ConnectionError("[Errno -3] Temporary failure in name resolution")
        return type("Info", (), {"repo_url": "https://huggingface.co/user/merge"})()

    def whoami(self, **kw):
        return self._call("whoami", **kw)

    def create_repo(self, repo_id, **kw):
        return self._call("create_repo", repo_id=repo_id, **kw)

    def upload_folder(self, **kw):
        return self._call("upload_folder", **kw)

    def upload_file(self, **kw):
        return self._call("upload_file", **kw)


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No token anywhere and online, unless a test says otherwise."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setattr(package, "_stored_token", lambda: None)
    return monkeypatch


@pytest.fixture
def export(pool, tmp_path):
    merged = {k: v + 0.01 for k, v in pool.base.items()}
    return package.write_export(tmp_path / "merge", merged, base_sd=pool.base, family="openclip_vit",
                                model_info=package.model_info_of(pool), heads=package.heads_of(pool),
                                recipe={"method": "ta", "params": {"alpha": 0.3}, "tasks": list(pool.task_names),
                                        "base": "tiny", "source": "test"})


def test_the_folder_that_would_be_uploaded(export, env):
    env.setenv("HF_TOKEN", "hf_test_token")
    api = FakeApi()
    out = package.push_export(export, "user/merge", private=True, api=api)
    files = sorted(p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file())
    assert out == {"url": "https://huggingface.co/user/merge", "repo": "user/merge", "files": files}
    assert "README.md" in files and "merge_recipe.json" in files and "heads/alpha.safetensors" in files
    assert [c[0] for c in api.calls] == ["whoami", "create_repo", "upload_folder"]
    create, upload = api.calls[1][1], api.calls[2][1]
    assert create == {"repo_id": "user/merge", "private": True, "exist_ok": True, "repo_type": "model",
                      "token": "hf_test_token"}
    assert upload["folder_path"] == str(export) and upload["repo_id"] == "user/merge"
    assert upload["token"] == "hf_test_token" and "ta" in upload["commit_message"]


def test_a_single_file_export_is_uploaded_as_that_file(pool, tmp_path, env):
    p = package.write_export(tmp_path / "m.safetensors", pool.base, base_sd=None, family="openclip_vit",
                             model_info={}, recipe={"method": "ties"})
    api = FakeApi()
    out = package.push_export(p, "user/merge", token="hf_given", api=api)
    assert out["files"] == ["m.safetensors"] and [c[0] for c in api.calls][-1] == "upload_file"
    assert api.calls[-1][1]["path_in_repo"] == "m.safetensors" and api.calls[-1][1]["token"] == "hf_given"


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "-x/y", "", "user/na me"])
def test_bad_repository_ids_refused(export, env, repo):
    api = FakeApi()
    with pytest.raises(PushError, match="user/name"):
        package.push_export(export, repo, token="hf_x", api=api)
    assert api.calls == []


def test_not_an_export_refused(tmp_path, env):
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "weights.bin").write_bytes(b"x")
    api = FakeApi()
    with pytest.raises(PushError, match="not an ESM Studio export folder"):
        package.push_export(tmp_path / "some", "user/merge", token="hf_x", api=api)
    with pytest.raises(PushError, match="no such export"):
        package.push_export(tmp_path / "missing", "user/merge", token="hf_x", api=api)
    assert api.calls == []


def test_a_half_written_folder_is_not_pushed(export, env):
    (export / ".README.md.part").write_text("x")
    with pytest.raises(PushError, match="hidden or partial"):
        package.push_export(export, "user/merge", token="hf_x", api=FakeApi())


def test_offline_refused_at_once(export, env):
    env.setenv("HF_HUB_OFFLINE", "1")
    api = FakeApi()
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set"):
        package.push_export(export, "user/merge", token="hf_x", api=api)
    assert api.calls == []


def test_no_token_refused_at_once(export, env):
    api = FakeApi()
    with pytest.raises(PushError, match="no Hugging Face token: set HF_TOKEN"):
        package.push_export(export, "user/merge", api=api)
    assert api.calls == []
    env.setenv("HF_TOKEN", "two words")
    with pytest.raises(ValueError, match="HF_TOKEN must be a Hugging Face token"):
        package.push_export(export, "user/merge", api=api)
    assert api.calls == []


def test_the_stored_login_is_used_without_hf_token(export, env):
    env.setattr(package, "_stored_token", lambda: "hf_stored")
    api = FakeApi()
    package.push_export(export, "user/merge", api=api)
    assert api.calls[0] == ("whoami", {"token": "hf_stored"})


def test_a_hub_that_does_not_answer_fails_within_the_bound(export, env):
    release = threading.Event()
    api = FakeApi(block=release)
    try:
        with pytest.raises(PushError, match="did not answer within 0.2 s"):
            package.push_export(export, "user/merge", token="hf_x", api=api, check_seconds=0.2)
    finally:
        release.set()
    assert [c[0] for c in api.calls] == ["whoami"]                 # nothing created, nothing uploaded


def test_network_errors_said_in_one_line(export, env):
    api = FakeApi(fail="whoami")
    with pytest.raises(PushError, match=r"push to user/merge failed: ConnectionError: .*name resolution"):
        package.push_export(export, "user/merge", token="hf_x", api=api)
    assert [c[0] for c in api.calls] == ["whoami"]


def test_cli_push_exits_2_with_the_reason(export, env, capsys):
    env.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["push", str(export), "--repo", "user/merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("esm-studio push: error: HF_HUB_OFFLINE is set")
    env.delenv("HF_HUB_OFFLINE")
    assert cli.main(["push", str(export), "--repo", "user/merge", "--private"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err


def test_cli_push_uploads_through_the_api(export, env, capsys):
    api = FakeApi()
    env.setenv("HF_TOKEN", "hf_env")
    env.setattr(package, "_hf_api", lambda token: api)
    assert cli.main(["push", str(export), "--repo", "user/merge", "--private"]) == 0
    n = sum(1 for p in export.rglob("*") if p.is_file())
    assert capsys.readouterr().out.strip() == f"pushed {n} file(s) to https://huggingface.co/user/merge"
    assert api.calls[1][1]["private"] is True and api.calls[2][1]["folder_path"] == str(export)


def test_session_push_checks_before_writing_the_folder(sess, env):
    S.merge(sess, "ta", {"alpha": 0.3})
    with pytest.raises(PushError, match="no Hugging Face token"):
        S.push_merged(sess, "user/merge")
    with pytest.raises(PushError, match="paste your own"):            # a public server never lends its login
        S.push_merged(sess, "user/merge", stored_token=False)
    with pytest.raises(PushError, match="user/name"):
        S.push_merged(sess, "nope", token="hf_x")
    assert not (sess.workdir / "exports").exists()
    api = FakeApi()
    out = S.push_merged(sess, "user/merge", token="hf_visitor", api=api, stored_token=False)
    assert "README.md" in out["files"] and api.calls[0] == ("whoami", {"token": "hf_visitor"})
    assert api.calls[2][1]["folder_path"] == str(S.export_folder(sess)[0])


@pytest.mark.slow                    # launches the app: ~25 s on the shared machine
def test_the_export_view_over_http(pool, env, tmp_path):
    """The Export view's folder button answers a .zip of the folder; its push button refuses without a token,
    naming why, and never lends the server's login on a public Space."""
    gradio_client = pytest.importorskip("gradio_client")
    import os
    import zipfile
    from esm_core.merging import METHODS
    from fake_pool import launch_app
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo, url = launch_app(lambda: pool)
    try:
        c = gradio_client.Client(url, verbose=False, download_files=str(tmp_path))
        c.predict(api_name="/init")
        with pytest.raises(Exception, match="merge first"):
            c.predict(api_name="/export_folder")
        vals = [[t for t in p.default.split(",") if t]            # the app's multi-select takes a list
                if m.name == "esm" and p.name == "esd_types" and isinstance(p.default, str) else p.default
                for m in METHODS.values() for p in m.params]      # every method's parameters, schema order
        c.predict("ta", *vals, api_name="/merge")
        path, note, shown = c.predict(api_name="/export_folder")
        assert path.endswith(".zip") and "Model folder of merge #1" in note and shown["format"] == "open_clip"
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        assert any(n.endswith("/README.md") for n in names) and any(n.endswith("/merge_recipe.json") for n in names)
        with pytest.raises(Exception, match="no Hugging Face token"):
            c.predict("user/merge", "", True, api_name="/export_push")
        env.setenv("SPACE_ID", "someone/esm-studio")
        env.setenv("HF_TOKEN", "hf_the_servers")
        with pytest.raises(Exception, match="paste your own"):
            c.predict("user/merge", "", True, api_name="/export_push")
    finally:
        demo.close()
