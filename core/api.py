"""qtune's plugin API: everything a plugin needs, in one module (docs/plugins.md documents each name).

Built-in plugins and the examples import from here and nowhere else in qtune (a test enforces it),
so a third-party plugin written against this module uses exactly what the built-ins use. Importing
it loads no ML library: the functions import torch, transformers or peft when called.

What is here, by module: the hook marker (hookspecs) and the objects the register_* hooks take
(types); what a run looks like to callbacks (RunContext) and to exporters and commands (FinishedRun,
run folders); one-line errors (errors); files written so that a crash leaves nothing half-written
(fsutil); the machine (backends: packages and GPUs; memory); model shapes, the memory estimate and
the backends' memory traits (profiles); the base model's 4-bit quantization and the merged model
full-weight exporters start from (quantization, merge); checking an export against the trained model
(verify); the roles a conversation's messages may have (chat) and a conversation as a chat template
trains it (data).
"""

from .backends import cuda_capability, cuda_device_count, cuda_total_memory_gib, missing_modules
from .chat import ROLES
from .data import tokenize_chat_example
from .errors import ConfigError, QtuneError, describe, first_line
from .fsutil import atomic_dir, atomic_file, check_free_space, missing_path_reason, read_json_dict
from .hookspecs import hookimpl
from .memory import GIB, cuda_if_present, current_memory_gib, peak_rss_gib
from .merge import DEFAULT_SHARD_SIZE, load_merged, prepare_tokenizer, save_merged, weights_bytes
from .models import cache_dir
from .profiles import FUSED_KERNELS, PLAIN_KERNELS, MemoryTraits, ModelShape, seed_memory_gib
from .quantization import DTYPES, disable_bnb_cpu_repacking, nf4_config, torch_dtype, training_quantization
from .run import ADAPTER_DIR, CHECKPOINTS_DIR, RUNNING_FILE, FinishedRun, RunContext, last_complete_checkpoint, read_metrics
from .types import (
    Backend,
    ChatTemplate,
    DataFormat,
    DatasetLoader,
    Exporter,
    ExportResult,
    ModelEntry,
    PromptTemplate,
    Tracker,
    TrainingCallback,
)
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
    "ADAPTER_DIR", "CHECKPOINTS_DIR", "DEFAULT_SHARD_SIZE", "DTYPES", "FUSED_KERNELS", "GIB", "PLAIN_KERNELS", "ROLES", "RUNNING_FILE",
    "Backend", "ChatTemplate", "ConfigError", "DataFormat", "DatasetLoader", "ExportResult", "Exporter", "FinishedRun", "MemoryTraits",
    "ModelEntry", "ModelShape", "PromptResult", "PromptTemplate", "QtuneError", "Reference", "RunContext", "Tracker", "TrainingCallback",
    "VerifyReport", "atomic_dir", "atomic_file", "cache_dir", "check_free_space", "cuda_capability", "cuda_device_count", "cuda_if_present",
    "cuda_total_memory_gib", "current_memory_gib", "describe", "disable_bnb_cpu_repacking", "export_device", "first_line",
    "free_memory", "hookimpl", "last_complete_checkpoint", "load_merged", "missing_modules", "missing_path_reason", "nf4_config",
    "peak_rss_gib", "prepare_tokenizer", "read_json_dict", "read_metrics", "reference_dtype", "save_merged",
    "seed_memory_gib", "tokenize_chat_example", "torch_dtype", "training_quantization", "verify_hf_model",
    "verify_with", "weights_bytes",
]
