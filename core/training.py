"""Training, shared by every backend: trl's SFTTrainer with qtune's callbacks bridged in.

Backends that patch trl (Unsloth) have been imported by the time this module imports trl, because
the pipeline loads the model through the backend first.

Safety nets here: a non-finite loss or LoRA weight stops training before the step's checkpoint is
written (so every checkpoint on disk is a good one); a CUDA out-of-memory error becomes one line of
advice; a checkpoint counts only once complete (see :func:`qtune.run.checkpoint_is_complete`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import QtuneError
from .frame_room import call_with_frame_room
from .memory import current_memory_gib
from .run import CHECKPOINTS_DIR, RunContext, last_complete_checkpoint
from .types import TrainingCallback

#: in a checkpoint's trainer_state.json (stateful_callbacks.QtuneBridge.attributes): the sum of the
#: training losses up to that step, so a resumed run reports the same train_loss as one never stopped
LOSS_SUM = "loss_sum"
#: trainer checkpoints live in RUN_DIR/checkpoints/checkpoint-STEP


#: eval_steps that no step reaches: the trainer then evaluates once, at the last step
#: (transformers' DefaultFlowCallback evaluates at the end whenever the last step is no multiple)
EVAL_AT_END_ONLY = 2**31 - 1


class NonFiniteLoss(QtuneError):
    pass


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def sft_config(run: RunContext, model, validate: bool = False) -> Any:
    """trl's SFTConfig for ``run``; ``validate``: there are held-out rows to compute the validation
    loss on (every training.eval_steps and at the end)."""
    from trl import SFTConfig

    from .distributed import trainer_arguments

    config = run.config
    t = config.training
    on_gpu = cuda_available()
    dtype = getattr(model, "dtype", None)
    import torch

    from .plugin_manager import get_host

    trackers = [get_host().trackers.get(name) for name in t.report_to]
    optim = t.optim
    if not on_gpu and "8bit" in optim:
        # bitsandbytes' 8-bit optimizers need CUDA; their 32-bit twin keeps the update rule.
        optim = "adamw_torch"
        run.console.print(f"[yellow]note:[/] optimizer {t.optim} needs a CUDA GPU; using {optim} on CPU")
    return SFTConfig(
        output_dir=str(run.run_dir / CHECKPOINTS_DIR),
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.num_train_epochs,
        learning_rate=t.learning_rate,
        optim=optim,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        # logging_nan_inf_filter keeps its default (True), as in the seed notebook. It puts the running
        # mean in the log in place of a NaN/inf loss, so the bridge watches every micro-batch's loss
        # itself (QtuneBridge.watch).
        packing=t.packing,
        max_length=config.model.max_seq_length,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        # transformers' integrations by their names; the other trackers come in as tracker_callbacks
        report_to=[tracker.integration for tracker in trackers if tracker.integration] or "none",
        run_name=run.run_dir.name,
        disable_tqdm=True,
        dataset_num_proc=None,
        gradient_checkpointing=False,  # the backend set it up when it added LoRA
        remove_unused_columns=True,
        **(validation_settings(t) if validate else {}),
        **trainer_arguments(run, model),  # DDP or FSDP on several processes (qtune.distributed)
    )


def validation_settings(t) -> dict[str, Any]:
    """The SFTConfig keys of the validation loss: trl/transformers' own evaluation loop on the
    held-out rows, tokenized and masked as the training rows are. With packing, trl packs them too and
    its padding-free collator gives each example its own positions (no attention across examples)."""
    settings: dict[str, Any] = {
        "eval_strategy": "steps",
        "eval_steps": t.eval_steps or EVAL_AT_END_ONLY,
        "per_device_eval_batch_size": t.per_device_eval_batch_size or t.per_device_train_batch_size,
        "prediction_loss_only": True,  # never gather the logits (vocabulary x tokens) of every row
    }
    if t.early_stopping_patience:
        # What EarlyStoppingCallback compares; the adapter saved is the model when training stops.
        settings.update(metric_for_best_model="eval_loss", greater_is_better=False)
    return settings


# --------------------------------------------------------------------------- callbacks


def call_callbacks(callbacks: list[TrainingCallback], event: str, *args: Any) -> None:
    """Call ``event`` on every callback; a plugin's exception becomes one line naming it."""
    from .plugin_manager import get_host

    host = get_host()
    for cb in callbacks:
        name = getattr(cb, "name", type(cb).__name__)
        with host.guard_item(host.callbacks, name, f"{event} of callback {name!r}"):
            getattr(cb, event)(*args)


def tracker_callbacks(run: RunContext) -> list[Any]:
    """The TrainerCallbacks of the trackers ``training.report_to`` names; a plugin's exception
    becomes one line naming it."""
    from .plugin_manager import get_host

    host = get_host()
    callbacks = []
    for name in run.config.training.report_to:
        with host.guard_item(host.trackers, name, f"starting tracker {name!r}"):
            callbacks += host.trackers.get(name).callbacks(run)
    return callbacks


def all_finite(tensors) -> bool:
    """Whether every value of ``tensors`` is finite, with one device sync.

    One fused norm per dtype and device (``torch._foreach_norm``) and one sum: a norm is NaN/inf exactly
    when its tensor holds a NaN/inf, and norms are never negative, so the sum is finite exactly when
    every tensor is. A few kernel launches per optimizer step, whatever the number of LoRA weights.
    """
    import torch

    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    sums = []
    with torch.no_grad():
        for group in groups.values():
            try:
                norms = torch._foreach_norm(group)
            except (RuntimeError, AttributeError, TypeError):  # a dtype or device _foreach_norm does not take
                norms = [torch.linalg.vector_norm(t.float()) for t in group]
            sums.append(torch.stack(norms).float().sum())
        if not sums:
            return True
        return bool(torch.isfinite(torch.stack([total.to(sums[0].device) for total in sums])).all())


def batch_tokens(inputs) -> Any:
    """The tokens a training batch feeds the model, padding left out: the attention mask's sum or,
    for padding-free and packed batches (which carry no mask), every input id.

    An int for a batch on the CPU (as the trainer's data loader hands it over); a 0-dim tensor,
    read later, for one already on a GPU, so that counting never waits for the device.
    """
    if not isinstance(inputs, Mapping):
        return 0
    mask = inputs.get("attention_mask")
    if mask is not None:
        total = mask.sum()
        return int(total) if total.device.type == "cpu" else total
    ids = inputs.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def make_bridge(run: RunContext, callbacks: list[TrainingCallback], eval_rows: int = 0):
    """A transformers TrainerCallback that forwards the trainer's events to qtune's callbacks."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class QtuneBridge(TrainerCallback, ExportableState):
        """Also an ExportableState: the trainer stores :meth:`state` in each checkpoint's
        trainer_state.json, written last, so a complete checkpoint always carries it."""

        def __init__(self) -> None:
            self.last_time = time.perf_counter()
            # Counted here, not read from trl's num_tokens: Unsloth drops that from the logs on the GPU.
            self.tokens: Any = 0  # trained tokens so far in this process (batch_tokens)
            self.last_tokens = 0.0
            self.params = []  # the trained weights, set when training starts
            self.step_losses = []  # this optimizer step's micro-batch losses, still on the device
            self.eval_seconds = 0.0  # time spent evaluating since the last training record
            self.eval_batches = (0, 0)  # (done, total) of the evaluation under way
            self.eval_started = 0.0
            self.eval_rows = eval_rows  # held-out examples (before any packing)
            #: the summed losses of the steps before this process started (read from the resumed
            #: checkpoint) and, on the device, of the steps since: what the trainer's train_loss sums
            self.loss_before = 0.0
            self.loss_since: Any = 0.0

        def state(self) -> dict:
            return {"args": {}, "attributes": {LOSS_SUM: self.loss_before + float(self.loss_since)}}

        def watch(self, trainer) -> None:
            """Count each micro-batch's tokens and keep its loss (on the device: no sync) for the
            check at the step's end; announce each evaluation before its first batch."""
            training_step = trainer.training_step

            def watched_training_step(*args, **kwargs):
                # called as Trainer.training_step(model, inputs, num_items_in_batch)
                inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
                self.tokens += batch_tokens(inputs)
                loss = training_step(*args, **kwargs)
                self.step_losses.append(loss.detach())
                return loss

            trainer.training_step = watched_training_step
            evaluate = getattr(trainer, "evaluate", None)
            if evaluate is None:
                return

            def watched_evaluate(*args, **kwargs):
                # The trainer calls self.evaluate at each eval step; tell the callbacks before the
                # first batch, since an evaluation can take long on a CPU. With packing, trl's
                # eval_dataset holds packed rows, and the batches are made of those.
                dataset = trainer.eval_dataset
                batched = len(dataset) if dataset is not None else 0
                total = math.ceil(batched / max(trainer.args.per_device_eval_batch_size, 1))
                self.eval_batches = (0, total)
                self.eval_started = time.perf_counter()
                call_callbacks(callbacks, "on_evaluate_start", run, "validation loss", total)
                try:
                    return evaluate(*args, **kwargs)
                finally:
                    self.eval_seconds += time.perf_counter() - self.eval_started

            trainer.evaluate = watched_evaluate

        def on_train_begin(self, args, state, control, **kwargs):
            run.total_steps = state.max_steps
            self.start_step = state.global_step
            self.last_time = time.perf_counter()
            self.tokens, self.last_tokens, self.eval_seconds = 0, 0.0, 0.0
            model = kwargs.get("model")
            self.params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
            self.step_losses = []
            call_callbacks(callbacks, "on_train_start", run)

        def on_step_end(self, args, state, control, **kwargs):
            # Runs after the optimizer step and before the step is logged or saved: a NaN here never
            # reaches a checkpoint. One device sync covers the weights and the step's losses.
            losses, self.step_losses = self.step_losses, []
            if losses:  # summed on the device, read only when a checkpoint is saved
                import torch

                self.loss_since = self.loss_since + torch.stack([loss.double() for loss in losses]).sum()
            if not all_finite(self.params + losses):
                control.should_save = False
                bad = [float(loss) for loss in losses if not math.isfinite(float(loss))]
                what = f"the loss became {bad[0]}" if bad else "the LoRA weights became NaN/inf"
                raise NonFiniteLoss(divergence_message(run, state.global_step, what))

        def on_prediction_step(self, args, state, control, **kwargs):
            done, total = self.eval_batches
            self.eval_batches = (done + 1, total)
            call_callbacks(callbacks, "on_evaluate_step", run, done + 1, total)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "eval_loss" in logs:
                self.log_validation(state, logs)
                return
            if logs is None or "loss" not in logs:
                return
            now = time.perf_counter()
            metrics: dict[str, float] = {
                "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
            }
            if not math.isfinite(metrics["loss"]):
                control.should_save = False
                raise NonFiniteLoss(divergence_message(run, state.global_step, f"the loss became {metrics['loss']}"))
            if "grad_norm" in logs and logs["grad_norm"] is not None:
                metrics["grad_norm"] = float(logs["grad_norm"])
            # a GPU count is read after on_step_end's sync; on several processes, the sum over ranks
            tokens = run.total(float(self.tokens))
            elapsed = now - self.last_time - self.eval_seconds  # training time only
            if elapsed > 0 and tokens > self.last_tokens:
                metrics["tokens_per_second"] = (tokens - self.last_tokens) / elapsed
            metrics["num_tokens"] = tokens
            metrics["memory_gib"] = round(current_memory_gib(), 4)
            self.last_tokens = tokens
            self.last_time, self.eval_seconds = now, 0.0
            # This callback runs first, and the trainer hands every callback the same dict: the
            # trackers (report_to) log tokens/s and memory with the loss.
            logs.update({k: metrics[k] for k in ("tokens_per_second", "memory_gib") if k in metrics})
            run.log_metrics({"step": state.global_step, **metrics})
            call_callbacks(callbacks, "on_step_end", run, state.global_step, metrics)

        def log_validation(self, state, logs) -> None:
            loss = float(logs["eval_loss"])
            seconds = float(logs.get("eval_runtime", time.perf_counter() - self.eval_started))
            result = {"step": state.global_step, "eval_loss": loss, "rows": self.eval_rows, "seconds": round(seconds, 2)}
            run.log_metrics({"step": state.global_step, "eval_loss": loss, "eval_seconds": round(seconds, 3)})
            summary = run.summary
            summary["eval_loss"], summary["eval_loss_step"] = round(loss, 6), state.global_step
            if loss < summary.get("best_eval_loss", math.inf):
                summary["best_eval_loss"], summary["best_eval_loss_step"] = round(loss, 6), state.global_step
            run.console.print(f"validation loss {loss:.4f} at step {state.global_step} ({self.eval_rows} rows, {seconds:.1f} s)")
            call_callbacks(callbacks, "on_evaluate", run, result)

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            call_callbacks(callbacks, "on_save", run, path)

        def on_train_end(self, args, state, control, **kwargs):
            call_callbacks(callbacks, "on_train_end", run)

    return QtuneBridge()


def divergence_message(run: RunContext, step: int, what: str) -> str:
    last = last_complete_checkpoint(run.run_dir / CHECKPOINTS_DIR)
    kept = f"{last.name} (the last good one) is kept" if last else "no checkpoint was saved before it"
    fp16 = ", use bfloat16 rather than float16" if run.config.model.dtype == "float16" else ""
    return (
        f"training diverged at step {step}: {what}; {kept}; lower training.learning_rate, keep training.max_grad_norm "
        f"above 0{fp16}, and check the data and the model's weights"
    )


# --------------------------------------------------------------------------- out of memory


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def out_of_memory_error(error: BaseException, config, during: str = "training") -> QtuneError:
    """The advice for a CUDA out-of-memory error, as one line naming the settings to change."""
    t, m = config.training, config.model
    detail = " ".join(str(error).split())
    detail = detail.split(" GPU ")[0].split(" Including ")[0].rstrip(". ")[:120] or "out of memory"
    tips = []
    if during == "loading the model":
        if not m.load_in_4bit:
            tips.append("set model.load_in_4bit: true")
        tips.append("choose a smaller model (`qtune models` lists the memory each needs)")
    else:
        tips.append(
            f"lower training.per_device_train_batch_size (now {t.per_device_train_batch_size}) and raise "
            f"training.gradient_accumulation_steps (now {t.gradient_accumulation_steps}) to keep the effective batch"
        )
        tips.append(f"shorten model.max_seq_length (now {m.max_seq_length})")
        if config.lora.gradient_checkpointing is False:
            tips.append('turn on lora.gradient_checkpointing ("unsloth" or true)')
        if not m.load_in_4bit:
            tips.append("set model.load_in_4bit: true")
    return QtuneError(f"the GPU ran out of memory while {during} ({detail}); " + "; or ".join(tips))


# --------------------------------------------------------------------------- checkpoints


def checkpoint_loss_sum(path: Path) -> float:
    """The summed training losses up to the checkpoint ``path`` (see :data:`LOSS_SUM`); 0.0 for a
    checkpoint written by a qtune that did not record it."""
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
        return float(state["stateful_callbacks"]["QtuneBridge"]["attributes"][LOSS_SUM])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


# --------------------------------------------------------------------------- training


def train(
    run: RunContext,
    model,
    tokenizer,
    train_dataset,
    callbacks: list[TrainingCallback],
    resume_from: str | None = None,
    eval_dataset=None,
):
    """Train with trl's SFTTrainer; ``eval_dataset`` (tokenized like ``train_dataset``) gives the
    validation loss."""
    from transformers import EarlyStoppingCallback, PrinterCallback
    from trl import SFTTrainer

    t = run.config.training
    bridge = make_bridge(run, callbacks, eval_rows=len(eval_dataset) if eval_dataset is not None else 0)
    extra = []
    if eval_dataset is not None and t.early_stopping_patience:
        extra.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    trainer = SFTTrainer(
        model=model,
        args=sft_config(run, model, validate=eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[*tracker_callbacks(run), *extra],
    )
    bridge.watch(trainer)
    # First, so that the numbers it adds to each log (tokens/s, memory) reach the trackers too.
    trainer.callback_handler.callbacks.insert(0, bridge)
    if resume_from is not None:
        bridge.loss_before = checkpoint_loss_sum(Path(resume_from))
    # Progress and metrics reach the user through qtune's callbacks and metrics.jsonl.
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    try:
        result = call_with_frame_room(trainer.train, resume_from_checkpoint=resume_from)
    except Exception as error:
        if is_out_of_memory(error):
            raise out_of_memory_error(error, run.config) from None
        raise
    run.summary["train_runtime_s"] = round(time.perf_counter() - started, 2)
    # The trainer's training_loss divides the losses of this process's steps by all steps; the
    # steps before a resume are added back from the checkpoint.
    steps_done = max(int(result.global_step), 1)
    run.summary["train_loss"] = round(float(result.training_loss) + bridge.loss_before / steps_done, 6)
    run.summary["steps"] = int(result.global_step)
    stopper = next((c for c in extra if isinstance(c, EarlyStoppingCallback)), None)
    if stopper is not None and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience:
        run.summary["early_stopped"] = True
        run.console.print(
            f"early stopping at step {result.global_step}: no better validation loss for {t.early_stopping_patience} "
            f"evaluations (best {run.summary.get('best_eval_loss')} at step {run.summary.get('best_eval_loss_step')})"
        )
    return trainer
