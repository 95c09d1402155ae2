"""Run directories: what a training run writes, and how later commands (generate, export) open it.

Layout of ``OUTPUT_DIR/NAME/``::

    config.yaml      the resolved config the run used (profile applied)
    preflight.json   what the checks before training found, and the data's fingerprint (for resume)
    metrics.jsonl    one JSON record per logged step or evaluation (validation loss: ``eval_loss``)
    distributed.json the processes, device and strategy of a run trained on several processes
    logs/            the output of ranks other than 0 (``qtune run --gpus N``)
    summary.json     final figures (memory, evaluation, timings), written when the run ends
    running.json     the training process's id and host, present while it runs
    adapter/         the LoRA adapter and tokenizer, in peft's format
    checkpoints/     resumable trainer checkpoints (training.save_steps)
    tensorboard/     TensorBoard event files (training.report_to: [tensorboard])
    exports/         one folder per exported format
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QtuneError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

ADAPTER_DIR = "adapter"
PREFLIGHT_FILE = "preflight.json"
#: present while a process trains the run; a killed run leaves it behind (`qtune runs` checks the process)
RUNNING_FILE = "running.json"


@dataclass
class RunContext:
    """What callbacks see during a run. ``summary`` entries are printed and saved at the end."""

    config: Config
    run_dir: Path
    console: Any  # rich.console.Console
    backend_name: str = ""
    model_path: str = ""
    model: Any = None
    tokenizer: Any = None
    total_steps: int = 0
    device: str = "cpu"
    summary: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    #: this process's place among several training processes (:class:`qtune.distributed.Ranks`);
    #: None when one process trains
    ranks: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this process reports for the run: the only one, or rank 0 of several. The others
        write nothing (metrics, summary, adapter) and their console is quiet."""
        return self.ranks is None or self.ranks.is_main

    def gather(self, value: Any) -> list[Any]:
        """Every training process's ``value``, in rank order (``[value]`` for one process). All
        processes must call it at the same point: use it in a callback with ``every_rank = True``."""
        return [value] if self.ranks is None else self.ranks.gather(value)

    def total(self, value: float) -> float:
        """``value`` summed over the training processes (all must call it at the same point)."""
        return float(value) if self.ranks is None else self.ranks.sum(value)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"time": round(time.time() - self.started_at, 3), **record}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


@dataclass
class FinishedRun:
    """A run directory opened for generation or export."""

    run_dir: Path
    config: Config

    @classmethod
    def open(cls, run_dir: str | Path) -> FinishedRun:
        run_dir = Path(run_dir)
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise QtuneError(f"{str(run_dir)!r} is not a qtune run directory (no config.yaml); pass the folder `qtune run` printed")
        import yaml

        from .config import validate

        config = validate(yaml.safe_load(config_file.read_text(encoding="utf-8")) or {})
        run = cls(run_dir, config)
        if not (run.adapter_dir / "adapter_config.json").is_file():
            raise QtuneError(f"run {str(run_dir)!r} has no trained adapter (adapter/adapter_config.json); finish or resume the run first")
        return run

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTER_DIR

    @property
    def exports_dir(self) -> Path:
        return self.run_dir / "exports"

    @property
    def template(self):
        from .plugin_manager import get_host

        return get_host().templates.get(self.config.template)

    def model_path(self) -> str:
        from .models import resolve_model

        return resolve_model(self.config.model.name)

    def backend(self):
        from .backends import choose_backend

        return choose_backend(self.config)

    def load_trained(self) -> tuple[Any, Any]:
        """The base model with the trained adapter, and the tokenizer saved with the run."""
        return self.backend().load_trained(self.config, self.model_path(), self.adapter_dir)

    def summary(self) -> dict[str, Any]:
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------- checkpoints

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_is_complete(path: Path) -> bool:
    """A checkpoint folder the trainer finished: it writes trainer_state.json last, after the
    weights, optimizer, scheduler and RNG state; a kill mid-save leaves it missing or cut short."""
    path = Path(path)
    step = checkpoint_step(path)
    if step is None or not path.is_dir():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != step:
        return False
    names = {p.name for p in path.iterdir()}
    return (
        any(n.endswith(".safetensors") for n in names)
        and {"optimizer.pt", "scheduler.pt"} <= names
        and any(n.startswith("rng_state") for n in names)
    )


def list_checkpoints(folder: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every checkpoint-N folder, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted((step, path, checkpoint_is_complete(path)) for step, path in found)


def last_complete_checkpoint(folder: Path) -> Path | None:
    complete = [path for _, path, ok in list_checkpoints(folder) if ok]
    return complete[-1] if complete else None


# --------------------------------------------------------------------------- new run folders


def new_run_dir(config: Config) -> Path:
    root = Path(config.training.output_dir).expanduser()
    name = config.name or time.strftime("run-%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise QtuneError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-'; change `name`")
    run_dir = root / name
    if run_dir.exists():
        raise QtuneError(f"run directory {str(run_dir)!r} already exists; choose another `name` or remove it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".qtune-write-test-{name}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise QtuneError(f"cannot write to training.output_dir {str(root)!r}: {exc.strerror}; choose a writable folder") from None
    return run_dir


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl; a line cut short by a kill is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
