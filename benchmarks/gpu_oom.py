"""A real CUDA out-of-memory error on the GPU, through `qtune run`, and what qtune makes of it.

The CPU machine cannot produce one, so tests/test_reliability.py only checks the conversion of a
constructed torch.OutOfMemoryError. This script proves the whole path on a GPU, in two cases, each
a `qtune run` in its own process (this checkout's code), on a random-weight Qwen2.5 shape:

1. **a micro-batch that cannot fit on the card**: rows of ~4,000 tokens, micro-batch 64, 16-bit
   base, no gradient checkpointing (hundreds of GiB of activations on a 1.5B shape). Expected: the
   first step fails, stderr is exactly one line (``Error: the GPU ran out of memory while training
   (...); lower training.per_device_train_batch_size ...``), no traceback, a non-zero exit, and no
   run directory left (nothing was trained).
2. **out of memory after a checkpoint**: a short run (micro-batch 8, 256 tokens) with
   ``save_steps: 2`` whose callback ``oom_after_save`` (a plugin written to the work folder), once
   checkpoint-2 is saved, empties the allocator's cache and caps the process at the memory it then
   holds plus 2% (``torch.cuda.set_per_process_memory_fraction``): step 3's micro-batch no longer
   fits, and the allocator raises a real OutOfMemoryError inside the training step. Expected: one
   line of advice, summary.json with ``status: failed`` and ``last_checkpoint`` naming checkpoint-2,
   checkpoint-2 complete; then ``qtune run --resume`` (a new process, no cap: the callback caps only
   when it sees checkpoint-2 saved, which a resumed run never does) finishes all steps.

The script prints a verdict per expectation and writes ``OUT/gpu_oom.json``; it exits non-zero when
one fails.

Usage (not run yet: ready for a GPU call):

  here, on the CPU machine, from the project root (once): the tokenizer and the package bundle
      python benchmarks/gpu_merge_4bit.py prepare
  the GPU call (nvidia-h200), carrying .bench and .gpu-bundle:
      mkdir -p /tmp/site && tar xzf .gpu-bundle/site.tgz -C /tmp/site &&
      export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 &&
      python3 benchmarks/gpu_oom.py run --out $OUT

Options of ``run``: --shape 0.5B|1.5B|3B|7B (default 1.5B).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import checkpoints  # noqa: E402  (the random-weight base of a real Qwen2.5 shape, built on the GPU)
import gpu_merge_4bit as shared  # noqa: E402  (the tokenizer, the bundle, this checkout's qtune)

WORK = Path(os.environ.get("BENCH_WORK", "/tmp/qtune-oom"))

OOM_AFTER_SAVE = '''
from qtune.api import TrainingCallback, hookimpl


class OomAfterSave(TrainingCallback):
    """Once checkpoint-AT is saved, cap this process at the CUDA memory it holds (+2%)."""

    name = "oom_after_save"

    def __init__(self, at=2):
        self.at = at

    def on_save(self, run, path):
        import torch

        if path.name != f"checkpoint-{self.at}":
            return
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, torch.cuda.memory_reserved() * 1.02 / total))


@hookimpl
def register_callbacks(register):
    register(OomAfterSave)
'''


def qtune(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`qtune ARGV` in a fresh process, on this checkout's code."""
    command = [sys.executable, str(Path(__file__).resolve()), "cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=1800)


def write_config(path: Path, base: Path, data: Path, name: str, **training) -> Path:
    import yaml

    config = {
        "name": name,
        "model": {"name": str(base), "backend": "transformers", "max_seq_length": 4096, "dtype": "bfloat16", "load_in_4bit": False},
        "lora": {"r": 16, "alpha": 16, "gradient_checkpointing": False},
        "template": "alpaca",
        "dataset": {"path": str(data)},
        "training": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "warmup_steps": 0, "max_steps": 4,
                     "learning_rate": 2e-4, "optim": "adamw_torch", "seed": 3407, "logging_steps": 1,
                     "output_dir": str(WORK / "runs"), **training},
        "callbacks": ["memory_monitor"],
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def one_line(result: subprocess.CompletedProcess) -> bool:
    return result.returncode != 0 and "Traceback" not in result.stderr + result.stdout and len(stderr_lines(result)) == 1


def run(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_oom.py needs a CUDA GPU (an out-of-memory error on the CPU is the operating system's, not torch's)")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    shared._use_checkout()
    base = WORK / "base"
    built = checkpoints.build(base, args.shape)
    checks: dict[str, bool] = {}
    record: dict = {"shape": built, "gpu": torch.cuda.get_device_name(0),
                    "total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}

    # 1. a micro-batch that cannot fit
    long_rows = WORK / "long.jsonl"
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 440)  # ~4,000 tokens
    long_rows.write_text("".join(json.dumps({"instruction": "Repeat the text.", "input": text, "output": "ok"}) + "\n"
                                 for _ in range(128)), encoding="utf-8")
    config = write_config(WORK / "too-big.yaml", base, long_rows, "too-big", per_device_train_batch_size=64)
    started = time.perf_counter()
    result = qtune("run", str(config), "--no-progress")
    line = stderr_lines(result)[-1] if stderr_lines(result) else ""
    record["too_big"] = {"exit": result.returncode, "stderr": result.stderr[-3000:], "seconds": round(time.perf_counter() - started, 1)}
    checks["too big: one line, no traceback, non-zero exit"] = one_line(result)
    checks["too big: the line is the out-of-memory advice"] = "ran out of memory while training" in line and "per_device_train_batch_size (now 64)" in line
    checks["too big: no run directory left (nothing trained)"] = not (WORK / "runs" / "too-big").exists()

    # 2. out of memory after checkpoint-2, then resume
    plugins = WORK / "plugins"
    plugins.mkdir()
    (plugins / "oom_after_save.py").write_text(OOM_AFTER_SAVE, encoding="utf-8")
    env = {"QTUNE_PLUGINS_DIR": str(plugins)}
    short_rows = WORK / "short.jsonl"
    short_rows.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "input": " ".join(["one two three"] * 60), "output": str(i)})
                                  + "\n" for i in range(64)), encoding="utf-8")
    config = write_config(WORK / "capped.yaml", base, short_rows, "capped", max_steps=6, save_steps=2)
    text = config.read_text()
    config.write_text(text.replace("- memory_monitor", "- memory_monitor\n- oom_after_save"), encoding="utf-8")
    run_dir = WORK / "runs" / "capped"
    result = qtune("run", str(config), "--no-progress", env=env)
    line = stderr_lines(result)[-1] if stderr_lines(result) else ""
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    from qtune.training import checkpoint_is_complete

    record["capped"] = {"exit": result.returncode, "stderr": result.stderr[-3000:], "summary": summary}
    checks["capped: one line, no traceback, non-zero exit"] = one_line(result)
    checks["capped: the line is the out-of-memory advice"] = "ran out of memory while training" in line
    checks["capped: summary.json says failed and names checkpoint-2"] = (
        summary.get("status") == "failed" and str(summary.get("last_checkpoint", "")).endswith("checkpoint-2"))
    checks["capped: checkpoint-2 is complete"] = checkpoint_is_complete(run_dir / "checkpoints" / "checkpoint-2")
    resumed = qtune("run", "--resume", str(run_dir), "--no-progress", env=env)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    record["resumed"] = {"exit": resumed.returncode, "stderr": resumed.stderr[-3000:], "summary": summary}
    checks["resume: finishes all 6 steps from checkpoint-2"] = (
        resumed.returncode == 0 and summary.get("steps") == 6 and summary.get("resumed_from") == "checkpoint-2")

    record["checks"] = checks
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_oom.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    for check, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {check}")
    if not all(checks.values()):
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cli"]:  # the qtune command line on this checkout's code (the subprocesses above)
        shared._use_checkout()
        from qtune_cli.main import main as qtune_main

        qtune_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="on the GPU machine")
    go.add_argument("--shape", default="1.5B", choices=["0.5B", "1.5B", "3B", "7B"])
    go.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
