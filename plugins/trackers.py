"""Experiment trackers (``training.report_to``). The built-in ones are transformers' own integrations,
so logging to trackio, Weights & Biases or MLflow is the library's code, not qtune's; qtune checks
that the tracker's package is installed before any model loads (one line with the pip command).

TensorBoard, the embedded offline default (docs/config.md says why), gets more: its event files go
to ``RUN_DIR/tensorboard`` with the run's resolved config, and a resumed run replaces the steps
logged after its checkpoint instead of adding them twice.
"""

from __future__ import annotations

from qtune.api import Tracker, hookimpl

#: transformers' integration name -> (modules of which one must be importable, pip requirement)
INTEGRATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "trackio": (("trackio",), "trackio"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "neptune": (("neptune",), "neptune"),
    "swanlab": (("swanlab",), "swanlab"),
    "codecarbon": (("codecarbon",), "codecarbon"),
}
#: where the TensorBoard event files of a run go, under the run directory
TENSORBOARD_DIR = "tensorboard"


class Integration(Tracker):
    """One of transformers' integrations, as it is: it records the TrainingArguments and the run name
    (the run directory's name)."""

    def __init__(self, name: str, modules: tuple[str, ...], requirement: str) -> None:
        self.name, self.modules, self.requirement, self.integration = name, modules, requirement, name
        self.description = f"transformers' {name} integration"


class TensorBoard(Tracker):
    name = "tensorboard"
    description = "TensorBoard event files in RUN_DIR/tensorboard, with the run's config"
    modules = ("tensorboard", "tensorboardX")
    requirement = "tensorboard"

    def callbacks(self, run):
        from transformers.integrations import TensorBoardCallback

        class QtuneTensorBoard(TensorBoardCallback):
            """transformers' TensorBoard integration with the log folder in the run directory (it reads
            the folder from an environment variable otherwise), the config as text, and resumes that
            replace the steps logged after the checkpoint instead of adding them twice."""

            def on_train_begin(self, args, state, control, **kwargs):
                self.purge_step = state.global_step + 1 if state.global_step else None
                super().on_train_begin(args, state, control, **kwargs)
                if self.tb_writer is not None:
                    # Markdown: TensorBoard shows an indented block as preformatted text.
                    text = "".join(f"    {line}\n" for line in run.config.to_yaml().splitlines())
                    self.tb_writer.add_text("qtune/config", text, global_step=state.global_step)
                    self.tb_writer.add_text("qtune/run_name", args.run_name or "", global_step=state.global_step)
                    self.tb_writer.flush()

            def _init_summary_writer(self, args):
                # purge_step: readers drop the earlier file's events from that step on (a resumed run
                # logs again the steps after its checkpoint)
                self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=getattr(self, "purge_step", None))

        callback = QtuneTensorBoard()
        callback.logging_dir = str(run.run_dir / TENSORBOARD_DIR)
        return [callback]


@hookimpl
def register_trackers(register):
    register(TensorBoard())
    for name, (modules, requirement) in INTEGRATIONS.items():
        register(Integration(name, modules, requirement))
