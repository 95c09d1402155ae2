"""`qtune run`: the whole fine-tuning pipeline, every part supplied by plugins.

Order matters: everything that can be checked without a model (config, plugin names, dataset
fields) is checked before the run directory is created or a model is loaded, and the backend
loads the model before trl is imported (Unsloth must patch trl/transformers first).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from .backends import choose_backend
from .config import Config
from .errors import QtuneError
from .fsutil import atomic_dir, atomic_file
from .models import resolve_model
from .plugin_manager import get_host
from .run import ADAPTER_DIR, RunContext
from .types import TrainingCallback


def new_run_dir(config: Config) -> Path:
    root = Path(config.training.output_dir).expanduser()
    name = config.name or time.strftime("run-%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise QtuneError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-'; change `name`")
    run_dir = root / name
    if run_dir.exists():
        raise QtuneError(f"run directory {str(run_dir)!r} already exists; choose another `name` or remove it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".qtune-write-test-{name}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise QtuneError(f"cannot write to training.output_dir {str(root)!r}: {exc.strerror}; choose a writable folder") from None
    return run_dir


def make_callbacks(config: Config, extra: list[TrainingCallback]) -> list[TrainingCallback]:
    registry = get_host().callbacks
    callbacks = list(extra)
    for index, entry in enumerate(config.callbacks):
        factory = registry.get(entry.name)
        try:
            callbacks.append(factory(**entry.options))
        except TypeError as exc:
            raise QtuneError(f"callbacks[{index}] ({entry.name}): bad options: {exc}") from None
    return callbacks


def _emit(callbacks: list[TrainingCallback], event: str, *args: Any) -> None:
    for cb in callbacks:
        getattr(cb, event)(*args)


def run(config: Config, console, extra_callbacks: list[TrainingCallback] | None = None) -> RunContext:
    host = get_host()
    template = host.templates.get(config.template)
    backend = choose_backend(config)
    callbacks = make_callbacks(config, extra_callbacks or [])

    from .data import ensure_distinct_pad, load_rows, tokenize_rows

    train_rows, held_out = load_rows(config, template)  # refuses bad fields before any model loads
    model_path = resolve_model(config.model.name)
    run_dir = new_run_dir(config)
    run_dir.mkdir(parents=True)
    with atomic_file(run_dir / "config.yaml") as handle:
        handle.write(config.to_yaml())
    ctx = RunContext(config=config, run_dir=run_dir, console=console, backend_name=backend.name, model_path=model_path)
    console.print(f"run directory: [bold]{run_dir}[/]  backend: [bold]{backend.name}[/]  model: {model_path}")
    try:
        _emit(callbacks, "on_run_start", ctx)
        _train_and_save(ctx, backend, template, train_rows, held_out, callbacks, ensure_distinct_pad, tokenize_rows)
        _emit(callbacks, "on_run_end", ctx)
    except BaseException as error:
        ctx.summary["error"] = str(error) or type(error).__name__
        _emit(callbacks, "on_error", ctx, error)
        _write_summary(ctx)
        raise
    _write_summary(ctx)
    return ctx


def _train_and_save(ctx, backend, template, train_rows, held_out, callbacks, ensure_distinct_pad, tokenize_rows):
    config, console = ctx.config, ctx.console
    from transformers import set_seed

    set_seed(config.training.seed)
    model, tokenizer = backend.load(config, ctx.model_path)
    ctx.model, ctx.tokenizer = model, tokenizer
    ctx.device = str(getattr(model, "device", "cpu"))
    note = ensure_distinct_pad(tokenizer)
    if note:
        console.print(f"[yellow]note:[/] {note}")
    train_dataset, stats = tokenize_rows(train_rows, template, tokenizer, config)
    ctx.summary["data"] = stats
    if stats["truncated"]:
        console.print(f"[yellow]note:[/] {stats['truncated']} of {stats['examples']} examples are longer than model.max_seq_length and were cut")

    evaluate = config.evaluation.exact_match and held_out is not None
    if evaluate and config.evaluation.before_training:
        ctx.summary["eval_before"] = _exact_match(ctx, backend, model, tokenizer, template, held_out, "before training", callbacks)

    # The seed is applied again right before the LoRA weights are created: same config and seed,
    # same initial adapter, same loss curve.
    set_seed(config.training.seed)
    try:
        model = backend.add_lora(model, config)
    except ValueError as exc:  # peft: target modules not found in the model
        raise QtuneError(f"lora.target_modules do not fit this model: {str(exc).splitlines()[0]}") from None
    ctx.model = model

    from .training import train

    train(ctx, model, tokenizer, train_dataset, callbacks)
    adapter = save_adapter(ctx, model, tokenizer)
    _emit(callbacks, "on_save", ctx, adapter)

    if evaluate:
        ctx.summary["eval_after"] = _exact_match(ctx, backend, model, tokenizer, template, held_out, "after training", callbacks)

    if config.exports:
        from .export import run_exports
        from .run import FinishedRun

        _write_summary(ctx)
        ctx.summary["exports"] = run_exports(FinishedRun(ctx.run_dir, config), config.exports, console)


def _exact_match(ctx, backend, model, tokenizer, template, rows, label, callbacks):
    from .evaluation import exact_match

    evaluation = ctx.config.evaluation
    started = time.perf_counter()
    result = exact_match(backend.for_inference(model), tokenizer, template, rows, evaluation.max_new_tokens, evaluation.batch_size)
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["when"] = label
    ctx.console.print(f"exact match {label}: [bold]{result['accuracy']:.1%}[/] ({result['correct']}/{result['total']})")
    ctx.log_metrics({"eval": label, "exact_match": result["accuracy"]})
    _emit(callbacks, "on_evaluate", ctx, result)
    return result


def save_adapter(ctx: RunContext, model, tokenizer) -> Path:
    final = ctx.run_dir / ADAPTER_DIR
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return final


def _write_summary(ctx: RunContext) -> None:
    with atomic_file(ctx.run_dir / "summary.json") as handle:
        json.dump(ctx.summary, handle, indent=2, default=str)
