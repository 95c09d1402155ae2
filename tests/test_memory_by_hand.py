"""The catalogue's 4-bit memory figures, checked against arithmetic written out by hand.

Each expected figure below is worked out from the model's published config.json and the estimate
that core/profiles.py documents (QLoRA r16 on the 7 projections, 2 x 2048-token micro-batches,
Unsloth's offloaded checkpointing), with every intermediate count written as a literal, so a change
to ``seed_memory_gib``, ``estimate_memory_gib``, the shapes or the catalogue shows up here. Nothing
in this file calls the estimate to get its expected values.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

GIB = 1024**3
#: NF4: 4 bits + an 8-bit absmax per 64 weights + an fp32 scale per 256 absmax blocks, in bytes
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # = 0.515869140625
TOKENS = 2 * 2048  # the seed's micro-batch at full sequence length


def by_hand(linear_params, embedding_params, lora_params, hidden, intermediate, vocab):
    """The documented sum: weights + LoRA + tokens x (one layer's activations + logits), + 0.5 GiB, + 5%."""
    weights = linear_params * NF4_BYTES + embedding_params * 2  # embeddings and head stay 16-bit
    lora = lora_params * 10  # fp32 weight + fp32 gradient + two 8-bit AdamW states
    one_layer = 2 * (3.5 * hidden + 2.8 * intermediate)  # Unsloth checkpointing keeps one layer's worth
    logits = vocab * 0.5  # Unsloth's chunked cross-entropy
    return (weights + lora + TOKENS * (one_layer + logits)) / GIB


# Qwen2.5-7B (config.json: vocab 152064, hidden 3584, 28 layers, intermediate 18944, 28 heads of
# 128, 4 kv heads, untied embeddings)
QWEN_7B_LINEAR = 28 * (
    3584 * 3584  # q_proj: 28 heads x 128 = 3584 wide
    + 2 * 3584 * 512  # k_proj, v_proj: 4 kv heads x 128 = 512 wide
    + 3584 * 3584  # o_proj
    + 3 * 3584 * 18944  # gate, up, down
)
QWEN_7B_EMBEDDINGS = 2 * 152064 * 3584  # input embeddings and a separate head
QWEN_7B_LORA = 28 * 16 * (
    (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + 18944) + (18944 + 3584)
)

# Gemma-2-9B (config.json: vocab 256000, hidden 3584, 42 layers, intermediate 14336, 16 heads of
# head_dim 256, 8 kv heads, tied embeddings): its attention is 4096 wide, wider than its hidden size
GEMMA_9B_LINEAR = 42 * (
    3584 * 4096  # q_proj: 16 x 256
    + 2 * 3584 * 2048  # k_proj, v_proj: 8 x 256
    + 4096 * 3584  # o_proj
    + 3 * 3584 * 14336
)
GEMMA_9B_EMBEDDINGS = 256000 * 3584  # tied: counted once
GEMMA_9B_LORA = 42 * 16 * (
    (3584 + 4096) + 2 * (3584 + 2048) + (4096 + 3584) + 2 * (3584 + 14336) + (14336 + 3584)
)


def test_the_hand_counts_are_the_published_sizes():
    # the counts above, summed by hand, and the published parameter counts they add up to
    assert QWEN_7B_LINEAR == 6_525_288_448 and QWEN_7B_EMBEDDINGS == 1_089_994_752
    assert (QWEN_7B_LINEAR + QWEN_7B_EMBEDDINGS) / 1e9 == pytest.approx(7.62, abs=0.01)  # the model card: 7.61B
    assert QWEN_7B_LORA == 40_370_176
    assert GEMMA_9B_LINEAR == 8_323_596_288 and GEMMA_9B_EMBEDDINGS == 917_504_000
    assert (GEMMA_9B_LINEAR + GEMMA_9B_EMBEDDINGS) / 1e9 == pytest.approx(9.24, abs=0.01)
    assert GEMMA_9B_LORA == 54_018_048


# Worked out: Qwen2.5-7B weights 6,525,288,448 x 0.51587 + 1,089,994,752 x 2 = 5,546,184,448 bytes;
# LoRA 403,701,760; activations 4096 x (131,174.4 + 76,032) = 848,717,414; total 6.3317 GiB,
# (6.3317 + 0.5) x 1.05 = 7.17 GiB. Gemma-2-9B: 6,128,894,464 + 540,180,480 + 4096 x (105,369.6 +
# 128,000) = 7.1013 GiB -> 7.98 GiB.
EXPECTED = {"qwen2.5-7b": (QWEN_7B_LINEAR, QWEN_7B_EMBEDDINGS, QWEN_7B_LORA, 3584, 18944, 152064, 7.17),
            "gemma-2-9b": (GEMMA_9B_LINEAR, GEMMA_9B_EMBEDDINGS, GEMMA_9B_LORA, 3584, 14336, 256000, 7.98)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_seed_memory_equals_the_hand_computed_figure(name):
    from qtune.plugins.models import SHAPES
    from qtune.profiles import seed_memory_gib

    *counts, written_out = EXPECTED[name]
    expected = round((by_hand(*counts) + 0.5) * 1.05, 2)
    assert expected == written_out  # the sum above, done again here
    assert seed_memory_gib(SHAPES[name]) == written_out


@pytest.mark.parametrize("name, shown", [("qwen2.5-7b", 7.2), ("qwen2.5-7b-instruct", 7.2), ("gemma-2-9b", 8.0), ("gemma-2-9b-it", 8.0)])
def test_qtune_models_prints_the_hand_computed_memory(name, shown):
    from qtune_cli.main import cli

    result = CliRunner().invoke(cli, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows[name]["memory_4bit_gib"] == shown  # 7.17 and 7.98 GiB, shown to 0.1
    table = CliRunner().invoke(cli, ["models", "--family", rows[name]["family"]], env={"COLUMNS": "200"})
    line = next(line for line in table.output.splitlines() if f" {name} " in line)
    assert f"{shown:.1f} GiB" in line


def test_plain_kernels_on_one_gpu_and_sharded_by_hand():
    # The transformers backend's traits (docs/benchmarks.md, measured on an H200): activations 2.3x a
    # fused layer's, 10 bytes of logits per vocabulary entry, and a 4-bit model's embeddings upcast to
    # float32 by peft (4 bytes) on one GPU, but kept 16-bit when FSDP shards the model.
    from qtune.plugins.models import SHAPES
    from qtune.profiles import PLAIN_KERNELS, estimate_memory_gib, sharded_memory_gib

    tokens = 2048  # one packed row, checkpointing off: every layer's activations are kept
    weights = QWEN_7B_LINEAR * NF4_BYTES + QWEN_7B_EMBEDDINGS * 4
    per_token = 28 * 2 * (3.5 * 3584 + 2.8 * 18944) * 2.3 + 152064 * 10
    by_hand_gib = ((weights + QWEN_7B_LORA * 10 + tokens * per_token) / GIB + 0.5) * 1.05
    assert estimate_memory_gib(SHAPES["qwen2.5-7b"], tokens, False, kernels=PLAIN_KERNELS) == pytest.approx(by_hand_gib, abs=0.01)
    assert 27.57 < by_hand_gib < 27.57 * 1.05  # the measured peak, and at most 5% above it
    # one FSDP process holds everything, with the embeddings in 16-bit: 2 bytes less per embedding weight
    sharded = sharded_memory_gib(SHAPES["qwen2.5-7b"], tokens, 1, False, kernels=PLAIN_KERNELS)
    assert sharded == pytest.approx(by_hand_gib - QWEN_7B_EMBEDDINGS * 2 / GIB * 1.05, abs=0.02)
