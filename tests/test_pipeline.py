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
