"""A corpus of bad inputs. Each case runs the installed `qtune` executable in a fresh process, as a
user would, and must end with one line on stderr, a non-zero exit, no traceback, and nothing
written: the listing of the case's folder is the same before and after, and no run directory
appears. Every case fails before a model's weights load; most before torch is imported.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from helpers import ALPACA_ROWS, model_folder_with_weights, one_line_error, run_qtune, write_jsonl

CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {}


def case(name: str, *needles: str):
    """Register a case: a function (tmp, model_dir) -> (argv, env) that builds its files."""

    def decorate(build):
        CASES[name] = (build, needles)
        return build

    return decorate


def base_config(tmp: Path, model_dir: Path) -> dict:
    data = write_jsonl(tmp / "alpaca.jsonl", ALPACA_ROWS)
    return {
        "name": "tiny",
        "model": {"name": str(model_dir), "backend": "transformers", "max_seq_length": 256, "load_in_4bit": False},
        "lora": {"r": 8, "alpha": 16, "gradient_checkpointing": False},
        "template": "alpaca",
        "dataset": {"path": str(data)},
        "training": {"max_steps": 2, "optim": "adamw_torch", "output_dir": str(tmp / "runs")},
        "callbacks": [],
    }


def config_with(tmp: Path, model_dir: Path, **sections) -> Path:
    config = base_config(tmp, model_dir)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_with(**sections):
    """A case whose config is the base config updated by ``sections``."""
    return lambda tmp, model: (["run", config_with(tmp, model, **sections)], {})


def run_text(text: str | bytes):
    """A case whose config file holds exactly ``text``."""

    def build(tmp, model):
        path = tmp / "config.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return ["run", path], {}

    return build


def with_data(name: str, content: str | bytes, **sections):
    """A case whose dataset is the file ``name`` holding ``content``."""

    def build(tmp, model):
        data = tmp / name
        data.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return ["run", config_with(tmp, model, dataset={"path": str(data)}, **sections)], {}

    return build


def with_plugin(code: str, **sections):
    """A case with QTUNE_PLUGINS_DIR holding one plugin module."""

    def build(tmp, model):
        folder = tmp / "plugins"
        folder.mkdir()
        (folder / "local_plugin.py").write_text(code, encoding="utf-8")
        return ["run", config_with(tmp, model, **sections)], {"QTUNE_PLUGINS_DIR": str(folder)}

    return build


# --------------------------------------------------------------------------- the config file

case("yaml-syntax", "not valid YAML", "line 2")(run_text("training: [1, 2\nlora: {r: 8}\n"))
case("yaml-not-a-mapping", "must hold a mapping")(run_text("- model\n- lora\n"))
case("config-not-utf8", "not UTF-8")(run_text(b"name: caf\xe9\ntraining: {max_steps: 2}\n"))
case("config-missing", "not found", "qtune init")(lambda tmp, model: (["run", tmp / "nope.yaml"], {}))
case("unknown-key", "training.max_stepz", "did you mean 'training.max_steps'")(run_with(training={"max_stepz": 3}))
case("unknown-section", "'modle'", "did you mean 'model'")(run_with(modle={"name": "x"}))
case("wrong-type-string", "training.max_steps", "'ten'")(run_with(training={"max_steps": "ten"}))
case("wrong-type-list", "lora.r")(run_with(lora={"r": [8]}))
case("zero-rank", "lora.r", "greater than 0")(run_with(lora={"r": 0}))
case("negative-batch", "training.per_device_train_batch_size", "greater than 0")(
    run_with(training={"per_device_train_batch_size": -2}))
case("zero-accumulation", "training.gradient_accumulation_steps")(run_with(training={"gradient_accumulation_steps": 0}))
case("negative-learning-rate", "training.learning_rate")(run_with(training={"learning_rate": -0.001}))
case("dropout-out-of-range", "lora.dropout", "less than 1")(run_with(lora={"dropout": 1.5}))
case("limit-zero", "dataset.limit", "greater than 0")(run_with(dataset={"limit": 0}))
case("unknown-dtype", "model.dtype", "bfloat16")(run_with(model={"dtype": "float8"}))
case("absurd-max-seq-length", "model.max_seq_length", "less than or equal")(run_with(model={"max_seq_length": 10**12}))
case("unknown-template", "unknown template 'alpacca'", "did you mean 'alpaca'")(run_with(template="alpacca"))
case("unknown-backend", "unknown backend 'vllm'", "model.backend")(run_with(model={"backend": "vllm"}))
case("unknown-export-format", "unknown export format 'onnx'", "exports[0].format")(run_with(exports=["onnx"]))
case("unknown-callback", "unknown callback 'wandb'")(run_with(callbacks=["wandb"]))
case("unknown-dataset-loader", "unknown dataset loader 's3'")(run_with(dataset={"loader": "s3"}))
case("callback-bad-options", "callbacks[0]", "bad options")(
    run_with(callbacks=[{"name": "memory_monitor", "options": {"every": 5}}]))
case("exact-match-without-eval-rows", "dataset.eval_size")(run_with(evaluation={"exact_match": True}))
case("eval-size-too-large", "dataset.eval_size", "leaves no training rows")(run_with(dataset={"eval_size": 50}))
case("run-name-with-space", "name", "may hold only")(run_with(name="my run"))


@case("set-without-equals", "not KEY=VALUE", "--set training.max_steps=10")
def _(tmp, model):
    return ["run", config_with(tmp, model), "--set", "training.max_steps"], {}


@case("set-into-a-value", "template is not a section")
def _(tmp, model):
    return ["run", config_with(tmp, model), "--set", "template.name=x"], {}


@case("set-unknown-key", "training.batch_size", "per_device_train_batch_size")
def _(tmp, model):
    return ["run", config_with(tmp, model), "--set", "training.batch_size=4"], {}


# --------------------------------------------------------------------------- the data

case("dataset-missing", "dataset.path", "not found")(run_with(dataset={"path": "data/missing.jsonl"}))
case("dataset-empty-jsonl", "is empty")(with_data("data.jsonl", ""))
case("dataset-blank-lines", "dataset.path", "only blank lines")(with_data("data.jsonl", "\n\n\n"))
case("dataset-json-scalar", "dataset.path", "not a JSON list of rows")(with_data("data.json", "5\n"))
case("dataset-jsonl-of-lists", "dataset.path", "not JSON Lines of rows")(with_data("data.jsonl", '["instruction", "output"]\n'))
case("dataset-csv-wrong-header", "lacks column 'instruction'", "dataset.fields.instruction")(
    with_data("data.csv", "question,answer\nWhat is 2 + 2?,4\n"))
case("dataset-not-utf8", "not UTF-8")(with_data("data.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n'))
case("dataset-wrong-columns", "lacks column 'instruction'")(
    with_data("data.jsonl", json.dumps({"prompt": "Say hi.", "completion": "Hi."}) + "\n"))
case("dataset-unknown-format", "one format")(with_data("data.txt", "instruction: hi\n"))
# the first row parses, the second does not: pyarrow's error, without datasets' own log line before it
case("dataset-jsonl-broken-second-row", "could not read dataset", "JSON parse error")(
    with_data("data.jsonl", json.dumps(ALPACA_ROWS[0]) + "\nnot json\n"))
case("dataset-local-file-with-hub-loader", "is a local file or folder", "dataset.loader to files")(
    lambda tmp, model: (["run", config_with(tmp, model, dataset={"loader": "hub"})], {}))

case("eval-path-missing", "dataset.eval_path", "not found")(run_with(dataset={"eval_path": "data/held-out.jsonl"}))


@case("eval-file-row-without-output", "eval dataset row 1, field 'output'", "is empty")
def _(tmp, model):
    held_out = write_jsonl(tmp / "held-out.jsonl", [ALPACA_ROWS[0], {**ALPACA_ROWS[1], "output": ""}])
    return ["run", config_with(tmp, model, dataset={"eval_path": str(held_out)})], {}


@case("dataset-symlink-loop", "dataset.path", "symbolic link that loops")
def _(tmp, model):
    (tmp / "loop-a.jsonl").symlink_to(tmp / "loop-b.jsonl")
    (tmp / "loop-b.jsonl").symlink_to(tmp / "loop-a.jsonl")
    return ["run", config_with(tmp, model, dataset={"path": str(tmp / "loop-a.jsonl")})], {}
case("dataset-field-mapping-unknown", "dataset.fields.question", "has no field 'question'")(
    run_with(dataset={"fields": {"question": "q"}}))


@case("dataset-empty-output", "dataset row 2, field 'output'", "is empty")
def _(tmp, model):
    rows = [dict(r) for r in ALPACA_ROWS]
    rows[2]["output"] = "  "
    data = write_jsonl(tmp / "rows.jsonl", rows)
    return ["run", config_with(tmp, model, dataset={"path": str(data)})], {}


@case("dataset-null-instruction", "dataset row 1, field 'instruction' (column 'question')", "is empty")
def _(tmp, model):
    rows = [{"question": r["instruction"], "output": r["output"]} for r in ALPACA_ROWS]
    rows[1]["question"] = None
    data = write_jsonl(tmp / "rows.jsonl", rows)
    return ["run", config_with(tmp, model, dataset={"path": str(data), "fields": {"instruction": "question"}})], {}


@case("dataset-folder-without-data", "holds no")
def _(tmp, model):
    (tmp / "empty").mkdir()
    return ["run", config_with(tmp, model, dataset={"path": str(tmp / "empty"), "loader": "files"})], {}


# --------------------------------------------------------------------------- tokens (need the tokenizer, not the weights)

case("every-example-cut", "model.max_seq_length", "will be cut")(run_with(model={"max_seq_length": 8}))

MARKERLESS_TEMPLATE = '''
from qtune import hookimpl
from qtune.types import PromptTemplate

class Plain(PromptTemplate):
    name = "plain"
    fields = ("instruction", "output")
    response_marker = "### Answer:"

    def render_prompt(self, example):
        return f"Q: {example['instruction']}\\nA: "

    def render_completion(self, example):
        return str(example["output"])

@hookimpl
def register_templates(register):
    register(Plain())
'''
case("response-marker-missing", "response marker '### Answer:'", "train_on_responses_only")(
    with_plugin(MARKERLESS_TEMPLATE, template="plain", training={"train_on_responses_only": True}))

PICKY_TEMPLATE = '''
from qtune import hookimpl
from qtune.types import PromptTemplate

class Picky(PromptTemplate):
    name = "picky"
    fields = ("instruction", "output")

    def render_prompt(self, example):
        if example["instruction"].startswith("Add"):
            raise ValueError("numbers are not supported")
        return example["instruction"] + "\\n"

    def render_completion(self, example):
        return str(example["output"])

@hookimpl
def register_templates(register):
    register(Picky())
'''
case("template-fails-on-a-row", "dataset row 2", "failed to render it", "ValueError")(with_plugin(PICKY_TEMPLATE, template="picky"))


@case("tokenizer-without-eos", "no EOS token")
def _(tmp, model):
    folder = tmp / "model-no-eos"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(model / name, folder / name)
    (folder / "model.safetensors").symlink_to(model / "model.safetensors")
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return ["run", config_with(tmp, model, model={"name": str(folder)})], {}


# --------------------------------------------------------------------------- the output folder

case("output-dir-under-a-file", "training.output_dir", "is a file")(
    lambda tmp, model: ((tmp / "afile").write_text("x"), (["run", config_with(tmp, model, training={"output_dir": str(tmp / "afile" / "runs")})], {}))[1])


@case("run-directory-exists", "already exists", "--resume")
def _(tmp, model):
    (tmp / "runs" / "tiny").mkdir(parents=True)
    return ["run", config_with(tmp, model)], {}


# --------------------------------------------------------------------------- the model folder

case("model-path-missing", "model.name", "not found")(run_with(model={"name": "./models/nope"}))


@case("model-name-is-a-gguf-file", "model.name", "is a GGUF file", "give its folder")
def _(tmp, model):
    (tmp / "model.Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))
    return ["run", config_with(tmp, model, model={"name": str(tmp / "model.Q4_K_M.gguf")})], {}


@case("model-pickle-only", "pickled weights (pytorch_model.bin)", "safetensors only", "use_safetensors=False")
def _(tmp, model):
    folder = model_folder_with_weights(tmp / "pickled-model", model, "pytorch_model.bin",
                                       b"not a real pickle: it must never be opened")
    return ["run", config_with(tmp, model, model={"name": str(folder)})], {}


@case("model-without-weights", "holds no weights")
def _(tmp, model):
    folder = tmp / "bare-model"
    folder.mkdir()
    shutil.copy(model / "config.json", folder / "config.json")
    return ["run", config_with(tmp, model, model={"name": str(folder)})], {}


@case("model-folder-without-config", "no config.json")
def _(tmp, model):
    (tmp / "not-a-model").mkdir()
    return ["run", config_with(tmp, model, model={"name": str(tmp / "not-a-model")})], {}


# --------------------------------------------------------------------------- plugins

case("plugin-raises-in-hook", "failed in register_templates", "RuntimeError: boom")(with_plugin(
    "from qtune import hookimpl\n\n@hookimpl\ndef register_templates(register):\n    raise RuntimeError('boom')\n"))
case("plugin-fails-to-import", "failed in loading", "ModuleNotFoundError")(with_plugin("import qtune_no_such_module\n"))
case("plugin-callback-fails-to-start", "failed in starting callback 'boom' (callbacks[0])", "no GPU monitor here")(with_plugin(
    "from qtune import hookimpl\nfrom qtune.types import TrainingCallback\n\n"
    "class Boom(TrainingCallback):\n    name = 'boom'\n\n    def __init__(self, **options):\n"
    "        raise RuntimeError('no GPU monitor here')\n\n"
    "@hookimpl\ndef register_callbacks(register):\n    register(Boom)\n", callbacks=["boom"]))


@case("plugins-dir-not-a-folder", "QTUNE_PLUGINS_DIR", "not a directory")
def _(tmp, model):
    return ["run", config_with(tmp, model)], {"QTUNE_PLUGINS_DIR": str(tmp / "no-such-folder")}


# --------------------------------------------------------------------------- conversations


def conversations(*rows: list) -> str:
    """JSON Lines of OpenAI-style conversations."""
    return "".join(json.dumps({"messages": messages}) + "\n" for messages in rows)


GOOD = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
case("conversation-with-instruction-template", "holds conversations", "template 'alpaca'", "template: chat")(
    with_data("chat.jsonl", conversations(GOOD, GOOD)))
case("conversation-without-assistant-turn", "dataset row 1", "has no assistant turn")(
    with_data("chat.jsonl", conversations(GOOD, [{"role": "user", "content": "Hi"}]), template="chatml"))
case("conversation-roles-out-of-order", "dataset row 0", "two assistant turns in a row")(
    with_data("chat.jsonl", conversations(GOOD + [{"role": "assistant", "content": "Again"}], GOOD), template="chatml"))
case("conversation-empty-message", "dataset row 1", "message 1 (assistant) is empty")(
    with_data("chat.jsonl", conversations(GOOD, [GOOD[0], {"role": "assistant", "content": " "}]), template="chatml"))
case("conversation-with-an-image", "dataset row 0", "'image_url' part", "only text conversations are supported")(
    with_data("chat.jsonl", json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "cat.png"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}) + "\n", template="chatml"))
case("sharegpt-unknown-speaker", "dataset row 0", "is from 'bot'", "ShareGPT speakers are")(
    with_data("chat.json", json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}]),
              template="chatml"))
@case("conversation-column-missing", "lacks column 'dialogue'", "dataset.fields.messages")
def _(tmp, model):
    data = tmp / "chat.jsonl"
    data.write_text(conversations(GOOD), encoding="utf-8")
    dataset = {"path": str(data), "format": "messages", "fields": {"messages": "dialogue"}}
    return ["run", config_with(tmp, model, template="chatml", dataset=dataset)], {}
case("tokenizer-without-chat-template", "has none", "template: chatml")(
    with_data("chat.jsonl", conversations(GOOD), template="chat"))


# --------------------------------------------------------------------------- resume and the command line


@case("resume-not-a-run", "not a qtune run directory")
def _(tmp, model):
    (tmp / "somewhere").mkdir()
    return ["run", "--resume", tmp / "somewhere"], {}


@case("resume-without-checkpoint", "no complete checkpoint", "save_steps is 0")
def _(tmp, model):
    run_dir = tmp / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    shutil.copy(config_with(tmp, model), run_dir / "config.yaml")
    return ["run", "--resume", run_dir], {}


@case("resume-a-finished-run", "already finished")
def _(tmp, model):
    run_dir = tmp / "runs" / "tiny"
    (run_dir / "adapter").mkdir(parents=True)
    shutil.copy(config_with(tmp, model), run_dir / "config.yaml")
    return ["run", "--resume", run_dir], {}


@case("resume-with-a-config", "leave out CONFIG")
def _(tmp, model):
    return ["run", config_with(tmp, model), "--resume", tmp], {}


case("run-without-config", "give a CONFIG")(lambda tmp, model: (["run"], {}))


# --------------------------------------------------------------------------- second round (issue 15): what validate
# must catch because run would die on it later, and what used to be accepted silently

case("yaml-duplicate-section", "key 'lora' at line 4 repeats the one at line 2")(
    run_text("name: tiny\nlora:\n  r: 8\nlora:\n  alpha: 16\n"))
case("seed-too-large-for-numpy", "training.seed", "less than 4294967296")(run_with(training={"seed": 2**40}))
case("learning-rate-nan", "training.learning_rate", "finite")(run_text("training:\n  learning_rate: .nan\n"))
case("synonym-rank", "unknown config key 'lora.rank'", "did you mean 'lora.r'?")(run_with(lora={"rank": 8}))
case("synonym-lr", "did you mean 'training.learning_rate'?")(run_with(training={"lr": 1e-4}))
case("key-in-the-wrong-section", "did you mean 'model.max_seq_length'?")(run_with(training={"max_seq_length": 512}))


@case("synonym-batch-size-in-set", "did you mean 'training.per_device_train_batch_size'?")
def _(tmp, model):
    return ["run", config_with(tmp, model), "--set", "batch_size=4"], {}


case("dataset-numbers-in-a-text-field", "field 'output'", "holds numbers", "rows 0, 1, 2, 3", "numbers_as_text")(
    with_data("data.jsonl", "".join(json.dumps({"instruction": r["instruction"], "output": i}) + "\n" for i, r in enumerate(ALPACA_ROWS))))
case("dataset-mapping-in-an-optional-field", "field 'input'", "lists or mappings", "row 1")(
    with_data("data.jsonl", "".join(json.dumps({**r, "input": {"a": 1} if i == 1 else ""}) + "\n" for i, r in enumerate(ALPACA_ROWS))))


@case("model-safetensors-empty", "model.safetensors is empty (0 bytes)")
def _(tmp, model):
    folder = model_folder_with_weights(tmp / "empty-weights", model, "model.safetensors", b"")
    return ["run", config_with(tmp, model, model={"name": str(folder)})], {}


@case("model-safetensors-truncated", "model.safetensors is cut short")
def _(tmp, model):
    content = (model / "model.safetensors").read_bytes()
    folder = model_folder_with_weights(tmp / "cut-weights", model, "model.safetensors", content[: len(content) // 2])
    return ["run", config_with(tmp, model, model={"name": str(folder)})], {}


@case("model-needs-remote-code", "custom model type", "model.trust_remote_code: true")
def _(tmp, model):
    folder = tmp / "custom-model"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="qtune-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    return ["run", config_with(tmp, model, model={"name": str(folder)})], {}


case("lora-target-modules-missing", "lora.target_modules", "'qkv_proj' match no module", "q_proj")(
    run_with(lora={"target_modules": ["q_proj", "qkv_proj"]}))

UNAVAILABLE_EXPORTER = '''
from qtune.api import Exporter, hookimpl

class Onnx(Exporter):
    name = "onnx-test"

    def unavailable_reason(self):
        return "onnxruntime is not installed; install it with: pip install onnxruntime"

@hookimpl
def register_exporters(register):
    register(Onnx())
'''
case("export-cannot-run-here", "exports[0]", "'onnx-test' cannot run here", "pip install onnxruntime")(
    with_plugin(UNAVAILABLE_EXPORTER, exports=["onnx-test"]))
case("output-dir-under-proc", "training.output_dir", "proc file system")(run_with(training={"output_dir": "/proc/qtune-runs"}))


@case("hub-unreachable", "cannot reach the Hugging Face hub", "model 'qtune-test/missing-model'", "qtune init --preset demo")
def _(tmp, model):
    # HF_ENDPOINT on a closed local port: unreachable everywhere, even on a machine that is online
    env = {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp.parent / "hf-home")}
    return ["run", config_with(tmp, model, model={"name": "qtune-test/missing-model"})], env


@case("dataset-missing-hub-unreachable", "dataset.path", "'./data/train.jsonl' not found")
def _(tmp, model):
    # a mistyped local path on a machine whose hub is unreachable: the path is named, not the hub
    env = {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp.parent / "hf-home")}
    return ["run", config_with(tmp, model, dataset={"path": "./data/train.jsonl"})], env


# --------------------------------------------------------------------------- the runner


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time."""
    result = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        result[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return result


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 75


#: cases `qtune validate` cannot see: they are about `run` itself (its arguments, --resume)
RUN_ONLY = {"resume-not-a-run", "resume-without-checkpoint", "resume-a-finished-run", "resume-with-a-config", "run-without-config"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line_writing_nothing(name, tmp_path, tiny_qwen_dir):
    build, needles = CASES[name]
    work = tmp_path / "case"
    work.mkdir()
    argv, env = build(work, tiny_qwen_dir)
    before = listing(work)
    line = one_line_error(run_qtune(*argv, cwd=work, env=env, timeout=300))
    assert line.startswith("Error: "), line
    for needle in needles:
        assert needle in line, line
    assert listing(work) == before, "files were written"
    assert (work / "runs").exists() == ("runs" in before), "an output folder appeared"


@pytest.mark.parametrize("name", [name for name in CASES if name not in RUN_ONLY])
def test_validate_refuses_what_run_refuses(name, tmp_path, tiny_qwen_dir):
    """One rule: what `qtune validate` accepts, `qtune run` carries to the first training step. So
    every case `run` refuses, `validate` refuses too, in one line, writing nothing."""
    build, needles = CASES[name]
    work = tmp_path / "case"
    work.mkdir()
    argv, env = build(work, tiny_qwen_dir)
    assert argv[0] == "run"
    before = listing(work)
    line = one_line_error(run_qtune("validate", *argv[1:], cwd=work, env=env, timeout=300))
    assert line.startswith("Error: "), line
    for needle in needles:
        assert needle in line, line
    assert listing(work) == before, "files were written"
