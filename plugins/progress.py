"""Live training progress with Rich: step of total, loss, learning rate, tokens/s, ETA, memory."""

from __future__ import annotations

from qtune.api import TrainingCallback, current_memory_gib, hookimpl


class RichProgress(TrainingCallback):
    name = "rich_progress"
    description = "live Rich progress bar (step, loss, learning rate, tokens/s, ETA, memory)"

    def __init__(self, **options):
        super().__init__(**options)
        self.progress = None

    def on_train_start(self, run):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # Narrow enough for an 80-column terminal or a captured log: step, loss, lr, tokens/s,
        # memory, elapsed, ETA.
        self.progress = Progress(
            BarColumn(bar_width=10),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[mem]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(compact=True),
            console=run.console,
            transient=False,
            # Redrawn once per optimizer step (in on_step_end), not by Rich's 10 Hz refresh thread:
            # a training loop that is bound by the host (small batches on a fast GPU) would lend that
            # thread the GIL ten times a second.
            auto_refresh=False,
        )
        self.task = self.progress.add_task("train", total=run.total_steps or None, loss="-", lr="-", tps="-", mem="-")
        self.progress.start()
        self.progress.refresh()

    def on_step_end(self, run, step, metrics):
        if self.progress is None:
            return
        tps = metrics.get("tokens_per_second")
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{metrics['loss']:.4f}",
            lr=f"{metrics['learning_rate']:.1e}",
            tps=f"{tps:,.0f}" if tps else "-",
            mem=f"{current_memory_gib():.2f} GiB",
            refresh=True,
        )

    def _stop(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_train_end(self, run):
        self._stop()

    def on_error(self, run, error):
        self._stop()


@hookimpl
def register_callbacks(register):
    register(RichProgress)
