"""esm_core.settings: every environment variable read in one place, refused by name when it is bad."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from esm_core import settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_when_unset(monkeypatch):
    for name in settings.ALL:
        monkeypatch.delenv(name, raising=False)
    got = settings.check_all()
    assert got["ESM_MAX_SESSIONS"] == 8
    assert got["ESM_SESSION_MEMORY_MB"] == 8 * 2 ** 30
    assert got["ESM_MAX_MODEL_PARAMS"] == 320_000_000
    assert got["ESM_UPLOAD_SPACE_MB"] == 16 * 2 ** 30
    assert got["ESM_STUDIO_MMAP_THRESHOLD_MIB"] == 4.0
    assert got["ESM_STUDIO_CACHE"] == Path("~/.cache/esm-studio").expanduser()
    assert got["ESM_STUDIO_NPM"] == got["ESM_STUDIO_CACHE"] / "packages"
    assert got["HF_HUB_OFFLINE"] is False


def test_values_are_parsed(monkeypatch, tmp_path):
    monkeypatch.setenv("ESM_MAX_SESSIONS", " 3 ")
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", "1.5")
    monkeypatch.setenv("ESM_MAX_MODEL_PARAMS", "1_000")
    monkeypatch.setenv("ESM_STUDIO_MMAP_THRESHOLD_MIB", "0")
    monkeypatch.setenv("ESM_STUDIO_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "Yes")
    assert settings.max_sessions() == 3
    assert settings.session_memory_bytes() == int(1.5 * 2 ** 20)
    assert settings.max_model_params() == 1000
    assert settings.mmap_threshold_mib() == 0
    assert settings.cache_dir() == tmp_path and settings.npm_dir() == tmp_path / "packages"
    assert settings.hub_offline() is True


@pytest.mark.parametrize("name,value,says", [
    ("ESM_MAX_SESSIONS", "eight", "ESM_MAX_SESSIONS must be an integer"),
    ("ESM_MAX_SESSIONS", "0", "between 1 and 1,024, got 0"),
    ("ESM_MAX_SESSIONS", "2.5", "must be an integer"),
    ("ESM_SESSION_MEMORY_MB", "nan", "ESM_SESSION_MEMORY_MB must be a number"),
    ("ESM_SESSION_MEMORY_MB", "-1", "ESM_SESSION_MEMORY_MB must be a number between"),
    ("ESM_UPLOAD_SPACE_MB", "lots", "ESM_UPLOAD_SPACE_MB must be a number"),
    ("ESM_SESSION_MEMORY_MB", "1e400", "ESM_SESSION_MEMORY_MB"),
    ("ESM_MAX_MODEL_PARAMS", "1e9", "ESM_MAX_MODEL_PARAMS must be an integer"),
    ("ESM_STUDIO_MMAP_THRESHOLD_MIB", "64", "between 0 and 32"),
    ("HF_HUB_OFFLINE", "maybe", "HF_HUB_OFFLINE must be one of"),
])
def test_bad_values_are_refused_by_name(monkeypatch, name, value, says):
    monkeypatch.setenv(name, value)
    with pytest.raises(settings.SettingError, match=says):
        settings.ALL[name]()
    with pytest.raises(ValueError, match=name):
        settings.check_all()


def _env_reads(tree: ast.AST) -> list[int]:
    """Lines that read the environment: ``os.environ.get``, ``os.getenv``, ``os.environ[...]`` in a load."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr == "getenv" or (f.attr == "get" and isinstance(f.value, ast.Attribute)
                                      and f.value.attr == "environ"):
                lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and \
                isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            lines.append(node.lineno)
    return lines


def test_the_reader_sees_environment_reads():
    src = "import os\na = os.environ.get('X')\nb = os.getenv('Y')\nc = os.environ['Z']\nos.environ.setdefault('W', '1')\n"
    assert _env_reads(ast.parse(src)) == [2, 3, 4]


def test_no_module_reads_the_environment_but_settings():
    """One policy: every environment read in esm_core goes through esm_core.settings."""
    readers = [f"{p.relative_to(ROOT)}:{line}" for p in (ROOT / "esm_core").rglob("*.py")
               if p != ROOT / "esm_core" / "settings.py" for line in _env_reads(ast.parse(p.read_text()))]
    assert readers == []


# ---------------------------------------------------------------- esm_core.progress, the one progress type

def test_progress_steps_report_before_each_item_and_stop_when_the_reporter_raises():
    from esm_core import progress as P
    seen = []
    assert list(P.steps(["a", "b"], lambda f, d: seen.append((f, d)), "layer", 0.5, 1.0)) == ["a", "b"]
    assert seen == [(0.5, "layer a (1/2)"), (0.75, "layer b (2/2)")]
    assert list(P.steps([], None, "x")) == []

    def stop(f, d):
        if f > 0:
            raise RuntimeError("stop")
    with pytest.raises(RuntimeError):
        list(P.steps([1, 2, 3], stop, "k"))
    got = []
    P.scaled(lambda f, d: got.append(f), 0.2, 0.4)(0.5, "half")
    P.scaled(lambda f, d: got.append(f), 0.2, 0.4)(7, "clipped")
    assert got == [pytest.approx(0.3), pytest.approx(0.4)]
    assert P.reporter(None) is P.no_progress and P.no_progress(0.1, "x") is None
