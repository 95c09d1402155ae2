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
