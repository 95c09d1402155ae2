"""The Hugging Face export formats: the seed notebook's save_pretrained_merged methods, offline.

lora          the adapter and tokenizer in peft's format (PeftModel.from_pretrained loads it)
merged-16bit  base + adapter merged, sharded safetensors for transformers / vLLM (bf16, fp16, fp32)
merged-4bit   merged, then bitsandbytes NF4 saved with transformers (quantization_config in config.json)

Each is verified in transformers against the trained model (:func:`qtune.api.verify_hf_model`).
Thresholds are per format and quantization (``BOUNDS`` below): lossless formats (the LoRA itself,
merged fp32) must agree on top-1 at 99% or more (GGUF f32 / f16: 98%, qtune.plugins.gguf_export); bf16 and the quantized formats get looser top-1
bounds and are held mainly to top-5. The reason is the test models: a random-weight model's logits
are nearly flat (the best two of 150,000 tokens often differ by 0.01), so rounding well inside a
format's error budget flips the arg max without changing what the model ranks as plausible; a real
model's logits are peaked. Every bound is set below what was measured on the random tiny Qwen2
(2 layers, hidden 256) and SmolLM2-135M-Instruct (with a small random LoRA), top-1 / top-5:

    format             tiny random    SmolLM2-135M
    merged-16bit bf16  0.95 / 1.00    1.00 / 1.00
    merged-4bit (NF4)  0.48 / 0.94    0.74 / 0.97
    gguf f16           1.00 / 1.00    1.00 / 1.00
    gguf bf16          0.94 / 1.00    1.00 / 1.00
    gguf q8_0          0.93 / 1.00    0.99 / 1.00
    gguf q6_k          0.84 / 1.00    0.92 / 1.00
    gguf q5_k_m        0.83 / 1.00    0.85 / 1.00
    gguf q4_k_m        0.61 / 0.99    0.79-0.82 / 1.00
    gguf q4_0          0.50 / 0.91    0.69 / 0.96
    gguf q3_k_m        0.63 / 0.92    0.88 / 1.00
    gguf q2_k          0.26 / 0.52    0.71 / 0.92

merged-4bit of a run trained in 4-bit (QLoRA) is held to what that run trained: the NF4 base with
the adapter on top (:func:`qtune.api.training_quantization`), not the float32 base. Quantizing the merged
weights re-rounds only where the adapter moved a weight across an NF4 bin, so the export stays close
to that model, while the float32 model differs from both by the base's whole NF4 error. Measured
on CPU (bitsandbytes 0.50.2, compute bfloat16) on the three probe prompts, top-1 / top-5 of
merged-4bit against each reference, and of the NF4 base *without* the adapter (what a merge that
lost the adapter would score):

    run (adapter)                              vs NF4+adapter  vs fp32+adapter  no adapter
    tiny Qwen2, QLoRA 30 steps lr 2e-3         0.97 / 1.00     0.96 / 1.00      0.07 / 0.17
    SmolLM2-135M, QLoRA 30 steps lr 1e-3       0.90 / 0.99     0.84 / 0.96      0.52 / 0.69
    SmolLM2-135M, random lora_B (std 0.001)    0.93 / 1.00     0.69 / 0.95      0.99 / 1.00
    random Qwen2.5-0.5B shape, QLoRA 8 steps   0.94 / 1.00     0.59 / 0.98      0.00 / 0.02
    tiny Qwen2, random lora_B (std 0.05)       0.50 / 0.84     0.63 / 0.88      0.10 / 0.16

The bound (0.75 / 0.95, ``BOUNDS["merged-4bit/nf4-base"]``) passes every trained adapter and fails the
no-adapter rows of trained runs. The last row is an outlier by construction: an unstructured
random update about half the size of the weights themselves moves most weights into another NF4
bin, so the two roundings no longer cancel; trained adapters are small and aligned with the data. Merging into the dequantized NF4 base instead (then quantizing again) scored like the
no-adapter rows (SmolLM2 0.55 / 0.69, Qwen2.5-0.5B shape 0.00 / 0.02): re-quantizing snaps the
small updates back onto the base's grid, which is why merged-4bit merges into the original weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from qtune.api import (
    DEFAULT_SHARD_SIZE,
    DTYPES,
    Exporter,
    ExportResult,
    FinishedRun,
    QtuneError,
    atomic_dir,
    check_free_space,
    disable_bnb_cpu_repacking,
    export_device,
    free_memory,
    hookimpl,
    load_merged,
    missing_modules,
    nf4_config,
    prepare_tokenizer,
    reference_dtype,
    save_merged,
    torch_dtype,
    training_quantization,
    verify_hf_model,
    weights_bytes,
)

#: (minimum top-1, minimum top-5 agreement) per format and quantization; see the tables above
BOUNDS: dict[str, tuple[float, float]] = {
    "lora": (0.99, 0.99),
    "merged-16bit:fp32": (0.99, 0.99),
    "merged-16bit:fp16": (0.97, 0.99),
    # bf16 keeps 8 mantissa bits: on flat random logits ~5% of arg maxes flip
    "merged-16bit:bf16": (0.9, 0.99),
    # vs the float32 base + adapter (a run not trained in 4-bit): NF4 (blocks of 64, one absmax
    # each) is coarser than q4_k_m, which keeps some tensors in q6_k
    "merged-4bit": (0.4, 0.9),
    # vs the NF4 base + adapter a QLoRA run trained (see the table above)
    "merged-4bit/nf4-base": (0.75, 0.95),
}


class LoraExporter(Exporter):
    name = "lora"
    description = "LoRA adapter + tokenizer in peft's format (small; needs the base model to run)"

    def unavailable_reason(self):
        return missing_modules("torch", "transformers", "peft")

    def export(self, run, out_dir: Path, quantization: str | None) -> ExportResult:
        files = copy_adapter(run, out_dir)
        return ExportResult(self.name, Path(out_dir), files, {"base_model": run.config.model.name})

    def verify(self, run, result: ExportResult):
        def load():
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = export_device()
            path = run.model_path()
            remote = run.config.model.trust_remote_code
            base = AutoModelForCausalLM.from_pretrained(path, dtype=reference_dtype(path, device), device_map={"": device},
                                                        trust_remote_code=remote)
            return PeftModel.from_pretrained(base, result.path), AutoTokenizer.from_pretrained(result.path, trust_remote_code=remote)

        return verify_hf_model(run, self.name, None, load, BOUNDS["lora"], runtime="transformers + peft")


class Merged16bitExporter(Exporter):
    name = "merged-16bit"
    description = "adapter merged into the base, sharded safetensors for transformers and vLLM"
    quantizations = ("bf16", "fp16", "fp32")
    default_quantization = "bf16"
    quantization_aliases = {"bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "half": "fp16", "float32": "fp32", "f32": "fp32"}
    options = {"max_shard_size": f"largest safetensors shard, e.g. {DEFAULT_SHARD_SIZE} (default) or 500MB"}

    def unavailable_reason(self):
        return missing_modules("torch", "transformers", "peft", "safetensors")

    def export(self, run, out_dir: Path, quantization: str | None, max_shard_size: str | int | None = None) -> ExportResult:
        quant = quantization or self.default_quantization
        files = write_merged_16bit(run, out_dir, quant, max_shard_size)
        shards = [p.name for p in files if p.suffix == ".safetensors"]
        return ExportResult(self.name, Path(out_dir), files,
                            {"dtype": quant, "shards": len(shards), "max_shard_size": str(max_shard_size or DEFAULT_SHARD_SIZE)})

    def verify(self, run, result: ExportResult):
        quant = result.details.get("quant")

        def load():
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            # Weights as exported, computed in float32: the check is about the files, not about
            # 16-bit arithmetic (which differs between runtimes anyway).
            remote = run.config.model.trust_remote_code
            model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32, device_map={"": export_device()},
                                                         trust_remote_code=remote)
            return model, AutoTokenizer.from_pretrained(result.path, trust_remote_code=remote)

        return verify_hf_model(run, self.name, quant, load, BOUNDS[f"{self.name}:{quant}"])


class Merged4bitExporter(Exporter):
    name = "merged-4bit"
    description = "adapter merged, then bitsandbytes NF4 (double quantization) saved with transformers"
    quantizations = ("nf4",)
    default_quantization = "nf4"

    def unavailable_reason(self):
        return missing_modules("torch", "transformers", "peft", "bitsandbytes")

    def export(self, run, out_dir: Path, quantization: str | None) -> ExportResult:
        import torch

        device = export_device()
        if device == "cpu" or (device.startswith("cuda") and torch.cuda.is_bf16_supported()):
            compute = "bfloat16"
        else:
            compute = "float16"
        files = write_merged_4bit(run, out_dir, compute, device)
        return ExportResult(self.name, Path(out_dir), files, {"quant_type": "nf4", "double_quant": True, "compute_dtype": compute})

    def verify(self, run, result: ExportResult):
        """Against what the run trained: for a QLoRA run the NF4 base + adapter (the same
        BitsAndBytesConfig rebuilt, :func:`qtune.api.training_quantization`), else the
        32-bit base + adapter."""

        def load():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            remote = run.config.model.trust_remote_code
            model = AutoModelForCausalLM.from_pretrained(result.path, device_map={"": export_device()}, trust_remote_code=remote)
            disable_bnb_cpu_repacking(model)  # the kernels the reference uses
            return model, AutoTokenizer.from_pretrained(result.path, trust_remote_code=remote)

        quantization = training_quantization(run)
        bounds = BOUNDS["merged-4bit/nf4-base" if quantization else "merged-4bit"]
        return verify_hf_model(run, self.name, result.details.get("quant"), load, bounds, runtime="transformers + bitsandbytes",
                               quantization=quantization)


# --------------------------------------------------------------------------- writing the folders


def parse_size(value: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    number, factor = text, 1
    for unit, scale in units.items():
        if text.endswith(unit):
            number, factor = text[: -len(unit)], scale
            break
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise QtuneError(f"max shard size {value!r} is not a size; write it like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise QtuneError(f"max shard size {value!r} must be positive")
    return size


def write_merged_16bit(run: FinishedRun, dest: Path, quant: str = "bf16",
                       max_shard_size: str | int | None = None, device: str | None = None) -> list[Path]:
    """Merge and save ``run`` into ``dest`` (created atomically) in ``quant`` (bf16, fp16 or fp32)."""
    shard = parse_size(max_shard_size or DEFAULT_SHARD_SIZE)
    model, tokenizer = load_merged(run, DTYPES[quant], device)
    needed = int(weights_bytes(model) * 1.05) + _folder_bytes(run.adapter_dir)
    check_free_space(Path(dest).parent, needed, f"the merged {quant} model")
    with atomic_dir(dest) as tmp:
        save_merged(model, tokenizer, tmp, run.template, shard)
    del model
    free_memory()
    return sorted(p for p in Path(dest).rglob("*") if p.is_file())


def write_merged_4bit(run: FinishedRun, dest: Path, compute_dtype: str = "bfloat16", device: str | None = None) -> list[Path]:
    """Merge in 16-bit, then quantize to bitsandbytes NF4 (double quantization) and save.

    bitsandbytes quantizes while transformers loads a checkpoint, so the merged 16-bit model is
    written to a temporary folder beside ``dest`` first (it needs that much extra disk for a while)
    and loaded back with a ``BitsAndBytesConfig``; the 16-bit model is freed before that load.
    """
    from transformers import AutoModelForCausalLM

    device = device or export_device()
    model, tokenizer = load_merged(run, compute_dtype, device)
    size16 = weights_bytes(model)
    dest = Path(dest)
    check_free_space(dest.parent, int(size16 * 1.05 + size16 * 0.4), "the merged model and its 4-bit copy")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.merging-", dir=dest.parent))
    try:
        save_merged(model, tokenizer, work, run.template)
        del model
        free_memory()
        quantized = AutoModelForCausalLM.from_pretrained(
            work, quantization_config=nf4_config(compute_dtype), dtype=torch_dtype(compute_dtype), device_map={"": device},
            trust_remote_code=run.config.model.trust_remote_code,
        )
        with atomic_dir(dest) as tmp:
            quantized.save_pretrained(tmp, safe_serialization=True)
            for name in _tokenizer_and_generation_files(work):
                shutil.copy2(work / name, tmp / name)
        del quantized
        free_memory()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sorted(p for p in dest.rglob("*") if p.is_file())


def _tokenizer_and_generation_files(folder: Path) -> list[str]:
    weights = {"config.json", "model.safetensors.index.json"}
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".safetensors" and p.name not in weights)


def copy_adapter(run: FinishedRun, dest: Path) -> list[Path]:
    """The run's adapter in peft's format, its tokenizer carrying the run template's chat template."""
    from transformers import AutoTokenizer

    source = run.adapter_dir
    check_free_space(Path(dest).parent, int(_folder_bytes(source) * 1.05) + 2**20, "the LoRA adapter")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=run.config.model.trust_remote_code)
    with atomic_dir(dest) as tmp:
        for path in sorted(source.iterdir()):
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        prepare_tokenizer(tokenizer, run.template)
        tokenizer.save_pretrained(tmp)
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not config.get("base_model_name_or_path"):
            config["base_model_name_or_path"] = run.config.model.name
            config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return sorted(p for p in Path(dest).rglob("*") if p.is_file())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@hookimpl
def register_exporters(register):
    register(LoraExporter())
    register(Merged16bitExporter())
    register(Merged4bitExporter())
