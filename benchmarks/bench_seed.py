r"""The seed workload on one GPU, four ways, each in its own process (``import unsloth`` patches a process):

  a  notebook      Unsloth as the seed notebook calls it (FastLanguageModel, trl's SFTTrainer, packing off)
  b  qtune-seed    `qtune run` with the seed config (every key at its default: backend auto -> unsloth)
  c  qtune-fast    `qtune run` with training.profile: fast
  d  transformers  transformers + peft + bitsandbytes, no Unsloth: sdpa, gradient checkpointing

The seed's workload on a random-weight Qwen2.5-7B shape in NF4 (benchmarks/checkpoints.py) with the
real tokenizer and the 999 Alpaca rows twice over. Figures over the steps after --warmup: non-pad
tokens/s, s/step and the process's peak reserved GPU memory.

--setups lists setups in order; digits repeat one (a2). A group joined by + (a+b) takes turns, one
optimizer step each (benchmarks/turns.py), so both meet the host's drifting speed a second apart: compare (b)
with (a) only so. docs/benchmarks.md has the recipe: `prepare` here, then on the GPU (carry .bench,
.gpu-bundle) `python3 benchmarks/bench_seed.py run --setups c,a+b,b2+a2 --out $OUT`. It prints a table
last and writes bench_seed.json and bench_logs.txt; numbers compare only inside one call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402  (benchmarks/checkpoints.py, next to this script)
from turns import Turns, prepare_turns, run_jobs  # noqa: E402  (benchmarks/turns.py)

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/qtune-bench"))
GIB = 1024**3
DATA_REPEAT = 2
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = {"a": "Unsloth notebook (packing off)", "b": "qtune run, seed config", "c": "qtune run, fast profile",
          "d": "transformers+peft+bnb, sdpa, grad ckpt"}

# The notebook's prompt, byte for byte.
ALPACA_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""


# --------------------------------------------------------------------------- in each setup's process


class StepTimer:
    """Counts the non-pad tokens every forward pass receives and times the optimizer steps.

    A step runs from the end of the previous one to its own end (data and logging included); the
    GPU is synchronized before the clock is read, and time spent waiting for a turn is left out.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup, self.tokens, self.marks, self.losses = warmup, 0, [], []  # marks: (step, seconds, tokens so far)
        self.turns = Turns.from_env()
        self.extra: dict = {}

    def attach(self, model) -> None:
        def count(module, args, kwargs):
            mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
            # packed and padding-free batches carry no mask and no padding
            self.tokens += int(mask.sum()) if mask is not None else int(ids.numel()) if ids is not None else 0

        model.register_forward_pre_hook(count, with_kwargs=True)
        self.step_end(0)

    def step_end(self, step: int) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        waited = self.turns.waited_s if self.turns else 0.0
        self.marks.append((step, time.perf_counter() - waited, self.tokens))
        if self.turns is not None:
            self.turns.step_end(step)

    def result(self) -> dict:
        import torch

        timed = [m for m in self.marks if m[0] >= self.warmup]
        out = {"steps": self.marks[-1][0] if self.marks else 0, "warmup_steps": self.warmup, "losses": self.losses, **self.extra}
        if len(timed) >= 2:
            (s0, t0, k0), (s1, t1, k1) = timed[0], timed[-1]
            out.update(steps_timed=s1 - s0, s_per_step=(t1 - t0) / (s1 - s0), tokens_per_s=(k1 - k0) / (t1 - t0),
                       tokens_per_step=(k1 - k0) / (s1 - s0), step_tokens=[b[2] - a[2] for a, b in pairwise(timed)])
        if self.turns is not None:
            out["turns"] = {"waited_s": round(self.turns.waited_s, 2), "broken_at_step": self.turns.broken_at}
        if torch.cuda.is_available():
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        return out


def qtune_timer_class():
    """The timer as the qtune callback ``bench_timer``, for setups (b) and (c) (loaded from QTUNE_PLUGINS_DIR)."""
    from qtune.api import TrainingCallback

    class BenchTimer(TrainingCallback):
        name = "bench_timer"
        description = "times optimizer steps and counts non-pad tokens (benchmarks/bench_seed.py)"

        def __init__(self) -> None:
            self.timer = StepTimer(int(os.environ["BENCH_WARMUP"]))

        def on_train_start(self, run):
            t = run.config.training
            self.timer.extra.update(backend=run.backend_name, batch=t.per_device_train_batch_size,
                                    accumulation=t.gradient_accumulation_steps, packing=t.packing,
                                    gradient_checkpointing=run.config.lora.gradient_checkpointing)
            self.timer.attach(run.model)

        def on_step_end(self, run, step, metrics):
            self.timer.losses.append(metrics.get("loss"))
            self.timer.step_end(step)

        def on_train_end(self, run):
            Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(self.timer.result()))

    return BenchTimer


PLUGIN_SOURCE = f"""\
# Written by benchmarks/bench_seed.py: its step timer as the qtune callback bench_timer.
import sys
sys.path.insert(0, {str(HERE)!r})
import bench_seed
from qtune.api import hookimpl


@hookimpl
def register_callbacks(register):
    register(bench_seed.qtune_timer_class())
"""


def sft_args(steps: int, bf16: bool, **extra):
    """The notebook's SFTConfig."""
    from trl import SFTConfig

    return SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5, max_steps=steps,
                     learning_rate=2e-4, fp16=not bf16, bf16=bf16, logging_steps=1, optim="adamw_8bit", weight_decay=0.01,
                     lr_scheduler_type="linear", seed=3407, output_dir=str(WORK / "outputs"), report_to="none",
                     save_strategy="no", dataset_text_field="text", max_length=2048, dataset_num_proc=2, packing=False, **extra)


def text_dataset(data: str, eos: str):
    """The notebook's formatting: the Alpaca prompt filled in, EOS appended."""
    from datasets import load_dataset

    def formatting_prompts_func(examples):
        rows = zip(examples["instruction"], examples["input"], examples["output"], strict=True)
        return {"text": [ALPACA_PROMPT.format(*row) + eos for row in rows]}

    return load_dataset("json", data_files=data, split="train").map(formatting_prompts_func, batched=True)


def train_with_timer(warmup: int, **trainer_kwargs) -> dict:
    """trl's SFTTrainer with the step timer as a transformers callback (setups a and d)."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    timer = StepTimer(warmup)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            timer.attach(model)

        def on_step_end(self, args, state, control, **kwargs):
            timer.step_end(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                timer.losses.append(logs["loss"])

    trainer = SFTTrainer(callbacks=[Timer()], **trainer_kwargs)
    trainer.train()
    return timer.result() | {"packing": trainer.args.packing, "padding_free": bool(getattr(trainer.args, "padding_free", False))}


def worker_notebook(args: dict) -> dict:
    """Setup (a): the seed notebook's calls, in its order."""
    from unsloth import FastLanguageModel, is_bfloat16_supported  # noqa: I001  (first, as the notebook does)

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args["model"], max_seq_length=2048, dtype=None, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGET_MODULES, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
                                             use_rslora=False, loftq_config=None)
    return train_with_timer(args["warmup"], model=model, processing_class=tokenizer, args=sft_args(args["steps"], is_bfloat16_supported()),
                            train_dataset=text_dataset(args["data"], tokenizer.eos_token))


def worker_transformers(args: dict) -> dict:
    """Setup (d): transformers + peft + bitsandbytes, no Unsloth (sdpa, non-reentrant checkpointing)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the checkpoint is bitsandbytes NF4: its config carries the quantization settings
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3407)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    return train_with_timer(args["warmup"], model=get_peft_model(model, lora), processing_class=tokenizer,
                            args=sft_args(args["steps"], True, padding_free=False), train_dataset=text_dataset(args["data"], tokenizer.eos_token))


# --------------------------------------------------------------------------- the run's parent


def prepare() -> None:
    """On the CPU machine: the Qwen2.5 tokenizer and the Alpaca rows into .bench/."""
    checkpoints.prepare()
    source = Path(os.environ.get("BENCH_DATA", checkpoints.ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"))
    shutil.copyfile(source, checkpoints.BENCH_DIR / "alpaca_en_demo.json")
    size = sum(f.stat().st_size for f in checkpoints.BENCH_DIR.rglob("*") if f.is_file())
    print(f"prepared {checkpoints.BENCH_DIR} ({size / 1e6:.1f} MB): carry '.bench' in the GPU call")


def setup_job(setup: str, opts, env: dict, model: Path, data: Path) -> dict:
    """The command, environment and result file of one setup: its letter, then digits for repeats."""
    letter = setup.rstrip("0123456789")
    result_file = WORK / f"result-{setup}.json"
    result_file.unlink(missing_ok=True)
    if letter in "ad":
        args = json.dumps({"model": str(model), "data": str(data), "steps": opts.steps, "warmup": opts.warmup})
        cmd = [sys.executable, __file__, "_notebook" if letter == "a" else "_transformers", args]
    else:
        # the seed config (every other key at its default), pointed at the benchmark's checkpoint and data
        training = {"max_steps": opts.steps, "output_dir": str(WORK / "runs"), "profile": "seed" if letter == "b" else "fast"}
        if opts.shape == "tiny":  # a CPU smoke run: one micro-batch a step
            training["gradient_accumulation_steps"] = 1
        config = WORK / f"config-{setup}.yaml"
        config.write_text(f"name: bench-{setup}\nmodel: {{name: {str(model)!r}}}\ndataset: {{path: {str(data)!r}}}\n"
                          f"training: {json.dumps(training)}\ncallbacks: [memory_monitor, bench_timer]\n")
        cmd = [sys.executable, "-c", "import sys; from qtune_cli.main import main; main(sys.argv[1:])", "run", str(config)]
    return {"cmd": cmd, "env": dict(env, BENCH_RESULT=str(result_file)), "result_file": result_file, "label": SETUPS[letter]}


def run(opts) -> int:
    t_start = time.perf_counter()
    if not (checkpoints.BENCH_DIR / "alpaca_en_demo.json").is_file():
        sys.exit(f"{checkpoints.BENCH_DIR} has no alpaca_en_demo.json: run `python benchmarks/bench_seed.py prepare` and carry .bench")
    groups = [[m.strip() for m in group.split("+") if m.strip()] for group in opts.setups.split(",") if group.strip()]
    out_dir = Path(opts.out or os.environ.get("OUT") or WORK / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "plugins").mkdir(parents=True)
    (WORK / "plugins" / "bench_timer_plugin.py").write_text(PLUGIN_SOURCE)
    rows = json.loads((checkpoints.BENCH_DIR / "alpaca_en_demo.json").read_text())
    data = WORK / "alpaca.json"
    data.write_text(json.dumps(rows * DATA_REPEAT))  # enough rows for packing's bigger steps
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               BENCH_WARMUP=str(opts.warmup), QTUNE_PLUGINS_DIR=str(WORK / "plugins"))
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "options": vars(opts), "results": {}}
    log: list[str] = []

    model = WORK / f"qwen2.5-{opts.shape}-shape"
    [(rc, wall, output)] = run_jobs(WORK, ["build"], [{"cmd": [sys.executable, __file__, "_build", str(model), opts.shape], "env": env}], 300, log)
    report["build"] = {"rc": rc, "wall_s": round(wall, 1)} | next((json.loads(x) for x in output.splitlines() if x.startswith("{")), {})
    if rc != 0:
        return finish(report, log, out_dir)
    for members in groups:
        elapsed = time.perf_counter() - t_start
        if elapsed > opts.budget_s:
            for setup in members:
                report["results"][setup] = {"label": SETUPS[setup[0]], "skipped": f"budget spent ({elapsed:.0f} s)"}
            continue
        jobs = [setup_job(setup, opts, env, model, data) for setup in members]
        token = None
        if len(jobs) > 1:
            for slot, job in enumerate(jobs):  # Unsloth writes its generated modules there: one folder each
                job["env"]["UNSLOTH_COMPILE_LOCATION"] = str(WORK / f"unsloth_compiled_cache_{slot}")
            token = prepare_turns(WORK, members, jobs, opts.steps)
        try:
            outcomes = run_jobs(WORK, members, jobs, opts.deadline_s - elapsed, log)
        finally:
            if token is not None:
                os.close(token)
        for setup, job, (rc, wall, output) in zip(members, jobs, outcomes, strict=True):
            result = json.loads(job["result_file"].read_text()) if job["result_file"].is_file() else {}
            result.update(label=job["label"], rc=rc, wall_s=round(wall, 1))
            if len(jobs) > 1:
                result["in_turns_with"] = [m for m in members if m != setup]
            if rc != 0:
                result["error_tail"] = "\n".join(output.splitlines()[-15:])
            report["results"][setup] = result
    report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    return finish(report, log, out_dir)


def summarize(results: dict) -> dict:
    """Ratios to (a): each run's to the (a) of its repeat number (b2 to a2; c, d and the repeats of a
    to a), the means of the repeats, and the peak memory's difference."""
    ok = {name: r for name, r in results.items() if r.get("tokens_per_s")}
    for name, r in ok.items():
        pair = ok.get("a" + name[1:]) if name[0] == "b" else None
        if base := pair or ok.get("a"):
            r["ratio_to_a"] = r["tokens_per_s"] / base["tokens_per_s"]
    runs: dict[str, list[float]] = {}
    for name, r in ok.items():
        runs.setdefault(name[0], []).append(r["tokens_per_s"])
    mean = {letter: sum(v) / len(v) for letter, v in runs.items()}
    summary: dict = {"runs": {k: len(v) for k, v in runs.items()}, "tokens_per_s_mean": mean}
    if "a" in mean:
        summary["ratio_of_means_to_a"] = {k: round(v / mean["a"], 3) for k, v in mean.items() if k != "a"}
    if "peak_reserved_gib" in ok.get("a", {}) and "peak_reserved_gib" in ok.get("b", {}):
        summary["b_minus_a_peak_reserved_gib"] = round(ok["b"]["peak_reserved_gib"] - ok["a"]["peak_reserved_gib"], 3)
    return summary


def finish(report: dict, log: list[str], out_dir: Path) -> int:
    """Ratios into the report, bench_seed.json and bench_logs.txt under out_dir, the table printed last."""
    from rich.console import Console
    from rich.table import Table

    results = report["results"]
    report["summary"] = summary = summarize(results)
    (out_dir / "bench_seed.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench_logs.txt").write_text("\n".join(log))
    build = report.get("build", {})
    table = Table(title=f"{build.get('gpu', build.get('device', '?'))}, Qwen2.5-{build.get('shape', '?')} shape; "
                        f"unsloth {build.get('unsloth')}, trl {build.get('trl')}; {report['date']}")
    for column in ("setup", "what", "s/step", "tokens/s", "x (a)", "peak GiB", "tokens/step", "note"):
        table.add_column(column, justify="left" if column in ("setup", "what", "note") else "right")
    for name, r in results.items():
        if "tokens_per_s" not in r:
            table.add_row(name, r.get("label", ""), *["-"] * 5, r.get("skipped") or f"rc={r.get('rc')}")
            continue
        note = f"in turns with {'+'.join(r['in_turns_with'])}" if r.get("in_turns_with") else ""
        if (r.get("turns") or {}).get("broken_at_step") is not None:
            note += f", alone from step {r['turns']['broken_at_step']}"
        peak = f"{r['peak_reserved_gib']:.2f}" if "peak_reserved_gib" in r else "-"
        ratio = f"{r['ratio_to_a']:.3f}" if "ratio_to_a" in r else "-"
        table.add_row(name, r["label"], f"{r['s_per_step']:.3f}", f"{r['tokens_per_s']:.0f}", ratio, peak, f"{r['tokens_per_step']:.0f}", note)
    lines = [f"{k} / a, means of the runs: {v}" for k, v in summary.get("ratio_of_means_to_a", {}).items()]
    if "b_minus_a_peak_reserved_gib" in summary:
        lines.append(f"b - a peak reserved: {summary['b_minus_a_peak_reserved_gib']} GiB")
    table.caption = "; ".join(lines) + f"\nJSON: {out_dir / 'bench_seed.json'}"
    Console(width=160).print(table)
    return 0 if results and all(r.get("rc") == 0 for r in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_build"]:
        import torch

        print(json.dumps(checkpoints.build(Path(argv[1]), argv[2], nf4=torch.cuda.is_available())))
        return 0
    if argv[:1] in (["_notebook"], ["_transformers"]):
        result = (worker_notebook if argv[0] == "_notebook" else worker_transformers)(json.loads(argv[1]))
        Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="on the CPU machine: .bench/ (tokenizer, data)")
    p = sub.add_parser("run", help="on the GPU machine: build the checkpoint, time the setups, report")
    p.add_argument("--setups", default="a,b,c,d", help="in order, comma-separated; a2: a repeat; a+b: a group taking turns")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per setup, warm-up included")
    p.add_argument("--warmup", type=int, default=4, help="first optimizer steps left out of the timing (compilation, allocator growth)")
    p.add_argument("--budget-s", type=float, default=480, help="start no group after this many seconds")
    p.add_argument("--deadline-s", type=float, default=575, help="stop the setups still running at this many seconds")
    p.add_argument("--out", default=None, help="folder for bench_seed.json and bench_logs.txt (default $OUT)")
    p.add_argument("--shape", default="7B", help="Qwen2.5 shape of the checkpoint (tiny: CPU smoke run of b)")
    opts = parser.parse_args(argv)
    if opts.command == "prepare":
        prepare()
        return 0
    if opts.warmup >= opts.steps:
        parser.error("--warmup must be below --steps: no step would be timed")
    if unknown := [m for m in opts.setups.replace("+", ",").split(",") if m.strip().rstrip("0123456789") not in SETUPS]:
        parser.error(f"unknown setup {unknown[0]!r}: use a, b, c or d, with digits for repeats (a2) and + for turns (a+b)")
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
