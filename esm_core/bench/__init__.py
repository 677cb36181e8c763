"""``esm-studio bench``: speed and peak memory of every merging method (:mod:`.core`), with ESM's
cold-merge and re-merge rows (:mod:`.esm_rows`); :mod:`.jobs` says what a row is."""
from .core import (FULL_BLOCKS, JOB_PROVIDERS, all_jobs, bench, format_table, make_checkpoints,  # noqa: F401
                   register_jobs, select_jobs)
from .jobs import Job  # noqa: F401
