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
    HALT=fail raises there, HALT=fill writes 64 MiB there."""

    name = "halting"

    def export(self, run, out_dir, quantization):
        version = os.environ.get("HALT_VERSION", "1")
        with atomic_dir(out_dir) as tmp:
            (tmp / "first-half").write_text(version)
            if os.environ.get("HALT") == "wait":
                Path(os.environ["HALT_MARKER"]).touch()
                time.sleep(600)
            if os.environ.get("HALT") == "fill":  # more than the test's small disk holds
                (tmp / "big").write_bytes(bytes(64 * 2**20))
            if os.environ.get("HALT") == "fail":
                raise QtuneError("the halting format failed half way")
            (tmp / "second-half").write_text(version)
        return ExportResult(self.name, Path(out_dir))


@hookimpl
def register_exporters(register):
    register(Halting())
'''


def halting_run(tmp_path: Path, root: Path | None = None) -> tuple[Path, dict[str, str]]:
    """A run directory under ``root`` (config + adapter marker: the halting exporter reads neither)
    and the environment that loads the halting exporter."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "halting.py").write_text(HALTING_EXPORTER, encoding="utf-8")
    run_dir = (root or tmp_path) / "runs" / "r"
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


def test_disk_full_while_writing_an_export_keeps_the_old_one(tmp_path, tmpfs):
    run_dir, env = halting_run(tmp_path, root=tmpfs)
    exports = run_dir / "exports"
    assert run_qtune("export", run_dir, "-f", "halting", env=env).returncode == 0
    records = (exports / "exports.json").read_text()
    error = one_line_error(run_qtune("export", run_dir, "-f", "halting", "--force", env={**env, "HALT": "fill"}))
    assert "filled up while exporting halting" in error and "free some space" in error, error
    assert "plugin" not in error  # a full disk is not the plugin's fault
    assert export_contents(exports / "halting") == {"first-half": "1", "second-half": "1"}
    assert hidden(exports) == [] and (exports / "exports.json").read_text() == records


def test_disk_full_while_writing_a_checkpoint_then_resume(tmp_path, tmpfs, tiny_qwen_dir):
    """Each checkpoint of the tiny Qwen2 holds its 18.7 MB tokenizer.json: on a 30 MiB disk the
    first fits and the second cannot."""
    from helpers import ALPACA_ROWS, tiny_run_config, write_jsonl
    from qtune.run import checkpoint_is_complete, list_checkpoints

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 2)
    subprocess.run(["mount", "-o", "remount,size=30m", str(tmpfs)], check=True)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"max_steps": 3, "save_steps": 1, "output_dir": str(tmpfs / "runs")})
    run_dir = tmpfs / "runs" / "tiny"
    error = one_line_error(run_qtune("run", config, "--no-progress"))
    assert "filled up while writing the run" in error and f"qtune run --resume {run_dir}" in error, error
    kept = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for _, p, _ in kept] == ["checkpoint-1"] and checkpoint_is_complete(kept[0][1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "filled up" in summary["error"]
    assert not (run_dir / "adapter").exists() and not list(run_dir.rglob(".*partial*"))

    subprocess.run(["mount", "-o", "remount,size=200m", str(tmpfs)], check=True)  # space freed
    resumed = run_qtune("run", "--resume", run_dir, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3 and summary["resumed_from"] == "checkpoint-1"


FAILING_CALLBACK = '''
from qtune.api import QtuneError, TrainingCallback, hookimpl


class FailsAt(TrainingCallback):
    name = "fails_at"

    def __init__(self, event="on_train_start", step=0):
        self.event, self.step = event, step

    def on_train_start(self, run):
        if self.event == "on_train_start":
            raise QtuneError("the test callback stops the run before training")

    def on_step_end(self, run, step, metrics):
        if self.event == "on_step_end" and step == self.step:
            raise QtuneError(f"the test callback stops the run at step {step}")


@hookimpl
def register_callbacks(register):
    register(FailsAt)
'''


@pytest.mark.parametrize("event, trained", [("on_train_start", False), ("on_step_end", True)])
def test_failure_after_the_run_directory_exists_is_one_line_and_marked(tmp_path, tiny_qwen_dir, event, trained):
    """Past validation, a failure still ends in one line: the run directory is removed when nothing
    was trained, else summary.json says status failed, with the reason."""
    from helpers import ALPACA_ROWS, tiny_run_config, write_jsonl

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "fails_at.py").write_text(FAILING_CALLBACK, encoding="utf-8")
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 2)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"max_steps": 3},
                             callbacks=[{"name": "fails_at", "options": {"event": event, "step": 2}}])
    env = {"QTUNE_PLUGINS_DIR": str(plugins)}
    assert run_qtune("validate", config, env=env).returncode == 0
    error = one_line_error(run_qtune("run", config, "--no-progress", env=env))
    assert "the test callback stops the run" in error
    run_dir = tmp_path / "runs" / "tiny"
    if not trained:
        assert not run_dir.exists() and list((tmp_path / "runs").iterdir()) == []
    else:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["error"] == error.removeprefix("Error: ")


def test_two_runs_of_one_name_at_once_one_refuses(tmp_path, tiny_qwen_dir):
    """While `qtune run` trains, a second run of the same name is refused in one line, and so is a
    --resume of the running run (its lock), before it touches anything."""
    from helpers import ALPACA_ROWS, tiny_run_config, write_jsonl
    from qtune.run import last_complete_checkpoint

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 4)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"max_steps": 500, "save_steps": 1, "save_total_limit": 1})
    run_dir = tmp_path / "runs" / "tiny"
    first = subprocess.Popen([QTUNE, "run", str(config), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, **OFFLINE_ENV})
    try:
        deadline = time.monotonic() + 600
        while last_complete_checkpoint(run_dir / "checkpoints") is None and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None and last_complete_checkpoint(run_dir / "checkpoints") is not None
        second = one_line_error(run_qtune("run", config, "--no-progress"))
        assert "already exists" in second and "--resume" in second
        metrics = (run_dir / "metrics.jsonl").read_text()
        third = one_line_error(run_qtune("run", "--resume", run_dir, "--no-progress"))
        assert "another qtune process is running" in third and "wait for it to finish" in third
        assert first.poll() is None and (run_dir / "metrics.jsonl").read_text().startswith(metrics)  # untouched
    finally:
        first.kill()
        first.wait(timeout=60)
