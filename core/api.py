"""qtune's plugin API: everything a plugin needs, in one module.

Built-in plugins and the examples import from here and nowhere else in qtune (a test enforces it),
so a third-party plugin written against this module uses exactly what the built-ins use. Importing
it loads no ML library.
"""

from .errors import ConfigError, QtuneError, describe, first_line
from .fsutil import atomic_dir, atomic_file, check_free_space, read_json_dict
from .hookspecs import hookimpl
from .models import cache_dir
from .run import FinishedRun, RunContext
from .types import Backend, DatasetLoader, Exporter, ExportResult, ModelEntry, PromptTemplate, TrainingCallback

__all__ = [
    "Backend", "ConfigError", "DatasetLoader", "ExportResult", "Exporter", "FinishedRun", "ModelEntry",
    "PromptTemplate", "QtuneError", "RunContext", "TrainingCallback", "atomic_dir", "atomic_file", "cache_dir",
    "check_free_space", "describe", "first_line", "hookimpl", "read_json_dict",
]
