"""Reliability: preflight findings, kill -9 and resume, divergence, out-of-memory advice, callbacks
that fail, and the security defaults (no remote code, no pickles, no unnamed plugin folders).

The crash tests are real: `qtune run` runs in a subprocess on the tiny Qwen2 and is killed with
SIGKILL, or trains a model whose weights really overflow. docs/reliability.md names these tests.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from helpers import (
    ALPACA_ROWS,
    OFFLINE_ENV,
    QTUNE,
    logged_steps,
    model_folder_with_weights,
    one_line_error,
    read_metrics,
    tiny_run_config,
    write_jsonl,
)
from helpers import run_qtune as qtune
from qtune.config import Config, load_config
from qtune.errors import QtuneError


def steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "step" in m]


# --------------------------------------------------------------------------- preflight


def test_preflight_reports_truncation_masking_and_pad_with_rows(tmp_path, tiny_qwen_dir):
    from qtune.preflight import ERROR, NOTE, WARNING, preflight

    rows = [dict(r) for r in ALPACA_ROWS]
    rows[1]["instruction"] = "Describe the sky. " * 40  # the prompt alone is longer than 96 tokens
    rows[3]["output"] = "chat " * 80  # a completion that runs past the limit
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = load_config(tiny_run_config(tmp_path, tiny_qwen_dir, data, model={"max_seq_length": 96},
                                         training={"train_on_responses_only": True}))
    report = preflight(config)
    by_level = {level: [str(f) for f in report.findings if f.level == level] for level in (ERROR, WARNING, NOTE)}
    assert by_level[ERROR] == []
    truncated = next(f for f in by_level[WARNING] if f.startswith("model.max_seq_length"))
    assert "2 of 4 examples (50%; rows 1, 3)" in truncated and "raise model.max_seq_length to" in truncated
    masked = next(f for f in by_level[WARNING] if "every label is masked" in f)
    assert masked.startswith("dataset row 1:") and "train_on_responses_only" in masked
    assert report.stats["fully_masked_dropped"] == 1 and report.stats["truncated"] == 2
    assert all("\n" not in str(f) and ": " in str(f) for f in report.findings)


def test_preflight_chooses_a_distinct_pad_and_says_so(tmp_path, tiny_qwen_dir):
    from transformers import AutoTokenizer

    from qtune.data import IGNORE_INDEX
    from qtune.preflight import NOTE, Report, check_data, check_tokens

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    config = load_config(tiny_run_config(tmp_path, tiny_qwen_dir, data))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    tokenizer.pad_token = tokenizer.eos_token  # what many tokenizers ship with
    from qtune.plugin_manager import get_host

    report = Report(config=config, template=get_host().templates.get("alpaca"), model_path=str(tiny_qwen_dir))
    check_data(report)
    check_tokens(report, tokenizer)
    notes = [str(f) for f in report.findings if f.level == NOTE]
    assert any("pad token was '<|endoftext|>'" in n and "<|PAD_TOKEN|>" in n for n in notes), notes
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    labels = report.encoded["labels"]
    assert all(row[-1] == tokenizer.eos_token_id != IGNORE_INDEX for row in labels)  # EOS ends every example, trained


def test_eos_already_in_the_text_is_not_doubled(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    from qtune.data import tokenize_example
    from qtune.plugin_manager import get_host

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    alpaca = get_host().templates.get("alpaca")
    tokenized = tokenize_example({"instruction": "Say hi.", "output": "Hi.<|endoftext|>"}, alpaca, tokenizer, 512, responses_only=True)
    assert tokenized.had_eos and tokenized.input_ids.count(tokenizer.eos_token_id) == 1
    assert tokenized.labels[-1] == tokenizer.eos_token_id  # trained, not masked as prompt
    assert tokenizer.decode([t for t in tokenized.labels if t != -100]) == "Hi.<|endoftext|>"


def test_validate_show_highlights_trained_tokens(tmp_path, tiny_qwen_dir):
    from transformers import AutoTokenizer

    from qtune.plugin_manager import get_host
    from qtune_cli.examples import render_example
    from qtune_cli.main import cli

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    config_file = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"train_on_responses_only": True})
    result = CliRunner().invoke(cli, ["validate", str(config_file), "--show", "2"])
    assert result.exit_code == 0, result.output
    assert "example 1 (dataset row 0)" in result.output and "example 2 (dataset row 1)" in result.output
    assert "cold<|endoftext|>" in result.output and "valid (4 training examples" in result.output
    assert not (tmp_path / "runs").exists()

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    text = render_example(ALPACA_ROWS[0], get_host().templates.get("alpaca"), tokenizer, load_config(config_file))
    styled = [(text.plain[span.start:span.end], str(span.style)) for span in text.spans]
    assert styled[-1] == ("<|endoftext|>", "bold green reverse")  # EOS visible, trained
    assert "".join(piece for piece, style in styled if style == "bold green") == "cold"
    assert {style for _, style in styled if style != "bold green"} == {"dim", "bold green reverse"}  # the prompt is masked
    assert "".join(piece for piece, _ in styled[:-1]) == get_host().templates.get("alpaca").render_prompt(ALPACA_ROWS[0]) + "cold"


# --------------------------------------------------------------------------- checkpoints and resume


def fake_checkpoint(folder: Path, step: int, *, state: str | None = None, skip: tuple[str, ...] = ()) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        if name not in skip:
            (path / name).write_bytes(b"x")
    if "trainer_state.json" not in skip:
        (path / "trainer_state.json").write_text(state if state is not None else json.dumps({"global_step": step}))
    return path


def test_half_written_checkpoint_is_never_picked(tmp_path):
    from qtune.run import checkpoint_is_complete, last_complete_checkpoint

    folder = tmp_path / "checkpoints"
    good = fake_checkpoint(folder, 2)
    fake_checkpoint(folder, 4, skip=("trainer_state.json",))  # killed before the trainer state
    fake_checkpoint(folder, 6, state='{"global_step": 6, "log_hist')  # killed while writing it
    fake_checkpoint(folder, 8, skip=("optimizer.pt",))  # being rotated away
    fake_checkpoint(folder, 10, state=json.dumps({"global_step": 9}))  # not this step's state
    (folder / "checkpoint-12").write_text("a file, not a folder")
    assert checkpoint_is_complete(good)
    assert last_complete_checkpoint(folder) == good
    assert last_complete_checkpoint(tmp_path / "nowhere") is None


def test_resume_keeps_each_step_once_in_metrics(tmp_path):
    from qtune.pipeline import _prepare_resume
    from qtune.run import list_checkpoints

    run_dir = tmp_path / "run"
    checkpoint = fake_checkpoint(run_dir / "checkpoints", 4)
    fake_checkpoint(run_dir / "checkpoints", 6, skip=("trainer_state.json",))
    (run_dir / ".adapter.partial-123").mkdir()
    records = [{"time": 0.5, "eval": "before training", "exact_match": 0.0}] + [{"time": float(s), "step": s, "loss": 1.0 / s} for s in range(1, 7)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"time": 7.0, "step": 7, "lo')
    last_time = _prepare_resume(run_dir, checkpoint)
    kept = read_metrics(run_dir)
    assert [r.get("step") for r in kept] == [None, 1, 2, 3, 4] and last_time == 4.0
    assert [p.name for _, p, _ in list_checkpoints(run_dir / "checkpoints")] == ["checkpoint-4"]
    assert not list(run_dir.glob(".*partial*"))


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_qwen_dir):
    from safetensors.torch import load_file

    from qtune.run import checkpoint_is_complete, list_checkpoints

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 4)  # 16 rows: 8 steps of 2
    configs = {}
    for name in ("straight", "killed"):
        folder = tmp_path / name
        folder.mkdir()
        configs[name] = tiny_run_config(folder, tiny_qwen_dir, data, name=name, training={"max_steps": 8, "save_steps": 2})
    straight = tmp_path / "straight" / "runs" / "straight"
    run_dir = tmp_path / "killed" / "runs" / "killed"

    # Kill -9 once checkpoint-4 is complete and step 5 is logged: steps after the checkpoint are
    # in metrics.jsonl and must be logged once only after the resume.
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([QTUNE, "run", str(configs["killed"]), "--no-progress"], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE_ENV})
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            if checkpoint_is_complete(run_dir / "checkpoints" / "checkpoint-4") and 5 in logged_steps(run_dir / "metrics.jsonl"):
                proc.kill()  # SIGKILL
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    assert 5 in logged_steps(run_dir / "metrics.jsonl")

    # What else a kill can leave: a half-written later checkpoint and a line cut short.
    half = run_dir / "checkpoints" / "checkpoint-6"
    if not half.exists():
        shutil.copytree(run_dir / "checkpoints" / "checkpoint-4", half)
        (half / "trainer_state.json").write_text('{"global_step": 6, "log_hist')
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"time": 99.0, "step": 6, "lo')

    resumed = qtune("run", "--resume", run_dir, "--no-progress")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from checkpoint-4" in resumed.stdout
    uninterrupted = qtune("run", configs["straight"], "--no-progress")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    a, b = steps(straight), steps(run_dir)
    assert [m["step"] for m in b] == list(range(1, 9))  # every step once, none lost, none twice
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-4, (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-3 * max(1.0, x["grad_norm"]), (x, y)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-4" and summary["steps"] == 8 and "error" not in summary
    # train_loss is the mean over all 8 steps, those before the kill included, as in the straight run
    # (both rounded to 6 places, so one unit of the last place is the tolerance)
    straight_loss = json.loads((straight / "summary.json").read_text())["train_loss"]
    assert abs(summary["train_loss"] - straight_loss) <= 1e-6 + 1e-12, (summary["train_loss"], straight_loss)
    assert abs(straight_loss - sum(m["loss"] for m in a) / len(a)) <= 1e-5  # the mean of the logged step losses
    weights_a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    weights_b = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a) <= 1e-4
    assert all(complete for _, _, complete in list_checkpoints(run_dir / "checkpoints"))
    assert not list(run_dir.rglob(".*partial*"))


# --------------------------------------------------------------------------- divergence and out of memory


@pytest.fixture(scope="module")
def poisoned_model_dir(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny Qwen2 whose input embedding of `<|box_end|>` is +inf (as after a bad conversion):
    any example holding that token turns the loss NaN; the others train normally."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    import assets

    dest = assets.tiny_qwen2(tmp_path_factory.mktemp("models") / "poisoned", qwen_tokenizer_dir, tie_word_embeddings=False)
    weights = load_file(str(dest / "model.safetensors"))
    token = AutoTokenizer.from_pretrained(dest).convert_tokens_to_ids("<|box_end|>")
    weights["model.embed_tokens.weight"][token] = torch.inf
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, poisoned_model_dir):
    from safetensors.torch import load_file

    from qtune.run import list_checkpoints

    rows = [dict(r) for r in ALPACA_ROWS * 2]
    rows[5] = {"instruction": "Repeat the marker.", "input": "<|box_end|>", "output": "<|box_end|>"}
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = tiny_run_config(tmp_path, poisoned_model_dir, data, training={"max_steps": 4, "save_steps": 1})
    error = one_line_error(qtune("run", config, "--no-progress"))
    assert "training diverged at step" in error and "the loss became nan" in error and "learning_rate" in error
    step = int(error.split("at step ")[1].split(":")[0])
    assert step >= 2, "the poisoned row must come after a good step (it does with this seed)"
    assert f"checkpoint-{step - 1} (the last good one) is kept" in error

    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["error"] == error.removeprefix("Error: ")
    assert summary["last_checkpoint"].endswith(f"checkpoint-{step - 1}")
    assert not (run_dir / "adapter").exists()
    assert [m["step"] for m in steps(run_dir)] == list(range(1, step))  # no NaN record, no later step
    kept = list_checkpoints(run_dir / "checkpoints")
    assert kept and all(complete and s < step for s, _, complete in kept)
    for _, path, _ in kept:  # every checkpoint on disk is a good one
        weights = load_file(str(path / "adapter_model.safetensors"))
        assert all(bool(t.isfinite().all()) for t in weights.values())


def test_all_finite_finds_nan_and_inf_in_any_dtype():
    import torch

    from qtune.training import all_finite

    good = [torch.randn(4, 8, requires_grad=True), torch.randn(3, dtype=torch.bfloat16), torch.tensor(2.5)]
    assert all_finite(good) and all_finite([])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.bfloat16):
            assert not all_finite([*good, torch.tensor([1.0, bad], dtype=dtype)]), (bad, dtype)


def test_out_of_memory_becomes_one_line_of_advice():
    import torch

    from qtune.training import is_out_of_memory, out_of_memory_error

    config = Config()
    config.lora.gradient_checkpointing = False
    oom = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 7.42 GiB. GPU 0 has a total capacity of 79.19 GiB of which 3.06 GiB is free. "
        "Including non-PyTorch memory, this process has 76.12 GiB memory in use.\nOf the allocated memory ..."
    )
    assert is_out_of_memory(oom) and is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    message = str(out_of_memory_error(oom, config))
    assert "\n" not in message and "Tried to allocate 7.42 GiB" in message and "GPU 0 has" not in message
    for advice in ("per_device_train_batch_size (now 2)", "gradient_accumulation_steps (now 4)", "max_seq_length (now 2048)",
                   "lora.gradient_checkpointing"):
        assert advice in message, message
    config.model.load_in_4bit = False
    loading = str(out_of_memory_error(oom, config, "loading the model"))
    assert "while loading the model" in loading and "load_in_4bit: true" in loading and "smaller model" in loading


def test_out_of_memory_while_loading_is_converted():
    import torch

    from qtune.pipeline import load_model
    from qtune.types import Backend

    class Greedy(Backend):
        name = "greedy"

        def load(self, config, model_path):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 140.00 GiB.")

    with pytest.raises(QtuneError, match="ran out of memory while loading the model"):
        load_model(Greedy(), Config(), "somewhere")


def test_a_failing_callback_becomes_one_line_naming_it():
    from qtune.training import call_callbacks
    from qtune.types import TrainingCallback

    class Flaky(TrainingCallback):
        name = "flaky"

        def on_step_end(self, run, step, metrics):
            raise KeyError("loss")

    with pytest.raises(QtuneError) as info:
        call_callbacks([Flaky()], "on_step_end", None, 3, {})
    assert "of callback 'flaky'" in str(info.value) and "on_step_end" in str(info.value) and "KeyError" in str(info.value)


# --------------------------------------------------------------------------- security


def test_trust_remote_code_is_off_unless_turned_on_and_then_warned(tmp_path, tiny_qwen_dir):
    from qtune.preflight import WARNING, preflight

    assert Config().model.trust_remote_code is False
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    config_file = tiny_run_config(tmp_path, tiny_qwen_dir, data, model={"trust_remote_code": True})
    warnings = [str(f) for f in preflight(load_config(config_file)).findings if f.level == WARNING]
    assert any(w.startswith("model.trust_remote_code: is on") for w in warnings), warnings
    result = qtune("validate", config_file)
    assert result.returncode == 0 and "warning: model.trust_remote_code: is on" in result.stdout


class _Trap:
    """Unpickling this creates MARKER: proof that a pickle was loaded."""

    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path, tiny_qwen_dir):
    from qtune.pipeline import load_model
    from qtune.plugins.transformers_backend import TransformersBackend

    marker = tmp_path / "UNPICKLED"
    folder = tmp_path / "pickled-model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_qwen_dir / name, folder / name)
    trap = _Trap()
    trap.marker = str(marker)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(trap))

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    config_file = tiny_run_config(tmp_path, folder, data)
    error = one_line_error(qtune("run", config_file))
    assert "pickled weights (pytorch_model.bin)" in error and "use_safetensors=False" in error  # the fix, spelled out
    assert not (tmp_path / "runs").exists()
    # The backend itself refuses too (use_safetensors=True), should preflight be bypassed.
    with pytest.raises(QtuneError, match="safetensors"):
        load_model(TransformersBackend(), load_config(config_file), str(folder))
    assert not marker.exists()


def test_plugin_folders_load_only_when_named(tmp_path, monkeypatch):
    from qtune.plugin_manager import PluginHost

    marker = tmp_path / "IMPORTED"
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "sneaky.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "from qtune import hookimpl\nfrom qtune.types import PromptTemplate\n\n"
        "class Sneaky(PromptTemplate):\n    name = 'sneaky'\n\n"
        "@hookimpl\ndef register_templates(register):\n    register(Sneaky())\n"
    )
    monkeypatch.chdir(folder)  # not even the working directory is searched
    monkeypatch.delenv("QTUNE_PLUGINS_DIR", raising=False)
    assert "sneaky" not in PluginHost().templates and not marker.exists()
    monkeypatch.setenv("QTUNE_PLUGINS_DIR", str(folder))
    host = PluginHost()
    assert "sneaky" in host.templates and marker.exists()
    assert host.distributions[str(folder / "sneaky.py")] == ("(plugin dir)", "")


def test_validate_loads_no_model_weights(tmp_path, tiny_qwen_dir):
    """validate needs the tokenizer only: a model folder whose weights file is sound (its header is
    checked) but holds none of this model's tensors still validates."""
    import torch
    from safetensors.torch import save

    content = save({"not.a.tensor.of.this.model": torch.zeros(2, 2)})
    folder = model_folder_with_weights(tmp_path / "model", tiny_qwen_dir, "model.safetensors", content)
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    result = qtune("validate", tiny_run_config(tmp_path, folder, data))
    assert result.returncode == 0, result.stderr
    assert "valid (4 training examples" in result.stdout


def test_finding_lines_name_place_problem_and_fix():
    from qtune.preflight import Finding, PreflightError

    finding = Finding("error", "dataset row 3, field 'output'", "is empty\n(really)", "fill it in")
    assert str(finding) == "dataset row 3, field 'output': is empty (really); fill it in"
    error = PreflightError([finding, Finding("error", "model.name", "gone")])
    assert str(error).splitlines() == [str(finding), "model.name: gone"]


def test_yaml_of_a_run_is_the_config_it_resumes_with(tmp_path, tiny_qwen_dir):
    """open_for_resume reads RUN_DIR/config.yaml; with no checkpoint it answers in one line."""
    from qtune.pipeline import open_for_resume

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    config = load_config(tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"save_steps": 5}))
    (run_dir / "config.yaml").write_text(config.to_yaml())
    with pytest.raises(QtuneError, match="stopped before its first save"):
        open_for_resume(run_dir)
    checkpoint = fake_checkpoint(run_dir / "checkpoints", 5)
    resumed_config, found = open_for_resume(run_dir)
    assert found == checkpoint and resumed_config == config
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["save_steps"] == 5
    assert math.isfinite(resumed_config.training.learning_rate)


def test_plugin_folder_skips_hidden_files_and_obeys_qtune_load_plugins(tmp_path, monkeypatch):
    """Each file of the folder leaves a marker when imported (executed)."""
    from qtune.plugin_manager import PluginHost

    folder = tmp_path / "plugins"
    folder.mkdir()
    for stem in ("visible", ".hidden", "other"):
        (folder / f"{stem}.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / ('ran-' + stem.lstrip('.')))!r}).touch()\n")

    def executed() -> list[str]:
        ran = sorted(p.name for p in tmp_path.glob("ran-*"))
        for p in tmp_path.glob("ran-*"):
            p.unlink()
        return ran

    monkeypatch.setenv("QTUNE_PLUGINS_DIR", str(folder))
    monkeypatch.delenv("QTUNE_LOAD_PLUGINS", raising=False)
    PluginHost()
    assert executed() == ["ran-other", "ran-visible"]  # never the hidden one
    monkeypatch.setenv("QTUNE_LOAD_PLUGINS", "")
    PluginHost()
    assert executed() == []
    monkeypatch.setenv("QTUNE_LOAD_PLUGINS", "visible")
    host = PluginHost()
    assert executed() == ["ran-visible"] and str(folder / "visible.py") in host.distributions


def test_converter_sdist_runs_only_with_the_pinned_sha256(tmp_path, monkeypatch):
    """A tampered sdist (a converter of someone else's making) is refused before anything is
    extracted; the pinned hash was measured on the sdist pip downloads from PyPI."""
    import hashlib
    import io
    import tarfile

    from qtune.plugins.gguf_export import SDIST_SHA256, fetch_converter

    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        code = b"print('not llama.cpp')\n"
        member = tarfile.TarInfo("llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py")
        member.size = len(code)
        tar.addfile(member, io.BytesIO(code))
    monkeypatch.setenv("QTUNE_LLAMA_CPP_SDIST", str(fake))
    dest = tmp_path / "cache" / "llama.cpp" / "0.3.36"
    with pytest.raises(QtuneError, match="is not the pinned 832db0699007f1be") as info:
        fetch_converter("0.3.36", dest)
    assert "\n" not in str(info.value) and not dest.exists()
    with pytest.raises(QtuneError, match="no pinned sha256 for the llama-cpp-python 9.9.9 sdist"):
        fetch_converter("9.9.9", dest)
    real = os.environ.get("QTUNE_LLAMA_CPP_SDIST_REAL")  # set it to check the pin against a downloaded sdist
    if real:
        assert hashlib.sha256(Path(real).read_bytes()).hexdigest() == SDIST_SHA256["0.3.36"]
        monkeypatch.setenv("QTUNE_LLAMA_CPP_SDIST", real)
        fetch_converter("0.3.36", dest)
        assert (dest / "convert_hf_to_gguf.py").is_file()
