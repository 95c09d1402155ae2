"""`qtune run`: the whole fine-tuning pipeline, every part supplied by plugins.

Order matters: everything that can be checked without model weights (config, plugin names, the
data, the tokens: :mod:`qtune.preflight`) is checked before the run directory is created or a model
is loaded, and the backend loads the model before trl is imported (Unsloth must patch
trl/transformers first; for such a backend the token checks run on its own tokenizer right after
the model loads, still before the run directory exists).

``--resume RUN_DIR`` continues a run from its last complete checkpoint with the run's saved
config.yaml; see :func:`open_for_resume` and docs/reliability.md.

On several processes (:mod:`qtune.distributed`) every rank runs :func:`run` on a run directory
prepared beforehand; only rank 0 writes into it and prints (the others get a quiet console).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .backends import choose_backend
from .config import Config
from .errors import QtuneError, first_line
from .fsutil import atomic_dir, atomic_file, disk_full_error, is_disk_full, lock_folder, read_json_dict
from .plugin_manager import get_host, make_callbacks
from .profiles import resolve_profile
from .run import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    PREFLIGHT_FILE,
    RUNNING_FILE,
    RunContext,
    last_complete_checkpoint,
    list_checkpoints,
    new_run_dir,
    read_metrics,
)
from .training import call_callbacks, is_out_of_memory, out_of_memory_error
from .types import Backend, TrainingCallback

# --------------------------------------------------------------------------- resume


def open_for_resume(run_dir: Path) -> tuple[Config, Path]:
    """The saved config of ``run_dir`` and its last complete checkpoint; one-line errors otherwise.
    Cheap: no ML library is imported."""
    from .config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise QtuneError(f"--resume {str(run_dir)!r} is not a qtune run directory (no config.yaml); pass the folder `qtune run` printed")
    config = load_config(run_dir / "config.yaml")
    if (run_dir / ADAPTER_DIR).exists():
        raise QtuneError(f"run {str(run_dir)!r} already finished (it has {ADAPTER_DIR}/); nothing to resume")
    checkpoint = last_complete_checkpoint(run_dir / CHECKPOINTS_DIR)
    if checkpoint is None:
        hint = "training.save_steps is 0, so it saved none" if not config.training.save_steps else "it stopped before its first save"
        raise QtuneError(
            f"run {str(run_dir)!r} has no complete checkpoint to resume from ({hint}); start it again with "
            f"`qtune run {run_dir / 'config.yaml'}` after removing the folder"
        )
    return config, checkpoint


def _prepare_resume(run_dir: Path, checkpoint: Path) -> float:
    """Make ``run_dir`` ready to continue from ``checkpoint``: remove incomplete checkpoints and
    half-written temporary folders, and drop metrics.jsonl records of the steps after the
    checkpoint (the resumed run logs them again, so each step appears once). Returns the time of the
    last record kept, so the ``time`` column goes on from there."""
    step = int(checkpoint.name.split("-")[1])
    for _, path, complete in list_checkpoints(run_dir / CHECKPOINTS_DIR):
        if not complete:
            shutil.rmtree(path, ignore_errors=True)
    for partial in list(run_dir.glob(".*.partial-*")) + list((run_dir / CHECKPOINTS_DIR).glob(".*.partial-*")):
        shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
    metrics = run_dir / "metrics.jsonl"
    kept, last_time = [], 0.0
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by the kill
                continue
            if not isinstance(record, dict) or record.get("step", 0) > step:
                continue
            kept.append(line)
            last_time = max(last_time, float(record.get("time", 0.0)))
        with atomic_file(metrics) as handle:
            handle.write("".join(line + "\n" for line in kept))
    return last_time


# --------------------------------------------------------------------------- the run


def _tokens_before_model(backend: Backend) -> bool:
    """Whether preflight may load the tokenizer (and so import transformers) before the backend
    loads the model. A backend that patches transformers must be imported first: ``import_first()``
    does that where it can; otherwise its own tokenizer is checked right after the model loads."""
    return not backend.patches_trainer or backend.import_first()


def _print_new_findings(report, console, start: int) -> int:
    from .preflight import print_findings

    new = type(report)(config=report.config, findings=report.findings[start:])
    print_findings(new, console)
    return len(report.findings)


def load_model(backend: Backend, config: Config, model_path: str):
    try:
        return backend.load(config, model_path)
    except QtuneError:
        raise
    except OSError as exc:  # missing files, no safetensors (pickles are never loaded), offline hub
        raise QtuneError(
            f"could not load model {model_path!r}: {first_line(exc)}; qtune loads *.safetensors weights only: give a folder "
            f"or hub id that has them"
        ) from None
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(exc, config, "loading the model") from None
        with get_host().guard_item(get_host().backends, backend.name, f"loading the model with backend {backend.name!r}"):
            raise


def run(config: Config, console, extra_callbacks: list[TrainingCallback] | None = None, resume: Path | None = None,
        ranks=None, prepared: Path | None = None) -> RunContext:
    """Train ``config``. With ``resume`` (a run directory whose config.yaml gave ``config``),
    continue that run from its last complete checkpoint instead of starting a new one.

    On several processes, ``ranks`` is this process's :class:`qtune.distributed.Ranks` and
    ``prepared`` the run directory :func:`qtune.distributed.prepare_run` made (unless resuming):
    its preflight findings were printed then, so they are not printed again."""
    from .distributed import DISTRIBUTED_FILE, Ranks, join_ranks
    from .preflight import PREFLIGHT_VERSION, check_model_skeleton, check_tokens, data_fingerprint, preflight

    ranks = ranks or Ranks()
    host = get_host()
    template = host.templates.get(config.template)
    backend = choose_backend(config)
    callbacks = make_callbacks(config, extra_callbacks or [])
    if not ranks.is_main:  # rank 0 reports for all; a callback may ask to run on every rank
        callbacks = [cb for cb in callbacks if getattr(cb, "every_rank", False)]
    checkpoint = None
    if resume is not None:
        _, checkpoint = open_for_resume(resume)  # its config.yaml already holds the applied profile
    elif prepared is None:
        config = resolve_profile(config, backend, console)

    early = _tokens_before_model(backend)
    if ranks.distributed or (resume is not None and (Path(resume) / DISTRIBUTED_FILE).is_file()):
        # several processes, or a run resumed on another number of processes than it trained on
        config, layout = join_ranks(ranks, config, early, resume or prepared, backend, console)
    report = preflight(config, load_tokenizer=early, resuming=resume is not None or prepared is not None)
    report.raise_for_errors()
    printed = len(report.findings) if prepared is not None else _print_new_findings(report, console, 0)
    model = tokenizer = None
    if not early:
        # Nothing may import torch or transformers before such a backend loads the model, not even
        # to seed: the seed is applied right after, and again before the LoRA weights are made.
        model, tokenizer = load_model(backend, config, report.model_path)
        from transformers import set_seed

        set_seed(config.training.seed)
        check_model_skeleton(report, model)
        check_tokens(report, tokenizer)
        report.raise_for_errors()
        _print_new_findings(report, console, printed)

    from .data import trainable

    fingerprint = data_fingerprint(trainable(report.encoded))
    last_time = 0.0
    if resume is not None or prepared is not None:
        run_dir = Path(resume or prepared)
        saved = read_json_dict(run_dir / PREFLIGHT_FILE)
        if saved.get("fingerprint") not in (None, fingerprint):
            raise QtuneError(
                f"the training data of {str(run_dir)!r} changed since the run started (dataset or tokenizer), so resuming "
                f"would not continue the same run; restore the data or start a new run"
            )
        lock = None
        if ranks.is_main:  # one process holds the run folder (the other ranks work under rank 0)
            lock = lock_folder(run_dir, f"another qtune process is running {str(run_dir)!r}; wait for it to finish")
        if checkpoint is not None and ranks.is_main:
            last_time = _prepare_resume(run_dir, checkpoint)
    else:
        run_dir = new_run_dir(config)
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:  # a run with the same name started between the checks and here
            raise QtuneError(f"run directory {str(run_dir)!r} was just created by another qtune run; choose another `name` "
                             f"or wait for that run and continue it with `qtune run --resume`") from None
        lock = lock_folder(run_dir, f"another qtune process is running {str(run_dir)!r}; wait for it to finish")
        with atomic_file(run_dir / "config.yaml") as handle:
            handle.write(config.to_yaml())
        with atomic_file(run_dir / PREFLIGHT_FILE) as handle:
            json.dump({"version": PREFLIGHT_VERSION, "fingerprint": fingerprint, **report.to_json()}, handle, indent=2, default=str)
    ctx = RunContext(config=config, run_dir=run_dir, console=console, backend_name=backend.name, model_path=report.model_path,
                     ranks=ranks if ranks.distributed else None)
    if ranks.distributed:
        ctx.summary["distributed"] = layout
    ctx.started_at = ranks.share(ctx.started_at - last_time)  # one clock for metrics.jsonl
    if checkpoint is not None:
        ctx.summary["resumed_from"] = checkpoint.name
        previous = read_json_dict(run_dir / "summary.json")
        if "eval_before" in previous:
            ctx.summary["eval_before"] = previous["eval_before"]
    verb = f"resuming from {checkpoint.name}" if checkpoint is not None else "run directory"
    console.print(f"{verb}: [bold]{run_dir}[/]  backend: [bold]{backend.name}[/]  model: {report.model_path}", soft_wrap=True)
    if ranks.is_main:
        mark_running(run_dir)
    try:
        call_callbacks(callbacks, "on_run_start", ctx)
        _train_and_save(ctx, backend, template, report, callbacks, model, tokenizer, checkpoint)
        call_callbacks(callbacks, "on_run_end", ctx)
    except BaseException as error:
        converted = None
        if is_disk_full(error, run_dir):
            # A save cut short by the full disk is not a checkpoint: removing it frees its space.
            for _, path, complete in list_checkpoints(run_dir / CHECKPOINTS_DIR):
                if not complete:
                    shutil.rmtree(path, ignore_errors=True)
            resumable = last_complete_checkpoint(run_dir / CHECKPOINTS_DIR) is not None
            then = f"continue it with `qtune run --resume {run_dir}`" if resumable else "run the command again"
            error = converted = disk_full_error("writing the run (checkpoints, metrics or the adapter)", run_dir, then)
        ctx.summary["status"] = "failed"
        ctx.summary["error"] = str(error) or type(error).__name__
        last = last_complete_checkpoint(run_dir / CHECKPOINTS_DIR)
        if last is not None and not (run_dir / ADAPTER_DIR).exists():
            ctx.summary["last_checkpoint"] = str(last)
        for cb in callbacks:  # a callback failing here must not hide the error itself
            try:
                cb.on_error(ctx, error)
            except Exception:
                pass
        if ranks.is_main:
            if resume is None and _nothing_trained(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)  # nothing to resume or keep: as if never started
            else:
                try:
                    _write_summary(ctx)
                except OSError:  # a full disk: the error line says what happened; summary.json stays as it was
                    pass
                (run_dir / RUNNING_FILE).unlink(missing_ok=True)
        if converted is not None:
            raise converted from None
        raise
    else:
        ctx.summary["status"] = "finished"
        if ranks.is_main:
            _write_summary(ctx)
            (run_dir / RUNNING_FILE).unlink(missing_ok=True)
    finally:
        if lock is not None:
            os.close(lock)
    return ctx


def mark_running(run_dir: Path) -> None:
    """Write RUN_DIR/running.json (this process's id and host) for as long as the run goes on, so
    `qtune runs` tells a run in progress from one that was killed (the file stays, the process is gone)."""
    import os
    import socket

    with atomic_file(run_dir / RUNNING_FILE) as handle:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, handle)


def _nothing_trained(run_dir: Path) -> bool:
    """No optimizer step logged, no checkpoint, no adapter: a run that failed before training."""
    logged = any("step" in record for record in read_metrics(run_dir))
    return not logged and not list_checkpoints(run_dir / CHECKPOINTS_DIR) and not (run_dir / ADAPTER_DIR).exists()


def _train_and_save(ctx, backend, template, report, callbacks, model, tokenizer, checkpoint):
    config, console = ctx.config, ctx.console
    from transformers import set_seed

    from .data import encoded_stats, ensure_distinct_pad, tokenize_rows, trainable
    from .preflight import same_tokenizer

    if model is None:
        set_seed(config.training.seed)
        model, tokenizer = load_model(backend, config, ctx.model_path)
    ctx.model, ctx.tokenizer = model, tokenizer
    ctx.device = str(getattr(model, "device", "cpu"))
    attention = backend.attention_in_use(model, config)
    if attention:
        ctx.summary["attention"] = attention
        console.print(f"attention: {attention}", soft_wrap=True)
    from .quantization import describe_quantization

    # what the base was trained as, and where: exports are verified against the same base
    ctx.summary["device"] = ctx.device
    ctx.summary["quantization"] = describe_quantization(model)
    ensure_distinct_pad(tokenizer)  # as preflight did (and said) on its tokenizer
    if same_tokenizer(tokenizer, report.tokenizer):
        train_dataset, stats = trainable(report.encoded), encoded_stats(report.encoded)
    else:  # the backend changed the tokenizer: train on its tokens, through the same function
        console.print("[cyan]note:[/] the backend's tokenizer differs from the model folder's; the examples are tokenized again with it")
        train_dataset, stats = tokenize_rows(report.train_rows, template, tokenizer, config)
    ctx.summary["data"] = stats

    # On several processes rank 0 alone evaluates, saves and exports; the others stop after training.
    main = ctx.is_main
    evaluate = config.evaluation.exact_match and report.held_out is not None and main
    if evaluate and config.evaluation.before_training and checkpoint is None:
        ctx.summary["eval_before"] = _exact_match(ctx, backend, model, tokenizer, template, report.held_out, "before training", callbacks)

    # The seed is applied again right before the LoRA weights are created: same config and seed,
    # same initial adapter, same loss curve.
    set_seed(config.training.seed)
    try:
        model = backend.add_lora(model, config)
    except ValueError as exc:  # peft: target modules not found in the model
        raise QtuneError(f"lora.target_modules do not fit this model: {first_line(exc)}") from None
    except Exception:
        with get_host().guard_item(get_host().backends, backend.name, f"adding LoRA with backend {backend.name!r}"):
            raise
    ctx.model = model

    from .training import train

    eval_dataset = validation_rows(report.held_out, template, tokenizer, config)
    trainer = train(ctx, model, tokenizer, train_dataset, callbacks, resume_from=str(checkpoint) if checkpoint is not None else None,
                    eval_dataset=eval_dataset)
    if ctx.summary.get("distributed", {}).get("strategy") == "fsdp":
        from .distributed import save_sharded_adapter

        model = save_sharded_adapter(ctx, trainer, tokenizer)  # every rank takes part in gathering the shards
    if not main:
        return
    adapter = ctx.run_dir / ADAPTER_DIR if model is None else save_adapter(ctx, model, tokenizer)
    call_callbacks(callbacks, "on_save", ctx, adapter)

    if evaluate:
        ctx.summary["eval_after"] = _exact_match(ctx, backend, model, tokenizer, template, report.held_out, "after training", callbacks)

    if config.exports:
        from .export import run_exports
        from .run import FinishedRun

        _write_summary(ctx)
        ctx.summary["exports"] = run_exports(FinishedRun(ctx.run_dir, config), config.exports, console)


def validation_rows(held_out, template, tokenizer, config):
    """The held-out rows (dataset.eval_size) tokenized and masked as the training rows are, for the
    validation loss; None without held-out rows. Rows with nothing to score (every label masked) are
    left out, as in training; none left is refused."""
    if held_out is None:
        return None
    from .data import tokenize_rows

    return tokenize_rows(held_out, template, tokenizer, config, held_out=True)[0]


def _exact_match(ctx, backend, model, tokenizer, template, rows, label, callbacks):
    from .evaluation import exact_match

    evaluation = ctx.config.evaluation
    # A note first: greedy generation for every held-out row can take minutes on a CPU.
    ctx.console.print(f"[dim]exact match {label}: generating answers to {len(rows)} held-out prompts ...[/]")
    started = time.perf_counter()
    result = exact_match(backend.for_inference(model), tokenizer, template, rows, evaluation.max_new_tokens, evaluation.batch_size)
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["when"] = label
    ctx.console.print(f"exact match {label}: [bold]{result['accuracy']:.1%}[/] ({result['correct']}/{result['total']})")
    ctx.log_metrics({"eval": label, "exact_match": result["accuracy"]})
    call_callbacks(callbacks, "on_evaluate", ctx, result)
    return result


def save_adapter(ctx: RunContext, model, tokenizer) -> Path:
    final = ctx.run_dir / ADAPTER_DIR
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return final


def _write_summary(ctx: RunContext) -> None:
    # Exports record themselves in exports/exports.json as each finishes; keep those records when
    # a later export fails and the run's summary is written again from memory.
    from .export import EXPORTS_RECORD

    recorded = read_json_dict(ctx.run_dir / "exports" / EXPORTS_RECORD)
    if recorded:
        ctx.summary["exports"] = {**recorded, **(ctx.summary.get("exports") or {})}
    with atomic_file(ctx.run_dir / "summary.json") as handle:
        json.dump(ctx.summary, handle, indent=2, default=str)

