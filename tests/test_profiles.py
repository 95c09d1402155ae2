"""The memory estimate, the fast profile and the model catalogue (`qtune models`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qtune.config import Config
from qtune.plugins.models import CATALOGUE, SHAPES, catalogue_entries
from qtune.profiles import (
    FAST_TOKENS_PER_MICROBATCH,
    FUSED_KERNELS,
    PLAIN_KERNELS,
    ModelShape,
    apply_profile,
    estimate_memory_gib,
    model_shape_for,
    profile_changes,
    seed_memory_gib,
)

QWEN7B = SHAPES["qwen2.5-7b"]


def fast(gpu_total_gib, **changes) -> tuple[Config, Config]:
    config = Config()
    config.training.profile = "fast"
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(config, section), key, value)
    return config, apply_profile(config, gpu_total_gib, shape=QWEN7B)


# --- the estimate ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, checkpointing, measured",
    [
        (2 * 267, "unsloth", 6.25),  # the seed notebook, Alpaca-like lengths (FACTS.md, H200)
        (8 * 2048, "unsloth", 9.2),  # packing, 8 rows, Unsloth checkpointing
        (8 * 2048, False, 63.8),  # packing, 8 rows, no checkpointing
        (16 * 2048, False, 122.0),  # packing, 16 rows, no checkpointing
    ],
)
def test_estimate_matches_measurements_on_the_safe_side(tokens, checkpointing, measured):
    estimate = estimate_memory_gib(QWEN7B, tokens, checkpointing)
    assert measured <= estimate <= measured * 1.10


def test_estimate_grows_with_what_it_should():
    base = estimate_memory_gib(QWEN7B, 4096)
    assert estimate_memory_gib(QWEN7B, 8192) > base
    assert estimate_memory_gib(QWEN7B, 4096, lora_r=64) > base
    assert estimate_memory_gib(QWEN7B, 4096, load_in_4bit=False) > base + 8  # 16-bit weights
    assert estimate_memory_gib(QWEN7B, 4096, True) > base  # plain checkpointing keeps layer inputs on the GPU
    assert estimate_memory_gib(QWEN7B, 4096, kernels=PLAIN_KERNELS) > base


@pytest.mark.parametrize(
    "key, published_b",
    [("qwen2.5-0.5b", 0.49), ("qwen2.5-7b", 7.62), ("qwen2.5-72b", 72.7), ("llama-3.1-8b", 8.03),
     ("llama-3.1-405b", 405.85), ("mistral-nemo-12b", 12.25), ("phi-3.5-mini", 3.82), ("gemma-2-9b", 9.24)],
)
def test_shapes_give_the_published_parameter_counts(key, published_b):
    assert SHAPES[key].params / 1e9 == pytest.approx(published_b, rel=0.01)


def test_shape_from_a_model_folder(tiny_qwen_dir):
    shape = model_shape_for(str(tiny_qwen_dir))
    config = json.loads((tiny_qwen_dir / "config.json").read_text())
    assert shape == ModelShape.from_hf_config(config)
    assert (shape.hidden, shape.layers, shape.vocab) == (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"])


def test_shape_of_a_catalogue_name_needs_no_download():
    assert model_shape_for("qwen2.5-7b") == QWEN7B
    assert model_shape_for("no-such-org/no-such-model") is None


# --- the fast profile --------------------------------------------------------------------------


def test_seed_profile_changes_nothing():
    config = Config()
    applied = apply_profile(config, 80.0, shape=QWEN7B)
    assert applied == config and applied is not config


def test_fast_on_an_80gb_card_turns_checkpointing_off():
    config, applied = fast(79.2)
    assert applied.training.packing is True
    assert applied.training.per_device_train_batch_size * config.model.max_seq_length == FAST_TOKENS_PER_MICROBATCH
    assert applied.training.gradient_accumulation_steps == 1
    assert applied.lora.gradient_checkpointing is False
    assert config.training.packing is False and config.lora.gradient_checkpointing == "unsloth"  # a copy
    assert "training.packing: False -> True" in profile_changes(config, applied)


def test_fast_on_a_24gb_card_keeps_checkpointing():
    _, applied = fast(24.0)
    assert applied.training.packing is True
    assert applied.training.per_device_train_batch_size == 8
    assert applied.lora.gradient_checkpointing == "unsloth"
    assert estimate_memory_gib(QWEN7B, 8 * 2048, "unsloth") < 24.0 * 0.9


def test_fast_keeps_the_seed_token_capacity_per_step():
    config, applied = fast(79.2, model__max_seq_length=512)
    t = applied.training
    assert t.per_device_train_batch_size == FAST_TOKENS_PER_MICROBATCH // 512
    seed_capacity = config.training.per_device_train_batch_size * config.training.gradient_accumulation_steps * 512
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * 512 >= seed_capacity


def test_fast_without_a_gpu_packs_but_leaves_checkpointing():
    _, applied = fast(None)
    assert applied.training.packing is True
    assert applied.lora.gradient_checkpointing == "unsloth"


def test_fast_is_more_cautious_for_plain_transformers():
    # Measured on an H200 (139.8 GiB; docs/benchmarks.md, benchmarks/gpu_plain_memory.py): the
    # transformers backend without checkpointing takes 8.02 GiB + 19.55 GiB per packed row of 2048, and
    # the old plan of 8 rows ran out of memory. Unsloth's fused kernels take 8 rows there (63.8 GiB, FACTS.md).
    config = Config()
    config.training.profile = "fast"
    unsloth = apply_profile(config, 139.8, shape=QWEN7B, kernels=FUSED_KERNELS)
    plain = apply_profile(config, 139.8, shape=QWEN7B, kernels=PLAIN_KERNELS)
    assert (unsloth.training.per_device_train_batch_size, unsloth.lora.gradient_checkpointing) == (8, False)
    rows = plain.training.per_device_train_batch_size
    assert plain.lora.gradient_checkpointing is False and rows < 8
    assert 8.02 + 19.55 * rows <= 0.9 * 139.8  # fits, at the measured cost
    # an 80 GiB card: plain keeps checkpointing on where Unsloth's kernels need none
    on_h100 = apply_profile(config, 79.2, shape=QWEN7B, kernels=PLAIN_KERNELS)
    assert on_h100.lora.gradient_checkpointing == "unsloth"
    assert apply_profile(config, 79.2, shape=QWEN7B, kernels=FUSED_KERNELS).lora.gradient_checkpointing is False


def test_profile_is_validated():
    from qtune.config import validate
    from qtune.errors import ConfigError

    assert validate({"training": {"profile": "fast"}}).training.profile == "fast"
    with pytest.raises(ConfigError, match="profile"):
        validate({"training": {"profile": "fastest"}})


# --- the catalogue -----------------------------------------------------------------------------


def test_catalogue_names_and_computed_memory():
    entries = {e.name: e for e in catalogue_entries()}
    assert len(entries) == len(CATALOGUE)
    assert entries["qwen2.5-7b"].source == "unsloth/Qwen2.5-7B"  # the notebook's id
    assert entries["qwen2.5-7b-instruct"].source == "unsloth/Qwen2.5-7B-Instruct"
    for entry in entries.values():
        assert entry.source.startswith("unsloth/")
        assert entry.memory_4bit_gib == round(seed_memory_gib(entry.shape), 1)
        assert entry.params_b == round(entry.shape.params / 1e9, 2)
    for family in ("qwen2", "llama", "mistral", "phi3", "gemma2"):
        assert any(e.family == family for e in entries.values())


def test_models_command_json_and_table():
    from qtune_cli.main import cli

    result = CliRunner().invoke(cli, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["qwen2.5-7b"]["source"] == "unsloth/Qwen2.5-7B"
    assert "smollm2-135m-instruct" in rows  # the offline demo model stays in the catalogue
    table = CliRunner().invoke(cli, ["models", "--family", "qwen2"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "unsloth/Qwen2.5-72B-Instruct" in table.output and "GiB" in table.output
    assert "gemma" not in table.output


def test_models_command_imports_no_torch():
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr))\n"
        "from qtune_cli.main import main\n"
        "main(['models', '--json'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert "NO-TORCH" in proc.stderr, proc.stderr[-2000:]
