"""The plugin examples in docs/plugins.md, run as a stranger would use them: each file copied out of
the docs into a plugin folder, then a real run that uses every one of them, an export whose verify
passes, the same exporter broken so that its verify fails, and plugins that fail in each place."""

from __future__ import annotations

import csv
import functools
import json

import pytest
from test_docs import doc_examples

from helpers import ALPACA_ROWS, one_line_error, read_metrics, run_qtune, tiny_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("doc-plugins")
    for name, code in doc_examples().items():
        (folder / name).write_text(code, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory, tiny_qwen_dir, plugin_dir):
    """A tiny LoRA run with the docs' template, loader, backend, callback and tracker."""
    tmp = tmp_path_factory.mktemp("doc-run")
    data = tmp / "qa.txt"
    data.write_text("".join(f"{row['instruction']}\t{row['output']}\n" for row in ALPACA_ROWS), encoding="utf-8")
    config = tiny_run_config(tmp, tiny_qwen_dir, data, name="docs", template="vicuna-docs",
                             model={"backend": "fp32-docs"}, dataset={"loader": "qa-lines"},
                             training={"max_steps": 3, "report_to": ["csv"]}, callbacks=["memory_monitor", {"name": "loss_csv", "options": {"filename": "losses.csv"}}])
    result = run_qtune("run", config, "--no-progress", env={"QTUNE_PLUGINS_DIR": str(plugin_dir)})
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "runs" / "docs"


def test_the_examples_register_what_the_docs_say(plugin_dir):
    result = run_qtune("plugins", env={"QTUNE_PLUGINS_DIR": str(plugin_dir)})
    assert result.returncode == 0, result.stderr
    for name in ("vicuna-docs", "qa-lines", "turns", "my-qwen-0.5b", "fp32-docs", "loss_csv", "csv", "lora-fp16"):
        assert name in result.stdout
    models = json.loads(run_qtune("models", "--json", env={"QTUNE_PLUGINS_DIR": str(plugin_dir)}).stdout)
    mine = next(row for row in models if row["name"] == "my-qwen-0.5b")
    # Qwen2.5-0.5B: 494M weights (Qwen's model card says 0.49B)
    assert mine["params_b"] == 0.49 and mine["source"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_a_run_with_the_docs_template_loader_backend_and_callback(doc_run):
    config = (doc_run / "config.yaml").read_text()
    assert "backend: fp32-docs" in config and "template: vicuna-docs" in config
    losses = [float(row["loss"]) for row in csv.DictReader((doc_run / "losses.csv").open())]
    assert losses == [record["loss"] for record in read_metrics(doc_run) if "loss" in record]
    assert len(losses) == 3
    summary = json.loads((doc_run / "summary.json").read_text())
    assert summary["loss_csv"].endswith("losses.csv")


def test_the_docs_tracker_gets_what_the_trainer_logs(doc_run):
    logged = {}
    for row in csv.DictReader((doc_run / "log.csv").open()):
        logged.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    records = read_metrics(doc_run)
    # the tracker's numbers are the ones metrics.jsonl holds, qtune's tokens/s and memory included
    for key in ("loss", "learning_rate", "tokens_per_second", "memory_gib"):
        expected = [(m["step"], m[key]) for m in records if key in m]
        assert len(expected) == 3 and [s for s, _ in logged[key]] == [s for s, _ in expected], key
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(logged[key], expected, strict=True)), key


def test_the_docs_command_counts_the_adapter(doc_run, plugin_dir):
    result = run_qtune("adapter-size", doc_run, env={"QTUNE_PLUGINS_DIR": str(plugin_dir)})
    assert result.returncode == 0, result.stderr
    # r=8 on the seven projections of the tiny Qwen2 (hidden 256, 2 of 4 heads' width for k/v = 128,
    # intermediate 512), 2 layers: r * (in + out) per module
    per_layer = 8 * ((256 + 256) + (256 + 128) + (256 + 128) + (256 + 256) + (256 + 512) + (256 + 512) + (512 + 256))
    assert result.stdout.strip() == f"{2 * per_layer} LoRA weights"


def test_the_docs_exporter_verifies_in_transformers(doc_run, plugin_dir):
    result = run_qtune("export", doc_run, "--format", "lora-fp16", env={"QTUNE_PLUGINS_DIR": str(plugin_dir)})
    assert result.returncode == 0, result.stderr
    record = json.loads((doc_run / "exports" / "exports.json").read_text())["lora-fp16"]
    assert record["verify"]["passed"] is True and record["verify"]["top1_agreement"] >= 0.97
    from safetensors.torch import load_file

    tensors = load_file(doc_run / "exports" / "lora-fp16" / "adapter_model.safetensors")
    assert {str(t.dtype) for t in tensors.values()} == {"torch.float16"}


def test_a_broken_export_fails_its_verify_with_one_line(doc_run, tmp_path):
    broken = tmp_path / "plugins"
    broken.mkdir()
    for name, code in doc_examples().items():
        if name == "lora_fp16_export.py":
            assert "v.half()" in code
            # An exporter bug: the adapter's weights scaled while converting. The files load fine;
            # only the comparison with the trained model can tell.
            code = code.replace("v.half()", "(v * 30).half()")
        (broken / name).write_text(code, encoding="utf-8")
    result = run_qtune("export", doc_run, "--format", "lora-fp16", "--out", tmp_path / "out",
                       env={"QTUNE_PLUGINS_DIR": str(broken)})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    # the progress and the verify table come first; the error is the last line, and names the check
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: verification of the lora-fp16 export failed") and "top-1 agreement" in line, result.stderr
    record = json.loads((doc_run / "exports" / "exports.json").read_text())["out"]
    assert record["verify"]["passed"] is False


FAILING = {
    "register": ("from qtune.api import hookimpl\n\n@hookimpl\ndef register_templates(register):\n    raise KeyError('oops')\n",
                 ["plugins"], "failed in register_templates: KeyError: 'oops'"),
    "import": ("import qtune_no_such_module\n", ["plugins"], "failed in loading: ModuleNotFoundError"),
    "loader": ("from qtune.api import DatasetLoader, hookimpl\n\nclass L(DatasetLoader):\n    name = 'bad'\n"
               "    def load(self, spec):\n        return 1 / 0\n\n"
               "@hookimpl\ndef register_dataset_loaders(register):\n    register(L())\n",
               ["validate", "{config}", "--set", "dataset.loader=bad"],
               "failed in loading the dataset with loader 'bad': ZeroDivisionError: division by zero"),
    "data format": ("from qtune.api import DataFormat, hookimpl\n\nclass F(DataFormat):\n    name = 'bad'\n"
                    "    def detect(self, columns, fields, first_row):\n        return first_row['nope']\n\n"
                    "@hookimpl\ndef register_data_formats(register):\n    register(F())\n",
                    ["validate", "{config}"], "failed in detecting the 'bad' format: KeyError: 'nope'"),
    "tracker": ("from qtune.api import Tracker, hookimpl\n\nclass T(Tracker):\n    name = 'bad'\n"
                "    def callbacks(self, run):\n        return 1 / 0\n\n"
                "@hookimpl\ndef register_trackers(register):\n    register(T())\n",
                ["run", "{config}", "--no-progress", "--set", "training.report_to=bad", "--set", "training.output_dir={out}"],
                "failed in starting tracker 'bad': ZeroDivisionError: division by zero"),
    "export": ("from qtune.api import Exporter, hookimpl\n\nclass E(Exporter):\n    name = 'bad'\n"
               "    def export(self, run, out_dir, quantization):\n        return 1 / 0\n\n"
               "@hookimpl\ndef register_exporters(register):\n    register(E())\n",
               ["export", "{run}", "-f", "bad"], "failed in exporting bad: ZeroDivisionError: division by zero"),
    "verify": ("from pathlib import Path\nfrom qtune.api import Exporter, ExportResult, atomic_dir, hookimpl\n\n"
               "class E(Exporter):\n    name = 'bad'\n    def export(self, run, out_dir, quantization):\n"
               "        with atomic_dir(out_dir) as tmp:\n            (tmp / 'x').write_text('x')\n"
               "        return ExportResult(self.name, Path(out_dir))\n"
               "    def verify(self, run, result):\n        return {'passed': False}\n\n"
               "@hookimpl\ndef register_exporters(register):\n    register(E())\n",
               ["export", "{run}", "-f", "bad", "--out", "{out}"], "returned dict from verify(); it must return a qtune.api.VerifyReport"),
}


@pytest.mark.parametrize("where", sorted(FAILING))
def test_a_failing_plugin_ends_in_one_line_naming_it(where, doc_run, tmp_path):
    code, args, expected = FAILING[where]
    (tmp_path / "broken_plugin.py").write_text(code, encoding="utf-8")
    env = {"QTUNE_PLUGINS_DIR": str(tmp_path)}

    def command(attempt):
        tokens = {"{run}": str(doc_run), "{out}": str(tmp_path / f"out-{attempt}"), "{config}": str(config)}
        return [functools.reduce(lambda text, token: text.replace(token, tokens[token]), tokens, a) for a in args]

    # a config of the built-ins alone, on the docs run's base model and Alpaca rows
    import yaml

    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ALPACA_ROWS), encoding="utf-8")
    base = yaml.safe_load((doc_run / "config.yaml").read_text())["model"]["name"]
    config = tiny_run_config(tmp_path, base, data)

    result = run_qtune(*command(1), env=env)
    if where == "verify":  # the export itself succeeded and said so; the error is the last line
        assert result.returncode != 0 and "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
    else:
        line = one_line_error(result)
    assert f"plugin {str(tmp_path / 'broken_plugin.py')!r} (distribution (plugin dir))" in line
    assert expected in line
    debug = run_qtune("--debug", *command(2), env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and expected in debug.stderr


TURNS_ROWS = [
    {"system": "Be brief.", "turns": ["Hi", "Hello!", "What is 2+2?", "4"]},
    {"system": "", "turns": ["Name a colour.", "Blue."]},
    {"system": "", "turns": ["Only a question"]},
    {"system": "", "turns": ["Q", "  "]},
]


def test_the_docs_data_format_reads_conversations(plugin_dir, tiny_qwen_dir, tmp_path):
    # A JSONL file nobody mapped: `dataset.format: auto` takes the docs' turns format from its column.
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TURNS_ROWS), encoding="utf-8")
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, template="chatml")
    env = {"QTUNE_PLUGINS_DIR": str(plugin_dir), "COLUMNS": "200"}
    result = run_qtune("validate", config, "--show", "1", env=env)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in out, out
    # the format's own finding, and the core's order check on a row the format found nothing wrong with
    assert "row 3" in out and "has an empty turn (turn 1)" in out, out
    assert "row 2" in out and "has no assistant turn" in out, out
    assert "row 0" not in out and "row 1" not in out
    # the good rows alone validate, and --show renders the first as ChatML with its system message
    data.write_text("".join(json.dumps(row) + "\n" for row in TURNS_ROWS[:2]), encoding="utf-8")
    result = run_qtune("validate", config, "--show", "1", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<|im_start|>system" in result.stdout and "What is 2+2?" in result.stdout


def test_a_format_that_returns_an_unknown_role_is_caught_by_the_core(tiny_qwen_dir, tmp_path):
    # A third party's slip: the docs' turns format with its assistant role misspelt. The core checks
    # the roles of every format's rows, so validate names the row instead of training on it.
    code = doc_examples()["turns_format.py"]
    assert '"assistant"' in code
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "turns_format.py").write_text(code.replace('"assistant"', '"asistant"'), encoding="utf-8")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TURNS_ROWS[:2]), encoding="utf-8")
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, template="chatml")
    result = run_qtune("validate", config, env={"QTUNE_PLUGINS_DIR": str(plugins), "COLUMNS": "200"})
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in out, out
    assert "row 0" in out and "message 2 has role 'asistant'; roles are system, user, assistant, tool" in out, out
    assert "row 1" in out and "message 1 has role 'asistant'" in out, out
