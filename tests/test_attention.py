"""Variable-length attention for packed batches (qtune.plugins.varlen, the built-in backends'): the choice logic, the fallback, the
example boundaries, the memory budget and the transformers path.

The kernel is CUDA-only; the transformers path is checked on the CPU with a reference kernel put in
its place (one SDPA call per example, written here from the kernel's documented semantics), against
transformers' own SDPA with its block-diagonal mask. The GPU proof is benchmarks/bench_varlen.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import run_qtune, tiny_run_config, write_jsonl
from qtune.config import Config
from qtune.plugins import varlen as attention
from qtune.plugins.models import SHAPES
from qtune.plugins.varlen import packed_cu_seqlens, profile_varlen_reason, varlen_unsupported_reason
from qtune.profiles import apply_profile, attention_choice, estimate_memory_gib, planned_memory_gib

QWEN7B = SHAPES["qwen2.5-7b"]
SUPPORTED = dict(has_kernel=True, capability=(9, 0), head_dim=128, heads=28, kv_heads=4)


# --- the choice logic ---------------------------------------------------------------------------


def test_qwen25_7b_on_a_hopper_gpu_is_supported():
    assert varlen_unsupported_reason(**SUPPORTED) is None
    assert varlen_unsupported_reason(**(SUPPORTED | {"capability": (8, 0), "sliding_window": 4096})) is None


@pytest.mark.parametrize(
    "change, words",
    [
        ({"has_kernel": False}, "no torch.nn.attention.varlen.varlen_attn"),
        ({"capability": None}, "no CUDA GPU"),
        ({"capability": (7, 5)}, "compute capability is 7.5"),
        ({"dtype": "float32"}, "float32"),
        ({"head_dim": 264}, "head dim 264"),
        ({"head_dim": 100}, "head dim 100"),
        ({"kv_heads": 5}, "28 query heads do not share 5"),
        ({"sliding_window": 4096, "takes_window": False}, "sliding window"),
    ],
)
def test_each_unsupported_case_names_its_reason(change, words):
    assert words in varlen_unsupported_reason(**(SUPPORTED | change))


def fast_config(**model) -> Config:
    config = Config()
    config.training.profile = "fast"
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def test_fast_profile_chooses_varlen_where_the_machine_and_model_allow():
    applied = apply_profile(fast_config(), 141.0, shape=QWEN7B, varlen_unavailable=None)
    assert applied.model.attention == "varlen"


def test_fast_profile_keeps_the_default_attention_and_says_why():
    config = fast_config()
    applied = apply_profile(config, 141.0, shape=QWEN7B, varlen_unavailable="no CUDA GPU")
    assert applied.model.attention == "default"
    assert attention_choice(config, "no CUDA GPU") == ("default", "no CUDA GPU")
    # a backend not asked (the default): its own attention
    assert apply_profile(config, 141.0, shape=QWEN7B).model.attention == "default"


def test_the_built_in_backends_refuse_varlen_for_a_model_the_kernel_cannot_take(monkeypatch):
    from qtune.plugins.transformers_backend import TransformersBackend
    from qtune.plugins.unsloth_backend import UnslothBackend

    monkeypatch.setattr(attention, "varlen_machine_reason", lambda: None)  # a machine with the kernel
    assert profile_varlen_reason(fast_config(), QWEN7B) is None
    odd = QWEN7B.__class__(**(vars(QWEN7B) | {"heads": 28, "kv_heads": 5}))
    assert "do not share 5" in profile_varlen_reason(fast_config(), odd)
    assert "float32" in profile_varlen_reason(fast_config(dtype="float32"), QWEN7B)
    for backend in (TransformersBackend(), UnslothBackend()):
        assert "do not share 5" in backend.varlen_reason(fast_config(), odd)
    monkeypatch.setattr(attention, "varlen_machine_reason", lambda: "no CUDA GPU")
    assert profile_varlen_reason(fast_config(), QWEN7B) == "no CUDA GPU"


def test_a_backend_without_varlen_keeps_its_attention():
    from qtune.api import Backend

    class Plain(Backend):
        name = "plain"

    assert Plain().varlen_reason(fast_config(), QWEN7B) == "backend 'plain' has no variable-length attention"


def test_only_auto_is_resolved():
    for chosen in ("default", "varlen"):
        applied = apply_profile(fast_config(attention=chosen), 141.0, shape=QWEN7B, varlen_unavailable="no CUDA GPU" if chosen == "varlen" else None)
        assert applied.model.attention == chosen
    seed = Config()
    assert apply_profile(seed, 141.0, shape=QWEN7B, varlen_unavailable=None).model.attention == "auto"


def test_machine_reason_without_torch_import():
    code = "import sys; from qtune.plugins.varlen import varlen_machine_reason; print(repr(varlen_machine_reason())); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "False"
    # this machine: torch 2.13 ships varlen_attn, and there is no GPU
    assert out[0] == "'no CUDA GPU'"


# --- the memory budget ----------------------------------------------------------------------------


def test_memory_budget_plans_for_the_smaller_of_card_and_budget():
    assert planned_memory_gib(141.0, 10.0) == 10.0
    assert planned_memory_gib(24.0, 80.0) == 24.0
    assert planned_memory_gib(None, 10.0) == 10.0
    assert planned_memory_gib(141.0, None) == 141.0
    assert planned_memory_gib(None, None) is None


def test_a_10gib_budget_on_a_large_card_keeps_checkpointing_and_fits():
    config = fast_config()
    whole_card = apply_profile(config, 141.0, shape=QWEN7B)
    assert whole_card.lora.gradient_checkpointing is False
    config.training.memory_budget_gib = 10.0
    budgeted = apply_profile(config, 141.0, shape=QWEN7B)
    assert budgeted.lora.gradient_checkpointing == "unsloth"
    rows = budgeted.training.per_device_train_batch_size
    # with offloaded checkpointing the estimate gives 8.83 GiB for 6 rows of 2048 and 9.25 for 7: 90% of
    # 10 GiB (9.0) takes 6
    assert estimate_memory_gib(QWEN7B, rows * 2048, "unsloth") <= 9.0 < estimate_memory_gib(QWEN7B, (rows + 1) * 2048, "unsloth")
    assert rows == 6
    # the same plan as a 10 GiB card's
    card = apply_profile(fast_config(), 10.0, shape=QWEN7B)
    assert (card.training.per_device_train_batch_size, card.training.gradient_accumulation_steps, card.lora) == (
        rows, budgeted.training.gradient_accumulation_steps, budgeted.lora)


def test_memory_budget_is_validated_and_documented():
    from qtune.config import validate

    with pytest.raises(Exception, match="memory_budget_gib"):
        validate({"training": {"memory_budget_gib": 0}})
    with pytest.raises(Exception, match="attention"):
        validate({"model": {"attention": "flash"}})


# --- the example boundaries ------------------------------------------------------------------------


def test_boundaries_of_a_packed_row_and_of_plain_rows():
    import torch

    cu, longest = packed_cu_seqlens(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4 and cu.dtype == torch.int32
    # two rows: each row starts an example, even where positions would run on
    cu, longest = packed_cu_seqlens(torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]]))
    assert cu.tolist() == [0, 4, 6, 8] and longest == 4


# --- the transformers path, on the CPU with a reference kernel --------------------------------------


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """varlen_attn's semantics (torch 2.11's signature: no enable_gqa), one SDPA call per example;
    like a kernel without grouped-query support it refuses fewer key/value heads."""
    import torch
    import torch.nn.functional as F

    if key.shape[1] != query.shape[1]:
        raise RuntimeError("reference kernel: key/value heads must equal query heads")
    assert tuple(window_size) == (-1, 0)
    REFERENCE_CALLS.append(query.shape[0])
    outs = []
    bounds = cu_seq_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


REFERENCE_CALLS: list[int] = []


@pytest.fixture
def cpu_varlen(monkeypatch):
    monkeypatch.setattr(attention, "VARLEN_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: reference_varlen)
    monkeypatch.setattr(attention, "_GQA_NATIVE", {})
    REFERENCE_CALLS.clear()
    return attention.register_transformers_varlen()


def test_transformers_varlen_equals_sdpa_with_the_block_mask(cpu_varlen, tiny_qwen_dir, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    computed = []
    original = attention.packed_cu_seqlens
    monkeypatch.setattr(attention, "packed_cu_seqlens", lambda ids: computed.append(1) or original(ids))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, attn_implementation="sdpa")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped heads are exercised
    lengths = [5, 9, 3, 7]
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[positions == 0] = -100
    with torch.no_grad():
        reference = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False)
        model.config._attn_implementation = cpu_varlen
        ours = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False)
    layers = model.config.num_hidden_layers
    assert REFERENCE_CALLS == [sum(lengths)] * layers  # one call per layer, over the whole row
    assert len(computed) == 1  # the boundaries once per batch, shared by every layer
    assert torch.allclose(ours.logits, reference.logits, atol=1e-5)
    assert abs(float(ours.loss) - float(reference.loss)) < 1e-5
    # the reference refuses grouped heads: they were expanded after one probe
    assert attention._GQA_NATIVE == {torch.device("cpu"): False}


def test_transformers_varlen_leaves_padded_batches_to_sdpa(cpu_varlen, tiny_qwen_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, attn_implementation="sdpa")
    ids = torch.randint(0, 1000, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        model.config._attn_implementation = cpu_varlen
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert REFERENCE_CALLS == []
    assert torch.allclose(ours[1, 2:], reference[1, 2:], atol=1e-5) and torch.allclose(ours[0], reference[0], atol=1e-5)


# --- the run says which attention it uses ---------------------------------------------------------


@pytest.mark.slow
def test_a_run_asking_for_varlen_without_a_gpu_falls_back_and_says_so(tmp_path, tiny_qwen_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(8)])
    config = tiny_run_config(
        tmp_path, tiny_qwen_dir, data, model={"backend": "transformers", "attention": "varlen"}, training={"max_steps": 1, "packing": True}
    )
    result = run_qtune("run", str(config), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "attention: default (sdpa); varlen not used: no CUDA GPU" in " ".join(result.stdout.split())


# --- Unsloth: the patch knows its version ----------------------------------------------------------


def test_unsloth_patch_applies_to_the_version_it_knows_only(monkeypatch):
    """Unsloth's attention dispatch imports only on a GPU machine (here its CPU fallback lacks it): a
    stand-in with the attributes the patch touches takes its place; the GPU run uses the real one."""
    import types

    from qtune.plugins.unsloth_backend import KNOWN_UNSLOTH, enable_unsloth_varlen

    dispatch = types.SimpleNamespace(
        HAS_FLASH_ATTENTION=False, _TORCH_VARLEN_ATTN=None, _NATIVE_BEATS_XFORMERS=False,
        _visible_capabilities=lambda: [(9, 0)], _native_beats_xformers=lambda caps, loaded: loaded and all(c[0] >= 8 for c in caps),
    )
    unsloth = types.SimpleNamespace(__version__="2099.1.1")
    monkeypatch.setitem(sys.modules, "unsloth", unsloth)
    monkeypatch.setitem(sys.modules, "unsloth.utils", types.SimpleNamespace(attention_dispatch=dispatch))
    monkeypatch.setitem(sys.modules, "unsloth.utils.attention_dispatch", dispatch)
    assert enable_unsloth_varlen() == f"qtune's varlen patch knows Unsloth {KNOWN_UNSLOTH}, not 2099.1.1"
    assert dispatch._TORCH_VARLEN_ATTN is None
    unsloth.__version__ = KNOWN_UNSLOTH
    assert enable_unsloth_varlen() is None
    assert dispatch._TORCH_VARLEN_ATTN is attention.varlen_attention and dispatch._NATIVE_BEATS_XFORMERS is True
    # a torch whose varlen_attn Unsloth already uses (2.12+) is left as it is
    own = object()
    dispatch._TORCH_VARLEN_ATTN = own
    assert enable_unsloth_varlen() is None and dispatch._TORCH_VARLEN_ATTN is own


def test_the_fast_profile_says_why_varlen_was_not_chosen(tiny_qwen_dir):
    import io

    from rich.console import Console

    from qtune.plugins.transformers_backend import TransformersBackend
    from qtune.profiles import resolve_profile

    config = fast_config(name=str(tiny_qwen_dir))
    console = Console(file=io.StringIO(), width=300)
    applied = resolve_profile(config, TransformersBackend(), console)
    printed = console.file.getvalue()
    assert applied.model.attention == "default"
    assert "model.attention: 'auto' -> 'default'" in printed
    assert "note: varlen attention not chosen: no CUDA GPU" in printed  # this machine has no GPU


def test_float32_cuda_tensors_reach_the_kernel_in_the_models_16_bit_dtype():
    # A QLoRA model prepared by peft keeps its norms in float32, so q/k/v arrive in float32, which
    # FlashAttention refuses; the H200 run of benchmarks/gpu_plain_memory.py failed so before this cast.
    import types

    import torch

    def tensor(dtype, device):
        return types.SimpleNamespace(dtype=dtype, device=torch.device(device) if device == "cpu" else types.SimpleNamespace(type=device))

    def module(**config):
        return types.SimpleNamespace(config=types.SimpleNamespace(**config))

    assert attention.half_dtype_for(tensor(torch.float32, "cuda"), module(_pre_quantization_dtype=torch.float16, dtype=torch.float32)) == torch.float16
    assert attention.half_dtype_for(tensor(torch.float32, "cuda"), module(dtype=torch.bfloat16)) == torch.bfloat16
    assert attention.half_dtype_for(tensor(torch.float32, "cuda"), module(dtype=torch.float32)) == torch.bfloat16
    assert attention.half_dtype_for(tensor(torch.bfloat16, "cuda"), module(dtype=torch.bfloat16)) is None
    assert attention.half_dtype_for(tensor(torch.float32, "cpu"), module(dtype=torch.bfloat16)) is None  # CPU kernels take float32


def gqa_reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """The reference kernel taking grouped key/value heads as they are, as FlashAttention's does (so
    the first call runs the whole grouped-heads probe, with its own autograd graph)."""
    groups = query.shape[1] // key.shape[1]
    return reference_varlen(query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), cu_seq_q, cu_seq_k,
                            max_q, max_k, scale=scale, window_size=window_size)


def test_transformers_varlen_trains_under_non_reentrant_gradient_checkpointing(tiny_qwen_dir, monkeypatch):
    # The H200 run of benchmarks/gpu_plain_memory.py (checkpointing on) failed with torch's "A different
    # number of tensors was saved during the original forward and recomputation": the grouped-heads
    # probe ran inside layer 0's first forward, and its tensors were counted there but not in the
    # recomputation (the probe's answer was cached by then).
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(attention, "VARLEN_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: gqa_reference_varlen)
    monkeypatch.setattr(attention, "_GQA_NATIVE", {})
    name = attention.register_transformers_varlen()
    lengths = [5, 9, 3, 7]
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    grads = {}
    for implementation in ("sdpa", name):
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, attn_implementation="sdpa")
        model.config._attn_implementation = implementation
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward()
        grads[implementation] = model.model.layers[0].self_attn.q_proj.weight.grad
    assert attention._GQA_NATIVE == {torch.device("cpu"): True}  # the probe ran, inside the checkpointed forward
    assert torch.allclose(grads[name], grads["sdpa"], atol=1e-5)
