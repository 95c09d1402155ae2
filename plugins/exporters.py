"""Built-in export formats: the seed notebook's save methods, produced offline.

lora          the adapter and tokenizer in peft's format (PeftModel.from_pretrained loads it)
merged-16bit  base + adapter merged, sharded safetensors for transformers / vLLM (bf16, fp16, fp32)
merged-4bit   merged, then bitsandbytes NF4 saved with transformers (quantization_config in config.json)
gguf          llama.cpp's format (f16 ... q2_k) with the run's chat template, plus an Ollama Modelfile

The machinery lives in qtune.merge, qtune.gguf and qtune.verify; these classes only wire it up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qtune import hookimpl
from qtune.types import Exporter, ExportResult


def _missing(*modules: str) -> str | None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


class LoraExporter(Exporter):
    name = "lora"
    description = "LoRA adapter + tokenizer in peft's format (small; needs the base model to run)"

    def unavailable_reason(self):
        return _missing("torch", "transformers", "peft")

    def export(self, run, out_dir: Path, quantization: str | None) -> ExportResult:
        from qtune.merge import copy_adapter

        files = copy_adapter(run, out_dir)
        return ExportResult(self.name, Path(out_dir), files, {"base_model": run.config.model.name})

    def verify(self, run, result: ExportResult):
        from qtune.verify import export_device, reference_dtype, verify_hf_model

        def load():
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = export_device()
            path = run.model_path()
            remote = run.config.model.trust_remote_code
            base = AutoModelForCausalLM.from_pretrained(path, dtype=reference_dtype(path, device), device_map={"": device},
                                                        trust_remote_code=remote)
            return PeftModel.from_pretrained(base, result.path), AutoTokenizer.from_pretrained(result.path, trust_remote_code=remote)

        return verify_hf_model(run, self.name, None, load, runtime="transformers + peft")


class Merged16bitExporter(Exporter):
    name = "merged-16bit"
    description = "adapter merged into the base, sharded safetensors for transformers and vLLM"
    quantizations = ("bf16", "fp16", "fp32")
    default_quantization = "bf16"
    quantization_aliases = {"bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "half": "fp16", "float32": "fp32", "f32": "fp32"}

    def unavailable_reason(self):
        return _missing("torch", "transformers", "peft", "safetensors")

    def export(self, run, out_dir: Path, quantization: str | None, max_shard_size: str | int | None = None) -> ExportResult:
        from qtune.merge import DEFAULT_SHARD_SIZE, write_merged_16bit

        quant = quantization or self.default_quantization
        files = write_merged_16bit(run, out_dir, quant, max_shard_size)
        shards = [p.name for p in files if p.suffix == ".safetensors"]
        return ExportResult(self.name, Path(out_dir), files,
                            {"dtype": quant, "shards": len(shards), "max_shard_size": str(max_shard_size or DEFAULT_SHARD_SIZE)})

    def verify(self, run, result: ExportResult):
        from qtune.verify import export_device, verify_hf_model

        def load():
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            # Weights as exported, computed in float32: the check is about the files, not about
            # 16-bit arithmetic (which differs between runtimes anyway).
            remote = run.config.model.trust_remote_code
            model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32, device_map={"": export_device()},
                                                         trust_remote_code=remote)
            return model, AutoTokenizer.from_pretrained(result.path, trust_remote_code=remote)

        return verify_hf_model(run, self.name, result.details.get("quant"), load)


class Merged4bitExporter(Exporter):
    name = "merged-4bit"
    description = "adapter merged, then bitsandbytes NF4 (double quantization) saved with transformers"
    quantizations = ("nf4",)
    default_quantization = "nf4"

    def unavailable_reason(self):
        return _missing("torch", "transformers", "peft", "bitsandbytes")

    def export(self, run, out_dir: Path, quantization: str | None) -> ExportResult:
        import torch

        from qtune.merge import write_merged_4bit
        from qtune.verify import export_device

        device = export_device()
        if device == "cpu" or (device.startswith("cuda") and torch.cuda.is_bf16_supported()):
            compute = "bfloat16"
        else:
            compute = "float16"
        files = write_merged_4bit(run, out_dir, compute, device)
        return ExportResult(self.name, Path(out_dir), files, {"quant_type": "nf4", "double_quant": True, "compute_dtype": compute})

    def verify(self, run, result: ExportResult):
        """Against what the run trained: for a QLoRA run the NF4 base + adapter (the same
        BitsAndBytesConfig rebuilt, :func:`qtune.verify.training_quantization`), else the
        32-bit base + adapter."""
        from qtune.verify import disable_bnb_cpu_repacking, export_device, training_quantization, verify_hf_model

        def load():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            remote = run.config.model.trust_remote_code
            model = AutoModelForCausalLM.from_pretrained(result.path, device_map={"": export_device()}, trust_remote_code=remote)
            disable_bnb_cpu_repacking(model)  # the kernels the reference uses
            return model, AutoTokenizer.from_pretrained(result.path, trust_remote_code=remote)

        return verify_hf_model(run, self.name, result.details.get("quant"), load, runtime="transformers + bitsandbytes",
                               quantization=training_quantization(run))


class GGUFExporter(Exporter):
    name = "gguf"
    description = "llama.cpp / Ollama file with the run's chat template and a Modelfile (llama-cpp-python)"
    default_quantization = "q8_0"

    def __init__(self) -> None:
        from qtune.gguf import GGUF_QUANTS, QUANT_ALIASES

        self.quantizations = tuple(GGUF_QUANTS)
        self.quantization_aliases = dict(QUANT_ALIASES)

    def unavailable_reason(self):
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed; install it with: pip install 'qtune[gguf]'"
        return _missing("torch", "transformers", "peft")

    def export(self, run, out_dir: Path, quantization: str | None, llama_cpp_dir: str | Path | None = None) -> ExportResult:
        from qtune.gguf import write_gguf

        quant = quantization or self.default_quantization
        files, details = write_gguf(run, out_dir, quant, llama_cpp_dir)
        return ExportResult(self.name, Path(out_dir), files, details)

    def verify(self, run, result: ExportResult):
        from qtune.gguf import verify_gguf

        return verify_gguf(run, Path(result.details["gguf"]), result.details.get("quant"))


@hookimpl
def register_exporters(register):
    register(LoraExporter())
    register(Merged16bitExporter())
    register(Merged4bitExporter())
    register(GGUFExporter())
