"""Choosing the model backend for a config."""

from __future__ import annotations

from .config import Config
from .errors import QtuneError
from .types import Backend


def choose_backend(config: Config) -> Backend:
    from .plugin_manager import get_host

    backends = get_host().backends
    if config.model.backend != "auto":
        backend = backends.get(config.model.backend)
        reason = backend.unavailable_reason(config)
        if reason:
            raise QtuneError(f"backend {backend.name!r} cannot run here: {reason}; set model.backend: auto or install what it needs")
        return backend
    # auto: Unsloth where it can run (CUDA GPU and unsloth installed), transformers otherwise
    for name in ("unsloth", "transformers"):
        if name in backends and backends.get(name).unavailable_reason(config) is None:
            return backends.get(name)
    raise QtuneError("no model backend can run here; install torch and transformers (pip install qtune)")


def cuda_total_memory_gib(device: int = 0) -> float | None:
    """Memory of CUDA device ``device`` in GiB, asked through libcuda without importing torch
    (Unsloth must be imported before torch in a training process); None without a usable GPU."""
    import ctypes
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    handle, total = ctypes.c_int(0), ctypes.c_size_t(0)
    try:
        if driver.cuInit(0) != 0 or driver.cuDeviceGet(ctypes.byref(handle), device) != 0:
            return None
        if driver.cuDeviceTotalMem_v2(ctypes.byref(total), handle) != 0:
            return None
    except AttributeError:
        return None
    return total.value / 1024**3
