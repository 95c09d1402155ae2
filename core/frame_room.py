"""Room on CPython's frame stack for the training loop, on the CPython versions that need it.

CPython 3.11+ keeps Python frames in 16 KiB chunks: a call that does not fit in the current chunk
maps a new one and its return unmaps it (python/cpython#142183). A training loop whose hot call
chains cross a chunk boundary pays an mmap, page faults and an munmap at every crossing, and where
the boundaries fall depends on how deep the caller's stack is: `qtune run` (CLI, pipeline) calls
``trainer.train`` from deeper than a notebook cell. CPython 3.13 and later cache one chunk (the fix,
gh-145789, backported to 3.13 on 2026-03-18); 3.11 and 3.12 do not, and the GPU machines run 3.12.

Measured on an H200 (Python 3.12; docs/benchmarks.md, 2026-12-02 17:43, the seed workload, three
processes taking turns step by step): `qtune run` from this frame made 3.0% and 2.9% more tokens/s
than without it, in both groups; on an H100 it cut the main thread's page faults per optimizer
step from 6,994 to 2,228, the notebook's level.
"""

from __future__ import annotations

import sys

#: stack slots (8 bytes each) reserved by :func:`call_with_frame_room`'s frame: ~512 KiB
FRAME_ROOM_SLOTS = 1 << 16
#: the CPython versions without the one-chunk cache
NEEDS_ROOM = sys.implementation.name == "cpython" and sys.version_info < (3, 13)


def call_with_frame_room(function, *args, **kwargs):
    """``function(*args, **kwargs)``; on CPython 3.11 and 3.12 from a frame whose raised
    ``co_stacksize`` (below) reserves ~512 KiB of frame stack. CPython gives a frame that large a
    chunk of its own, doubled from 16 KiB until it fits (1 MiB), so every frame the call makes fits
    in the rest of it. The memory is only reserved: pages are touched as frames use them."""
    return function(*args, **kwargs)


if NEEDS_ROOM:
    call_with_frame_room.__code__ = call_with_frame_room.__code__.replace(
        co_stacksize=call_with_frame_room.__code__.co_stacksize + FRAME_ROOM_SLOTS
    )
