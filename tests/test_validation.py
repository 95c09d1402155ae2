"""Validation loss during training: trl/transformers' evaluation on the held-out rows, checked against
a loss computed here by hand, with and without packing; its events, early stopping, the live line."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from helpers import ALPACA_ROWS, read_metrics, tiny_run_config, write_jsonl
from qtune.api import TrainingCallback

#: four held-out rows, different from the training rows; dataset.eval_size takes them from the end
HELD_OUT = [
    {"instruction": "Give the opposite of the word.", "input": "up", "output": "down"},
    {"instruction": "Add the numbers.", "input": "4 + 4", "output": "8"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "dog", "output": "chien"},
]


class Recorder(TrainingCallback):
    """Every evaluation event the run sends, in order."""

    name = "recorder"

    def __init__(self):
        self.events = []

    def on_evaluate_start(self, run, name, total):
        self.events.append(("start", name, total))

    def on_evaluate_step(self, run, done, total):
        self.events.append(("step", done, total))

    def on_evaluate(self, run, metrics):
        self.events.append(("result", metrics["step"], metrics["eval_loss"]))


def train(tmp_path, model_dir, eval_file=False, **training):
    """4 steps on the training rows with the HELD_OUT rows held out: the last rows of the data
    (dataset.eval_size), or with ``eval_file`` a file of their own (dataset.eval_path)."""
    from rich.console import Console

    from qtune.config import load_config
    from qtune.pipeline import run

    if eval_file:
        data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 4)
        dataset = {"path": str(data), "eval_path": str(write_jsonl(tmp_path / "held-out.jsonl", HELD_OUT))}
    else:
        data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 4 + HELD_OUT)
        dataset = {"path": str(data), "eval_size": len(HELD_OUT)}
    settings = {"max_steps": 4, "eval_steps": 2, "per_device_eval_batch_size": 8, "train_on_responses_only": True, **training}
    config = load_config(tiny_run_config(tmp_path, model_dir, data, dataset=dataset, training=settings))
    recorder = Recorder()
    output = io.StringIO()
    ctx = run(config, Console(file=output, width=200), extra_callbacks=[recorder])
    return ctx.run_dir, recorder.events, output.getvalue()


def direct_validation_loss(run_dir, model_dir) -> float:
    """The mean cross-entropy of the held-out rows' trained tokens (prompt masked, EOS trained),
    each row on its own through base + saved adapter: no batching, no packing, no trainer."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.data import tokenize_example
    from qtune.plugin_manager import get_host

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, run_dir / "adapter").eval()
    template = get_host().templates.get("alpaca")
    total, count = 0.0, 0
    for row in HELD_OUT:
        example = tokenize_example(row, template, tokenizer, 256, responses_only=True)
        assert tokenizer.decode(example.input_ids[example.prompt_tokens:]).startswith(row["output"])
        labels = torch.tensor(example.labels)
        with torch.no_grad():
            logits = model(torch.tensor([example.input_ids])).logits[0].float()
        # token t predicts token t + 1
        total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
        count += int((labels[1:] != -100).sum())
    return total / count


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_validation_loss_equals_a_direct_computation(tmp_path, tiny_qwen_dir, packing):
    run_dir, events, output = train(tmp_path, tiny_qwen_dir, packing=packing)
    evals = [m for m in read_metrics(run_dir) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]  # every training.eval_steps, the last at the end
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_loss"] == round(evals[-1]["eval_loss"], 6) and summary["eval_loss_step"] == 4
    # The last evaluation ran on the weights that were saved: computed again by hand, row by row.
    # With packing the rows share one packed sequence: equal only without attention across rows.
    assert abs(evals[-1]["eval_loss"] - direct_validation_loss(run_dir, tiny_qwen_dir)) <= 1e-5
    assert f"validation loss {evals[0]['eval_loss']:.4f} at step 2 (4 rows" in output
    # Training records still come one per step, with the memory now and tokens/s
    steps = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and all(m["memory_gib"] > 0.05 for m in steps)
    # Callbacks hear each evaluation start (its batches: one here), each batch, and the result.
    batches = 1
    expected = []
    for m in evals:
        expected += [("start", "validation loss", batches), ("step", 1, batches), ("result", m["step"], m["eval_loss"])]
    assert events == expected


def test_held_out_rows_from_their_own_file_give_the_same_validation_loss(tmp_path, tiny_qwen_dir):
    """dataset.eval_path: the same held-out rows in a file of their own, the same training rows:
    the same losses as with eval_size, and the row-by-row computation agrees."""
    run_dir, _, output = train(tmp_path, tiny_qwen_dir, eval_file=True)
    evals = [m for m in read_metrics(run_dir) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert abs(evals[-1]["eval_loss"] - direct_validation_loss(run_dir, tiny_qwen_dir)) <= 1e-5
    assert "(4 rows" in output
    assert json.loads((run_dir / "summary.json").read_text())["data"]["examples"] == len(ALPACA_ROWS) * 4


def test_early_stopping_stops_when_the_validation_loss_stops_improving(tmp_path, tiny_qwen_dir):
    # A threshold no improvement reaches: the second evaluation counts as no better, and with a
    # patience of 1 training stops there, saving the adapter of that step.
    run_dir, events, output = train(tmp_path, tiny_qwen_dir, max_steps=10, eval_steps=1, early_stopping_patience=1,
                                    early_stopping_threshold=1000.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["early_stopped"] is True
    assert [m["step"] for m in read_metrics(run_dir) if "eval_loss" in m] == [1, 2]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert "early stopping at step 2" in output


def test_eval_steps_and_early_stopping_need_their_prerequisites():
    from qtune.config import validate
    from qtune.errors import ConfigError

    with pytest.raises(ConfigError, match="training.eval_steps needs held-out rows"):
        validate({"training": {"eval_steps": 5}})
    with pytest.raises(ConfigError, match="early_stopping_patience needs a validation loss during training"):
        validate({"dataset": {"eval_size": 4}, "training": {"early_stopping_patience": 2}})


def test_live_line_shows_the_validation_loss_its_step_and_an_evaluation_bar():
    from rich.console import Console
    from rich.text import Text

    from qtune.plugin_manager import get_host

    buffer = io.StringIO()
    run = SimpleNamespace(console=Console(file=buffer, force_terminal=True, width=80), total_steps=4)
    progress = get_host().callbacks.get("rich_progress")()
    progress.on_train_start(run)
    progress.on_step_end(run, 2, {"loss": 0.5, "learning_rate": 2e-4, "tokens_per_second": 99.0, "memory_gib": 1.5})
    progress.on_evaluate_start(run, "validation loss", 3)
    progress.on_evaluate_step(run, 1, 3)
    frames = Text.from_ansi(buffer.getvalue()).plain
    assert "evaluating validation loss" in frames and "1/3" in frames
    progress.on_evaluate_step(run, 2, 3)
    progress.on_evaluate_step(run, 3, 3)
    progress.on_evaluate(run, {"eval_loss": 0.4321, "step": 2, "rows": 10, "seconds": 1.0})
    progress.on_step_end(run, 3, {"loss": 0.25, "learning_rate": 1e-4, "tokens_per_second": 99.0, "memory_gib": 1.5})
    progress.on_train_end(run)
    lines = [line for line in Text.from_ansi(buffer.getvalue()).plain.splitlines() if line.strip()]
    assert "3/4" in lines[-2] and "loss 0.2500" in lines[-2] and "1.50 GiB" in lines[-2]
    assert "validation loss 0.4321 at step 2" in lines[-1] and "3/3" in lines[-1]
    assert all(len(line) <= 80 for line in lines)
