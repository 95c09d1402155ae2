"""benchmarks/gpu_merge_4bit.py's plumbing on the CPU: a tiny random Qwen2 trained through qtune's
pipeline, merged-4bit and merged-16bit exported and verified, the control row, the table and JSON.
(On the CPU the transformers backend trains without 4-bit, so merged-4bit meets the float32 reference.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_merge_4bit.py"


@pytest.mark.slow
def test_gpu_merge_script_runs_on_cpu(tmp_path, monkeypatch, qwen_tokenizer_dir, capsys):
    spec = importlib.util.spec_from_file_location("gpu_merge_4bit", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    bench = tmp_path / "bench"
    (bench / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bench / "tokenizer" / name).write_bytes((qwen_tokenizer_dir / name).read_bytes())
    monkeypatch.setattr(script.checkpoints, "BENCH_DIR", bench)  # the shared checkpoint builder reads the tokenizer there
    monkeypatch.setattr(script, "WORK", tmp_path / "work")
    script.main(["run", "--out", str(tmp_path / "out"), "--shape", "tiny", "--steps", "2", "--allow-cpu"])
    result = json.loads((tmp_path / "out" / "gpu_merge_4bit.json").read_text())
    assert result["info"]["training_quantization"] is None  # CPU: the transformers backend did not load 4-bit
    assert result["training"]["steps"] == 2
    rows = {row["format"]: row for row in result["exports"]}
    assert list(rows) == ["merged-4bit", "control: base, no adapter", "merged-16bit"]
    assert rows["merged-4bit"]["verify_passed"] and rows["merged-4bit"]["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert rows["merged-16bit"]["verify_passed"] and rows["merged-16bit"]["verify_top5_agreement"] >= 0.99
    assert isinstance(rows["control: base, no adapter"]["would_pass_merged_4bit_bounds"], bool)
    table = capsys.readouterr().out.splitlines()
    assert table[-6].startswith("format") and table[-1].startswith("total")
    assert not (tmp_path / "work").exists()  # cleaned up without --keep
