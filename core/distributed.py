"""Training on several processes: data-parallel (DDP) and sharded (FSDP) LoRA/QLoRA.

qtune writes no gradient exchange of its own. ``qtune run CONFIG --gpus N`` (or ``--cpu-processes N``
for gloo on the CPU) starts N copies of ``python -m qtune_cli run`` through torch's own launcher
(``torch.distributed.launcher.api.elastic_launch``, what ``torchrun`` runs), and each copy trains
through trl's SFTTrainer, whose accelerate wraps the model in DDP or FSDP because it finds itself
under torch.distributed (RANK, WORLD_SIZE, LOCAL_RANK in the environment). ``torchrun ... -m qtune_cli
run CONFIG`` and ``accelerate launch -m qtune_cli run CONFIG`` start the same workers, on one node or
several, with the launcher's own flags.

What this module adds around that:

* planning, before any weights load (:func:`plan`): how many processes, on which device, with which
  strategy (``training.distributed``: auto chooses DDP when a replica of the model fits one GPU and
  FSDP when only a shard does, from :func:`qtune.profiles.estimate_memory_gib`), and one-line errors
  for more GPUs than exist, a model that cannot fit even sharded, a backend that cannot shard;
* the run directory prepared once (:func:`prepare_run`: preflight, config.yaml, preflight.json,
  distributed.json) by the launching process, or by rank 0 when a user's launcher started the ranks;
* :class:`Ranks`, what the rest of qtune asks about the process group: which rank is the main one
  (it alone writes the run directory and prints), a sum and a gather over ranks;
* in each worker: the run directory shared (:func:`start_worker`), the ranks joined, a worker's
  one-line error left where the launcher reads it (:func:`report_worker_error`). The launcher itself
  is the CLI's (``qtune_cli/launch.py``): it starts the workers, sends the output of ranks other
  than 0 to ``RUN_DIR/logs`` and turns a failed rank into one line.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import QtuneError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .profiles import ModelShape

STRATEGIES = ("auto", "ddp", "fsdp")
#: set by qtune's launcher (``qtune_cli/launch.py``) in every worker it starts: the workers leave error reporting to it
LAUNCHED_ENV = "QTUNE_LAUNCHED"
#: the run directory :func:`prepare_run` made for the workers to train in
RUN_DIR_ENV = "QTUNE_RUN_DIR"
#: what the run was trained on: processes, device, strategy (read back when it is resumed)
DISTRIBUTED_FILE = "distributed.json"
#: where qtune's launcher sends the output of the ranks other than 0
LOGS_DIR = "logs"
#: share of a card the plan may fill (the fast profile's :data:`qtune.profiles.MEMORY_HEADROOM_FRACTION`)
HEADROOM = 0.90
#: the most GPUs :func:`gpus_needed` considers (8 nodes of 8)
MAX_GPUS = 64
GIB = 1024**3


# --------------------------------------------------------------------------- ranks


@dataclass
class Ranks:
    """This process's place in the process group; one process alone is ``Ranks()``.

    ``sum`` and ``gather`` are collectives: every rank must call them at the same point.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: the group the small exchanges below go through (gloo, so they take CPU values on any device)
    group: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> Ranks:
        """What a launcher (torchrun, accelerate launch, qtune's own) put in the environment."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        return cls(rank=int(env.get("RANK", "0")), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")))

    def join(self) -> Ranks:
        """Join the process group (the accelerator's backend: nccl on GPUs, gloo on CPU) unless the
        launcher's library already did, and open a gloo group for qtune's own small exchanges.
        accelerate (inside the trainer) finds the group initialised and uses it."""
        if not self.distributed or self.group is not None:
            return self
        import torch
        import torch.distributed as dist

        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if on_gpu else "gloo")
        self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self

    def sum(self, value: float) -> float:
        """``value`` summed over ranks (itself when alone)."""
        if not self.distributed:
            return float(value)
        import torch
        import torch.distributed as dist

        total = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(total, group=self.group)
        return float(total.item())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def share(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def leave(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# --------------------------------------------------------------------------- planning


def prepare_run(config: Config, console: Any, chosen: Plan) -> tuple[Config, Path]:
    """Everything before the weights load, once: the profile, preflight (its findings printed),
    the run directory with config.yaml, preflight.json and distributed.json. Returns the config
    as resolved (what every rank then reads from config.yaml) and the run directory."""
    from .backends import choose_backend
    from .data import trainable
    from .fsutil import atomic_file
    from .preflight import PREFLIGHT_VERSION, PreflightError, data_fingerprint, preflight, print_findings
    from .profiles import resolve_profile
    from .run import PREFLIGHT_FILE, new_run_dir

    if chosen.backend is not None:
        config = config.model_copy(deep=True)
        config.model.backend = chosen.backend
    config = resolve_profile(config, choose_backend(config), console, processes=chosen.processes,
                            sharded=chosen.strategy == "fsdp")
    # The launching process never trains: it checks the tokens with the model folder's tokenizer
    # (a backend that patches transformers has its own tokenizer checked again by each rank).
    report = preflight(config, load_tokenizer=True)
    if report.errors:
        raise PreflightError(report.errors)
    print_findings(report, console)
    run_dir = new_run_dir(config)
    run_dir.mkdir(parents=True)
    with atomic_file(run_dir / "config.yaml") as handle:
        handle.write(config.to_yaml())
    fingerprint = data_fingerprint(trainable(report.encoded))
    with atomic_file(run_dir / PREFLIGHT_FILE) as handle:
        json.dump({"version": PREFLIGHT_VERSION, "fingerprint": fingerprint, **report.to_json()}, handle, indent=2, default=str)
    write_distributed(run_dir, chosen)
    return config, run_dir


# --------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class Plan:
    """How a run will train: ``processes`` on ``device`` ("cuda" or "cpu") with ``strategy``
    ("single", "ddp" or "fsdp"), and why."""

    processes: int
    device: str
    strategy: str
    reason: str
    backend: Optional[str] = None  # a backend the plan switched to (fsdp with backend auto)
    replica_gib: Optional[float] = None
    shard_gib: Optional[float] = None

    def describe(self) -> str:
        unit = "GPU" if self.device == "cuda" else "CPU process"
        plural = "" if self.processes == 1 else "es" if unit.endswith("s") else "s"
        return f"{self.processes} {unit}{plural}, {self.strategy}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"processes": self.processes, "device": self.device, "strategy": self.strategy, "reason": self.reason,
                "replica_gib": self.replica_gib, "shard_gib": self.shard_gib}


def _estimate_args(config: Config) -> dict[str, Any]:
    return dict(
        tokens_per_microbatch=config.training.per_device_train_batch_size * config.model.max_seq_length,
        lora_r=config.lora.r,
        target_modules=list(config.lora.target_modules),
        load_in_4bit=config.model.load_in_4bit,
    )


def plan(config: Config, processes: int, device: str, backend: Any, gpus_present: Optional[int] = None,
         gpu_gib: Optional[float] = None, shape: Optional[ModelShape] = None) -> Plan:
    """Decide how ``config`` trains on ``processes`` processes; a one-line QtuneError when it cannot.

    ``backend`` is the backend chosen for one process; ``gpus_present`` and ``gpu_gib`` default to
    what the CUDA driver reports (asked without importing torch).
    """
    from .profiles import PLAIN_KERNELS, estimate_memory_gib, model_shape_for, sharded_memory_gib

    wanted = config.training.distributed
    if processes < 1:
        raise QtuneError(f"the number of processes must be at least 1, not {processes}")
    if device == "cuda":
        from .backends import cuda_device_count, cuda_total_memory_gib

        present = cuda_device_count() if gpus_present is None else gpus_present
        if processes > present:
            found = f"only {present} GPU{'s' if present != 1 else ''}" if present else "no CUDA GPU"
            raise QtuneError(
                f"--gpus {processes} asks for more GPUs than this machine has ({found} visible); pass --gpus {present} "
                f"or fewer{' or use --cpu-processes N' if not present else ''}, or launch on several nodes with torchrun"
            )
        gpu_gib = cuda_total_memory_gib(0) if gpu_gib is None else gpu_gib
    if processes == 1:
        return Plan(1, device, "single", "one process")
    if device == "cpu":
        if wanted == "fsdp":
            # torch's fully_shard runs on gloo, but accelerate 1.15 turns FSDP on for GPU-like devices
            # only (its MULTI_CPU state never becomes FSDP), and the trainer goes through accelerate
            raise QtuneError(
                "training.distributed: fsdp needs GPUs (accelerate shards models on GPUs only); on the CPU set "
                "training.distributed: ddp or auto"
            )
        return _with_backend(config, Plan(processes, device, "ddp", "on CPU each process holds the whole model"), backend)

    shape = shape or model_shape_for(config.model.name)
    if shape is None or gpu_gib is None:
        if wanted == "auto":
            return _with_backend(config, Plan(processes, device, "ddp", "the model's shape is unknown, so ddp"), backend)
        return _with_backend(config, Plan(processes, device, wanted, f"training.distributed: {wanted}"), backend)

    args = _estimate_args(config)
    budget = gpu_gib * HEADROOM
    replica = estimate_memory_gib(shape, gradient_checkpointing=config.lora.gradient_checkpointing,
                                  kernels=getattr(backend, "memory_traits", PLAIN_KERNELS), **args)
    # FSDP runs on the transformers backend, with torch's checkpointing when any is asked for
    shard_ckpt = config.lora.gradient_checkpointing is not False
    shard = sharded_memory_gib(shape, processes=processes, gradient_checkpointing=shard_ckpt, kernels=PLAIN_KERNELS, **args)
    card = f"{gpu_gib:.0f} GiB GPUs"
    if wanted == "ddp" or (wanted == "auto" and replica <= budget):
        if replica > budget:
            raise QtuneError(
                f"training.distributed: ddp puts the whole model on every GPU, which needs ~{replica:.1f} GiB and the "
                f"{card} hold {budget:.1f} GiB usable; set training.distributed: fsdp (~{shard:.1f} GiB per GPU over "
                f"{processes}) or auto"
            )
        reason = f"a replica needs ~{replica:.1f} GiB, which fits one of the {card}"
        return _with_backend(config, Plan(processes, device, "ddp", reason, replica_gib=replica, shard_gib=shard), backend)
    if shard > budget:
        needed = gpus_needed(shape, config, gpu_gib)
        more = f"it needs {needed[0]} such GPUs" if needed else f"no number of {card} up to {MAX_GPUS} holds it"
        raise QtuneError(
            f"{config.model.name} does not fit even sharded over {processes} {card}: ~{shard:.1f} GiB per GPU with fsdp "
            f"({budget:.1f} usable); {more}, or lower training.per_device_train_batch_size or model.max_seq_length"
        )
    reason = (f"training.distributed: fsdp, ~{shard:.1f} GiB per GPU" if wanted == "fsdp" else
              f"a replica needs ~{replica:.1f} GiB, more than one of the {card}; sharded over {processes}, ~{shard:.1f} GiB each")
    return _with_backend(config, Plan(processes, device, "fsdp", reason, replica_gib=replica, shard_gib=shard), backend)


def _with_backend(config: Config, chosen: Plan, backend: Any) -> Plan:
    """Check that ``backend`` runs ``chosen.strategy``; with ``model.backend: auto`` switch to one that does."""
    if chosen.strategy == "fsdp" and config.evaluation.exact_match:
        raise QtuneError(
            f"evaluation.exact_match does not run under fsdp ({chosen.reason}); turn it off and evaluate the finished run "
            f"with `qtune generate`, or use fewer, larger GPUs"
        )
    strategies = tuple(getattr(backend, "strategies", ("ddp",)))
    if chosen.strategy in strategies:
        return chosen
    name = getattr(backend, "name", "?")
    if config.model.backend == "auto":
        from .plugin_manager import get_host

        backends = get_host().backends
        for other in backends:
            candidate = backends.get(other)
            if chosen.strategy in tuple(getattr(candidate, "strategies", ("ddp",))) and candidate.unavailable_reason(config) is None:
                return Plan(chosen.processes, chosen.device, chosen.strategy, f"{chosen.reason}; backend {other}, since {name} cannot "
                            f"{chosen.strategy}", backend=other, replica_gib=chosen.replica_gib, shard_gib=chosen.shard_gib)
    verb = "shard the model (fsdp)" if chosen.strategy == "fsdp" else f"train with {chosen.strategy}"
    raise QtuneError(
        f"backend {name!r} cannot {verb} over {chosen.processes} processes ({chosen.reason}); set model.backend: transformers"
        f"{' or training.distributed: ddp' if chosen.strategy == 'fsdp' else ''}"
    )


def gpus_needed(shape: ModelShape, config: Config, gpu_gib: float, kernels: Any = None) -> Optional[tuple[int, str]]:
    """The fewest GPUs of ``gpu_gib`` that train ``shape`` with ``config``'s settings, and the strategy
    (``single`` on one GPU, else ``fsdp``); None when even :data:`MAX_GPUS` are not enough."""
    from .profiles import FUSED_KERNELS, PLAIN_KERNELS, estimate_memory_gib, sharded_memory_gib

    args = _estimate_args(config)
    budget = gpu_gib * HEADROOM
    if estimate_memory_gib(shape, gradient_checkpointing=config.lora.gradient_checkpointing, kernels=kernels or FUSED_KERNELS, **args) <= budget:
        return 1, "single"
    ckpt = config.lora.gradient_checkpointing is not False
    for n in range(2, MAX_GPUS + 1):
        if sharded_memory_gib(shape, processes=n, gradient_checkpointing=ckpt, kernels=PLAIN_KERNELS, **args) <= budget:
            return n, "fsdp"
    return None


# --------------------------------------------------------------------------- trainer arguments


#: decoder layer classes FSDP wraps one unit each (transformers' names)
def _layer_classes(model: Any) -> list[str]:
    names = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    return sorted(names)


def trainer_arguments(run: Any, model: Any) -> dict[str, Any]:
    """The SFTConfig arguments a run on several processes adds (none for one process)."""
    ranks = getattr(run, "ranks", None)
    if ranks is None or not ranks.distributed:
        return {}
    import torch

    on_gpu = torch.cuda.is_available()
    strategy = run.summary.get("distributed", {}).get("strategy", "ddp")
    arguments: dict[str, Any] = {"ddp_backend": "nccl" if on_gpu else "gloo"}
    if strategy == "fsdp":
        arguments.update(
            fsdp="full_shard auto_wrap",
            fsdp_config={
                "version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": _layer_classes(model),
                "reshard_after_forward": True,
                # the adapter and the checkpoints are saved whole by rank 0, as with one process
                "state_dict_type": "FULL_STATE_DICT",
                "cpu_ram_efficient_loading": False,
                # checkpointing, when asked for, is the model's own (the backend turned it on with LoRA)
                "activation_checkpointing": False,
            },
        )
    else:
        # every LoRA weight takes part in every step: no search for unused parameters
        arguments["ddp_find_unused_parameters"] = False
    return arguments


# --------------------------------------------------------------------------- the run directory


def read_distributed(run_dir: Path) -> dict[str, Any]:
    from .fsutil import read_json_dict

    return read_json_dict(Path(run_dir) / DISTRIBUTED_FILE)


def write_distributed(run_dir: Path, chosen: Plan) -> None:
    from .fsutil import atomic_file

    with atomic_file(Path(run_dir) / DISTRIBUTED_FILE) as handle:
        json.dump(chosen.to_json(), handle, indent=2)


def accumulation_for(config: Config, run_dir: Path, processes: int) -> int:
    """``gradient_accumulation_steps`` that keeps the run's examples per optimizer step when it is
    resumed on ``processes`` processes after training on another number (batch x accumulation x
    processes stays the same, so every step after the checkpoint sees the same examples); a
    one-line error when no whole number does."""
    before = int(read_distributed(run_dir).get("processes", 1))
    ga = config.training.gradient_accumulation_steps
    if before == processes:
        return ga
    total = ga * before
    if total % processes:
        choices = sorted(n for n in range(1, total + 1) if total % n == 0)
        raise QtuneError(
            f"run {str(run_dir)!r} trained on {before} process{'es' if before != 1 else ''} with gradient accumulation {ga}; "
            f"to resume with the same examples per step, use a number of processes that divides {total}: "
            f"{', '.join(map(str, choices))}"
        )
    return total // processes


def report_worker_error(ranks: Ranks, message: str, error: BaseException | None = None) -> bool:
    """Record a worker's one-line error where its launcher reads it (torch elastic's error file).
    Returns True when qtune's own launcher started this worker: it prints the line, so the worker
    stays silent; False when the worker should print it itself."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import traceback

        stack = "".join(traceback.format_exception(error)) if error is not None else message
        kind = "error" if isinstance(error, QtuneError) or error is None else "bug"
        data = {"message": {"message": message, "extraInfo": {"py_callstack": stack, "timestamp": str(int(time.time())),
                                                              "qtune": kind}}}
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(data), encoding="utf-8")
        except OSError:
            pass
    return os.environ.get(LAUNCHED_ENV) == "1"


# --------------------------------------------------------------------------- in each worker


class OtherRankFailed(QtuneError):
    """Rank 0 failed before training and says so itself; this rank stops without a word."""


def start_worker(config: Config, ranks: Ranks, resume: Optional[Path], console: Any) -> tuple[Config, Optional[Path]]:
    """In a worker: the config and the prepared run directory it trains in. Under qtune's launcher
    that directory is ready (:data:`RUN_DIR_ENV`); under a user's torchrun / accelerate launch,
    rank 0 prepares it now (preflight printed once) while the others wait, and shares its path."""
    from .config import load_config

    if resume is not None:
        return config, None
    prepared = os.environ.get(RUN_DIR_ENV)
    if not prepared:
        if not ranks.distributed:
            return config, None
        from .backends import choose_backend

        backend = choose_backend(config)
        _import_first(backend)
        ranks.join()
        outcome: dict[str, str] = {}
        if ranks.is_main:
            import torch

            try:
                device = "cuda" if torch.cuda.is_available() else "cpu"
                # the GPUs may span several nodes: the launcher has placed the ranks already
                chosen = plan(config, ranks.world_size, device, backend, gpus_present=ranks.world_size)
                console.print(f"training on {chosen.describe()}", soft_wrap=True)
                _, run_dir = prepare_run(config, console, chosen)
                outcome = {"run_dir": str(run_dir)}
            except BaseException:
                ranks.share({"error": "rank 0 failed"})
                raise
        outcome = ranks.share(outcome)
        if "error" in outcome:
            raise OtherRankFailed(outcome["error"])
        prepared = outcome["run_dir"]
    return load_config(Path(prepared) / "config.yaml"), Path(prepared)


def _import_first(backend: Any) -> None:
    import_first = getattr(backend, "import_first", None)
    if callable(import_first):
        import_first()


def join_ranks(ranks: Ranks, config: Config, early: bool, run_dir: Optional[Path], backend: Any,
               console: Any) -> tuple[Config, dict[str, Any]]:
    """Join the process group (after a backend that patches transformers was imported) and settle
    how this run trains on ``ranks.world_size`` processes. A resumed run that trained on another
    number of processes (one process too) keeps its examples per optimizer step
    (:func:`accumulation_for`)."""
    if ranks.distributed and not early:
        raise QtuneError(
            f"backend {backend.name!r} patches transformers but offers no import_first(), so it cannot train on several "
            f"processes; set model.backend: transformers"
        )
    ranks.join()
    if run_dir is None:  # pragma: no cover (start_worker always prepares one)
        raise QtuneError("several processes need a prepared run directory; start them with `qtune run --gpus N`")
    before = read_distributed(run_dir)
    strategy = before.get("strategy") if before.get("strategy") in ("ddp", "fsdp") else "ddp"
    accumulation = accumulation_for(config, run_dir, ranks.world_size)
    if accumulation != config.training.gradient_accumulation_steps:
        console.print(
            f"[cyan]note:[/] this run trained on {before.get('processes', 1)} processes; on {ranks.world_size} gradient "
            f"accumulation becomes {accumulation} so that each optimizer step holds the same examples", soft_wrap=True)
        config = config.model_copy(deep=True)
        config.training.gradient_accumulation_steps = accumulation
    device = before.get("device", "cpu")
    if ranks.distributed:  # (one process may not import torch yet: a backend that patches it loads first)
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if strategy == "fsdp" and ranks.distributed:
        # read by the backend as it loads the model (4-bit storage dtype, no device map) and by accelerate
        os.environ["ACCELERATE_USE_FSDP"] = "true"
    layout = {"processes": ranks.world_size, "device": device, "strategy": strategy if ranks.distributed else "single"}
    ranks.gather(None)  # every rank has read distributed.json before rank 0 rewrites it
    if ranks.is_main and before.get("processes", 1) != ranks.world_size:
        write_distributed(run_dir, Plan(ranks.world_size, device, layout["strategy"], before.get("reason", "resumed")))
    return config, layout


def save_sharded_adapter(run: Any, trainer: Any, tokenizer: Any) -> None:
    """Save the adapter of an FSDP run: every rank takes part in gathering the shards (the trainer's
    save_model), rank 0 writes them, as one folder that appears whole."""
    from .fsutil import atomic_dir
    from .run import ADAPTER_DIR

    final = run.run_dir / ADAPTER_DIR
    if run.is_main:
        with atomic_dir(final) as folder:
            trainer.save_model(str(folder))
            tokenizer.save_pretrained(folder)
    else:
        trainer.save_model(str(final))  # gathers this rank's shards; only rank 0 writes
    return None
