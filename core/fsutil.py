"""Writing outputs so that an interrupted write leaves nothing under the final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import QtuneError


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only when the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise QtuneError(f"{str(final)!r} already exists; remove it or choose another output path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
            yield handle
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise QtuneError(
            f"not enough disk space for {what} in {str(folder)!r}: need {needed_bytes / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB free; free some space or choose another output directory"
        )


def read_json_dict(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
