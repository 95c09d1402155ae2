"""End to end: real `qtune run` LoRA steps on the tiny Qwen2 with the real Qwen2.5 tokenizer."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from helpers import ALPACA_ROWS, read_metrics, tiny_run_config, write_jsonl
from qtune_cli.main import cli


def run_cli(*args):
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_qwen_dir):
    tmp = tmp_path_factory.mktemp("trained")
    data = write_jsonl(tmp / "data.jsonl", ALPACA_ROWS * 4)
    config = tiny_run_config(tmp, tiny_qwen_dir, data, training={"max_steps": 8})
    result = run_cli("run", config, "--no-progress")
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "tiny", result.output


def test_run_writes_config_metrics_summary_and_adapter(trained_run):
    run_dir, output = trained_run
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "tokenizer.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["memory"]["device"] == "cpu" and summary["memory"]["peak_rss_gib"] > 0
    assert "Peak resident memory" in output
    steps = [m for m in read_metrics(run_dir) if "step" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))
    assert all(m["tokens_per_second"] > 0 for m in steps[1:])


def test_tokens_are_counted_per_optimizer_step_without_padding(tmp_path, tiny_qwen_dir):
    # One row eight times: every example has the same length, so each step (2 x 2 accumulated
    # micro-batches) trains exactly 4 x that many tokens. Counted by qtune itself, since Unsloth's
    # trainer logs no num_tokens.
    data = write_jsonl(tmp_path / "data.jsonl", [ALPACA_ROWS[0]] * 8)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"max_steps": 2, "gradient_accumulation_steps": 2})
    result = run_cli("run", config, "--no-progress")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    stats = json.loads((run_dir / "summary.json").read_text())["data"]
    length = stats["tokens"] / stats["examples"]
    steps = [m for m in read_metrics(run_dir) if "step" in m]
    assert [m["num_tokens"] for m in steps] == [4 * length, 8 * length]
    assert all(m["tokens_per_second"] > 0 for m in steps)


def test_batch_tokens_leaves_padding_out():
    import torch

    from qtune.training import batch_tokens

    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert batch_tokens(padded) == 8
    padding_free = {"input_ids": torch.ones(1, 13, dtype=torch.long), "position_ids": torch.arange(13).unsqueeze(0)}
    assert batch_tokens(padding_free) == 13
    assert batch_tokens(None) == 0


def test_bridge_counts_tokens_when_the_trainer_logs_none(tmp_path):
    # Unsloth's SFTTrainer drops num_tokens from its logs (unsloth_zoo.logging_utils.REMOVED_METRICS):
    # tokens/s must still reach metrics.jsonl and the progress bar.
    import io
    from types import SimpleNamespace

    import torch
    from rich.console import Console

    from qtune.config import validate
    from qtune.run import RunContext
    from qtune.training import make_bridge

    run = RunContext(config=validate({}), run_dir=tmp_path, console=Console(file=io.StringIO()))
    bridge = make_bridge(run, [])
    trainer = SimpleNamespace(training_step=lambda model, inputs, num_items=None: torch.tensor(2.0))
    bridge.watch(trainer)
    weight = torch.nn.Parameter(torch.ones(3))
    state, control = SimpleNamespace(max_steps=1, global_step=0), SimpleNamespace(should_save=True)
    bridge.on_train_begin(None, state, control, model=SimpleNamespace(parameters=lambda: [weight]))
    for mask in ([[1, 1, 1, 0], [1, 1, 0, 0]], [[1, 1, 1, 1], [1, 0, 0, 0]]):  # two micro-batches
        trainer.training_step(None, {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor(mask)}, 8)
    state.global_step = 1
    bridge.on_step_end(None, state, control)
    bridge.on_log(None, state, control, logs={"loss": 2.0, "learning_rate": 1e-4})
    [record] = read_metrics(tmp_path)
    assert record["num_tokens"] == 10 and record["tokens_per_second"] > 0


def test_loss_decreases(trained_run):
    run_dir, _ = trained_run
    losses = [m["loss"] for m in read_metrics(run_dir) if "step" in m]
    # From a random model (loss ~ ln(151936) = 11.9) eight LoRA steps must cut the loss clearly.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_saved_adapter_reloads_to_identical_logits(trained_run, tiny_qwen_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtune.run import FinishedRun

    run_dir, _ = trained_run
    run = FinishedRun.open(run_dir)
    reloaded, tokenizer = run.load_trained()
    batch = tokenizer(["### Instruction:\nAdd the numbers.\n\n### Response:\n"], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    plain_base_logits = base(**batch).logits
    independent = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        a = reloaded.eval()(**batch).logits
        b = independent(**batch).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain_base_logits, atol=1e-4)  # the adapter really changed the model


def test_same_seed_gives_same_loss_curve(tmp_path, tiny_qwen_dir):
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 2)
    curves = []
    for name in ("first", "second"):
        config = tiny_run_config(tmp_path, tiny_qwen_dir, data, name=name, training={"max_steps": 3})
        assert run_cli("run", config, "--no-progress").exit_code == 0
        curves.append([m["loss"] for m in read_metrics(tmp_path / "runs" / name) if "step" in m])
    assert curves[0] == curves[1]


def test_responses_only_and_packing_train(tmp_path, tiny_qwen_dir):
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 2)
    config = tiny_run_config(
        tmp_path, tiny_qwen_dir, data, training={"max_steps": 2, "packing": True, "train_on_responses_only": True}
    )
    result = run_cli("run", config, "--no-progress")
    assert result.exit_code == 0, result.output
    assert len([m for m in read_metrics(tmp_path / "runs" / "tiny") if "step" in m]) == 2


def test_generate_streams_an_answer(trained_run):
    run_dir, _ = trained_run
    streamed = run_cli("generate", run_dir, "--instruction", "Add the numbers.", "--input", "2 + 3", "--max-new-tokens", "5")
    whole = run_cli("generate", run_dir, "-i", "Add the numbers.", "--input", "2 + 3", "--max-new-tokens", "5", "--no-stream")
    assert streamed.exit_code == 0 and whole.exit_code == 0, streamed.output + whole.output
    assert streamed.output.strip() == whole.output.strip() != ""
