"""The plugin manager with real plugins: built-ins, an installed third-party package, failures."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qtune import hookimpl
from qtune.errors import QtuneError
from qtune.plugin_manager import BUILTIN_PLUGINS, PluginHost, get_host, reset_host
from qtune.types import PromptTemplate
from qtune_cli.main import cli


@pytest.fixture(autouse=True)
def fresh_host(monkeypatch):
    reset_host()
    yield
    reset_host()


def test_builtins_are_plugins_registered_through_the_hooks():
    host = get_host()
    names = {name for name, _ in host.pm.list_name_plugin()}
    assert set(BUILTIN_PLUGINS) <= names
    assert {"alpaca", "chatml"} <= set(host.templates)
    assert {"hub", "alpaca-cleaned", "files", "demo-tasks"} <= set(host.dataset_loaders)
    assert "transformers" in host.backends and "memory_monitor" in host.callbacks
    assert host.templates.owners["alpaca"] == "qtune.plugins.templates"


def test_installed_third_party_template_is_found_through_its_entry_point():
    host = get_host()
    assert "vicuna" in host.templates
    assert host.templates.owners["vicuna"] == "vicuna"
    example = {"instruction": "Hi", "output": "Hello"}
    assert host.templates.get("vicuna").render_prompt(example).endswith("USER: Hi ASSISTANT:")


def test_plugins_command_lists_distribution_version_and_hooks():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["vicuna"]["distribution"] == "qtune-template-vicuna"
    assert rows["vicuna"]["version"] == "0.1.0"
    assert rows["vicuna"]["hooks"] == ["register_templates"]
    assert rows["qtune.plugins.templates"]["distribution"] == "qtune (built-in)"


def test_load_plugins_variable_limits_installed_plugins(monkeypatch):
    monkeypatch.setenv("QTUNE_LOAD_PLUGINS", "")
    assert "vicuna" not in get_host().templates
    reset_host()
    monkeypatch.setenv("QTUNE_LOAD_PLUGINS", "qtune-template-vicuna")
    assert "vicuna" in get_host().templates


class Duplicate:
    class Alpaca2(PromptTemplate):
        name = "alpaca"

    @staticmethod
    @hookimpl
    def register_templates(register):
        register(Duplicate.Alpaca2())


class Broken:
    @staticmethod
    @hookimpl
    def register_exporters(register):
        raise RuntimeError("boom")


def test_a_name_taken_twice_is_refused_naming_both_plugins():
    with pytest.raises(QtuneError) as info:
        PluginHost(load_installed=False, extra_plugins={"dupe-plugin": Duplicate})
    assert "'dupe-plugin'" in str(info.value) and "'qtune.plugins.templates'" in str(info.value)


def test_a_plugin_that_raises_is_named():
    with pytest.raises(QtuneError) as info:
        PluginHost(load_installed=False, extra_plugins={"broken-plugin": Broken})
    assert "plugin 'broken-plugin' (distribution (registered in code)) failed in register_exporters: RuntimeError: boom" in str(info.value)


def test_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "bad_plugin.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.setenv("QTUNE_PLUGINS_DIR", str(tmp_path))
    with pytest.raises(QtuneError) as info:
        get_host()
    assert "bad_plugin.py" in str(info.value) and "ModuleNotFoundError" in str(info.value)


def test_plugins_dir_loads_a_local_plugin(tmp_path, monkeypatch):
    (tmp_path / "shout.py").write_text(
        "from qtune.api import PromptTemplate, hookimpl\n"
        "class Shout(PromptTemplate):\n    name = 'shout'\n    fields = ('instruction', 'output')\n"
        "    def render_prompt(self, e): return e['instruction'].upper() + '\\n'\n"
        "    def render_completion(self, e): return e['output']\n"
        "@hookimpl\ndef register_templates(register):\n    register(Shout())\n"
    )
    monkeypatch.setenv("QTUNE_PLUGINS_DIR", str(tmp_path))
    assert get_host().templates.get("shout").render_prompt({"instruction": "hi"}) == "HI\n"


def test_trace_variable_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("QTUNE_TRACE_PLUGINS", "1")
    get_host()
    assert "register_templates" in capsys.readouterr().err


class CommandAdder:
    @staticmethod
    @hookimpl
    def register_commands(cli):
        import click

        @cli.command(name="hello-plugin")
        def hello():
            """Say hello from a plugin."""
            click.echo("hello from a plugin command")


class BrokenCommands:
    @staticmethod
    @hookimpl
    def register_commands(cli):
        raise RuntimeError("no commands today")


def test_plugins_add_commands_to_the_cli():
    import click

    group = click.Group()
    PluginHost(load_installed=False, extra_plugins={"adder": CommandAdder}).add_commands(group)
    result = CliRunner().invoke(group, ["hello-plugin"])
    assert result.output == "hello from a plugin command\n"


def test_a_plugin_failing_to_add_commands_is_named():
    import click

    host = PluginHost(load_installed=False, extra_plugins={"broken-commands": BrokenCommands})
    with pytest.raises(QtuneError) as info:
        host.add_commands(click.Group())
    assert "plugin 'broken-commands' (distribution (registered in code)) failed in register_commands: RuntimeError: no commands today" in str(
        info.value)


def test_progress_bar_redraws_once_per_step_without_a_refresh_thread():
    """The Rich progress callback draws step, loss, lr and memory on each step, and runs no 10 Hz
    refresh thread that would take the GIL from a host-bound training loop."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    buffer = io.StringIO()
    run = SimpleNamespace(console=Console(file=buffer, force_terminal=True, width=80), total_steps=3)
    progress = get_host().callbacks.get("rich_progress")()
    progress.on_train_start(run)
    assert progress.live._refresh_thread is None
    for step in (1, 2, 3):
        progress.on_step_end(run, step, {"loss": 1.0 / step, "learning_rate": 2e-4, "tokens_per_second": 1234.0})
    progress.on_train_end(run)
    from rich.text import Text

    frames = Text.from_ansi(buffer.getvalue()).plain.splitlines()
    last = [line for line in frames if line.strip()][-1]
    assert "3/3" in last and "loss 0.3333" in last and "lr 2.0e-04" in last and "1,234 tok/s" in last and "GiB" in last
    assert len(last) <= 80


def test_an_installed_plugin_failing_at_export_names_its_distribution(tmp_path, monkeypatch):
    """The real installed qtune-export-modelcard package, made to fail inside export()."""
    from qtune.api import FinishedRun
    from qtune.export import export_run

    host = get_host()
    exporter = host.exporters.get("modelcard")
    monkeypatch.setattr(type(exporter), "export", lambda self, run, out_dir, quantization: {}["missing"])
    run = FinishedRun(tmp_path, None)
    with pytest.raises(QtuneError) as info:
        export_run(run, "modelcard", verify=False, out=tmp_path / "card")
    assert str(info.value).startswith(
        "plugin 'modelcard' (distribution qtune-export-modelcard 0.1.0) failed in exporting modelcard: KeyError: 'missing'; "
        "fix the plugin, `pip uninstall qtune-export-modelcard`, or leave it out with QTUNE_LOAD_PLUGINS")
    assert isinstance(info.value.__cause__, KeyError)  # kept for --debug
    assert not (tmp_path / "card").exists()


def test_auto_backend_takes_the_highest_priority_that_can_run(monkeypatch):
    from qtune.backends import choose_backend
    from qtune.config import Config

    config = Config.model_validate({"model": {"backend": "auto"}})
    monkeypatch.delenv("QTUNE_UNSLOTH_ALLOW_CPU", raising=False)
    assert choose_backend(config).name == "transformers"  # no GPU here: unsloth (20) cannot run
    monkeypatch.setenv("QTUNE_UNSLOTH_ALLOW_CPU", "1")
    assert choose_backend(config).name == "unsloth"
