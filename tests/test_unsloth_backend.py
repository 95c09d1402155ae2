"""The Unsloth backend, on the CPU through Unsloth's CPU fallback (QTUNE_UNSLOTH_ALLOW_CPU=1).

``import unsloth`` patches trl and transformers for the whole process, so every test that imports it
runs in a fresh interpreter (a subprocess); the checks that only ask whether the backend can run
stay in this process and never import unsloth.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qtune.config import Config
from qtune.plugins import unsloth_backend
from qtune.plugins.unsloth_backend import ALLOW_CPU_ENV, UnslothBackend, gradient_checkpointing_arg

HAVE_UNSLOTH = importlib.util.find_spec("unsloth") is not None
SKIP_REASON = "unsloth is not installed (pip install --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9)"


def test_registered_as_builtin():
    from qtune.plugin_manager import PluginHost

    host = PluginHost(load_installed=False)
    assert "unsloth" in host.backends
    assert host.backends.get("unsloth").patches_trainer


def test_importing_the_plugin_stays_light():
    code = "import sys, qtune.plugins.unsloth_backend; print(sorted({'torch', 'unsloth', 'trl', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unavailable_without_unsloth(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(unsloth_backend.importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a))
    reason = UnslothBackend().unavailable_reason(Config())
    assert reason and "unsloth is not installed" in reason


@pytest.mark.skipif(not HAVE_UNSLOTH, reason=SKIP_REASON)
def test_unavailable_without_gpu_unless_forced(monkeypatch):
    monkeypatch.setattr(unsloth_backend, "cuda_device_count", lambda: 0)
    monkeypatch.delenv(ALLOW_CPU_ENV, raising=False)
    reason = UnslothBackend().unavailable_reason(Config())
    assert reason and "no CUDA GPU" in reason and ALLOW_CPU_ENV in reason
    monkeypatch.setenv(ALLOW_CPU_ENV, "1")
    assert UnslothBackend().unavailable_reason(Config()) is None


def test_gpu_probe_imports_no_torch():
    # importing torch before unsloth would keep Unsloth's allocator settings from applying
    code = (
        "import os, sys; os.environ['CUDA_VISIBLE_DEVICES'] = ''\n"
        "from qtune.plugins.unsloth_backend import cuda_device_count\n"
        "print(cuda_device_count(), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]


def test_gradient_checkpointing_values():
    assert gradient_checkpointing_arg("unsloth") == "unsloth"
    assert gradient_checkpointing_arg(True) is True
    assert gradient_checkpointing_arg(False) is False


# The child process: the whole `qtune run` pipeline with model.backend=unsloth on a tiny Qwen2,
# noting which of torch/trl/transformers/peft were already imported when unsloth's import began.
CHILD = r"""
import json, sys
from pathlib import Path

import qtune.plugins.unsloth_backend as backend_module

imported_first = []
_import_unsloth = backend_module.import_unsloth

def watched_import_unsloth():
    if "unsloth" not in sys.modules and not imported_first:
        imported_first.append([m for m in ("torch", "trl", "transformers", "peft") if m in sys.modules])
    return _import_unsloth()

backend_module.import_unsloth = watched_import_unsloth

from rich.console import Console
from qtune.config import load_config
from qtune.pipeline import run

args = json.loads(sys.argv[1])
config = load_config(args["config"])
ctx = run(config, Console(stderr=True))
print("RESULT " + json.dumps({
    "imported_before_unsloth": imported_first,
    "run_dir": str(ctx.run_dir),
    "backend": ctx.backend_name,
    "summary": ctx.summary,
    "model_class": type(ctx.model).__name__,
}))

# Reload the trained adapter through the backend and generate a few tokens.
from qtune.plugin_manager import get_host
backend = get_host().backends.get("unsloth")
model, tokenizer = backend.load_trained(config, args["model"], ctx.run_dir / "adapter")
model = backend.for_inference(model)
inputs = tokenizer("### Instruction:\nSay hi", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
print("GENERATED " + json.dumps({"new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1])}))
"""


def _alpaca_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"numbers {i}, {i + 1}", "output": f"The sum is {2 * i + 1}."}
        for i in range(n)
    ]


@pytest.mark.skipif(not HAVE_UNSLOTH, reason=SKIP_REASON)
def test_trains_and_saves_through_the_pipeline(tmp_path, tiny_qwen_dir):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(_alpaca_rows(16)), encoding="utf-8")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        textwrap.dedent(
            f"""\
            name: unsloth-cpu
            model: {{name: {str(tiny_qwen_dir)!r}, backend: unsloth, max_seq_length: 128}}
            lora: {{r: 8, alpha: 16}}
            dataset: {{path: {str(data)!r}}}
            training:
              max_steps: 3
              per_device_train_batch_size: 2
              gradient_accumulation_steps: 1
              warmup_steps: 0
              learning_rate: 0.01
              output_dir: {str(tmp_path / "runs")!r}
            callbacks: []
            """
        ),
        encoding="utf-8",
    )
    env = dict(os.environ, **{ALLOW_CPU_ENV: "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    args = json.dumps({"config": str(config_file), "model": str(tiny_qwen_dir)})
    proc = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith(("RESULT ", "GENERATED "))}
    result = lines["RESULT"]

    assert result["backend"] == "unsloth"
    # import unsloth must come first: it patches trl/transformers/peft only when they load after it,
    # and sets the CUDA allocator's options before torch starts
    assert result["imported_before_unsloth"] == [[]], f"imported before unsloth: {result['imported_before_unsloth']}"
    assert result["summary"]["steps"] == 3

    run_dir = Path(result["run_dir"])
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    losses = [m["loss"] for m in steps]
    assert len(losses) == 3 and all(loss == loss and loss < 1e4 for loss in losses)
    # qtune's own token count (on the GPU, Unsloth drops trl's num_tokens from the logs)
    tokens = [m["num_tokens"] for m in steps]
    assert tokens == sorted(tokens) and tokens[0] > 0 and all(m["tokens_per_second"] > 0 for m in steps)

    adapter = run_dir / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (adapter / "tokenizer_config.json").is_file()

    # LoRA B matrices start at zero: non-zero ones prove the optimizer steps reached the adapter.
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    b_norms = [float(t.float().abs().sum()) for name, t in weights.items() if "lora_B" in name]
    assert b_norms and all(norm > 0 for norm in b_norms)

    assert lines["GENERATED"]["new_tokens"] >= 1
