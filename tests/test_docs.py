"""Docs that cannot drift: every hook in hookspecs.py has a section in docs/plugins.md with its
exact signature, and the README's commands exist."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from qtune import hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs"
HOOKS = [name for name, value in vars(hookspecs).items() if callable(value) and name.startswith("register_")]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_documented_section(hook):
    signature = f"{hook}{inspect.signature(getattr(hookspecs, hook))}"
    assert f"### {signature}\n" in (DOCS / "plugins.md").read_text(), f"docs/plugins.md lacks '### {signature}'"


def test_docs_name_no_hook_that_does_not_exist():
    documented = [line[4:].split("(")[0] for line in (DOCS / "plugins.md").read_text().splitlines() if line.startswith("### ")]
    assert sorted(documented) == sorted(HOOKS)


def config_keys():
    from pydantic import BaseModel

    from qtune.config import Config

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from walk(annotation, f"{prefix}{name}.")
            else:
                yield prefix + name

    return list(walk(Config))


def test_every_config_key_is_documented():
    text = (DOCS / "config.md").read_text()
    missing = [key for key in config_keys() if f"| `{key}` |" not in text]
    assert not missing, f"docs/config.md lacks {missing}"
