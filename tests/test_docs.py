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


# --------------------------------------------------------------------------- the plugin API boundary

ROOT = DOCS.parent
EXAMPLE_HEADER = "# file: "


def doc_examples() -> dict[str, str]:
    """The complete plugin files in docs/plugins.md: python blocks that open with ``# file: NAME.py``."""
    blocks = (DOCS / "plugins.md").read_text().split("```python\n")[1:]
    files = {}
    for block in blocks:
        code = block.split("```", 1)[0]
        if code.startswith(EXAMPLE_HEADER):
            name, _, body = code.partition("\n")
            files[name[len(EXAMPLE_HEADER):].strip()] = body
    return files


def qtune_imports(source: str) -> list[str]:
    """Every qtune module a piece of source imports (``import qtune.x``, ``from qtune.x import y``)."""
    import ast

    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [name for name in names if name == "qtune" or name.startswith("qtune.")]


def plugin_sources() -> dict[str, str]:
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "plugins").glob("*.py"))}
    sources |= {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "examples").glob("*/*.py"))}
    sources |= {f"docs/plugins.md:{name}": code for name, code in doc_examples().items()}
    return sources


def test_built_in_plugins_examples_and_docs_import_only_the_plugin_api():
    sources = plugin_sources()
    assert len([s for s in sources if s.startswith("plugins/")]) >= 10
    assert len(doc_examples()) == len(HOOKS), "one complete example per hook in docs/plugins.md"
    outside = {name: [m for m in qtune_imports(code) if m != "qtune.api"] for name, code in sources.items()}
    assert not {name: mods for name, mods in outside.items() if mods}, "plugins may import only qtune.api"


def test_the_boundary_check_sees_a_private_import():
    assert qtune_imports("from qtune.verify import compare\nimport qtune.api") == ["qtune.verify", "qtune.api"]


def test_every_plugin_api_name_is_documented():
    from qtune import api

    text = (DOCS / "plugins.md").read_text()
    undocumented = [name for name in api.__all__ if f"`{name}" not in text]
    assert not undocumented, f"docs/plugins.md's table lacks {undocumented}"
    assert sorted(api.__all__) == sorted(name for name in vars(api) if not name.startswith("_") and name != "annotations")


def _cpu_figures():
    import importlib.util

    path = DOCS.parent / "benchmarks" / "cpu_figures.py"
    spec = importlib.util.spec_from_file_location("cpu_figures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_figures_the_docs_quote_are_the_measured_ones():
    """README.md's demo figures and docs/export.md's export table are the blocks benchmarks/cpu_figures.py
    renders from its committed measurement: rerun it with --write rather than editing them."""
    import json

    figures_script = _cpu_figures()
    rendered = figures_script.blocks(json.loads(figures_script.RESULTS.read_text()))
    found = {}
    for doc in figures_script.DOCS:
        for name, body in figures_script.marked_blocks(doc.read_text(encoding="utf-8")).items():
            assert body == rendered.get(name), f"{doc.name}: the figures:{name} block differs from benchmarks/results/cpu_figures.json"
            found[name] = doc.name
    assert set(found) == {"demo", "demo-output", "chat-demo", "exports", "gguf-verify"}, found

