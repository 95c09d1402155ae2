"""Random-weight checkpoints of real Qwen2.5 shapes with the real Qwen2.5 tokenizer, for the GPU scripts.

No weights can be downloaded on the GPU machine, so the GPU scripts (bench_seed.py, bench_varlen.py,
gpu_merge_4bit.py, gpu_oom.py, gpu_plain_memory.py) build their models there, in the same call. Random weights measure speed and memory faithfully and give an
adapter something to move; what the model says means nothing. The shapes and the tokenizer are the
test fixtures' (tests/assets.py), so tests and benchmarks build the same models.

    prepare()                         on the CPU machine: the tokenizer into .bench/tokenizer
    build(dest, "7B", nf4=True)       on the GPU machine: a checkpoint folder with that tokenizer
    run_qtune(work, name, config)     there: `qtune run` on it in a subprocess, and its figures
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

# The Qwen2.5 tokenizer and shapes are test fixtures (tests/assets.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ROOT = Path(__file__).resolve().parents[1]
#: made on the CPU machine and carried to the GPU machine (BENCH_DIR moves it, e.g. for tests)
BENCH_DIR = Path(os.environ.get("BENCH_DIR", ROOT / ".bench"))
GIB = 1024**3
#: "tiny": a shape for CPU smoke runs (widths multiples of 64 for bitsandbytes, of 256 for llama.cpp)
TINY_SHAPE = dict(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)


def prepare() -> Path:
    """The Qwen2.5 base tokenizer (pad ``<|PAD_TOKEN|>``, distinct from EOS as Unsloth requires) in
    BENCH_DIR/tokenizer, with BENCH_DIR kept out of git. A current build is reused."""
    from assets import qwen25_tokenizer

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if BENCH_DIR == ROOT / ".bench" and exclude.parent.is_dir():
        if "/.bench/" not in (exclude.read_text() if exclude.is_file() else "").split():
            with open(exclude, "a") as handle:
                handle.write("/.bench/\n")
    return qwen25_tokenizer(instruct=False, dest=BENCH_DIR / "tokenizer")


def build(dest: Path, shape: str, nf4: bool = False, tokenizer_dir: Path | None = None) -> dict:
    """A random-weight bf16 Qwen2.5 checkpoint of ``shape`` ("7B", "1.5B", ... or "tiny") in ``dest``,
    built on the GPU when there is one, with the tokenizer of ``tokenizer_dir`` (default
    BENCH_DIR/tokenizer) next to it. With ``nf4`` it is then
    saved again as a bitsandbytes NF4 checkpoint (double quantization, bf16 compute) like Unsloth's
    ``-bnb-4bit`` uploads, embeddings and head left in 16-bit. Returns facts for the report."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from assets import TOKENIZER_FILES, _eos_and_pad_ids, _qwen25_config, qwen25_shape_config

    tokenizer_dir = Path(tokenizer_dir or BENCH_DIR / "tokenizer")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        sys.exit(f"{tokenizer_dir} is missing: run the script's `prepare` on the CPU machine and carry .bench")
    started = time.perf_counter()
    config = _qwen25_config(**TINY_SHAPE) if shape == "tiny" else qwen25_shape_config(shape)
    config.eos_token_id, config.pad_token_id = _eos_and_pad_ids(tokenizer_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dest = Path(dest)
    shm = Path("/dev/shm")  # the bf16 copy an NF4 build starts from: in RAM where there is a RAM disk
    bf16_dir = ((shm if shm.is_dir() else dest.parent) / (dest.name + "-bf16")) if nf4 else dest
    with torch.device(device):  # initialising 7.6 B parameters on the CPU would take minutes
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(bf16_dir)
    del model
    if nf4:
        if device == "cuda":
            torch.cuda.empty_cache()
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=quantization, dtype=torch.bfloat16,
                                                     device_map={"": 0 if device == "cuda" else "cpu"})
        model.save_pretrained(dest)
        del model
        shutil.rmtree(bf16_dir)
    if device == "cuda":
        torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, dest / name)
    return {"shape": shape, "params": params, "nf4": nf4, "device": device, "build_s": round(time.perf_counter() - started, 1),
            "checkpoint_gib": round(sum(f.stat().st_size for f in dest.glob("*.safetensors")) / GIB, 3)} | machine()


def machine() -> dict:
    """The GPU and the versions that ran: what a report's reader needs to compare two calls."""
    import torch

    facts = {"cuda": torch.version.cuda}
    if torch.cuda.is_available():
        facts.update(gpu=torch.cuda.get_device_name(0), gpu_total_gib=round(torch.cuda.get_device_properties(0).total_memory / GIB, 1))
    installed = {d.metadata["Name"].lower().replace("-", "_"): d.version for d in metadata.distributions()}
    names = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "unsloth", "unsloth_zoo", "qtune")
    return facts | {name: installed.get(name) for name in names}


def run_qtune(work: Path, name: str, config: dict, warmup: int = 0, timeout: float = 240) -> dict:
    """`qtune run` on ``config`` (written as the run's config file, with ``name`` and its runs under
    ``work/runs``) in a subprocess. Returns what it printed about its plan (profile, attention and
    note lines), the peak reserved GPU memory (the memory_monitor's, in summary.json), the attention
    it used, the resolved config, and tokens/s and s/step over the steps after ``warmup`` (from
    metrics.jsonl); ``error`` with the output's end when it failed."""
    config = {**config, "name": name, "training": {**config.get("training", {}), "output_dir": str(Path(work) / "runs")}}
    path = Path(work) / f"{name}.yaml"
    path.write_text(json.dumps(config))
    started = time.perf_counter()
    command = [sys.executable, "-c", "import sys; from qtune_cli.main import main; main(sys.argv[1:])", "run", str(path), "--no-progress"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout:.0f} s", "tail": str(exc.stdout or "")[-1500:]}
    printed = [line for line in proc.stdout.splitlines() if line.startswith(("profile", "attention", "note"))]
    result = {"rc": proc.returncode, "wall_s": round(time.perf_counter() - started, 1), "printed": printed}
    if proc.returncode != 0:
        return result | {"error": (proc.stdout + proc.stderr)[-1500:]}
    run_dir = Path(work) / "runs" / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # num_tokens is cumulative: each step's own tokens over its tokens_per_second is its time
    totals = [r["num_tokens"] for r in records]
    tokens = {r["step"]: total - before for r, total, before in zip(records, totals, [0] + totals[:-1], strict=True)}
    timed = [r for r in records if r["step"] > warmup and r.get("tokens_per_second")]
    seconds = sum(tokens[r["step"]] / r["tokens_per_second"] for r in timed)
    summary = json.loads((run_dir / "summary.json").read_text())
    return result | {
        "tokens_per_s": round(sum(tokens[r["step"]] for r in timed) / seconds, 1) if seconds else None,
        "s_per_step": round(seconds / len(timed), 4) if timed else None, "timed_steps": len(timed),
        "peak_reserved_gib": summary.get("memory", {}).get("peak_reserved_gib"), "attention": summary.get("attention"),
        "config": (run_dir / "config.yaml").read_text(),
    }
