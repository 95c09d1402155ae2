"""`qtune export --verify` when the export is wrong: the command fails with one line naming the
check, exits non-zero, and exports.json records the failed report; the same run exported where
nothing is lost still passes.

The export is made wrong for real: an adapter whose update to one projection is larger than
float16 can hold (65,504). Merged into float16 weights, that projection becomes inf, while the
trained model (base + adapter through peft, in float32) is finite, so verification must catch it.
Corrupting the adapter alone would not fail verification: the reference is built from the same
adapter, so the check compares the export with what the run holds, as it should.
"""

from __future__ import annotations

import json

import pytest
from test_export import make_run

from helpers import run_qtune

#: the projection whose LoRA update is blown up (the last layer's MLP output)
BLOWN_UP = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_qwen_dir):
    return make_run(tmp_path_factory.mktemp("verify") / "runs" / "tiny", tiny_qwen_dir)


def record(run_dir, key):
    return json.loads((run_dir / "exports" / "exports.json").read_text())[key]


def blow_up_adapter(run_dir, value: float) -> float:
    """Set one lora_B to ``value`` everywhere; returns the largest entry of its B @ A x scale."""
    import torch
    from safetensors.torch import load_file, save_file

    path = run_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[BLOWN_UP] = torch.full_like(tensors[BLOWN_UP], value)
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    a = tensors[BLOWN_UP.replace("lora_B", "lora_A")]
    return float((tensors[BLOWN_UP] @ a).abs().max()) * config["lora_alpha"] / config["r"]


@pytest.mark.slow
def test_a_float16_merge_that_overflows_fails_verification(run_dir):
    passing = run_qtune("export", run_dir, "--format", "merged-16bit", "--quant", "fp16")
    assert passing.returncode == 0, passing.stderr
    assert record(run_dir, "merged-16bit-fp16")["verify"]["passed"] is True

    assert blow_up_adapter(run_dir, 1e6) > 65504  # past float16's largest value
    failing = run_qtune("export", run_dir, "--format", "merged-16bit", "--quant", "fp16", "--force")
    assert failing.returncode == 1
    assert "Traceback" not in failing.stdout + failing.stderr
    errors = [line for line in failing.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, failing.stderr
    assert errors[0].startswith("Error: verification of the merged-16bit-fp16 export failed (top-1 agreement 0.")
    assert "< 0.97" in errors[0] and "--no-verify" in errors[0]
    report = record(run_dir, "merged-16bit-fp16")["verify"]
    assert report["passed"] is False and report["top1_agreement"] < 0.97
    assert any(f.startswith("top-1 agreement") for f in report["failures"])
    # float32 holds the same update: that export of the same adapter still verifies
    wide = run_qtune("export", run_dir, "--format", "merged-16bit", "--quant", "fp32")
    assert wide.returncode == 0, wide.stderr
    assert record(run_dir, "merged-16bit-fp32")["verify"]["passed"] is True


def test_nan_logits_never_pass_verification():
    """An adapter with NaN weights gives NaN logits on both sides of the comparison: numpy's arg max
    of NaNs is index 0 on both, so top-1 reads 1.0; the report must fail all the same."""
    import numpy as np

    from qtune.verify import VerifyReport, compare

    reference = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32)
    nan = np.full_like(reference, np.nan)
    report = VerifyReport("lora", None, "transformers + peft", "peft float32", min_top1=0.99, min_top5=0.99)
    report.prompts.append(compare(list(range(6)), nan, list(range(6)), nan))  # a NaN model on both sides
    assert not report.passed
