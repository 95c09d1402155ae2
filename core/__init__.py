"""qtune: LoRA/QLoRA fine-tuning built from plugins."""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402  (plugins write `from qtune import hookimpl`)

__all__ = ["__version__", "hookimpl"]
