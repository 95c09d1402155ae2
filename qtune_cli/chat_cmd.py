"""`qtune chat`: a multi-turn conversation in the terminal with a trained run or its GGUF, and the
conversation input of `qtune generate`. Heavy libraries load inside the functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from qtune.errors import QtuneError

HELP = "/reset forgets the conversation, /system TEXT sets the system prompt (/system alone removes it), /exit quits"


def open_chat_model(target: Path, max_new_tokens: int, temperature: float):
    """(template, tokenizer, generate, count_tokens, context) for a run directory or a GGUF file in
    one; ``generate(prompt)`` streams text. The run's template must be a chat template."""
    from qtune.run import FinishedRun
    from qtune.types import ChatTemplate
    from qtune_cli.output import quiet_libraries

    artefact = target.is_file() or bool(target.suffix)
    if artefact:  # a file made by `qtune export` (a GGUF, ...), run by its format's exporter
        from qtune.plugin_manager import get_host

        host = get_host()
        exporter = next((host.exporters.get(n) for n in host.exporters
                         if host.exporters.get(n).artifact_suffix == target.suffix.lower()), None)
        if exporter is None:
            raise QtuneError(f"cannot chat with {str(target)!r}: give a run directory or a file made by `qtune export`")
        if not target.is_file():
            raise QtuneError(f"file {str(target)!r} not found; export one with `qtune export RUN_DIR --format {exporter.name}`")
        run_dir = next((p for p in target.resolve().parents if (p / "config.yaml").is_file()), None)
        if run_dir is None:
            raise QtuneError(f"{str(target)!r} is not inside a qtune run directory, so its chat template is unknown")
    else:
        run_dir = target
    finished = FinishedRun.open(run_dir)
    template = finished.template
    if not isinstance(template, ChatTemplate):
        raise QtuneError(
            f"run {str(run_dir)!r} was trained with template {template.name!r}, which renders single instructions, not "
            f"conversations; use `qtune generate -i ...`, or train with a chat template (template: chat, chatml, ...)"
        )
    context = finished.config.model.max_seq_length
    quiet_libraries()
    if artefact:
        from transformers import AutoTokenizer

        # the run's tokenizer renders the conversation and counts its tokens (the export keeps the vocabulary)
        tokenizer = AutoTokenizer.from_pretrained(finished.adapter_dir)
        stops = [s for s in dict.fromkeys([*template.stop_strings(), template.end_of_turn_token(tokenizer) or ""]) if s]

        def generate(prompt):
            return exporter.stream_generate(target, prompt, max_new_tokens=max_new_tokens, stop=stops)

        def count_tokens(prompt):
            return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    else:
        from qtune.chat import end_of_turn_ids
        from qtune_cli.generation import stream_answer

        model, tokenizer = finished.load_trained()
        model = finished.backend().for_inference(model)
        stop_ids = end_of_turn_ids(template, tokenizer)

        def generate(prompt):
            return stream_answer(model, tokenizer, prompt, max_new_tokens, temperature, add_special_tokens=False, stop_ids=stop_ids)

        def count_tokens(prompt):
            return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return template, tokenizer, generate, count_tokens, context


def read_conversation(source: str) -> tuple[list[dict], list | None]:
    """A conversation from a JSON file (or ``-``: stdin): a list of messages, or an object with
    ``messages`` (OpenAI roles) or ``conversations`` (ShareGPT) and optional ``tools``. It must end
    in a message for the model to answer (user or tool)."""
    from qtune.chat import order_problem, row_tools, template_messages
    from qtune.data import detect_format
    from qtune.plugin_manager import get_host

    where = "stdin" if source == "-" else repr(source)
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QtuneError(f"conversation file {where} not found; give a JSON file or - for stdin") from None
    except UnicodeDecodeError:
        raise QtuneError(f"conversation {where} is not UTF-8 text; save it as UTF-8") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise QtuneError(f"conversation {where} is not JSON ({exc}); give a list of {{\"role\", \"content\"}} messages") from None
    row = {"messages": data} if isinstance(data, list) else data
    if not isinstance(row, dict):
        raise QtuneError(f"conversation {where} must be a list of messages or an object with `messages`")
    fmt = detect_format(list(row), {}, row, conversations=True)
    if fmt is None:
        raise QtuneError(f"conversation {where} has no `messages` or `conversations`; give a list of {{\"role\", \"content\"}} messages")
    with get_host().guard_item(get_host().data_formats, fmt.name, f"reading the conversation as {fmt.name!r}"):
        normal = fmt.conversation(row, {})
    messages = normal["messages"]
    problem = normal["problem"]
    if not problem and messages and messages[-1]["role"] == "assistant":
        problem = "ends in an assistant turn; add the message to answer"
    if not problem:
        # the model answers the last message: order as for training, with a final assistant turn
        problem = order_problem(messages + [{"role": "assistant", "content": "?"}])
    if problem:
        raise QtuneError(f"conversation {where} {problem}")
    return template_messages(messages), row_tools(normal)


@click.command()
@click.argument("target", metavar="RUN_DIR|GGUF", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt for the conversation (/system changes it).")
@click.option("--max-new-tokens", type=click.IntRange(1, 32768), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0, 5.0), default=0.0, show_default=True,
              help="0 is greedy (a GGUF is always greedy).")
def chat(target: Path, system: str | None, max_new_tokens: int, temperature: float):
    """Talk with a trained run (RUN_DIR) or its GGUF, turn by turn, answers streamed.

    The run's chat template renders the conversation; when it outgrows the run's
    model.max_seq_length the oldest exchanges are dropped (the system prompt stays).
    /reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits.
    """
    from qtune_cli.generation import ChatSession

    template, tokenizer, generate, count_tokens, context = open_chat_model(target, max_new_tokens, temperature)
    session = ChatSession(template, tokenizer, generate, count_tokens, context, max_new_tokens, system=system)
    click.echo(f"chatting with {target} (template {template.name}, context {context} tokens); {HELP}")
    while True:
        click.echo("you> ", nl=False)
        line = sys.stdin.readline()
        if not line:  # end of input
            click.echo()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            click.echo("(conversation reset)")
            continue
        if text == "/system" or text.startswith("/system "):
            session.system = text[len("/system"):].strip() or None
            click.echo(f"(system prompt {'set' if session.system else 'removed'})")
            continue
        if text.startswith("/"):
            click.echo(f"(unknown command {text.split()[0]}; {HELP})")
            continue
        before = session.dropped
        try:
            pieces = session.ask(text)
            click.echo("assistant> ", nl=False)
            for piece in pieces:
                click.echo(piece, nl=False)
            click.echo()
        except QtuneError as error:
            click.echo(f"(error: {error})")
            continue
        if session.dropped > before:
            click.echo(f"(dropped the {session.dropped - before} oldest messages to stay within {context} tokens)")
