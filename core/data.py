"""From a dataset section to training examples: load rows, map fields onto the template's, render
prompt + completion, tokenize, append EOS and build labels.

The labels are built here, not by trl, so preflight checks and training see the same tokens: the
prompt is masked (-100) when training on responses only, and the EOS token is always trained, so
the model learns to stop. :func:`encode_rows` is the one tokenization path: preflight reads its
check columns, training keeps its ``input_ids`` and ``labels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import QtuneError, describe
from .types import ChatTemplate, PromptTemplate

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

IGNORE_INDEX = -100
#: the row's index in the dataset as loaded (before shuffling and the eval split); findings name it
ROW_COLUMN = "_qtune_row"


#: how a local data file's name ends (a hub dataset id, owner/name, does not)
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".pq")


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local file or folder even when it is not there (a typo): it starts
    with ``.``, ``/`` or ``~``, or ends like a data file. A hub id (``owner/name``) does neither."""
    return path.startswith((".", "/", "~")) or path.lower().endswith(DATA_SUFFIXES)


def pick_loader(config: Config):
    """``dataset.loader``, with ``auto`` resolved: local files for a path that exists or looks local
    (a missing one is then named as missing, not fetched from the hub), the hub otherwise."""
    from .plugin_manager import get_host

    loaders = get_host().dataset_loaders
    name = config.dataset.loader
    if name == "auto":
        path = config.dataset.path or ""
        name = "files" if path and (Path(path).expanduser().exists() or looks_local(path)) else "hub"
    return loaders.get(name)


def read_rows(config: Config, template: PromptTemplate):
    """The dataset's rows as loaded, then as its data format gives them (the template's fields, or
    conversations), each with its index in :data:`ROW_COLUMN`. Refuses a missing split, no rows,
    missing columns, and conversations for an instruction template."""
    from .plugin_manager import get_host

    spec = config.dataset
    loader = pick_loader(config)
    with get_host().guard_item(get_host().dataset_loaders, loader.name, f"loading the dataset with loader {loader.name!r}"):
        rows = loader.load(spec)
    if hasattr(rows, "keys") and not hasattr(rows, "column_names"):  # a DatasetDict: take the split
        if spec.split not in rows:
            raise QtuneError(f"dataset has no split {spec.split!r}; choose one of: {', '.join(rows)}")
        rows = rows[spec.split]
    if len(rows) == 0:
        raise QtuneError(f"dataset {spec.path or spec.loader!r} has no rows; point dataset.path at data with examples")
    _check_utf8(rows, spec)  # before anything reads a row: pyarrow keeps invalid bytes until then
    fmt = data_format(rows, spec)
    host = get_host()
    if fmt.conversations and not isinstance(template, ChatTemplate):
        raise QtuneError(
            f"dataset {spec.path or spec.loader!r} holds conversations ({fmt.name} format) and template {template.name!r} "
            f"renders instruction rows; set template: chat (the model's own chat template) or a built-in chat template "
            f"such as chatml, qwen2.5, llama-3.1, mistral-v0.3, mistral-nemo, phi-3.5 or gemma"
        )
    with host.guard_item(host.data_formats, fmt.name, f"reading the dataset as {fmt.name!r} rows"):
        rows = fmt.rows(rows, template, spec)
    if fmt.conversations:
        rows = checked_conversations(rows, host.plugin_label(host.data_formats.owners.get(fmt.name, "?")))
    return rows.add_column(ROW_COLUMN, list(range(len(rows))))


def data_format(rows, spec):
    """The :class:`qtune.types.DataFormat` of dataset.format, ``auto`` resolved by :func:`detect_format`."""
    from .plugin_manager import get_host

    if spec.format != "auto":
        return get_host().data_formats.get(spec.format)
    found = detect_format(rows.column_names, spec.fields, dict(rows[0]) if len(rows) else None)
    if found is None:
        raise QtuneError(f"no data format recognises the columns {', '.join(sorted(rows.column_names))}; set dataset.format")
    return found


def detect_format(columns: list[str], fields: dict[str, str], first_row: Optional[dict], conversations: bool = False):
    """The highest-priority data format whose ``detect`` recognises these columns (and first row),
    among the conversation formats only with ``conversations``; None when none does."""
    from .plugin_manager import get_host

    host = get_host()
    found = []
    for fmt in host.data_formats.items.values():  # registration order, built-ins first: max() keeps the first of a tie
        if conversations and not fmt.conversations:
            continue
        with host.guard_item(host.data_formats, fmt.name, f"detecting the {fmt.name!r} format"):
            if fmt.detect(columns, fields, first_row):
                found.append(fmt)
    return max(found, key=lambda f: f.auto_priority) if found else None


def checked_conversations(rows, plugin: str):
    """A conversation format's rows with the problem column the core reads, and the order of the
    roles checked where the format found nothing wrong (:func:`qtune.chat.order_problem`). A second
    pass over the rows, so that a third party's format gets the same check as the built-ins."""
    from .chat import MESSAGES, PROBLEM_COLUMN, TOOLS, order_problem

    if not {MESSAGES, TOOLS, "problem"} <= set(rows.column_names):
        raise QtuneError(f"{plugin} returned conversation rows without `messages`, `tools` and `problem` columns "
                         f"(it gave {', '.join(sorted(rows.column_names))}); fix the plugin (docs/plugins.md, register_data_formats)")
    rows = rows.rename_column("problem", PROBLEM_COLUMN)

    def check(problems, conversations):
        return {PROBLEM_COLUMN: [problem or order_problem(messages) for problem, messages in zip(problems, conversations, strict=True)]}

    # batched, reading only the two columns: 20,000 ShareGPT rows took 0.1-0.2 s, against 1.2 s row by row (2-core CPU, 12-02)
    return rows.map(check, input_columns=[PROBLEM_COLUMN, MESSAGES], batched=True, desc=None)


def _check_utf8(rows, spec) -> None:
    """pyarrow's JSON reader keeps invalid UTF-8 bytes; reading them later fails deep in datasets."""
    import pyarrow as pa

    for name in rows.column_names:
        try:
            rows.data.column(name).validate(full=True)
        except pa.ArrowInvalid:
            raise QtuneError(
                f"dataset {spec.path or spec.loader!r}: column {name!r} is not UTF-8 text; re-save the file as UTF-8"
            ) from None


def eval_source(config: Config) -> Optional[Config]:
    """The config that reads the held-out rows when they have a file or split of their own
    (dataset.eval_path, dataset.eval_split), else None: they are then taken from the training data."""
    spec = config.dataset
    if not (spec.eval_path or spec.eval_split):
        return None
    own = {"path": spec.eval_path or spec.path, "split": spec.eval_split or spec.split, "limit": None, "shuffle": False,
           "eval_size": 0, "eval_path": None, "eval_split": None}
    return config.model_copy(update={"dataset": spec.model_copy(update=own)})


def split_rows(rows, config: Config, eval_rows=None):
    """Shuffle (dataset.shuffle), hold out dataset.eval_size rows from the end, keep dataset.limit.
    With ``eval_rows`` (read from :func:`eval_source`), those are held out instead: the first
    dataset.eval_size of them, or all. Returns (train, held_out)."""
    spec = config.dataset
    if spec.shuffle:
        rows = rows.shuffle(seed=config.training.seed)
    held_out = None
    if eval_rows is not None:
        held_out = eval_rows.select(range(min(spec.eval_size, len(eval_rows)))) if spec.eval_size else eval_rows
    elif spec.eval_size:
        if spec.eval_size >= len(rows):
            raise QtuneError(
                f"dataset.eval_size {spec.eval_size} leaves no training rows (the dataset has {len(rows)}); lower dataset.eval_size"
            )
        held_out = rows.select(range(len(rows) - spec.eval_size, len(rows)))
        rows = rows.select(range(len(rows) - spec.eval_size))
    if spec.limit:
        rows = rows.select(range(min(spec.limit, len(rows))))
    return rows, held_out


def load_rows(config: Config, template: PromptTemplate):
    """The dataset's rows, renamed to the template's field names and checked. Returns (train, held_out)."""
    source = eval_source(config)
    return split_rows(read_rows(config, template), config, read_rows(source, template) if source else None)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    truncated: bool
    #: tokens before truncation (EOS included)
    length: int = 0
    #: the text the ids were made from (prompt + completion, EOS not included) and each token's
    #: character span in it; only with ``with_offsets=True`` (``qtune validate --show``)
    text: Optional[str] = None
    offsets: Optional[list[tuple[int, int]]] = None
    #: the text already ended in the EOS token, so none was appended
    had_eos: bool = False
    #: the rendered prompt (preflight looks for the template's response marker in it)
    prompt: str = ""

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def responses_only(config: Config, template: PromptTemplate) -> bool:
    """training.train_on_responses_only resolved: ``auto`` trains the assistant turns only with a
    chat template, and every token with an instruction template (the seed notebook)."""
    value = config.training.train_on_responses_only
    if value == "auto":
        return isinstance(template, ChatTemplate)
    return bool(value)


def eos_token_id(tokenizer) -> int:
    """The tokenizer's EOS id; refused when it has none (every example ends in a trained EOS)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise QtuneError("the tokenizer has no EOS token, so the model cannot learn to stop; set eos_token in its tokenizer_config.json")
    return eos


def tokenize_example(
    example: dict[str, Any], template: PromptTemplate, tokenizer, max_length: int, responses_only: bool, with_offsets: bool = False
) -> TokenizedExample:
    eos = eos_token_id(tokenizer)
    prompt = template.render_prompt(example)
    completion = template.render_completion(example)
    text = prompt + completion
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    # Text (or a tokenizer) that already ends in EOS keeps that one EOS: never two.
    had_eos = bool(ids) and ids[-1] == eos
    if not had_eos:
        ids.append(eos)
    # A token belongs to the prompt when it starts before the prompt ends (special tokens such as BOS
    # have empty offsets at 0 and count as prompt).
    offsets = [tuple(span) for span in encoded["offset_mapping"]]
    last = len(offsets) - 1
    # An EOS the tokenizer added itself (empty span at 0) ends the completion: never prompt.
    prompt_tokens = sum(1 for i, (start, _) in enumerate(offsets) if start < len(prompt) and not (had_eos and i == last))
    labels = list(ids)
    if responses_only:
        labels[:prompt_tokens] = [IGNORE_INDEX] * prompt_tokens
    truncated = len(ids) > max_length
    return TokenizedExample(
        ids[:max_length],
        labels[:max_length],
        prompt_tokens,
        truncated,
        length=len(ids),
        text=text if with_offsets else None,
        offsets=offsets[:max_length] if with_offsets else None,
        had_eos=had_eos,
        prompt=prompt,
    )


def tokenize_chat_example(example: dict[str, Any], template: ChatTemplate, tokenizer, max_length: int, assistant_only: bool,
                          with_offsets: bool = False):
    """A conversation row (or an instruction row, as one turn) rendered by a chat template, with
    every assistant turn trained (:func:`qtune.chat.tokenize_conversation`)."""
    from .chat import example_conversation, tokenize_conversation

    messages, tools = example_conversation(template, example)
    return tokenize_conversation(template, messages, tokenizer, max_length, assistant_only, tools, with_offsets)


#: what :func:`encode_rows` writes for a row it could not tokenize
_FAILED = {"input_ids": [], "labels": [], "length": 0, "truncated": False, "trained": 0, "eos_trained": False,
           "had_eos": False, "marker_found": True, "turns": 0, "turns_cut": 0, "turns_end_missing": 0,
           "turns_end_masked": 0, "turns_empty": 0}


def encode_rows(rows, template: PromptTemplate, tokenizer, config: Config):
    """Tokenize every row (:func:`tokenize_example`, or :func:`tokenize_chat_example` with a chat
    template); a ``datasets.Dataset`` holding ``input_ids`` and ``labels`` plus what preflight
    checks: ``row`` (the row's index in the data as loaded), ``length``, ``truncated``, ``trained``
    (label count), ``eos_trained`` (the labels end in a trained EOS; with a chat template: every
    assistant turn ends in its trained end-of-turn token), ``had_eos``, ``marker_found``, the
    assistant turns (``turns``, ``turns_cut`` by truncation, ``turns_end_missing``,
    ``turns_end_masked``, ``turns_empty``), ``problem`` (what is wrong with a conversation row)
    and ``error`` (the template failed to render the row)."""
    from .chat import PROBLEM_COLUMN

    max_length = config.model.max_seq_length
    only_responses = responses_only(config, template)
    marker = template.response_marker
    eos = eos_token_id(tokenizer)  # refused here once, before the first row
    chat = isinstance(template, ChatTemplate)

    def encode(example):
        row = example.get(ROW_COLUMN, -1)
        problem = example.get(PROBLEM_COLUMN) or ""
        if problem:
            return {**_FAILED, "row": row, "problem": problem, "error": ""}
        try:
            if chat:
                conv = tokenize_chat_example(example, template, tokenizer, max_length, only_responses)
                return {
                    "input_ids": conv.input_ids, "labels": conv.labels, "row": row, "length": conv.length,
                    "truncated": conv.truncated, "trained": conv.trained_tokens,
                    "eos_trained": bool(conv.turns) and not (conv.turns_end_missing or conv.turns_end_masked or conv.empty_turns),
                    "had_eos": False, "marker_found": True, "turns": len(conv.turns), "turns_cut": conv.turns_cut,
                    "turns_end_missing": conv.turns_end_missing, "turns_end_masked": conv.turns_end_masked,
                    "turns_empty": conv.empty_turns, "problem": "", "error": "",
                }
            tokenized = tokenize_example(example, template, tokenizer, max_length, only_responses)
        except QtuneError as exc:
            if not chat:
                raise
            return {**_FAILED, "row": row, "problem": "", "error": str(exc)}
        except Exception as exc:  # a template plugin failing on this row: reported with the row
            return {**_FAILED, "row": row, "problem": "", "error": describe(exc)}
        return {
            "input_ids": tokenized.input_ids,
            "labels": tokenized.labels,
            "row": row,
            "length": tokenized.length,
            "truncated": tokenized.truncated,
            "trained": tokenized.trained_tokens,
            "eos_trained": bool(tokenized.labels) and tokenized.labels[-1] == eos,
            "had_eos": tokenized.had_eos,
            "marker_found": (not marker) or marker in tokenized.prompt,
            "turns": 1, "turns_cut": int(tokenized.truncated), "turns_end_missing": 0, "turns_end_masked": 0,
            "turns_empty": 0, "problem": "",
            "error": "",
        }

    return rows.map(encode, remove_columns=rows.column_names, desc=None)


def trainable(encoded):
    """The encoded rows training uses: those with at least one trained label, as input_ids + labels."""
    trained = encoded.filter(lambda count, error, problem: count > 0 and not error and not problem,
                             input_columns=["trained", "error", "problem"])
    return trained.select_columns(["input_ids", "labels"])


def tokenize_rows(rows, template: PromptTemplate, tokenizer, config: Config, held_out: bool = False):
    """A ``datasets.Dataset`` with input_ids and labels, ready for trl's SFTTrainer, and its stats.
    ``held_out``: the rows are held out for the validation loss (the errors say so)."""
    encoded = encode_rows(rows, template, tokenizer, config)
    errors = [(row, error) for row, error in zip(encoded["row"], encoded["error"], strict=True) if error]
    if errors:
        row, error = errors[0]
        place = "held-out dataset row" if held_out else "dataset row"
        raise QtuneError(f"{place} {row}: template {template.name!r} failed to render it: {error}; fix the row or the template")
    problems = [(row, problem) for row, problem in zip(encoded["row"], encoded["problem"], strict=True) if problem]
    if problems:
        row, problem = problems[0]
        raise QtuneError(f"dataset row {row}: the conversation {problem}; fix or remove the row")
    dataset = trainable(encoded)
    if len(dataset) == 0:
        which = "held-out row (dataset.eval_size / eval_path), so there is no validation loss," if held_out else "training example"
        raise QtuneError(
            f"every {which} has all labels masked (-100); raise model.max_seq_length or turn off "
            "training.train_on_responses_only"
        )
    return dataset, encoded_stats(encoded)


def encoded_stats(encoded) -> dict[str, Any]:
    trained = encoded["trained"]
    return {
        "examples": len(encoded),
        "truncated": int(sum(encoded["truncated"])),
        "fully_masked_dropped": int(sum(1 for count in trained if count == 0)),
        "tokens": int(sum(encoded["length"])),
        "trained_tokens": int(sum(trained)),
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
