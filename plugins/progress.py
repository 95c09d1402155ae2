"""Live training progress with Rich: step of total, loss, learning rate, tokens/s, ETA, memory, and
under it the validation loss with the step it was measured at, or, while an evaluation runs, its
own progress bar."""

from __future__ import annotations

from qtune.api import TrainingCallback, current_memory_gib, hookimpl


class RichProgress(TrainingCallback):
    name = "rich_progress"
    description = "live Rich progress bar (step, loss, learning rate, tokens/s, ETA, memory, validation loss)"

    def __init__(self, **options):
        super().__init__(**options)
        self.live = None
        self.evaluating = None

    def on_train_start(self, run):
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # Narrow enough for an 80-column terminal or a captured log: step, loss, lr, tokens/s,
        # memory, elapsed, ETA.
        self.training = Progress(
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
        )
        self.task = self.training.add_task("train", total=run.total_steps or None, loss="-", lr="-", tps="-", mem="-")
        # The second line: "evaluating validation loss" with a bar over the evaluation's batches,
        # then "validation loss X at step N" until the next evaluation.
        self.evaluation = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=10), MofNCompleteColumn(), TimeElapsedColumn(), console=run.console
        )
        self.eval_task = None
        # Redrawn once per optimizer step or evaluation batch, not by Rich's 10 Hz refresh thread: a
        # training loop that is bound by the host (small batches on a fast GPU) would lend that
        # thread the GIL ten times a second.
        self.live = Live(self.training, console=run.console, auto_refresh=False, transient=False)
        self.live.start()
        self.live.refresh()

    def on_step_end(self, run, step, metrics):
        if self.live is None:
            return
        tps = metrics.get("tokens_per_second")
        memory = metrics.get("memory_gib")
        self.training.update(
            self.task,
            completed=step,
            loss=f"{metrics['loss']:.4f}",
            lr=f"{metrics['learning_rate']:.1e}",
            tps=f"{tps:,.0f}" if tps else "-",
            mem=f"{memory if memory is not None else current_memory_gib():.2f} GiB",
        )
        self.live.refresh()

    def on_evaluate_start(self, run, name, total):
        if self.live is None:
            return
        from rich.console import Group

        description = f"[yellow]evaluating {name}[/]"
        if self.eval_task is None:
            self.eval_task = self.evaluation.add_task(description, total=total or None)
            self.live.update(Group(self.training, self.evaluation))
        else:
            self.evaluation.reset(self.eval_task, total=total or None, description=description)
        self.live.refresh()

    def on_evaluate_step(self, run, done, total):
        if self.live is None or self.eval_task is None:
            return
        self.evaluation.update(self.eval_task, completed=done)
        self.live.refresh()

    def on_evaluate(self, run, metrics):
        if self.live is None or self.eval_task is None or "eval_loss" not in metrics:
            return
        task = self.evaluation.tasks[0]
        self.evaluation.update(
            self.eval_task,
            completed=task.total or task.completed,
            description=f"validation loss [cyan]{metrics['eval_loss']:.4f}[/] at step {metrics['step']}",
        )
        self.live.refresh()

    def _stop(self):
        if self.live is not None:
            self.live.stop()
            self.live = None

    def on_train_end(self, run):
        self._stop()

    def on_error(self, run, error):
        self._stop()


@hookimpl
def register_callbacks(register):
    register(RichProgress)
