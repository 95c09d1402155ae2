"""Training, shared by every backend: trl's SFTTrainer with qtune's callbacks bridged in.

Backends that patch trl (Unsloth) have been imported by the time this module imports trl, because
the pipeline loads the model through the backend first.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from .errors import QtuneError
from .run import RunContext
from .types import TrainingCallback


class NonFiniteLoss(QtuneError):
    pass


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def sft_config(run: RunContext, model) -> Any:
    from trl import SFTConfig

    config = run.config
    t = config.training
    on_gpu = cuda_available()
    dtype = getattr(model, "dtype", None)
    import torch

    optim = t.optim
    if not on_gpu and "8bit" in optim:
        # bitsandbytes' 8-bit optimizers need CUDA; their 32-bit twin keeps the update rule.
        optim = "adamw_torch"
        run.console.print(f"[yellow]note:[/] optimizer {t.optim} needs a CUDA GPU; using {optim} on CPU")
    return SFTConfig(
        output_dir=str(run.run_dir / "checkpoints"),
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
        packing=t.packing,
        max_length=config.model.max_seq_length,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        dataset_num_proc=None,
        gradient_checkpointing=False,  # the backend set it up when it added LoRA
        remove_unused_columns=True,
    )


def make_bridge(run: RunContext, callbacks: list[TrainingCallback]):
    """A transformers TrainerCallback that forwards the trainer's events to qtune's callbacks."""
    from transformers import TrainerCallback

    class QtuneBridge(TrainerCallback):
        def __init__(self) -> None:
            self.last_time = time.perf_counter()
            self.last_tokens = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            run.total_steps = state.max_steps
            self.start_step = state.global_step
            self.last_time = time.perf_counter()
            for cb in callbacks:
                cb.on_train_start(run)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "loss" not in logs:
                return
            now = time.perf_counter()
            metrics: dict[str, float] = {
                "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
            }
            if "grad_norm" in logs and logs["grad_norm"] is not None:
                metrics["grad_norm"] = float(logs["grad_norm"])
            if "num_tokens" in logs:
                tokens = float(logs["num_tokens"])
                elapsed = now - self.last_time
                if elapsed > 0 and tokens >= self.last_tokens:
                    metrics["tokens_per_second"] = (tokens - self.last_tokens) / elapsed
                metrics["num_tokens"] = tokens
                self.last_tokens = tokens
            self.last_time = now
            run.log_metrics({"step": state.global_step, **metrics})
            for cb in callbacks:
                cb.on_step_end(run, state.global_step, metrics)
            if not math.isfinite(metrics["loss"]):
                control.should_training_stop = True
                raise NonFiniteLoss(
                    f"loss became {metrics['loss']} at step {state.global_step}; lower training.learning_rate "
                    f"or check the data (the last saved checkpoint is kept)"
                )

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for cb in callbacks:
                cb.on_save(run, path)

        def on_train_end(self, args, state, control, **kwargs):
            for cb in callbacks:
                cb.on_train_end(run)

    return QtuneBridge()


def train(run: RunContext, model, tokenizer, train_dataset, callbacks: list[TrainingCallback], resume_from: str | None = None):
    from transformers import PrinterCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=sft_config(run, model),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[make_bridge(run, callbacks)],
    )
    # Progress and metrics reach the user through qtune's callbacks and metrics.jsonl.
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    run.summary["train_runtime_s"] = round(time.perf_counter() - started, 2)
    run.summary["train_loss"] = round(float(result.training_loss), 6)
    run.summary["steps"] = int(result.global_step)
    return trainer
