"""Giving back the pages of file-mapped weights that were only read.

A base read from ``.safetensors`` files keeps its weights in private, copy-on-write mappings of the
files: a page counts in the process's resident memory once read, though the kernel could read it
again from the file at any time. The patcher keeps each patched weight's original beside the
buffer that holds the patched values; once the patch has read the original, its pages can be
given back, so a sweep holds one copy of those weights, as a single run does. The next read
(a restore, another variant) faults them in again from the page cache with the same bytes.

Only what is safe is given back: whole pages inside the tensor's bytes (never a neighbour's),
inside a private mapping of a file, none of them written (``/proc/self/pagemap`` shows every
present page is the file's own, not a copy-on-write copy). Linux only; elsewhere nothing happens.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
FILE_PAGE, SWAPPED, PRESENT = 1 << 61, 1 << 62, 1 << 63  # /proc/self/pagemap's flags (the kernel's pagemap.rst)

Spans = list[tuple[int, int]]  # sorted by start, none overlapping (as /proc/self/maps lists them)


def private_file_spans() -> Spans:
    """(start, end) addresses of this process's private mappings of files, in address order
    (none off Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    spans = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[1][3:4] == "p" and fields[5].startswith("/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    spans.append((start, end))
    except OSError:
        return []
    return sorted(spans)  # already in order there; sorted, the lookups below need not trust that


def _span_holding(spans: Spans, first: int, last: int) -> bool:
    """Whether one span of ``spans`` holds the addresses ``[first, last)`` (a binary search: a
    process maps a thousand files, libraries included, and a model has hundreds of weights)."""
    i = bisect.bisect_right(spans, (first, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= first and last <= spans[i][1]


def is_file_mapped(tensor: Tensor, spans: Spans) -> bool:
    """Whether ``tensor``'s bytes lie in a private mapping of a file (one of ``spans``)."""
    start = tensor.data_ptr()
    return tensor.device.type == "cpu" and _span_holding(spans, start, start + 1)


def release_read_pages(tensor: Tensor, spans: Spans) -> int:
    """Give back the pages wholly inside ``tensor``'s bytes where they are unwritten pages of a
    private file mapping in ``spans`` (:func:`private_file_spans`); the bytes given back (0: none)."""
    if tensor.device.type != "cpu" or not spans:
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE  # whole pages only
    if last <= first or not _span_holding(spans, first, last):
        return 0
    if not _only_file_pages(first // PAGE, (last - first) // PAGE):
        return 0  # written in place: giving those pages back would lose what was written
    return last - first if _madvise(first, last - first, MADV_DONTNEED) else 0


def _only_file_pages(first: int, count: int) -> bool:
    """Whether each of ``count`` pages from page number ``first`` is the file's own page or not in
    memory (never a copy-on-write copy, present or swapped out)."""
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            entries = os.pread(pagemap.fileno(), 8 * count, 8 * first)
    except OSError:
        return False
    if len(entries) != 8 * count:
        return False
    return all(not (entry & SWAPPED or (entry & PRESENT and not entry & FILE_PAGE))
               for (entry,) in struct.iter_unpack("<Q", entries))


_libc: ctypes.CDLL | None = None


def _madvise(address: int, length: int, advice: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise(address, length, advice) == 0
