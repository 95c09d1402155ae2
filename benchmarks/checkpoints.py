"""Random-weight checkpoints of real Qwen2.5 shapes with the real Qwen2.5 tokenizer, for the GPU scripts.

No weights can be downloaded on the GPU machine, so the GPU scripts (bench_seed.py, bench_varlen.py,
gpu_merge_4bit.py, gpu_oom.py, gpu_plain_memory.py) build their models there, in the same call. Random weights measure speed and memory faithfully and give an
adapter something to move; what the model says means nothing. The shapes and the tokenizer are the
test fixtures' (tests/assets.py), so tests and benchmarks build the same models.

    prepare()                         on the CPU machine: the tokenizer into .bench/tokenizer
    build(dest, "7B", nf4=True)       on the GPU machine: a checkpoint folder with that tokenizer
"""

from __future__ import annotations

import os
import shutil
import sys
import time
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
            "checkpoint_gib": round(sum(f.stat().st_size for f in dest.glob("*.safetensors")) / GIB, 3)}
