"""The training loop's frame room (qtune.frame_room): on CPython 3.11 and 3.12 a hot loop called
from it maps no frame-stack chunks, whatever the caller's depth."""

from __future__ import annotations

import resource
import sys

import pytest

from qtune.frame_room import NEEDS_ROOM, call_with_frame_room


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def chain(n):
    return chain(n - 1) if n else 0


def hot_loop() -> int:
    before = minor_faults()
    for _ in range(2000):
        chain(8)
    return minor_faults() - before


def at_depth(depth, function, *args):
    return at_depth(depth - 1, function, *args) if depth else function(*args)


def test_frame_room_stops_cpython_frame_chunk_thrashing():
    # CPython 3.11 and 3.12 map a 16 KiB chunk for the frames of a call that crosses a chunk
    # boundary and unmap it on return (python/cpython#142183): at the wrong stack depth, each of the
    # loop's 2,000 calls faults. The worst depth out of 200 is such a depth.
    worst = max(at_depth(d, hot_loop) for d in range(200))
    if sys.version_info >= (3, 13):
        assert not NEEDS_ROOM
        pytest.skip(f"CPython {sys.version_info[:2]} keeps a spare chunk (gh-142183 fixed): {worst} faults at worst")
    assert NEEDS_ROOM and worst >= 1000
    assert max(at_depth(d, call_with_frame_room, hot_loop) for d in range(200)) < 100
    assert call_with_frame_room(lambda a, b=0: a + b, 1, b=2) == 3
