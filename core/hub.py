"""Reaching the Hugging Face hub: one attempt, then one line.

huggingface_hub retries a failed request five times with back-off (about a minute, a dozen log
lines) and has no setting to turn that off. Before qtune lets a library fetch a hub id, it tries
one TCP connection to the hub itself (a few seconds at most). When that fails, an id already in
the local cache is used offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for this process
before the libraries are imported), and one that is not gets one line naming what was unreachable
and the two ways on: a local folder or file, or the offline demo.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

#: seconds to wait for the hub's TCP handshake
CONNECT_TIMEOUT_S = 3.0
TRUE = ("1", "on", "yes", "true")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_requested() -> bool:
    """HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) set by the user: the libraries use the cache only."""
    return any(os.environ.get(name, "").strip().lower() in TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.cache
def unreachable_reason() -> str | None:
    """Why the hub cannot be reached (one connection attempt per process), or None when it can."""
    parts = urlsplit(endpoint())
    host = parts.hostname or "huggingface.co"
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except socket.gaierror as exc:
        return f"{host}: {exc.strerror or exc}"
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"


def cache_folder() -> Path:
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def in_cache(repo_id: str, kind: str = "model") -> bool:
    """Whether the hub cache holds a snapshot of ``repo_id`` (``kind``: model or dataset)."""
    snapshots = cache_folder() / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def use_cache_only() -> None:
    """Make the libraries use the local cache only, for this process (read when they are imported;
    already imported ones are told too)."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True


def check_reachable(wanted: list[tuple[str, str, str]]) -> str | None:
    """Before a library fetches hub ids: ``wanted`` holds (id, kind, config key) for each (kind:
    model or dataset). None when they may go ahead (offline mode asked for, the hub reachable, or
    every id cached: then the cache is used), else the one-line problem and its fixes."""
    if not wanted or offline_requested():
        return None
    reason = unreachable_reason()
    if reason is None:
        return None
    missing = [(repo_id, kind, setting) for repo_id, kind, setting in wanted if not in_cache(repo_id, kind)]
    if not missing:
        use_cache_only()
        return None
    places = {"model": "a local model folder", "dataset": "a local data file (.jsonl, .json, .csv, .parquet)"}
    what = " and ".join(f"{kind} {repo_id!r}" for repo_id, kind, _ in missing)
    fixes = " and ".join(f"{setting} at {places[kind]}" for _, kind, setting in missing)
    cached = "it is" if len(missing) == 1 else "they are"
    return (f"cannot reach the Hugging Face hub ({reason}) to fetch {what}, and {cached} not in the local cache; "
            f"point {fixes}, or start with the offline demo: `qtune init --preset demo`")
