"""Choosing the model backend for a config, and what this machine offers it (GPUs, memory, packages)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import QtuneError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config


def choose_backend(config: Config) -> Any:
    """The registered :class:`qtune.types.Backend` that runs ``config`` here (typed loosely: this module
    sits below types.py, which names the run objects that reach back here)."""
    from .plugin_manager import get_host

    backends = get_host().backends
    if config.model.backend != "auto":
        backend = backends.get(config.model.backend)
        reason = backend.unavailable_reason(config)
        if reason:
            raise QtuneError(f"backend {backend.name!r} cannot run here: {reason}; set model.backend: auto or install what it needs")
        return backend
    # auto: the available backend with the highest auto_priority (built in: unsloth, then transformers)
    ranked = sorted((backends.get(name) for name in backends), key=lambda b: -b.auto_priority)
    for backend in ranked:
        if backend.auto_priority > 0 and backend.unavailable_reason(config) is None:
            return backend
    raise QtuneError("no model backend can run here; install torch and transformers (pip install qtune)")


def _libcuda():
    """The CUDA driver library, or None where there is no usable GPU. Asked through ctypes so that
    torch is not imported: Unsloth must be imported before torch in a training process (it turns
    on the allocator's expandable segments only if torch has not started)."""
    import ctypes
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            return driver if driver.cuInit(0) == 0 else None
        except AttributeError:
            return None
    return None


def cuda_device_count() -> int:
    """The CUDA GPUs the driver offers this process (what torch.cuda.is_available() checks)."""
    import ctypes

    driver, count = _libcuda(), ctypes.c_int(0)
    if driver is None or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_total_memory_gib(device: int = 0) -> float | None:
    """Memory of CUDA device ``device`` in GiB, or None without a usable GPU."""
    import ctypes

    driver, handle, total = _libcuda(), ctypes.c_int(0), ctypes.c_size_t(0)
    if driver is None or driver.cuDeviceGet(ctypes.byref(handle), device) != 0:
        return None
    if driver.cuDeviceTotalMem_v2(ctypes.byref(total), handle) != 0:
        return None
    return total.value / 1024**3


#: cuDeviceGetAttribute's CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
_CAPABILITY_ATTRIBUTES = (75, 76)


def cuda_capability(device: int = 0) -> tuple[int, int] | None:
    """Compute capability (major, minor) of CUDA device ``device``, or None without a usable GPU."""
    import ctypes

    driver, handle = _libcuda(), ctypes.c_int(0)
    if driver is None or driver.cuDeviceGet(ctypes.byref(handle), device) != 0:
        return None
    values = []
    for attribute in _CAPABILITY_ATTRIBUTES:
        value = ctypes.c_int(0)
        if driver.cuDeviceGetAttribute(ctypes.byref(value), attribute, handle) != 0:
            return None
        values.append(value.value)
    return values[0], values[1]


def missing_modules(*modules: str) -> str | None:
    """``"X is not installed"`` for the first of ``modules`` that cannot be imported, else None
    (found without importing anything): what ``unavailable_reason`` methods report."""
    import importlib.util

    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None
