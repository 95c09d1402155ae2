"""Experiment trackers: a real run logged to TensorBoard (the embedded offline default), read back with
TensorBoard's own reader; trackers that are not installed or do not exist are refused in one line."""

from __future__ import annotations

import json

from helpers import ALPACA_ROWS, one_line_error, read_metrics, run_qtune, tiny_run_config, write_jsonl


def test_tensorboard_event_files_hold_the_losses_config_and_run_name(tmp_path, tiny_qwen_dir):
    from click.testing import CliRunner
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qtune_cli.main import cli

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 5)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, dataset={"path": str(data), "eval_size": 4},
                             training={"max_steps": 4, "eval_steps": 2, "report_to": ["tensorboard"]})
    result = CliRunner().invoke(cli, ["run", str(config), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    records = read_metrics(run_dir)

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    def close(a, b):  # TensorBoard stores float32
        return len(a) == len(b) and all(s == t and abs(x - y) <= 1e-6 * max(1.0, abs(x)) for (s, x), (t, y) in zip(a, b, strict=True))

    assert close(scalars("train/loss"), [(m["step"], m["loss"]) for m in records if "loss" in m])
    assert close(scalars("eval/loss"), [(m["step"], m["eval_loss"]) for m in records if "eval_loss" in m])
    assert close(scalars("train/tokens_per_second"), [(m["step"], m["tokens_per_second"]) for m in records if "tokens_per_second" in m])
    assert [s for s, _ in scalars("train/memory_gib")] == [1, 2, 3, 4]

    def text(tag):  # torch's SummaryWriter.add_text stores TAG as TAG/text_summary
        return events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()

    assert "max_steps: 4" in text("qtune/config") and f"name: {tiny_qwen_dir}" in text("qtune/config")
    assert text("qtune/run_name") == "tiny"
    assert json.loads(text("args"))["run_name"] == "tiny"


def test_a_tracker_that_is_not_installed_is_refused_with_its_pip_command(tmp_path, tiny_qwen_dir):
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"report_to": ["comet_ml"]})
    line = one_line_error(run_qtune("validate", config))
    assert line == "Error: training.report_to: tracker 'comet_ml' is not installed; install it with `pip install comet-ml` or take it out of the list"
    assert not (tmp_path / "runs").exists()


def test_an_unknown_tracker_is_refused_with_the_closest_name(tmp_path, tiny_qwen_dir):
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"report_to": ["tensorbord"]})
    line = one_line_error(run_qtune("run", config))
    assert line == "Error: unknown tracker 'tensorbord' at 'training.report_to'; did you mean 'tensorboard'?"
