"""``qtune validate --show N``: training examples printed as they are trained, each token styled by its
label (masked dim, trained bold green, EOS visible). The tokens come from preflight's report, through
the one tokenization path training uses (:func:`qtune.data.encode_rows`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtune.errors import QtuneError

if TYPE_CHECKING:  # pragma: no cover
    from qtune.config import Config
    from qtune.preflight import Report


def show_examples(report: Report, count: int, out) -> None:
    """Print ``count`` training examples as trained: masked tokens dim, trained tokens bold green,
    EOS shown as its token text (reversed when trained)."""
    from rich.rule import Rule
    from rich.text import Text

    from qtune.data import ROW_COLUMN

    if report.tokenizer is None or report.train_rows is None:
        return
    rows = report.train_rows
    out.print(Text.assemble(("masked (not trained)", "dim"), "  ", ("trained", "bold green"), "  ",
                            (report.tokenizer.eos_token or "EOS", "bold green reverse"), " = EOS"))
    for position in range(min(count, len(rows))):
        example = dict(rows[position])
        text = render_example(example, report.template, report.tokenizer, report.config)
        row = example.get(ROW_COLUMN, position)
        out.print(Rule(f"example {position + 1} (dataset row {row})", style="dim"))
        out.print(text)


def render_example(example: dict, template, tokenizer, config: Config):
    """One example as a Rich Text, styled by its labels (see :func:`show_examples`)."""
    from rich.text import Text

    from qtune.data import IGNORE_INDEX, responses_only, tokenize_example
    from qtune.types import ChatTemplate

    if isinstance(template, ChatTemplate):
        return render_conversation_example(example, template, tokenizer, config)
    tokenized = tokenize_example(example, template, tokenizer, config.model.max_seq_length,
                                 responses_only(config, template), with_offsets=True)
    text, offsets = tokenized.text or "", tokenized.offsets or []
    result = Text()
    cursor = 0
    eos = tokenizer.eos_token_id
    for index, token_id in enumerate(tokenized.input_ids):
        trained = tokenized.labels[index] != IGNORE_INDEX
        style = "bold green" if trained else "dim"
        if index < len(offsets):
            start, end = offsets[index]
            if end > start:
                piece = text[max(start, cursor):end]
                if start > cursor:  # characters no token spans (rare): shown with this token
                    piece = text[cursor:end]
                cursor = max(cursor, end)
                result.append(piece, style=style)
                continue
            if token_id != eos:  # a special token the tokenizer added (BOS): its own text
                result.append(tokenizer.convert_ids_to_tokens(token_id), style=style)
                continue
        # the EOS qtune appended (or one in the text): always visible
        result.append(tokenizer.eos_token or "<eos>", style=f"{style} reverse")
    if tokenized.truncated:
        result.append(f" … cut at model.max_seq_length ({config.model.max_seq_length} of {tokenized.length} tokens)", style="red")
    return result


def render_conversation_example(example: dict, template, tokenizer, config: Config):
    """A conversation as the chat template renders it, one line per turn as the template lays them
    out, each token styled by its label: masked dim, trained (the assistant turns with their
    end-of-turn token) bold green. A line above says how many turns and tokens are trained."""
    from rich.text import Text

    from qtune.chat import PROBLEM_COLUMN
    from qtune.data import IGNORE_INDEX, responses_only, tokenize_chat_example

    if example.get(PROBLEM_COLUMN):
        return Text(f"not trained: the conversation {example[PROBLEM_COLUMN]}", style="red")
    max_length = config.model.max_seq_length
    try:
        conv = tokenize_chat_example(example, template, tokenizer, max_length, responses_only(config, template), with_offsets=True)
    except QtuneError as exc:
        return Text(f"not trained: {exc}", style="red")
    text, offsets = conv.text or "", conv.offsets or []
    result = Text(f"{len(conv.turns)} assistant turn{'s' if len(conv.turns) != 1 else ''}, "
                  f"{conv.trained_tokens} of {len(conv.input_ids)} tokens trained\n", style="italic")
    cursor = 0
    for index in range(len(conv.input_ids)):
        style = "bold green" if conv.labels[index] != IGNORE_INDEX else "dim"
        start, end = offsets[index]
        if end > cursor:
            result.append(text[min(start, cursor):end], style=style)
            cursor = end
    if conv.truncated:
        result.append(f" … cut at model.max_seq_length ({max_length} of {conv.length} tokens; "
                      f"{conv.turns_cut} assistant turn(s) cut)", style="red")
    return result
