"""What the trainer really feeds the model, seen from inside a real `qtune run` (tiny Qwen2, one
epoch of eight examples): packed batches are packed, padded batches are padded, and the tokens and
trained labels are the ones worked out here with the real tokenizer, independently of qtune's
templates and tokenization code.

A test-only callback puts a forward pre-hook on the model when training starts and keeps the
input ids, position ids, attention mask and labels of every training forward.
"""

from __future__ import annotations

import io
import json
import re
from itertools import pairwise

import pytest
from click.testing import CliRunner

from helpers import ALPACA_ROWS, read_metrics, tiny_run_config, write_jsonl
from qtune.types import TrainingCallback

#: the Alpaca prompt of Unsloth's notebook, written out here rather than taken from the template plugin
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n")
ROWS = ALPACA_ROWS * 2  # eight examples of different lengths
BATCH = 2


class BatchRecorder(TrainingCallback):
    name = "test-batch-recorder"

    def __init__(self):
        super().__init__()
        self.batches: list[dict] = []

    def on_train_start(self, run):
        def keep(module, args, kwargs):
            if module.training:
                self.batches.append({key: kwargs[key].detach().clone() for key in ("input_ids", "position_ids", "attention_mask", "labels")
                                     if kwargs.get(key) is not None})

        self.hook = run.model.register_forward_pre_hook(keep, with_kwargs=True)

    def on_train_end(self, run):
        self.hook.remove()


@pytest.fixture(scope="module")
def expected(tiny_qwen_dir):
    """(token ids with EOS appended, number of prompt tokens) per example, from the tokenizer alone;
    and the pad id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    examples = []
    for row in ROWS:
        prompt = ALPACA.format(row["instruction"], row["input"])
        ids = tokenizer(prompt + row["output"])["input_ids"] + [tokenizer.eos_token_id]
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids  # the prompt's tokens do not merge with the answer's
        examples.append((ids, len(prompt_ids)))
    return examples, tokenizer.pad_token_id


def train_one_epoch(tmp_path, model_dir, packing, responses_only):
    from rich.console import Console

    from qtune.config import load_config
    from qtune.pipeline import run

    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    config = tiny_run_config(tmp_path, model_dir, data, training={
        "max_steps": 0, "num_train_epochs": 1, "per_device_train_batch_size": BATCH, "packing": packing,
        "train_on_responses_only": responses_only})
    recorder = BatchRecorder()
    run(load_config(config), Console(file=io.StringIO()), extra_callbacks=[recorder])
    return recorder.batches, tmp_path / "runs" / "tiny"


def segments(batch, key="input_ids"):
    """The examples in a padding-free row (their ids, or their labels): split where the position ids restart at 0."""
    values, positions = batch[key][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(values)]
    return [values[a:b] for a, b in pairwise(starts)]


def test_packed_batches_hold_whole_examples_back_to_back_without_padding(tmp_path, tiny_qwen_dir, expected):
    examples, pad = expected
    batches, run_dir = train_one_epoch(tmp_path, tiny_qwen_dir, packing=True, responses_only=True)
    lengths = [len(ids) for ids, _ in examples]
    assert max(lengths) < 256 / 2 and sum(lengths) < 2 * 256  # so all eight fit in two packed rows of 256

    for batch in batches:
        assert batch["input_ids"].shape[0] == 1  # one flat row per micro-batch (padding-free)
        assert "attention_mask" not in batch  # no mask: nothing to mask
        assert pad not in batch["input_ids"].tolist()[0]
    # every example exactly once, whole, in the epoch, as tokenized here
    packed = sorted(tuple(s) for batch in batches for s in segments(batch))
    assert packed == sorted(tuple(ids) for ids, _ in examples)
    # fewer micro-batches than the eight examples would fill unpacked (4 of 2 rows): here one
    assert len(batches) == 1 < len(ROWS) // BATCH
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1
    # the tokens qtune counts for the step are the examples' lengths summed
    assert [m["num_tokens"] for m in read_metrics(run_dir) if "step" in m] == [sum(lengths)]
    # labels: the answers and EOS only; each example's first position is never a target
    labels = [label for batch in batches for label in batch["labels"][0].tolist()]
    assert sum(label != -100 for label in labels) == sum(len(ids) - prompt for ids, prompt in examples)
    trained = [tuple(ids[prompt:]) for ids, prompt in examples]
    found = [tuple(token for token, label in zip(ids, labels, strict=True) if label != -100)
             for batch in batches for ids, labels in zip(segments(batch), segments(batch, "labels"), strict=True)]
    assert sorted(found) == sorted(trained)


def test_unpacked_batches_are_padded_rows_of_the_batch_size(tmp_path, tiny_qwen_dir, expected):
    examples, pad = expected
    batches, run_dir = train_one_epoch(tmp_path, tiny_qwen_dir, packing=False, responses_only=False)
    assert len(batches) == len(ROWS) // BATCH == json.loads((run_dir / "summary.json").read_text())["steps"]
    rows, per_step = [], []
    for batch in batches:
        assert batch["input_ids"].shape[0] == BATCH
        mask = batch["attention_mask"]
        for ids, row_mask, labels in zip(batch["input_ids"].tolist(), mask.tolist(), batch["labels"].tolist(), strict=True):
            kept = [token for token, m in zip(ids, row_mask, strict=True) if m]
            assert all(token == pad for token, m in zip(ids, row_mask, strict=True) if not m)
            # every real token is trained (responses-only off), padding never
            assert [label for label, m in zip(labels, row_mask, strict=True) if m] == kept
            assert all(label == -100 for label, m in zip(labels, row_mask, strict=True) if not m)
            rows.append(tuple(kept))
        per_step.append(sum(len(row) for row in rows[-BATCH:]))
    assert sorted(rows) == sorted(tuple(ids) for ids, _ in examples)
    assert any(pad in batch["input_ids"].tolist()[row] for batch in batches for row in range(BATCH))  # lengths differ
    # qtune counts the real tokens of each step (the trainer shuffles, so the steps' examples are
    # those recorded), padding left out, and the epoch's count is every example's length
    counted = [m["num_tokens"] for m in read_metrics(run_dir) if "step" in m]
    assert counted == [sum(per_step[: k + 1]) for k in range(len(per_step))]
    assert counted[-1] == sum(len(ids) for ids, _ in examples)


@pytest.mark.parametrize("responses_only", [True, False])
def test_validate_reports_the_trained_token_counts(tmp_path, tiny_qwen_dir, expected, responses_only):
    from qtune_cli.main import cli

    examples, _ = expected
    total = sum(len(ids) for ids, _ in examples)
    trained = sum(len(ids) - prompt for ids, prompt in examples) if responses_only else total
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"train_on_responses_only": responses_only})
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    counts = re.search(r"valid \((\d+) training examples, ([\d,]+) of ([\d,]+) tokens trained", result.output)
    assert counts, result.output
    assert (int(counts[1]), int(counts[2].replace(",", "")), int(counts[3].replace(",", ""))) == (len(ROWS), trained, total)
