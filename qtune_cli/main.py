"""The `qtune` command line. Heavy libraries load inside the commands that need them, so
`qtune --help` stays fast."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from qtune import __version__
from qtune.errors import QtuneError
from qtune_cli.chat_cmd import chat
from qtune_cli.export_cmd import export
from qtune_cli.models_cmd import models
from qtune_cli.output import console, print_traceback, quiet_libraries


class QtuneGroup(click.Group):
    """Turns a :class:`QtuneError` into click's one-line ``Error: ...`` and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QtuneError as error:
            print_traceback(error)
            raise click.ClickException(str(error)) from None


def _set_debug(ctx, param, value):
    if value:
        os.environ["QTUNE_DEBUG"] = "1"


@click.group(cls=QtuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qtune")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Print the traceback behind an error (also QTUNE_DEBUG=1).")
def cli():
    """Fine-tune causal language models with LoRA/QLoRA, built from plugins.

    \b
    qtune init config.yaml          write the seed notebook's configuration
    qtune run config.yaml           fine-tune, with live progress and a memory report
    qtune generate runs/NAME -i ..  stream an answer from the trained adapter
    qtune chat runs/NAME            talk with it, turn by turn (chat templates)
    qtune export runs/NAME -f gguf  save as LoRA, merged 16-bit / 4-bit or GGUF
    qtune runs                      list the runs in ./runs: losses, scores, speed, status
    qtune report runs/A runs/B      one HTML page with their curves, config differences, exports
    """


PRESETS = ("seed", "demo", "chat-demo")


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), default="qtune.yaml")
@click.option("--preset", type=click.Choice(PRESETS), default="seed", show_default=True,
              help="seed: Unsloth's Qwen2.5-7B Alpaca notebook; demo: the offline CPU demo; chat-demo: its conversational twin.")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def init(path: Path, preset: str, force: bool):
    """Write a configuration file to PATH (default qtune.yaml)."""
    if path.exists() and not force:
        raise QtuneError(f"{str(path)!r} already exists; pass --force to overwrite it")
    if preset == "seed":
        from qtune.config import seed_config

        text = "# Unsloth's Qwen2.5-7B Alpaca notebook as a qtune config. Every key is optional.\n" + seed_config().to_yaml()
    else:
        from importlib.resources import files

        text = files("qtune").joinpath("presets", f"{preset}.yaml").read_text(encoding="utf-8")
    from qtune.fsutil import atomic_file

    with atomic_file(path) as handle:
        handle.write(text)
    click.echo(f"wrote {path}")


def _load(config_path, overrides):
    from qtune.config import load_config

    return load_config(config_path, tuple(overrides))


def _exit_with_findings(findings, cause: BaseException | None = None) -> None:
    """Print preflight errors, one line each on stderr, and exit non-zero; with --debug, first the
    traceback of the exception behind them (a plugin's)."""
    if cause is not None:
        print_traceback(cause)
    for finding in findings:
        click.echo(f"Error: {finding}", err=True)
    raise click.exceptions.Exit(1)


@cli.command()
@click.argument("config_path", metavar="[CONFIG]", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set training.max_steps=10 (repeatable).")
@click.option("--resume", "resume_dir", metavar="RUN_DIR", type=click.Path(path_type=Path),
              help="Continue RUN_DIR from its last complete checkpoint, with the run's saved config.yaml.")
@click.option("--progress/--no-progress", default=True, help="Show the live progress bar.")
@click.option("--gpus", type=click.IntRange(1), default=None, metavar="N",
              help="Train on N GPUs of this machine: N processes through torch.distributed, DDP or FSDP as "
                   "training.distributed says (docs/distributed.md). Several nodes: torchrun ... -m qtune_cli run CONFIG.")
@click.option("--cpu-processes", type=click.IntRange(1), default=None, metavar="N",
              help="Train with N processes on the CPU (gloo): the same path as --gpus, without GPUs.")
def run(config_path: Path | None, overrides: tuple[str, ...], resume_dir: Path | None, progress: bool, gpus: int | None,
        cpu_processes: int | None):
    """Fine-tune with the configuration in CONFIG, after the checks of `qtune validate`."""
    from qtune.distributed import LAUNCHED_ENV, Ranks
    from qtune_cli.launch import processes_from_options

    request = processes_from_options(gpus, cpu_processes)
    ranks = Ranks.from_env()
    if request is not None and (ranks.distributed or os.environ.get(LAUNCHED_ENV)):
        raise QtuneError("--gpus and --cpu-processes start the processes themselves; under torchrun or accelerate launch leave them out")
    if resume_dir is not None:
        if config_path is not None or overrides:
            raise QtuneError("--resume continues RUN_DIR with its saved config.yaml; leave out CONFIG and --set")
        from qtune.pipeline import open_for_resume

        config, _ = open_for_resume(resume_dir)
    elif config_path is None:
        raise QtuneError("give a CONFIG file to run (`qtune init` writes one), or --resume RUN_DIR")
    else:
        config = _load(config_path, overrides)
    quiet_libraries()
    if request is not None:
        return _launch(config, resume_dir, request, progress)
    if ranks.distributed or os.environ.get(LAUNCHED_ENV):
        return _run_worker(config, resume_dir, progress, ranks)
    from qtune.pipeline import run as run_pipeline
    from qtune.plugin_manager import get_host
    from qtune.preflight import PreflightError

    out = console()
    extra = [get_host().callbacks.get("rich_progress")()] if progress else []
    try:
        ctx = run_pipeline(config, out, extra_callbacks=extra, resume=resume_dir)
    except PreflightError as error:
        _exit_with_findings(error.findings, error.__cause__)
    _print_summary(out, ctx)


def _launch(config, resume_dir: Path | None, request, progress: bool) -> None:
    """`qtune run --gpus N`: plan, check and prepare the run here (once, before any weights load),
    then start N workers through torch's launcher and wait for them."""
    from qtune.backends import choose_backend
    from qtune.distributed import plan, prepare_run
    from qtune.preflight import PreflightError
    from qtune_cli.launch import launch

    if request.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the workers get the same: gloo on the CPU
    out = console()
    chosen = plan(config, request.processes, request.device, choose_backend(config))
    out.print(f"training on {chosen.describe()}", soft_wrap=True)
    if resume_dir is not None:
        run_dir, worker_args = Path(resume_dir), ["run", "--resume", str(resume_dir)]
    else:
        try:
            _, run_dir = prepare_run(config, out, chosen)
        except PreflightError as error:
            _exit_with_findings(error.findings, error.__cause__)
        worker_args = ["run", str(run_dir / "config.yaml")]
    if not progress:
        worker_args.append("--no-progress")
    launch(worker_args, request, run_dir)


def _run_worker(config, resume_dir: Path | None, progress: bool, ranks) -> None:
    """One of several training processes (or the one process of `--gpus 1`). Rank 0 prints; an
    error becomes one line, printed by qtune's launcher when it started the worker."""
    from rich.console import Console

    from qtune.distributed import OtherRankFailed, report_worker_error, start_worker
    from qtune.errors import describe
    from qtune.pipeline import run as run_pipeline
    from qtune.plugin_manager import get_host
    from qtune.preflight import PreflightError

    out = console() if ranks.is_main else Console(quiet=True)
    if not ranks.is_main:
        import warnings

        warnings.simplefilter("ignore")  # rank 0 shows what matters; the rest would repeat it
    try:
        config, prepared = start_worker(config, ranks, resume_dir, out)
        extra = [get_host().callbacks.get("rich_progress")()] if progress and ranks.is_main else []
        ctx = run_pipeline(config, out, extra_callbacks=extra, resume=resume_dir, ranks=ranks, prepared=prepared)
        if ranks.is_main:
            _print_summary(out, ctx)
    except OtherRankFailed:
        sys.exit(1)
    except (Exception, KeyboardInterrupt) as error:
        if isinstance(error, PreflightError):
            line = "; ".join(str(f) for f in error.findings)
        elif isinstance(error, QtuneError):
            line = str(error)
        elif isinstance(error, KeyboardInterrupt):
            line = "interrupted"
        else:
            line = describe(error)
        if not report_worker_error(ranks, line, error):
            click.echo(f"Error: {f'rank {ranks.rank}: ' if ranks.distributed else ''}{line}", err=True)
        sys.exit(130 if isinstance(error, KeyboardInterrupt) else 1)
    finally:
        ranks.leave()


def _print_summary(out, ctx) -> None:
    from rich.table import Table

    summary = ctx.summary
    table = Table(title="run summary", show_header=False)
    table.add_row("run directory", str(ctx.run_dir))
    table.add_row("adapter", str(ctx.run_dir / "adapter"))
    for key in ("steps", "train_loss", "train_runtime_s"):
        if key in summary:
            table.add_row(key, str(summary[key]))
    if "eval_loss" in summary:
        best = f"; best {summary['best_eval_loss']} at step {summary['best_eval_loss_step']}" if "best_eval_loss" in summary else ""
        table.add_row("validation loss", f"{summary['eval_loss']} at step {summary['eval_loss_step']}{best}")
    for key, label in (("eval_before", "exact match before"), ("eval_after", "exact match after")):
        if key in summary:
            result = summary[key]
            table.add_row(label, f"{result['accuracy']:.1%} ({result['correct']}/{result['total']}, {result['seconds']} s)")
    out.print(table)


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR|GGUF", type=click.Path(path_type=Path))
@click.argument("prompt", metavar="[INSTRUCTION]", required=False)
@click.option("-i", "--instruction", default=None, help="The instruction (the template's first field); or give it after RUN_DIR.")
@click.option("--input", "input_text", default="", help="Optional input / context.")
@click.option("--system", default=None, help="System prompt, for templates that have one (chat templates).")
@click.option("-c", "--conversation", "conversation", default=None, metavar="FILE|-",
              help="Answer the last message of a conversation in a JSON file (- reads stdin): a list of "
                   "{role, content} messages, or {messages|conversations, tools}. Needs a run with a chat template.")
@click.option("--max-new-tokens", type=click.IntRange(1, 32768), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0, 5.0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--stream/--no-stream", default=True, help="Print tokens as they come, or the whole answer at the end.")
def generate(run_dir: Path, prompt: str | None, instruction: str | None, input_text: str, system: str | None,
             conversation: str | None, max_new_tokens: int, temperature: float, stream: bool):
    """Answer an instruction (INSTRUCTION or -i) or a conversation (-c) with a trained run (RUN_DIR) or a GGUF file made by `qtune export`."""
    if prompt is not None:
        if instruction is not None:
            raise QtuneError("give the instruction once: after RUN_DIR or with -i, not both")
        instruction = prompt
    if (instruction is None) == (conversation is None):
        raise QtuneError("give either -i INSTRUCTION or --conversation FILE (- for stdin)")
    if conversation is not None:
        from qtune_cli.chat_cmd import open_chat_model, read_conversation

        messages, tools = read_conversation(conversation)
        if system and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": system}] + messages
        template, tokenizer, generate_text, _, _ = open_chat_model(run_dir, max_new_tokens, temperature)
        pieces = generate_text(template.render(messages, tokenizer, tools=tools, add_generation_prompt=True))
    elif not run_dir.is_dir() and (run_dir.is_file() or run_dir.suffix):
        example = {"instruction": instruction, "input": input_text, **({"system": system} if system else {})}
        pieces = _artifact_pieces(run_dir, example, max_new_tokens)
    else:
        example = {"instruction": instruction, "input": input_text, **({"system": system} if system else {})}
        from qtune.run import FinishedRun

        finished = FinishedRun.open(run_dir)
        quiet_libraries()
        model, tokenizer = finished.load_trained()
        model = finished.backend().for_inference(model)
        from qtune_cli.generation import stream_answer

        template = finished.template
        from qtune.types import ChatTemplate

        if isinstance(template, ChatTemplate):  # rendered with the run's tokenizer, stopping at the end of the turn
            from qtune.chat import end_of_turn_ids

            prompt = template.render(template.example_messages({k: v for k, v in example.items() if k != "output"}),
                                     tokenizer, add_generation_prompt=True)
            pieces = stream_answer(model, tokenizer, prompt, max_new_tokens, temperature, add_special_tokens=False,
                                   stop_ids=end_of_turn_ids(template, tokenizer))
        else:
            pieces = stream_answer(model, tokenizer, template.render_prompt(example), max_new_tokens, temperature)
    if stream:
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()
    else:
        click.echo("".join(pieces))


def _artifact_pieces(path: Path, example: dict, max_new_tokens: int):
    """A file made by `qtune export` (a GGUF, ...) runs in the runtime of the export format whose
    ``artifact_suffix`` it has; it sits in RUN_DIR/exports/..., and its run gives the template."""
    from qtune.plugin_manager import get_host
    from qtune.run import FinishedRun

    host = get_host()
    runners = {host.exporters.get(name).artifact_suffix: name for name in host.exporters if host.exporters.get(name).artifact_suffix}
    name = runners.get(path.suffix.lower())
    if name is None:
        choices = ", ".join(sorted(runners)) or "none"
        raise QtuneError(f"cannot generate from {str(path)!r}: give a run directory or an exported file ({choices})")
    if not path.is_file():
        raise QtuneError(f"file {str(path)!r} not found; export one with `qtune export RUN_DIR --format {name}`")
    run_dir = next((p for p in path.resolve().parents if (p / "config.yaml").is_file()), None)
    if run_dir is None:
        raise QtuneError(f"{str(path)!r} is not inside a qtune run directory, so its prompt template is unknown")
    template = FinishedRun.open(run_dir).template
    exporter = host.exporters.get(name)
    with host.guard(host.exporters.owners.get(name, "?"), f"generating with {name}"):
        pieces = exporter.stream_generate(path, template.render_prompt(example), max_new_tokens=max_new_tokens,
                                          stop=template.stop_strings())
    return pieces


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool):
    """List the loaded plugins: distribution, version and the hooks each implements."""
    from qtune.plugin_manager import get_host

    host = get_host()
    rows = host.plugin_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="qtune plugins")
    for column in ("plugin", "distribution", "version", "hooks"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["distribution"], row["version"], ", ".join(row["hooks"]))
    out = console()
    out.print(table)
    registries = [host.templates, host.dataset_loaders, host.data_formats, host.models, host.backends, host.callbacks, host.trackers,
                  host.exporters]
    for registry in registries:
        out.print(f"[bold]{registry.kind}s:[/] {', '.join(registry) or '-'}")


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value (repeatable).")
@click.option("--show", type=click.IntRange(0), default=0, metavar="N",
              help="Print N training examples as trained: masked prompt dim, trained tokens bold green, EOS shown.")
def validate(config_path: Path, overrides: tuple[str, ...], show: int):
    """Check CONFIG before any GPU time: schema, plugin names, data, tokens (loads the tokenizer, never the weights)."""
    config = _load(config_path, overrides)
    quiet_libraries()
    from qtune.preflight import preflight, print_findings
    from qtune_cli.examples import show_examples

    report = preflight(config)
    out = console()
    print_findings(report, out)
    if show:
        show_examples(report, show, out)
    if report.errors:
        _exit_with_findings(report.errors, report.cause)
    stats = report.stats
    click.echo(
        f"{config_path}: valid ({stats.get('examples', 0)} training examples, {stats.get('trained_tokens', 0):,} of "
        f"{stats.get('tokens', 0):,} tokens trained; template {config.template}, backend {config.model.backend}, model {config.model.name})"
    )


def _add_plugin_commands() -> None:
    from qtune.plugin_manager import get_host

    get_host().add_commands(cli)


def main(argv: list[str] | None = None) -> None:
    try:
        _add_plugin_commands()
    except QtuneError as error:
        if "--debug" in (argv if argv is not None else sys.argv):
            os.environ["QTUNE_DEBUG"] = "1"
        print_traceback(error)
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
    cli.main(args=argv, prog_name="qtune")


# Built-in commands kept in their own modules; each imports only click at module level.
cli.add_command(export)
cli.add_command(models)
cli.add_command(chat)

if __name__ == "__main__":
    main()
