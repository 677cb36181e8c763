"""The library's error types and how their messages list keys (one module, so that every layer can raise
them without importing another)."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit the base model."""


def _fmt_keys(keys, n=8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
