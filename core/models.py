"""Model names: a catalogue short name, a hub id, or a local directory."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_model(name: str) -> str:
    """Return what ``from_pretrained`` should load for ``name``.

    A local directory wins; then a catalogue name (`qtune models`); anything else is passed on as a
    hub id (loaded from the local cache when HF_HUB_OFFLINE=1).
    """
    expanded = os.path.expanduser(name)
    if Path(expanded).is_dir():
        return expanded
    from .plugin_manager import get_host

    models = get_host().models
    if name in models:
        return models.items[name].resolve()
    if name.lower() in models:
        return models.items[name.lower()].resolve()
    from .errors import QtuneError

    if Path(expanded).is_file():
        kind = "a GGUF file" if expanded.lower().endswith(".gguf") else "a file"
        raise QtuneError(f"model.name {name!r} is {kind}; qtune trains a transformers model: give its folder "
                         f"(config.json and safetensors), a hub id or a name from `qtune models`")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        from .fsutil import missing_path_reason

        raise QtuneError(f"model path {name!r} {missing_path_reason(Path(expanded))}; give a local model directory, "
                         f"a hub id or a name from `qtune models`")
    return name


def cache_dir() -> Path:
    """Where qtune keeps what it builds once (converted models, llama.cpp's converter)."""
    root = os.environ.get("QTUNE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qtune")
    return Path(root)
