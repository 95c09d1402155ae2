"""Faults, proven with real processes: an export killed with SIGKILL (also under --force), a --force
whose new export fails, two commands on the same run at once, and a disk that fills up.

Each test drives the installed `qtune` executable in a subprocess, as a user would. The exporter
used here is a small plugin (QTUNE_PLUGINS_DIR) that writes half its folder and then waits, fails
or finishes, so a kill lands mid-export every time without loading a model.
docs/reliability.md names these tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import OFFLINE_ENV, QTUNE, one_line_error, run_qtune
from qtune.config import Config

HALTING_EXPORTER = '''
import os
import time
from pathlib import Path

from qtune.api import Exporter, ExportResult, QtuneError, atomic_dir, hookimpl


class Halting(Exporter):
    """Writes VERSION into two files; HALT=wait stops after the first (and touches HALT_MARKER),
    HALT=fail raises there."""

    name = "halting"

    def export(self, run, out_dir, quantization):
        version = os.environ.get("HALT_VERSION", "1")
        with atomic_dir(out_dir) as tmp:
            (tmp / "first-half").write_text(version)
            if os.environ.get("HALT") == "wait":
                Path(os.environ["HALT_MARKER"]).touch()
                time.sleep(600)
            if os.environ.get("HALT") == "fail":
                raise QtuneError("the halting format failed half way")
            (tmp / "second-half").write_text(version)
        return ExportResult(self.name, Path(out_dir))


@hookimpl
def register_exporters(register):
    register(Halting())
'''


def halting_run(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A run directory (config + adapter marker: the halting exporter reads neither) and the
    environment that loads the halting exporter."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "halting.py").write_text(HALTING_EXPORTER, encoding="utf-8")
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "config.yaml").write_text(Config(name="r", model={"name": str(tmp_path)}).to_yaml())
    return run_dir, {"QTUNE_PLUGINS_DIR": str(plugins), "HALT_MARKER": str(tmp_path / "halted")}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def export_contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def start_halted_export(run_dir: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    """`qtune export RUN_DIR -f halting ARGS` stopped half way (its marker file exists)."""
    marker = Path(env["HALT_MARKER"])
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([QTUNE, "export", str(run_dir), "-f", "halting", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **OFFLINE_ENV, **env, "HALT": "wait", "HALT_VERSION": "2"})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no marker"
    return proc


def test_kill_9_during_force_export_keeps_the_old_export_and_the_next_export_cleans_up(tmp_path):
    run_dir, env = halting_run(tmp_path)
    exports = run_dir / "exports"
    first = run_qtune("export", run_dir, "-f", "halting", env=env)
    assert first.returncode == 0, first.stderr
    assert export_contents(exports / "halting") == {"first-half": "1", "second-half": "1"}

    proc = start_halted_export(run_dir, env, "--force")
    # While it runs, a second export of the same run is refused in one line.
    busy = one_line_error(run_qtune("export", run_dir, "-f", "halting", "--force", env=env))
    assert "another qtune process is exporting run" in busy and "wait for it to finish" in busy
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # The old export never left its name, and exports.json names only folders that exist.
    assert export_contents(exports / "halting") == {"first-half": "1", "second-half": "1"}
    records = json.loads((exports / "exports.json").read_text())
    assert list(records) == ["halting"] and all(Path(r["path"]).is_dir() for r in records.values())
    assert [name.split("-")[0] for name in hidden(exports)] == [".halting.partial"]  # what the kill left

    # A --force whose new export fails: one line, the old export intact, the kill's leftovers gone.
    failed = one_line_error(run_qtune("export", run_dir, "-f", "halting", "--force", env={**env, "HALT": "fail"}))
    assert "the halting format failed half way" in failed
    assert export_contents(exports / "halting") == {"first-half": "1", "second-half": "1"}
    assert hidden(exports) == []

    replaced = run_qtune("export", run_dir, "-f", "halting", "--force", env={**env, "HALT_VERSION": "3"})
    assert replaced.returncode == 0, replaced.stderr
    assert export_contents(exports / "halting") == {"first-half": "3", "second-half": "3"}
    assert hidden(exports) == []
    assert json.loads((exports / "exports.json").read_text())["halting"]["files"] == ["first-half", "second-half"]


def test_kill_9_during_a_first_export_leaves_nothing_under_the_name(tmp_path):
    run_dir, env = halting_run(tmp_path)
    proc = start_halted_export(run_dir, env)
    proc.kill()
    proc.wait(timeout=60)
    exports = run_dir / "exports"
    assert not (exports / "halting").exists() and not (exports / "exports.json").exists()
    done = run_qtune("export", run_dir, "-f", "halting", env=env)
    assert done.returncode == 0, done.stderr
    assert hidden(exports) == [] and export_contents(exports / "halting") == {"first-half": "1", "second-half": "1"}


def test_swap_cut_between_its_renames_is_repaired(tmp_path):
    """Where the file system cannot exchange two names, the old folder waits under .NAME.previous-PID
    for one rename; a kill right there is undone by the next clean-up, which puts it back."""
    from qtune.fsutil import remove_stale_temporaries, swap_into_place

    folder = tmp_path / "exports"
    (folder / ".gguf-q8_0.previous-4242").mkdir(parents=True)
    (folder / ".gguf-q8_0.previous-4242" / "model.gguf").write_text("old")
    (folder / ".gguf-q8_0.partial-4242").mkdir()
    (folder / ".lora.work-abc").mkdir()
    (folder / ".lora.merging-xyz").mkdir()
    (folder / ".lora.partial-1").write_text("a file")
    (folder / "lora").mkdir()
    (folder / ".keep").write_text("not ours")
    removed = remove_stale_temporaries(folder)
    assert sorted(p.name for p in removed) == [".gguf-q8_0.partial-4242", ".lora.merging-xyz", ".lora.partial-1", ".lora.work-abc"]
    assert (folder / "gguf-q8_0" / "model.gguf").read_text() == "old"
    assert hidden(folder) == [".keep"]

    new = folder / ".lora.partial-7"
    new.mkdir()
    (new / "adapter").write_text("new")
    swap_into_place(new, folder / "lora")
    assert export_contents(folder / "lora") == {"adapter": "new"} and hidden(folder) == [".keep"]


@pytest.fixture
def tmpfs(tmp_path):
    """A 20 MiB tmpfs mounted for the test (needs root); skipped where it cannot be mounted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
