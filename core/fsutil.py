"""Writing outputs so that an interrupted write leaves nothing under the final name."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import QtuneError

#: the temporary siblings qtune's writers leave beside a folder NAME when killed: atomic_dir's
#: ``.NAME.partial-PID`` and ``.NAME.previous-PID``, the exporters' ``.NAME.merging-*`` / ``.NAME.work-*``
TEMPORARY_KINDS = ("partial", "previous", "merging", "work")
_REPLACEABLE: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("qtune_replaceable", default=frozenset())


@contextlib.contextmanager
def replacing(final: Path) -> Iterator[None]:
    """While the block runs, :func:`atomic_dir` may replace the existing folder ``final`` (``qtune
    export --force``): the old folder keeps its name until the new one is complete."""
    token = _REPLACEABLE.set(_REPLACEABLE.get() | {str(Path(final).absolute())})
    try:
        yield
    finally:
        _REPLACEABLE.reset(token)


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only when the block succeeds.

    With ``overwrite`` (or inside :func:`replacing`), an existing ``final`` stays in place while the
    block runs and is swapped out in one step at the end (:func:`swap_into_place`)."""
    final = Path(final)
    if final.exists() and not (overwrite or str(final.absolute()) in _REPLACEABLE.get()):
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
    swap_into_place(tmp, final)


def swap_into_place(new: Path, final: Path) -> None:
    """Move the folder ``new`` to ``final``; an existing ``final`` is replaced without a moment in
    which neither exists: Linux's renameat2(RENAME_EXCHANGE) swaps the two names atomically, and the
    old folder (now under ``new``'s name) is deleted. Where the file system cannot exchange, the old
    folder goes to ``.NAME.previous-PID`` first, which :func:`remove_stale_temporaries` puts back
    should a kill fall between the two renames."""
    new, final = Path(new), Path(final)
    if not final.exists():
        os.replace(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)
        return
    previous = final.parent / f".{final.name}.previous-{os.getpid()}"
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(final, previous)
    os.replace(new, final)
    shutil.rmtree(previous, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Delete what killed writers left in ``folder`` (for the folder ``name``, or any): the
    :data:`TEMPORARY_KINDS` siblings. A ``.NAME.previous-*`` whose ``NAME`` is missing is the old
    folder of a swap cut between its two renames: it is put back instead. Call it only while no
    other process writes there (:func:`folder_lock`). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"\.({re.escape(name) if name else '.+'})\.({'|'.join(TEMPORARY_KINDS)})-.+")
    removed = []
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match:
            continue
        final = folder / match.group(1)
        if match.group(2) == "previous" and path.is_dir() and not final.exists():
            os.replace(path, final)
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def lock_folder(folder: Path, refusal: str) -> int:
    """Take an exclusive lock on the folder ``folder`` (flock on the folder itself: no lock file to
    leave behind) and return the descriptor that holds it (``os.close`` releases it); if another
    process holds it, raise QtuneError(``refusal``). The kernel drops the lock when the holder
    exits, even on kill -9."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise QtuneError(refusal) from None
    return fd


@contextlib.contextmanager
def folder_lock(folder: Path, refusal: str) -> Iterator[None]:
    """:func:`lock_folder` while the block runs."""
    fd = lock_folder(folder, refusal)
    try:
        yield
    finally:
        os.close(fd)


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


#: how libraries that do not raise OSError say it: tokenizers (Rust) raises a plain Exception
#: "No space left on device (os error 28)"; torch.save a RuntimeError "... file write failed"
DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(error: BaseException | None, where: Path | None = None) -> bool:
    """An error saying the disk (or the user's quota) is full, also when wrapped as a cause. With
    ``where``, torch.save's vague "file write failed" counts when that disk has under 64 MiB free."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if any(words in text for words in DISK_FULL_TEXTS):
            return True
        if where is not None and "write failed" in text and Path(where).exists() and shutil.disk_usage(where).free < 64 * 2**20:
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(doing: str, where: Path | str, then: str = "run the command again") -> QtuneError:
    """The one line for a disk that filled up while ``doing``: what was lost, what to do."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free if probe.exists() else 0
    return QtuneError(f"the disk holding {str(where)!r} filled up while {doing} ({free / 2**20:.0f} MiB free now); "
                      f"what was being written is removed and nothing finished was touched; free some space and {then}")


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


def missing_path_reason(path: Path) -> str:
    """Why ``path`` (which does not exist) cannot be read, for an error message: a symbolic link that
    loops or points nowhere is said to be one, rather than "not found"."""
    if not path.is_symlink():
        return "not found"
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python 3.11 raises RuntimeError for a loop
        return "is a symbolic link that loops"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link that loops"
    return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
