"""How training calls trainer.train: from the frame room (qtune.frame_room: on CPython 3.11 and 3.12
a hot loop called from it maps no frame-stack chunks, whatever the caller's depth), with Ctrl-C
taken at a step's end."""

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


def test_ctrl_c_during_training_is_noted_then_raised_between_steps():
    # The first SIGINT only takes note (the bridge raises at the step's end, where nothing can
    # swallow it); a second raises at once; the default handler comes back afterwards.
    import os
    import signal
    from types import SimpleNamespace

    from qtune.training import interrupt_between_steps

    bridge = SimpleNamespace(interrupt_requested=False)
    raised_at = None
    try:
        with interrupt_between_steps(bridge):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundaries
                pass
            noted = bridge.interrupt_requested
            raised_at = "second"
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
            raised_at = None
    except KeyboardInterrupt:
        raised_at = raised_at or "first"
    assert raised_at == "second" and noted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
