"""Exports of a real trained run on the tiny Qwen2: LoRA, merged 16-bit / 4-bit, GGUF, Modelfile,
the modelcard plugin, interrupted exports and the errors users can fix. CPU, real components."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import ALPACA_ROWS, tiny_run_config, write_jsonl
from qtune.plugin_manager import get_host, reset_host
from qtune.types import Exporter, ExportResult
from qtune_cli.export_cmd import export as export_command
from qtune_cli.main import cli

cli.add_command(export_command)  # main() adds it for the console script; tests drive `cli` directly

PROMPT = "Below is an instruction that describes a task.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n"


def qtune(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def make_run(run_dir: Path, model_dir: Path, template: str = "alpaca", b_std: float = 0.05, seed: int = 1) -> Path:
    """A run directory without training: the base model plus a LoRA on the seven projections whose
    lora_B is random (peft initialises it to zero, which would make the merge a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.config import SEED_TARGET_MODULES, Config

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=SEED_TARGET_MODULES, task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # lora_A comes from the global generator
    model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * b_std)
    run_dir.mkdir(parents=True)
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    config = Config(name=run_dir.name, model={"name": str(model_dir), "load_in_4bit": False}, template=template,
                    dataset={"path": "rows.jsonl", "loader": "files"})
    (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    return run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_qwen_dir):
    """A real `qtune run` (3 LoRA steps on the tiny Qwen2) whose config exports the LoRA adapter."""
    tmp = tmp_path_factory.mktemp("export-run")
    try:
        import qtune.pipeline  # noqa: F401
    except ImportError:  # the training pipeline is not there: a hand-made run directory
        return make_run(tmp / "runs" / "tiny", tiny_qwen_dir)
    data = write_jsonl(tmp / "data.jsonl", ALPACA_ROWS * 4)
    config = tiny_run_config(tmp, tiny_qwen_dir, data, training={"max_steps": 3}, exports=[{"format": "lora", "verify": True}])
    result = CliRunner().invoke(cli, ["run", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "tiny"


@pytest.fixture(scope="module")
def run(trained):
    from qtune.run import FinishedRun

    return FinishedRun.open(trained)


def peft_logits(run, text=PROMPT, dtype=None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(run.model_path(), dtype=dtype or torch.float32)
    model = PeftModel.from_pretrained(base, run.adapter_dir).eval()
    ids = AutoTokenizer.from_pretrained(run.adapter_dir)(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float(), ids


def test_config_exports_ran_after_training(run):
    summary = json.loads((run.run_dir / "summary.json").read_text())
    record = summary["exports"]["lora"]
    assert record["format"] == "lora" and record["verify"]["passed"] is True
    assert record["verify"]["top1_agreement"] == 1.0 and record["verify"]["tokenization_identical"] is True
    assert "adapter_model.safetensors" in record["files"]
    assert json.loads((run.exports_dir / "exports.json").read_text())["lora"]["format"] == "lora"


def test_lora_export_loads_with_peft_and_carries_the_chat_template(run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.export import export_run

    out = run.run_dir / "lora-copy"
    result = export_run(run, "lora", verify=False, out=out)
    assert result.path == out and (out / "adapter_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == run.template.chat_template()
    reference, ids = peft_logits(run)
    base = AutoModelForCausalLM.from_pretrained(run.model_path(), dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(**ids).logits
        exported = PeftModel.from_pretrained(base, out).eval()(**ids).logits
    assert torch.equal(exported, reference)
    assert (plain - reference).abs().max() > 1e-2  # the adapter is not a no-op, so merges below mean something


def test_merged_16bit_fp32_is_sharded_for_vllm_and_matches_peft(run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.export import export_run

    result = export_run(run, "merged_16bit", "FP32", verify=False, out=tmp_path / "m", max_shard_size="40MB")
    names = {p.name for p in result.files}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert not any("lora" in key for key in index["weight_map"])
    assert result.details["dtype"] == "fp32" and result.details["shards"] == len(shards)
    reference, ids = peft_logits(run)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        logits = merged(**ids).logits
    assert (logits - reference).abs().max() < 1e-4


def test_merged_16bit_bf16_through_the_cli_verifies(run):
    import torch
    from transformers import AutoModelForCausalLM

    result = qtune("export", run.run_dir, "--format", "merged-16bit")
    assert result.exit_code == 0, result.output
    out = run.exports_dir / "merged-16bit-bf16"
    assert result.output.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    record = json.loads((run.exports_dir / "exports.json").read_text())["merged-16bit-bf16"]
    assert record["verify"]["passed"] and record["verify"]["top5_agreement"] >= 0.99
    reference, ids = peft_logits(run, dtype=torch.bfloat16)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = merged(**ids).logits.float()
    # both in bf16: the merged weights differ from base + B@A by bf16 rounding only
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_merged_4bit_nf4_on_cpu(run):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from qtune.export import export_run

    result = export_run(run, "merged-4bit", verify=True)
    config = json.loads((result.path / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    report = result.details["verify"]
    assert report["passed"] and report["tokenization_identical"] and report["top5_agreement"] >= 0.9
    model = AutoModelForCausalLM.from_pretrained(result.path, device_map="cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)


QLORA = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


def qlora_run(run_dir: Path, model_dir: Path, steps: int = 4, lr: float = 3e-3) -> Path:
    """A run trained in 4-bit on the CPU, as QLoRA trains on a GPU: the base quantized on load with
    the backend's BitsAndBytesConfig, LoRA on the seven projections, a few Adam steps; summary.json
    records the quantization (what a GPU run's summary carries)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.config import SEED_TARGET_MODULES, Config
    from qtune.quantization import describe_quantization, disable_bnb_cpu_repacking, nf4_config

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=nf4_config("bfloat16"),
                                                device_map={"": "cpu"})
    disable_bnb_cpu_repacking(base)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=SEED_TARGET_MODULES, task_type="CAUSAL_LM"))
    template = get_host().templates.get("alpaca")
    texts = [template.render_prompt(row) + template.render_completion(row) + tokenizer.eos_token for row in ALPACA_ROWS]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    run_dir.mkdir(parents=True)
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    config = Config(name=run_dir.name, model={"name": str(model_dir), "load_in_4bit": True}, template="alpaca",
                    dataset={"path": "rows.jsonl", "loader": "files"})
    (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    (run_dir / "summary.json").write_text(json.dumps({"quantization": describe_quantization(model)}), encoding="utf-8")
    return run_dir


def test_merged_4bit_of_a_qlora_run_is_verified_against_its_nf4_base(tiny_qwen_dir, tmp_path):
    """A run trained in 4-bit is the NF4 base + adapter: merged-4bit is held to that model, with its own bounds."""
    from transformers import AutoModelForCausalLM

    from qtune.export import export_run
    from qtune.plugins.hf_exports import BOUNDS
    from qtune.quantization import disable_bnb_cpu_repacking, nf4_config, training_quantization
    from qtune.run import FinishedRun
    from qtune.verify import compare, hf_logits, reference_outputs

    run = FinishedRun.open(qlora_run(tmp_path / "qlora", tiny_qwen_dir))
    assert training_quantization(run) == QLORA
    result = export_run(run, "merged-4bit", verify=True)
    report = result.details["verify"]
    assert report["reference"] == "peft over the NF4 base (double quant, compute bfloat16)"
    assert (report["min_top1"], report["min_top5"]) == BOUNDS["merged-4bit/nf4-base"]
    assert report["passed"] and report["tokenization_identical"] and report["top5_agreement"] >= 0.95  # 1.00 / 1.00 measured
    nf4 = reference_outputs(run, 3, QLORA)
    fp32 = reference_outputs(run, 3)
    assert fp32.description == "peft float32"
    assert max(abs(a - b).max() for a, b in zip(nf4.logits, fp32.logits, strict=True)) > 0.05  # a different model
    # The check tells a merge that lost the adapter: the NF4 base alone fails the same bounds.
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype="bfloat16", quantization_config=nf4_config("bfloat16"),
                                                device_map={"": "cpu"})
    disable_bnb_cpu_repacking(base)
    plain = hf_logits(base.eval(), nf4.token_ids)
    top5 = [compare(ids, ref, ids, got).top5 for ids, ref, got in zip(nf4.token_ids, nf4.logits, plain, strict=True)]
    assert sum(top5) / len(top5) < BOUNDS["merged-4bit/nf4-base"][1]  # 0.2-0.33 measured


@pytest.mark.parametrize(
    "load_in_4bit, dtype, summary, cuda, expected",
    [
        (False, "auto", {"device": "cuda:0"}, True, None),
        (True, "auto", {"device": "cpu"}, False, None),  # the transformers backend quantizes on CUDA only
        (True, "auto", {"device": "cuda:0"}, False, QLORA),  # trained on a GPU, exported here
        (True, "float16", {"device": "cuda:0"}, False, {**QLORA, "compute_dtype": "float16"}),
        (True, "auto", {}, False, None),  # no record: as the backend would load it here
        (True, "auto", {}, True, QLORA),
        (True, "auto", {"quantization": None}, True, None),  # a recorded answer wins
        (False, "auto", {"quantization": {**QLORA, "compute_dtype": "torch.float16"}}, False, {**QLORA, "compute_dtype": "float16"}),
    ],
)
def test_training_quantization_decides_the_merged_4bit_reference(tiny_qwen_dir, tmp_path, monkeypatch, load_in_4bit, dtype,
                                                                  summary, cuda, expected):
    import torch

    from qtune.config import Config
    from qtune.quantization import training_quantization
    from qtune.run import FinishedRun

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    config = Config(model={"name": str(tiny_qwen_dir), "load_in_4bit": load_in_4bit, "dtype": dtype})
    assert training_quantization(FinishedRun(tmp_path, config)) == expected


def test_merge_into_a_prequantized_4bit_base(tiny_qwen_dir, tmp_path):
    """Unsloth's -bnb-4bit checkpoints as base: dequantized (what QLoRA trained against), then merged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qtune.export import export_run
    from qtune.run import FinishedRun

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, quantization_config=quantization, dtype=torch.bfloat16, device_map="cpu")
    base.save_pretrained(tmp_path / "base-bnb-4bit")
    AutoTokenizer.from_pretrained(tiny_qwen_dir).save_pretrained(tmp_path / "base-bnb-4bit")
    run = FinishedRun.open(make_run(tmp_path / "run", tmp_path / "base-bnb-4bit"))
    result = export_run(run, "merged-16bit", verify=True)
    assert result.details["verify"]["passed"] and result.details["verify"]["top5_agreement"] == 1.0
    assert "quantization_config" not in json.loads((result.path / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(result.path)
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear and merged.dtype == torch.bfloat16


def test_gguf_f16_matches_the_trained_model(run):
    from qtune.export import export_run
    from qtune.plugins.gguf_export import gguf_metadata

    result = export_run(run, "gguf", "f16", verify=True)
    report = result.details["verify"]
    assert report["top1_agreement"] == 1.0 and report["tokenization_identical"]
    assert report["max_abs_logit_diff"] < 5e-3
    assert all(report["checks"].values()) and len(report["checks"]) == 3
    gguf = result.path / f"{run.run_dir.name}.F16.gguf"
    metadata = gguf_metadata(gguf)
    assert metadata["tokenizer.ggml.eos_token_id"] == "151643"  # <|endoftext|>, what training appended
    assert metadata["tokenizer.chat_template"] == run.template.chat_template()
    assert metadata["general.file_type"] == "1"


@pytest.mark.parametrize("quant, file_type", [("q8_0", "7"), ("Q4_K_M", "15")])
def test_gguf_quantized_with_modelfile(run, quant, file_type):
    from qtune.export import export_run
    from qtune.plugins.gguf_export import gguf_metadata

    result = export_run(run, "gguf", quant, verify=True)
    name = f"{run.run_dir.name}.{quant.upper()}.gguf"
    assert sorted(p.name for p in result.files) == ["Modelfile", name]
    assert gguf_metadata(result.path / name)["general.file_type"] == file_type
    assert result.details["verify"]["passed"] and result.details["verify"]["top5_agreement"] >= 0.9
    modelfile = (result.path / "Modelfile").read_text()
    assert f"FROM ./{name}\n" in modelfile
    assert 'PARAMETER stop "<|endoftext|>"\nPARAMETER stop "### Instruction:"\n' in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # The Go template is the training prompt with the user's text in .Prompt, then the answer and EOS.
    example = run.template.render_prompt({"instruction": "{{ .Prompt }}", "input": ""})
    assert template == example + "{{ .Response }}<|endoftext|>"


@pytest.mark.parametrize("name", ["chatml", "qwen2.5", "gemma", "llama-3.1"])
def test_ollama_template_of_a_chat_template_renders_its_turn_with_and_without_a_system_prompt(name):
    """The Go template, filled as Ollama fills it, is the chat template's own rendering of one turn,
    followed by the answer and the end-of-turn token; the system branch only when there is one."""
    import re

    from qtune.plugins.gguf_export import ollama_template

    template = get_host().templates.get(name)
    go = ollama_template(template, "<eos>")

    def fill(system, prompt):
        text = go.replace("{{ .Prompt }}", prompt).replace("{{ .Response }}", "")
        pattern = r"\{\{ if \.System \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}"
        text = re.sub(pattern, lambda m: m.group(1) if system else m.group(2), text, flags=re.S)
        return text.replace("{{ .System }}", system)

    user = [{"role": "user", "content": "Hi"}]
    end = template.end_of_turn
    assert fill("", "Hi") == template.render(user, add_generation_prompt=True) + end
    system = [{"role": "system", "content": "Be brief."}]
    assert fill("Be brief.", "Hi") == template.render(system + user, add_generation_prompt=True) + end
    if name == "chatml":  # no default system prompt: nothing at all without one
        assert go.startswith("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ else }}{{ end }}")
    if name == "qwen2.5":  # Qwen's default in the else branch
        assert "{{ else }}<|im_start|>system\nYou are Qwen" in go


class Interrupted(Exporter):
    name = "test-interrupted"

    def export(self, run, out_dir, quantization):
        from qtune.fsutil import atomic_dir

        with atomic_dir(out_dir) as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 1000)
            raise KeyboardInterrupt  # Ctrl-C half way through
        return ExportResult(self.name, out_dir)


def test_interrupted_export_leaves_nothing_under_the_final_name(run):
    from qtune.export import export_run

    host = get_host()
    host.exporters.add(Interrupted(), "test")
    before = sorted(p.name for p in run.exports_dir.iterdir())
    try:
        with pytest.raises(KeyboardInterrupt):
            export_run(run, "test-interrupted", verify=False)
    finally:
        del host.exporters.items["test-interrupted"], host.exporters.owners["test-interrupted"]
    assert sorted(p.name for p in run.exports_dir.iterdir()) == before


def test_failed_gguf_conversion_leaves_nothing_and_keeps_the_previous_export(run, tmp_path):
    """A llama.cpp 'checkout' whose converter writes half a file and dies: the real export path fails
    cleanly, an existing export replaced with --force survives, and no temporary folder remains."""
    fake = tmp_path / "llama.cpp"
    (fake / "gguf-py").mkdir(parents=True)
    (fake / "convert_hf_to_gguf.py").write_text(
        "import sys\n"
        "out = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF' + bytes(100))\n"
        "sys.exit('RuntimeError: killed half way')\n"
    )
    previous = run.exports_dir / "gguf-q4_0"
    previous.mkdir(parents=True)
    (previous / "marker").write_text("old export")
    before = sorted(p.name for p in run.exports_dir.iterdir())
    result = qtune("export", run.run_dir, "-f", "gguf", "-q", "q4_0", "--llama-cpp-dir", fake, "--force")
    assert result.exit_code != 0
    assert "converter failed: RuntimeError: killed half way" in result.output
    assert sorted(p.name for p in run.exports_dir.iterdir()) == before
    assert (previous / "marker").read_text() == "old export"
    shutil.rmtree(previous)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-f", "gguff"], "unknown export format 'gguff'; did you mean 'gguf'?"),
        (["-f", "gguf", "-q", "q9_9"], "has no quantization 'q9_9'; choose one of: f32, f16, bf16, q8_0"),
        (["-f", "lora", "-q", "q4_k_m"], "takes no --quant"),
        (["-f", "lora", "--max-shard-size", "1GB"], "does not take --max-shard-size"),
        (["-f", "lora", "--out", "{run}/adapter"], "already exists; remove it, pass --force"),
    ],
)
def test_errors_name_the_problem_and_the_fix(run, args, message):
    result = qtune("export", run.run_dir, *[a.format(run=run.run_dir) for a in args])
    assert result.exit_code == 1 and message in result.output, result.output


def test_run_dir_without_adapter_is_refused(tmp_path, run):
    shutil.copy(run.run_dir / "config.yaml", tmp_path / "config.yaml")
    result = qtune("export", tmp_path, "-f", "lora")
    assert result.exit_code == 1 and "has no trained adapter" in result.output


def test_missing_llama_cpp_python_names_the_extra(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` sees when it is not installed
    result = qtune("export", run.run_dir, "-f", "gguf")
    assert result.exit_code == 1
    assert "export format 'gguf' cannot run here: llama-cpp-python is not installed; install it with: pip install 'qtune[gguf]'" in result.output


@pytest.fixture
def all_plugins(monkeypatch):
    monkeypatch.delenv("QTUNE_LOAD_PLUGINS", raising=False)
    reset_host()
    yield get_host()
    reset_host()


def test_modelcard_plugin_from_its_entry_point(run, all_plugins):
    assert all_plugins.exporters.owners["modelcard"] == "modelcard"
    result = qtune("export", run.run_dir, "--format", "modelcard")
    assert result.exit_code == 0, result.output
    card = (run.exports_dir / "modelcard" / "README.md").read_text()
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert card.startswith("---\nbase_model: ")
    assert f"| LoRA rank / alpha / dropout | {run.config.lora.r} / {run.config.lora.alpha} / 0.0 |" in card
    assert "## Training data" in card and str(run.config.dataset.path) in card
    if "steps" in summary:  # metrics of the real run
        assert f"| steps | {summary['steps']} |" in card
    assert "| lora | lora | - |" in card  # the export the config made after training
    assert "```yaml\n" + run.config.to_yaml().rstrip() + "\n```" in card


FAILING_EXPORTER = '''
from qtune import hookimpl
from qtune.errors import QtuneError
from qtune.types import Exporter


class Refuses(Exporter):
    name = "refuses"

    def export(self, run, out_dir, quantization):
        raise QtuneError("the refuses format always fails")


@hookimpl
def register_exporters(register):
    register(Refuses())
'''


def test_a_failing_export_keeps_the_records_of_those_before_it(tmp_path, tiny_qwen_dir, monkeypatch):
    import subprocess

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "refuses.py").write_text(FAILING_EXPORTER)
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 2)
    config = tiny_run_config(tmp_path, tiny_qwen_dir, data, training={"max_steps": 2}, exports=["lora", "refuses"])
    result = subprocess.run([str(Path(sys.executable).with_name("qtune")), "run", str(config), "--no-progress"],
                            capture_output=True, text=True, env={**__import__("os").environ, "QTUNE_PLUGINS_DIR": str(plugins)})
    assert result.returncode != 0 and "the refuses format always fails" in result.stderr
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert "the refuses format always fails" in summary["error"]
    assert summary["exports"]["lora"]["format"] == "lora"
