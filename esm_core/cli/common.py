"""Helpers shared by the sub-commands."""
from __future__ import annotations


def parse_sets(items: list[str] | None) -> dict:
    """``["k=v", ...]`` → ``{k: v}`` (values stay strings; the method schema coerces them)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
