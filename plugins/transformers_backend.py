"""The transformers + peft backend: runs anywhere torch runs (4-bit through bitsandbytes on CUDA,
plain weights on CPU)."""

from __future__ import annotations

from pathlib import Path

from qtune.api import Backend, hookimpl, missing_modules, nf4_config

from .varlen import model_varlen_reason, profile_varlen_reason, register_transformers_varlen


def resolve_dtype(name: str):
    """The torch dtype for model.dtype: auto is bf16 where the GPU supports it, fp16 on older GPUs,
    and fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _fsdp() -> bool:
    """Whether this process trains under FSDP (qtune's fsdp strategy or accelerate launch's FSDP config set it)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def _device_map():
    """Where the weights go: this process's GPU (LOCAL_RANK's, on several processes); the CPU
    without one. Under FSDP (accelerate sets ACCELERATE_USE_FSDP) on the CPU first: FSDP moves each
    shard to its GPU, so no GPU ever holds the whole model."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    if _fsdp():
        return None
    return {"": torch.cuda.current_device() if os.environ.get("LOCAL_RANK") else 0}


class TransformersBackend(Backend):
    name = "transformers"
    description = "transformers + peft (+ bitsandbytes 4-bit on CUDA); CPU and any GPU"
    auto_priority = 10  # runs wherever torch does: the fallback for `auto`
    strategies = ("ddp", "fsdp")

    def unavailable_reason(self, config):
        return missing_modules("torch", "transformers", "peft")

    def _quantization(self, config, dtype):
        import torch

        if not (config.model.load_in_4bit and torch.cuda.is_available()):
            return None
        quantization = nf4_config(dtype)  # exports and their verification rebuild the same 4-bit base
        if _fsdp():
            # FSDP shards flat tensors of one dtype: the packed 4-bit weights are stored in the compute
            # dtype, as the FSDP-QLoRA recipe does (same bytes, so the same memory)
            quantization.bnb_4bit_quant_storage = dtype
        return quantization

    def varlen_reason(self, config, shape):
        return profile_varlen_reason(config, shape)

    def _attention_implementation(self, config, model_path, dtype) -> str:
        """transformers' SDPA, or qtune's varlen function where ``model.attention: varlen`` and the
        model and machine allow it (``self._attention`` says which, and why not)."""
        self._attention = "default (sdpa)"
        if config.model.attention != "varlen":
            return "sdpa"
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
        why_not = model_varlen_reason(model_config, dtype)
        if why_not:
            self._attention = f"default (sdpa); varlen not used: {why_not}"
            return "sdpa"
        name = register_transformers_varlen()
        self._attention = f"varlen ({name}: one torch varlen_attn call per layer on packed batches, sdpa otherwise)"
        return name

    def attention_in_use(self, model, config):
        return getattr(self, "_attention", None)

    def load(self, config, model_path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = resolve_dtype(config.model.dtype)
        quantization = self._quantization(config, dtype)
        attention = self._attention_implementation(config, model_path, dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype,
            quantization_config=quantization,
            device_map=_device_map(),
            trust_remote_code=config.model.trust_remote_code,
            use_safetensors=True,  # never unpickle .bin weights
            attn_implementation=attention,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
        return model, tokenizer

    def add_lora(self, model, config):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        checkpointing = config.lora.gradient_checkpointing is not False
        # Under FSDP the 4-bit weights are stored in the compute dtype and FSDP shards every weight:
        # prepare_model_for_kbit_training would cast the norms to float32, so it is left out there
        # (as in the FSDP-QLoRA recipe) and checkpointing is turned on as for a 16-bit model.
        if getattr(model, "is_loaded_in_4bit", False) and not _fsdp():
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif checkpointing:
            # "unsloth" checkpointing is Unsloth's; here it means torch's non-reentrant checkpointing.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            bias=config.lora.bias,
            target_modules=list(config.lora.target_modules),
            use_rslora=config.lora.use_rslora,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)

    def load_trained(self, config, model_path, adapter_dir: Path):
        from peft import PeftModel
        from transformers import AutoTokenizer

        model, _ = self.load(config, model_path)
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        model = PeftModel.from_pretrained(model, adapter_dir)
        return model, tokenizer

    def for_inference(self, model):
        model.eval()
        return model


@hookimpl
def register_backends(register):
    register(TransformersBackend())
