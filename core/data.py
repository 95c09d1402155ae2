"""From a dataset section to training examples: load rows, map fields onto the template's, render
prompt + completion, tokenize, append EOS and build labels.

The labels are built here, not by trl, so preflight checks and training see the same tokens: the
prompt is masked (-100) when training on responses only, and the EOS token is always trained, so
the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .errors import QtuneError
from .types import PromptTemplate

IGNORE_INDEX = -100


def pick_loader(config: Config):
    from .plugin_manager import get_host

    loaders = get_host().dataset_loaders
    name = config.dataset.loader
    if name == "auto":
        path = config.dataset.path or ""
        name = "files" if path and Path(path).expanduser().exists() else "hub"
    return loaders.get(name)


def load_rows(config: Config, template: PromptTemplate):
    """The dataset's rows, renamed to the template's field names and checked. Returns (train, held_out)."""
    spec = config.dataset
    rows = pick_loader(config).load(spec)
    if hasattr(rows, "keys") and not hasattr(rows, "column_names"):  # a DatasetDict: take the split
        if spec.split not in rows:
            raise QtuneError(f"dataset has no split {spec.split!r}; choose one of: {', '.join(rows)}")
        rows = rows[spec.split]
    if len(rows) == 0:
        raise QtuneError(f"dataset {spec.path or spec.loader!r} has no rows; point dataset.path at data with examples")
    rows = rename_fields(rows, template, spec.fields)
    if spec.shuffle:
        rows = rows.shuffle(seed=config.training.seed)
    held_out = None
    if spec.eval_size:
        if spec.eval_size >= len(rows):
            raise QtuneError(f"dataset.eval_size {spec.eval_size} leaves no training rows (the dataset has {len(rows)})")
        held_out = rows.select(range(len(rows) - spec.eval_size, len(rows)))
        rows = rows.select(range(len(rows) - spec.eval_size))
    if spec.limit:
        rows = rows.select(range(min(spec.limit, len(rows))))
    return rows, held_out


def rename_fields(rows, template: PromptTemplate, mapping: dict[str, str]):
    unknown = set(mapping) - set(template.fields) - set(template.optional_fields)
    if unknown:
        name = sorted(unknown)[0]
        raise QtuneError(
            f"dataset.fields.{name}: template {template.name!r} has no field {name!r}; "
            f"its fields are {', '.join(template.fields + template.optional_fields)}"
        )
    columns = set(rows.column_names)
    renames = {}
    for field in template.fields + template.optional_fields:
        column = mapping.get(field, field)
        if column not in columns:
            if field in template.optional_fields and field not in mapping:
                continue
            raise QtuneError(
                f"dataset lacks column {column!r} for template field {field!r} (columns: {', '.join(sorted(columns))}); "
                f"map it with dataset.fields.{field}: <column>"
            )
        if column != field:
            renames[column] = field
    keep = [f for f in template.fields + template.optional_fields if mapping.get(f, f) in columns]
    rows = rows.rename_columns(renames) if renames else rows
    return rows.select_columns(keep)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    truncated: bool


def tokenize_example(
    example: dict[str, Any], template: PromptTemplate, tokenizer, max_length: int, responses_only: bool
) -> TokenizedExample:
    prompt = template.render_prompt(example)
    completion = template.render_completion(example)
    encoded = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(encoded["input_ids"]) + [tokenizer.eos_token_id]
    # A token belongs to the prompt when it starts before the prompt ends (special tokens such as BOS
    # have empty offsets at 0 and count as prompt).
    prompt_tokens = sum(1 for start, end in encoded["offset_mapping"] if start < len(prompt))
    labels = list(ids)
    if responses_only:
        labels[:prompt_tokens] = [IGNORE_INDEX] * prompt_tokens
    truncated = len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length], prompt_tokens, truncated)


def tokenize_rows(rows, template: PromptTemplate, tokenizer, config: Config):
    """A ``datasets.Dataset`` with input_ids and labels, ready for trl's SFTTrainer."""
    max_length = config.model.max_seq_length
    responses_only = config.training.train_on_responses_only

    def encode(example):
        tokenized = tokenize_example(example, template, tokenizer, max_length, responses_only)
        return {"input_ids": tokenized.input_ids, "labels": tokenized.labels, "truncated": tokenized.truncated}

    encoded = rows.map(encode, remove_columns=rows.column_names, desc=None)
    trained = encoded.filter(lambda ex: any(label != IGNORE_INDEX for label in ex["labels"]))
    if len(trained) == 0:
        raise QtuneError(
            "every training example has all labels masked (-100); raise model.max_seq_length or turn off "
            "training.train_on_responses_only"
        )
    return trained.remove_columns(["truncated"]), {
        "examples": len(encoded),
        "truncated": int(sum(encoded["truncated"])),
        "fully_masked_dropped": len(encoded) - len(trained),
    }


SAFE_PAD_CANDIDATES = ("<|PAD_TOKEN|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>", "<unk>")


def ensure_distinct_pad(tokenizer) -> str | None:
    """Give the tokenizer a pad token distinct from EOS when it has none or reuses EOS.

    Returns a sentence saying what was chosen, or None when nothing changed. Only tokens already in
    the vocabulary are used, so the model's embeddings never need resizing.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return None
    vocab = tokenizer.get_vocab()
    for candidate in SAFE_PAD_CANDIDATES + ((tokenizer.unk_token,) if tokenizer.unk_token else ()):
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            before = tokenizer.pad_token
            tokenizer.pad_token = candidate
            return f"pad token was {before!r} (the EOS token); using {candidate!r} so EOS stays trained"
    return None
