"""qtune's plugin API: everything a plugin needs, in one module.

Built-in plugins and the examples import from here and nowhere else in qtune (a test enforces it),
so a third-party plugin written against this module uses exactly what the built-ins use. Importing
it loads no ML library.
"""

from .errors import ConfigError, QtuneError, describe, first_line
from .fsutil import atomic_dir, atomic_file, check_free_space, read_json_dict
from .hookspecs import hookimpl
from .memory import GIB, cuda_if_present, current_memory_gib, peak_rss_gib
from .models import cache_dir
from .run import ADAPTER_DIR, RUNNING_FILE, FinishedRun, RunContext
from .training import CHECKPOINTS_DIR, last_complete_checkpoint
from .types import Backend, DatasetLoader, Exporter, ExportResult, ModelEntry, PromptTemplate, TrainingCallback

__all__ = [
    "Backend", "ConfigError", "DatasetLoader", "ExportResult", "Exporter", "FinishedRun", "ModelEntry",
    "PromptTemplate", "QtuneError", "RunContext", "TrainingCallback", "atomic_dir", "atomic_file", "cache_dir",
    "check_free_space", "describe", "first_line", "hookimpl", "read_json_dict",
    "GIB", "cuda_if_present", "current_memory_gib", "peak_rss_gib",
    "ADAPTER_DIR", "CHECKPOINTS_DIR", "RUNNING_FILE", "last_complete_checkpoint",
]
