"""Choosing the torch device ("auto": CUDA when present, else the CPU), checking a tensor for NaN / inf in one
cheap pass, and giving freed host memory back."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import threading

import torch

from . import settings


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def all_finite(t: torch.Tensor) -> bool:
    """True when the floating tensor ``t`` holds no NaN and no ±inf (an empty one: True).

    By its extremes (``torch.aminmax`` propagates NaN, and an inf is an extreme): one reduction without a
    boolean copy of ``t`` — ``torch.isfinite(t).all()`` takes ≈ 10× as long on the CPU (2.4 M float32 values:
    5.7 ms against 0.5 ms), which a re-merge pays on every key and an upload on every checkpoint."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


_LOCAL = threading.local()          # per thread: sections open, torch's count before the first of them


@contextlib.contextmanager
def one_torch_thread():
    """Run the body with torch on one intra-op thread in the calling thread.

    For sections whose parallel work runs in another thread pool (SciPy's OpenBLAS: the CPU eigh, syrk and
    trmm of the decompositions): torch's OpenMP workers, spinning between its short products, and
    OpenBLAS's take the same cores from each other (one ViT-B/32 block's spectra on 2 cores: 7.8 s wall with
    both pools at 2 threads, 6.3 s with torch at 1 — and 7.6 s with both at 1).

    torch's count belongs to each thread (OpenMP's and MKL's settings), and ``torch.set_num_threads`` also
    sets the default a thread takes at its first parallel op: a short-lived thread puts that default back at
    once, so no other thread (another session's handler) starts at one thread. Nested sections change nothing."""
    depth = getattr(_LOCAL, "depth", 0)
    if depth == 0:
        _LOCAL.saved = torch.get_num_threads()
    lowered = depth == 0 and _LOCAL.saved > 1
    _LOCAL.depth = depth + 1
    try:
        if lowered:
            _lower_to_one(_LOCAL.saved)
        yield
    finally:
        _LOCAL.depth -= 1
        if lowered:
            torch.set_num_threads(_LOCAL.saved)


def _lower_to_one(default: int) -> None:
    """The calling thread's torch count to 1, the default for threads not yet started back to ``default``."""
    torch.set_num_threads(1)
    keeper = threading.Thread(target=torch.set_num_threads, args=(default,), name="torch-threads-default")
    keeper.start()
    keeper.join()


@contextlib.contextmanager
def torch_threads_back():
    """Inside :func:`one_torch_thread`: the body runs at the count the section lowered — for one large torch
    call that spreads well over threads (the SVD of a 3072 × 768 matrix: 0.43 s on one thread, 0.22 s on
    two); outside a section it changes nothing."""
    if getattr(_LOCAL, "depth", 0) == 0 or _LOCAL.saved <= 1 or torch.get_num_threads() != 1:
        yield
        return
    torch.set_num_threads(_LOCAL.saved)
    try:
        yield
    finally:
        _lower_to_one(_LOCAL.saved)


_LIBC = []          # the C library, opened once (None where it is not glibc)


def _libc():
    if not _LIBC:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _LIBC.append(lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def trim_heap(collect: bool = False) -> None:
    """Give freed host memory back to the operating system: glibc's ``malloc_trim`` (a no-op where the C library
    is not glibc; under a millisecond), after a full garbage collection when ``collect`` (0.3 s in the app's
    process: tensors are freed by reference counting, so the app does not collect). Without it, the process
    keeps the pages of tensors it freed — after the app's Spectra view moved 2.5 GiB of statistics to disk,
    about 5 GiB of freed heap stayed resident on a ViT-B/32 × 8 upload. The C library is opened once: a
    ``ctypes.CDLL`` per call left a reference cycle of ctypes objects behind for the garbage collector."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3              # glibc mallopt parameter


def bound_heap_fragmentation(mib: float | None = None) -> float | None:
    """Serve every allocation of at least ``mib`` MiB (default: env ``ESM_STUDIO_MMAP_THRESHOLD_MIB``, else
    :mod:`esm_core.settings`: 4) from its own memory mapping, handed back to the system the moment it is freed:
    glibc's ``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc raising the threshold to 32 MiB as large
    blocks are freed. Freed tensors then never stay resident in a fragmented heap: with glibc's default the
    app's ESM++ step peaked 0.4-0.5 GB higher in about one run of three; the price is page faults on fresh
    mappings (docs/performance.md). Process-wide: the app's server sets it at start, and
    ``esm-studio bench --app-memory``, which mirrors the app. Returns the MiB set, or None (0 asked: glibc's
    own behaviour; or a C library that is not glibc)."""
    if mib is None:
        mib = settings.mmap_threshold_mib()
    if not 0 <= mib <= 32:
        raise ValueError(f"the mmap threshold must be between 0 and 32 MiB (glibc's limit), got {mib}")
    if mib == 0:
        return None
    libc = _libc()
    if libc is None:
        return None
    return float(mib) if libc.mallopt(M_MMAP_THRESHOLD, int(mib * 2**20)) == 1 else None
