"""Shared test fixtures: the tiny random pool of the app tests and the committed demo pool.

:mod:`fake_pool` (a plain module next to this file) builds the tiny pool and
launches the app on a free port; these fixtures hand them to the tests.
"""
from __future__ import annotations

import pytest

from esm_core.pools.demo import DEMO_DIR, load_demo_pool
from fake_pool import make_fake_pool


@pytest.fixture(scope="module")
def pool():
    """A tiny random TaskPool (tiny open_clip ViT, 3 tasks, random images): builds in well under a second."""
    return make_fake_pool()


@pytest.fixture
def sess(pool):
    """A studio session on the tiny pool (closed after the test)."""
    from esm_core import studio as S
    s = S.new_session("cpu", live_per_task=16, alpha_per_task=12)
    S.load_demo(s, loader=lambda: pool)
    yield s
    S.close(s)


@pytest.fixture(scope="session")
def demo_pool():
    """The committed demo pool (assets/demo). It is part of the repository: a missing one fails, never skips."""
    assert (DEMO_DIR / "config.json").is_file(), f"the demo pool is missing from {DEMO_DIR}"
    return load_demo_pool()


@pytest.fixture(scope="session")
def tiny_text_pool_dir(tmp_path_factory):
    """A tiny built text pool (random 2-layer BERT, two fabricated tasks, the real build): (folder, pool.json)."""
    from fake_text_pool import build_tiny_text_pool
    return build_tiny_text_pool(tmp_path_factory.mktemp("text"))
