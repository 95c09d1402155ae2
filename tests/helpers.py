"""Small builders shared by tests: configs and data files for real runs on the tiny Qwen2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ALPACA_ROWS = [
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Name the colour of the sky on a clear day.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
]


#: the installed `qtune` console script
QTUNE = str(Path(sys.executable).with_name("qtune"))
#: what every test process gets: no hub (CI has none), no tokenizers thread pool
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_qtune(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The installed `qtune` script in a fresh process, offline, as a user runs it."""
    return subprocess.run([QTUNE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **OFFLINE_ENV, **(env or {})}, timeout=timeout)


def one_line_error(result) -> str:
    """Assert that ``result`` failed with exactly one line on stderr and no traceback; return the line."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tiny_run_config(tmp_path: Path, model_dir: Path, data_file: Path, **sections) -> Path:
    """A config for a real, short LoRA run on the tiny Qwen2 on CPU; `sections` update the defaults."""
    config = {
        "name": "tiny",
        "model": {"name": str(model_dir), "backend": "transformers", "max_seq_length": 256, "load_in_4bit": False},
        "lora": {"r": 8, "alpha": 16, "gradient_checkpointing": False},
        "template": "alpaca",
        "dataset": {"path": str(data_file)},
        "training": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 0,
            "max_steps": 6,
            "learning_rate": 5e-3,
            "optim": "adamw_torch",
            "output_dir": str(tmp_path / "runs"),
            "seed": 3407,
        },
        "callbacks": ["memory_monitor"],
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def logged_steps(metrics: Path) -> list[int]:
    """The steps in a metrics.jsonl that may still be written to (a line cut short is skipped)."""
    found = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                found.append(json.loads(line).get("step"))
            except ValueError:
                pass
    return [s for s in found if s is not None]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def model_folder_with_weights(folder: Path, model_dir: Path, weights_name: str, content: bytes) -> Path:
    """A copy of ``model_dir``'s config and tokenizer with ``content`` as its only weights file."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, folder / name)
    (folder / weights_name).write_bytes(content)
    return folder
