"""Memory now: what the progress line, metrics.jsonl and the memory report read."""

from __future__ import annotations

import resource
import sys

GIB = 1024**3


def cuda_if_present():
    """``torch.cuda`` when a CUDA GPU is present, else None (imports torch)."""
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def current_memory_gib() -> float:
    """GPU memory reserved by torch now, or the process's resident memory on CPU."""
    torch = sys.modules.get("torch")
    gpu = cuda_if_present() if torch is not None else None  # no torch loaded yet: nothing on a GPU either
    if gpu is not None:
        return gpu.memory_reserved() / GIB
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / GIB


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux
