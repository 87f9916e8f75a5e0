"""Keep freed memory in the process heap while training on the CPU (glibc).

Every CPU training step allocates and frees the same large temporaries: a dozen or more
``(cells, genes)`` float32 tensors in the likelihood and its gradient, 6 MB each for 128
CellBench cells × 11,533 genes. With glibc's default thresholds the memory freed at the
end of a step is handed back to the kernel (the top of the heap is trimmed once it
exceeds twice the largest block freed so far) and the next step faults every page in
again: 100,000 to 250,000 minor page faults per CellBench epoch, which took 18% longer
than with the heap retained (``benchmarks/heap_ab.py``, ``benchmarks/RESULTS.md``).
Inside :func:`retained_heap` blocks of up to 32 MiB come from the heap and the heap is
not trimmed, so every step reuses the pages of the previous one.

On exit the memory is released (``malloc_trim``) and glibc is left with the thresholds
its own dynamic adjustment reaches after freeing a 32 MiB block: blocks over 32 MiB are
mapped on their own, and the heap is trimmed when more than 64 MiB is free at its top.
Elsewhere than on Linux with glibc nothing is changed. Set :data:`enabled` to ``False``
to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

#: Whether :func:`retained_heap` tunes glibc's allocator (training calls it).
enabled = True

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: mallopt takes an int: the largest trim threshold it can set (2 GiB).
_TRIM_THRESHOLD_WHILE_RETAINED = 2**31 - 1
_TRIM_THRESHOLD_AFTER = 2 * MMAP_THRESHOLD

_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    """glibc's handle, or ``None`` where the C library is another (macOS, musl...)."""
    global _libc
    if _libc is False:
        _libc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
                _libc = libc
            except (OSError, AttributeError):
                logger.debug("Not glibc: the allocator is left as it is.")
    return _libc


def glibc_available() -> bool:
    """Whether this process runs on glibc, whose allocator :func:`retained_heap` tunes."""
    return _glibc() is not None


def _set_thresholds(trim: int) -> None:
    libc = _glibc()
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, trim)


@contextmanager
def retained_heap() -> Iterator[None]:
    """Within the block, freed memory stays in the heap for the next allocation.

    Re-entrant: only the outermost block changes the allocator's settings and releases
    the retained memory when it ends. See the module docstring for why and what is set.

    Examples
    --------
    >>> import torch
    >>> with retained_heap():
    ...     for _ in range(3):
    ...         total = torch.ones(128, 11_533).sum()  # pages reused, not faulted in again
    """
    global _depth
    with _lock:
        outermost = _depth == 0
        _depth += 1
        active = outermost and enabled and glibc_available()
        if active:
            _set_thresholds(_TRIM_THRESHOLD_WHILE_RETAINED)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if active:
                _set_thresholds(_TRIM_THRESHOLD_AFTER)
                _glibc().malloc_trim(0)
