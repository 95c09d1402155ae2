"""The transformers backend's GPU memory beside the estimate the fast profile plans it with.

The fast profile sizes its micro-batch with :func:`qtune.profiles.estimate_memory_gib` and the
backend's ``memory_traits``; the transformers backend declares ``PLAIN_KERNELS`` (bf16 logits with an
fp32 copy, no fused kernels, no offloaded checkpointing). On 2026-12-02 the plan made from those
traits for Qwen2.5-7B on an H200 (8 packed rows of 2048 tokens, checkpointing off) ran out of memory
on the 139.8 GiB card: the traits were too small. This script measures, through ``qtune run`` with
``model.backend: transformers`` (packing on, ``model.attention: varlen``, 3 steps), the peak reserved
GPU memory (the memory_monitor's figure, in summary.json) of packed micro-batches of N rows of 2048
tokens, with gradient checkpointing off and on, beside the estimate; then the fast profile's own plan.

A random-weight Qwen2.5-7B shape in bitsandbytes NF4 (benchmarks/checkpoints.py) and the Alpaca
rows of .bench (``python benchmarks/bench_seed.py prepare``). GPU call, carrying .bench and
.gpu-bundle:

    mkdir -p /tmp/site && tar xzf .gpu-bundle/site.tgz -C /tmp/site &&
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 &&
    python3 benchmarks/gpu_plain_memory.py --points off:1,off:2,on:2,on:4 --profile --out $OUT

Prints a table last and writes gpu_plain_memory.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402  (benchmarks/checkpoints.py, next to this script)

WORK = Path(os.environ.get("BENCH_WORK", "/tmp/qtune-plain-memory"))
ROW_TOKENS = 2048


def qtune_run(name: str, model: Path, training: dict, lora: dict, timeout: float) -> dict:
    """One `qtune run` of 3 steps with the transformers backend (:func:`checkpoints.run_qtune`)."""
    config = {"model": {"name": str(model), "backend": "transformers", "attention": "varlen"}, "lora": lora,
              "dataset": {"path": str(WORK / "alpaca.json")}, "callbacks": ["memory_monitor"],
              "training": {"max_steps": 3, **training}}
    return checkpoints.run_qtune(WORK, name, config, timeout=timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="off:1,off:2,on:2,on:4", help="checkpointing (off/on):rows, comma-separated")
    parser.add_argument("--profile", action="store_true", help="then run the fast profile's own plan")
    parser.add_argument("--out", default=os.environ.get("OUT", str(WORK / "out")))
    opts = parser.parse_args()

    import torch
    import yaml

    from qtune.plugins.models import SHAPES
    from qtune.profiles import PLAIN_KERNELS, estimate_memory_gib

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    rows = json.loads((checkpoints.BENCH_DIR / "alpaca_en_demo.json").read_text())
    (WORK / "alpaca.json").write_text(json.dumps(rows * 2))
    model = WORK / "qwen2.5-7B-shape-bnb-4bit"
    report = {"gpu": torch.cuda.get_device_name(0), "gpu_gib": round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1),
              "build": checkpoints.build(model, "7B", nf4=True), "points": {}}
    shape = SHAPES["qwen2.5-7b"]
    for point in opts.points.split(","):
        checkpointing, count = point.split(":")
        ckpt = checkpointing == "on"
        result = qtune_run(f"{checkpointing}-{count}", model, {"packing": True, "per_device_train_batch_size": int(count),
                                                               "gradient_accumulation_steps": 1}, {"gradient_checkpointing": ckpt}, 240)
        result["estimate_gib"] = estimate_memory_gib(shape, int(count) * ROW_TOKENS, ckpt, kernels=PLAIN_KERNELS)
        report["points"][point] = result
        (out / "gpu_plain_memory.json").write_text(json.dumps(report, indent=2))  # kept if the call is stopped
        print(point, {k: v for k, v in result.items() if k != "config"}, flush=True)
    if opts.profile:
        result = qtune_run("fast", model, {"profile": "fast"}, {}, 300)
        if "config" in result:
            resolved = yaml.safe_load(result["config"])
            batch, ckpt = resolved["training"]["per_device_train_batch_size"], resolved["lora"]["gradient_checkpointing"]
            result["plan"] = f"{batch} x {ROW_TOKENS}, checkpointing {ckpt}"
            result["estimate_gib"] = estimate_memory_gib(shape, batch * ROW_TOKENS, ckpt, kernels=PLAIN_KERNELS)
        report["points"]["fast profile"] = result
    (out / "gpu_plain_memory.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['gpu']} ({report['gpu_gib']} GiB), Qwen2.5-7B shape NF4, transformers backend, packed rows of {ROW_TOKENS}")
    print(f"{'point':<14} {'peak reserved GiB':>18} {'estimate GiB':>13} {'attention'}")
    for name, r in report["points"].items():
        peak = f"{r['peak_reserved_gib']:.2f}" if r.get("peak_reserved_gib") is not None else r.get("error", "?").splitlines()[-1][:60]
        print(f"{name + (' ' + r['plan'] if r.get('plan') else ''):<14} {peak:>18} {r.get('estimate_gib', '-'):>13} {r.get('attention') or ''}")
    return 0 if all(r.get("rc") == 0 for r in report["points"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
