"""Config validation and the CLI's answers to bad input: one line, non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from helpers import ALPACA_ROWS, one_line_error, tiny_run_config, write_jsonl
from helpers import run_qtune as qtune
from qtune.config import load_config
from qtune.errors import ConfigError
from qtune_cli.main import cli


def assert_one_line_error(result, *needles):
    line = one_line_error(result)
    for needle in needles:
        assert needle in line, line


def test_help_is_fast_and_imports_no_torch():
    started = time.perf_counter()
    result = qtune("--help")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "qtune run" in result.stdout
    assert elapsed < 0.5 * 4, elapsed  # a generous bound for a loaded CI machine; measured ~0.15 s
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from qtune_cli.main import main\n"
         "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
         "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'unsloth') if m in sys.modules]\n"
         "print('HEAVY', heavy)"], capture_output=True, text=True)
    assert "HEAVY []" in probe.stdout, probe.stdout + probe.stderr


def test_init_writes_the_seed_config(tmp_path):
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "seed.yaml")])
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "seed.yaml")
    assert config.model.name == "unsloth/Qwen2.5-7B" and config.training.max_steps == 60
    again = CliRunner().invoke(cli, ["init", str(tmp_path / "seed.yaml")])
    assert again.exit_code != 0 and "--force" in again.output


def test_set_overrides_values_with_yaml_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 60\n")
    config = load_config(path, ("training.max_steps=10", "training.packing=true", "lora.target_modules=[q_proj, v_proj]"))
    assert config.training.max_steps == 10 and config.training.packing is True
    assert config.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "text, overrides, needles",
    [
        ("training:\n  max_stepz: 10\n", (), ["training.max_stepz", "training.max_steps"]),
        ("lora:\n  rank: 8\n", (), ["lora.rank", "lora.r"]),
        ("modle:\n  name: x\n", (), ["'modle'", "'model'"]),
        ("training:\n  learning_rate: fast\n", (), ["training.learning_rate", "'fast'"]),
        ("lora:\n  r: 0\n", (), ["lora.r", "greater than 0"]),
        ("model:\n  dtype: float8\n", (), ["model.dtype", "bfloat16"]),
        ("", ("training.batch_size=4",), ["training.batch_size", "per_device_train_batch_size"]),
        ("template: alpacca\n", (), ["template 'alpacca'", "'alpaca'"]),
        ("callbacks: [memory_monitr]\n", (), ["callbacks[0].name", "'memory_monitor'"]),
        ("model:\n  backend: vllm\n", (), ["model.backend", "transformers"]),
        ("training: [1, 2\n", (), ["not valid YAML", "line 2"]),
    ],
)
def test_bad_config_is_refused_naming_the_key(tmp_path, text, overrides, needles):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_cli_unknown_key_exits_with_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_stepz: 10\n")
    assert_one_line_error(qtune("run", path), "training.max_stepz", "did you mean 'training.max_steps'")
    assert not (tmp_path / "runs").exists()


def test_cli_unknown_template_exits_with_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("template: alpacca\n")
    assert_one_line_error(qtune("run", path), "unknown template 'alpacca'", "did you mean 'alpaca'")


def test_cli_unknown_plugin_name_exits_with_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("callbacks: [wandb]\n")
    assert_one_line_error(qtune("run", path), "unknown callback 'wandb'")
    path.write_text("dataset:\n  loader: s3\n")
    assert_one_line_error(qtune("run", path), "unknown dataset loader 's3'")


def test_cli_dataset_missing_field_exits_before_any_model_loads(tmp_path, tiny_qwen_dir):
    rows = [{"prompt": r["instruction"], "output": r["output"]} for r in ALPACA_ROWS]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data)
    result = qtune("run", config)
    assert_one_line_error(result, "lacks column 'instruction'", "dataset.fields.instruction")
    assert not (tmp_path / "runs").exists()
    # the fix the message names works
    cfg = yaml.safe_load(config.read_text())
    cfg["dataset"]["fields"] = {"instruction": "prompt"}
    config.write_text(yaml.safe_dump(cfg))
    assert qtune("validate", config).returncode == 0


def test_cli_missing_config_file(tmp_path):
    assert_one_line_error(qtune("run", tmp_path / "nope.yaml"), "not found", "qtune init")
