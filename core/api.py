"""qtune's plugin API: everything a plugin needs, in one module (docs/plugins.md documents each name).

Built-in plugins and the examples import from here and nowhere else in qtune (a test enforces it),
so a third-party plugin written against this module uses exactly what the built-ins use. Importing
it loads no ML library: the functions import torch, transformers or peft when called.
"""

# Variable-length attention for packed batches (qtune.attention): the kernel with torch 2.12's
# signature, whether a loaded model can use it here, and its transformers registration.
from .attention import model_varlen_reason, register_transformers_varlen, varlen_attention

# The hook marker, and the objects the register_* hooks take.
# The machine: packages, GPUs, memory.
from .backends import cuda_device_count, cuda_total_memory_gib, current_memory_gib, missing_modules

# A conversation as a chat template trains it: ids and labels (exporters check their templates with it).
from .data import tokenize_chat_example

# Failing well: a QtuneError is printed as one line; describe/first_line quote a library's exception.
from .errors import ConfigError, QtuneError, describe, first_line

# Writing files so that a crash leaves nothing half-written; qtune's cache folder.
from .fsutil import atomic_dir, atomic_file, check_free_space, read_json_dict
from .hookspecs import hookimpl

# The base model's 4-bit quantization (QLoRA) and the merged model full-weight exporters start from.
from .merge import DEFAULT_SHARD_SIZE, load_merged, prepare_tokenizer, save_merged, weights_bytes
from .models import cache_dir

# Model shapes and the memory estimate behind the catalogue and the fast profile.
from .profiles import FUSED_KERNELS, PLAIN_KERNELS, MemoryTraits, ModelShape, seed_memory_gib
from .quantization import DTYPES, disable_bnb_cpu_repacking, nf4_config, torch_dtype, training_quantization

# What a run looks like to callbacks (RunContext) and to exporters and commands (FinishedRun).
from .run import FinishedRun, RunContext
from .types import Backend, ChatTemplate, DatasetLoader, Exporter, ExportResult, ModelEntry, PromptTemplate, TrainingCallback

# Verifying an export against the trained model.
from .verify import (
    PromptResult,
    Reference,
    VerifyReport,
    export_device,
    free_memory,
    reference_dtype,
    verify_hf_model,
    verify_with,
)

__all__ = [
    "DEFAULT_SHARD_SIZE", "DTYPES", "FUSED_KERNELS", "MemoryTraits", "PLAIN_KERNELS", "Backend", "ChatTemplate", "ConfigError", "DatasetLoader", "ExportResult", "Exporter", "FinishedRun",
    "ModelEntry", "ModelShape", "PromptResult", "PromptTemplate", "QtuneError", "Reference", "RunContext", "TrainingCallback",
    "VerifyReport", "atomic_dir", "atomic_file", "cache_dir", "check_free_space", "cuda_device_count", "cuda_total_memory_gib",
    "current_memory_gib", "describe", "disable_bnb_cpu_repacking", "export_device", "first_line", "free_memory", "hookimpl",
    "load_merged", "missing_modules", "model_varlen_reason", "register_transformers_varlen", "varlen_attention", "nf4_config",
    "prepare_tokenizer", "read_json_dict", "reference_dtype", "save_merged",
    "seed_memory_gib", "tokenize_chat_example", "torch_dtype", "training_quantization", "verify_hf_model", "verify_with", "weights_bytes",
]
