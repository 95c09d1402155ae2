"""Experiment trackers: ``training.report_to`` names transformers' own integrations, so logging to
TensorBoard, trackio, Weights & Biases or MLflow is the library's code, not qtune's.

qtune adds little: preflight refuses a tracker whose package is missing (one line with the pip
command) before any model loads, and TensorBoard gets its folder in the run directory and the run's
resolved config (:func:`tracker_callbacks`). TensorBoard is the embedded, offline default (docs/config.md says why);
its event files go to ``RUN_DIR/tensorboard``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

#: tracker name (transformers' ``report_to``) -> (modules of which one must be importable, pip requirement)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
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


def missing_tracker(name: str) -> str | None:
    """The pip requirement to install when tracker ``name``'s package is absent, else None.
    Looks the module up without importing it (importing wandb or mlflow takes seconds)."""
    modules, requirement = TRACKERS[name]
    for module in modules:
        try:
            if importlib.util.find_spec(module) is not None:
                return None
        except (ImportError, ValueError):
            continue
    return requirement


def tracker_callbacks(run: Any) -> list:
    """The TrainerCallbacks qtune adds for ``training.report_to``: TensorBoard's, writing to
    ``RUN_DIR/tensorboard`` with the run's resolved config. The other trackers are transformers'
    integrations as they are (``report_to`` in the SFTConfig); they record the TrainingArguments,
    the run name (the run directory's name) included."""
    if "tensorboard" not in run.config.training.report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    class QtuneTensorBoard(TensorBoardCallback):
        """transformers' TensorBoard integration with the log folder in the run directory (it reads the
        folder from an environment variable otherwise), the config as text, and resumes that replace
        the steps logged after the checkpoint instead of adding them twice."""

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
