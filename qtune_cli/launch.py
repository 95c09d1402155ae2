"""Starting the processes of ``qtune run --gpus N`` / ``--cpu-processes N``: torch elastic's launcher
(``elastic_launch``, what ``torchrun`` runs) starts N copies of ``python -m qtune_cli run`` and waits;
a failed rank becomes one line. What the workers do is :mod:`qtune.distributed`'s."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from qtune.distributed import LAUNCHED_ENV, LOGS_DIR, RUN_DIR_ENV
from qtune.errors import QtuneError


@dataclass(frozen=True)
class Launch:
    """What ``qtune run --gpus N`` / ``--cpu-processes N`` asked for."""

    processes: int
    device: str  # "cuda" or "cpu"

    @property
    def flag(self) -> str:
        return f"--gpus {self.processes}" if self.device == "cuda" else f"--cpu-processes {self.processes}"


def worker_environment(device: str, processes: int, run_dir: Path) -> dict[str, str]:
    env = {LAUNCHED_ENV: "1", RUN_DIR_ENV: str(run_dir)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where GPUs are present
    if "OMP_NUM_THREADS" not in os.environ:
        # the cores shared out between the processes (torchrun sets 1; that starves CPU training)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def launch(worker_args: list[str], launch_request: Launch, run_dir: Path) -> None:
    """Run ``python -m qtune_cli <worker_args>`` on ``launch_request.processes`` processes through
    torch elastic and wait. Output of rank 0 reaches this terminal; the others' goes to
    RUN_DIR/logs. Raises a one-line QtuneError when a rank fails or the launch is interrupted."""
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torch elastic logs each step of its own work (rendezvous, closing signals, failures) as warnings
    # and errors; qtune says what happened in one line instead. torch gives some of these loggers
    # levels of their own, so each is silenced, not only their parent.
    for name in ["torch.distributed", *logging.Logger.manager.loggerDict]:
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    processes = launch_request.processes
    os.environ.update(worker_environment(launch_request.device, processes, run_dir))
    logs = DefaultLogsSpecs(log_dir=str(run_dir / LOGS_DIR), redirects={r: Std.ALL for r in range(1, processes)})
    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"qtune-{os.getpid()}", rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1, logs_specs=logs, shutdown_timeout=5,
    )
    try:
        elastic_launch(launch_config, sys.executable)("-u", "-m", "qtune_cli", *worker_args)
    except ChildFailedError as error:
        raise QtuneError(failure_line(error.failures, run_dir, launch_request)) from None
    except SignalException as error:
        raise QtuneError(
            f"interrupted ({error.sigval.name}); all {processes} processes were stopped{_resume_hint(run_dir, launch_request)}"
        ) from None


def failure_line(failures: dict[int, Any], run_dir: Path, launch_request: Launch) -> str:
    """One line for the failed ranks: the one that failed first with a message of its own (qtune's
    one-line error, written to its error file), else the first killed by a signal. SIGTERM comes last:
    it is how torch elastic stops the peers of a failed rank, and its failure timestamps are whole
    seconds, so a peer stopped in the same second as the victim would otherwise tie with it."""
    import signal

    def key(item):
        rank, failure = item
        message = failure.message
        own = isinstance(message, dict) and message.get("extraInfo", {}).get("qtune")
        stopped_by_elastic = failure.exitcode == -signal.SIGTERM
        return (0 if own else 3 if stopped_by_elastic else 1 if failure.exitcode < 0 else 2, failure.timestamp, rank)

    rank, failure = min(failures.items(), key=key)
    message = failure.message
    if isinstance(message, dict):
        cause = message.get("message", "failed")
    elif failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        cause = f"killed by {name} (pid {failure.pid})"
    else:
        cause = f"exited with code {failure.exitcode}"
    others = f"; the other {launch_request.processes - 1} process{'es were' if launch_request.processes > 2 else ' was'} stopped"
    bug = isinstance(message, dict) and message.get("extraInfo", {}).get("qtune") == "bug"
    log = f" (traceback: {failure.error_file})" if bug else "" if rank == 0 else f" (its output: {_rank_log(run_dir, failure)})"
    return f"rank {rank} {'failed: ' if isinstance(message, dict) else ''}{cause}{log}{others}{_resume_hint(run_dir, launch_request)}"


def _rank_log(run_dir: Path, failure: Any) -> str:
    error_file = getattr(failure, "error_file", "")
    if error_file and error_file != "<N/A>":
        return str(Path(error_file).parent)
    return str(run_dir / LOGS_DIR)


def _resume_hint(run_dir: Path, launch_request: Launch) -> str:
    from qtune.run import ADAPTER_DIR, CHECKPOINTS_DIR, last_complete_checkpoint

    if (run_dir / ADAPTER_DIR).exists():
        return ""
    last = last_complete_checkpoint(run_dir / CHECKPOINTS_DIR)
    if last is None:
        return ""
    return f"; {last.name} is complete: resume with `qtune run --resume {run_dir} {launch_request.flag}`"


def processes_from_options(gpus: Optional[int], cpu_processes: Optional[int]) -> Optional[Launch]:
    if gpus is not None and cpu_processes is not None:
        raise QtuneError("give --gpus N or --cpu-processes N, not both")
    if gpus is not None:
        return Launch(gpus, "cuda")
    if cpu_processes is not None:
        return Launch(cpu_processes, "cpu")
    return None
