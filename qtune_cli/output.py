"""What every command shares for its output: Rich consoles, quiet libraries, one-line errors."""

from __future__ import annotations

import os
import sys
import traceback


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def quiet_libraries() -> None:
    """Keep the terminal for qtune's own progress: no per-map bars or info logs from the libraries."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # datasets logs a file it cannot parse as an error before raising it; qtune's one line says it
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    # On CPUs with AVX512-BF16, bitsandbytes offers to fetch a kernel from the hub and warns when it
    # cannot; qtune never fetches code, so the warning is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Libraries already imported (an earlier command in this process) read the variables too late.
    # Importing them here instead would load transformers before Unsloth could patch it.
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity(logging.CRITICAL)


def debug_enabled() -> bool:
    """``qtune --debug`` or QTUNE_DEBUG=1: print the traceback behind a one-line error."""
    return os.environ.get("QTUNE_DEBUG", "") not in ("", "0")


def print_traceback(error: BaseException) -> None:
    """The traceback of ``error`` and its causes, on stderr (only when :func:`debug_enabled`)."""
    if debug_enabled():
        traceback.print_exception(error, file=sys.stderr)
