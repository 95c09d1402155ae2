"""Variable-length attention on packed batches (issue 16): numerics and speed on one GPU.

    python benchmarks/bench_varlen.py prepare DIR              # here: tokenizer + Alpaca rows into DIR
    python benchmarks/bench_varlen.py smoke --assets DIR       # GPU: kernel + small-model numerics
    python benchmarks/bench_varlen.py speed --assets DIR       # GPU: the Qwen2.5-7B shape, every setup

``smoke`` checks, on the GPU: torch's ``varlen_attn`` signature and whether it takes grouped heads;
one layer of the Qwen2.5-7B shape (28 query heads, 4 KV heads, head dim 128, 16,328 packed tokens in
71 examples) through :func:`qtune.plugins.varlen.varlen_attention` against one SDPA call per example
(outputs, gradients, time); then a random-weight model of the Qwen2.5-0.5B shape, for transformers
(``sdpa`` with transformers' block-diagonal mask against ``qtune_varlen``) and for Unsloth (its
dispatch as shipped against the same dispatch with qtune's patch): the loss of each of 20 LoRA steps
on the same packed batches from the same initial weights, per-layer gradients of one batch, and
isolation (changing one packed example leaves every other example's logits bit-identical).

``speed`` builds the random-weight Qwen2.5-7B shape as a bitsandbytes NF4 checkpoint and trains on
the Alpaca rows, each setup in its own process (``import unsloth`` patches the process), timing
optimizer steps after warm-up ones. Setups that differ only in the attention run in one process,
one phase after the other (same model, same batches stream, the switch between steps).

Everything prints one JSON line per result; the last lines are a table. ``--out`` (default $OUT)
gets ``bench_varlen-<mode>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # assets.py: the Qwen2.5 tokenizer and shapes
sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402  (benchmarks/checkpoints.py: the random-weight checkpoints every GPU script builds)

GIB = 1024**3
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALPACA_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""
#: loss tolerance of the numerics: bf16 keeps 8 bits of mantissa (relative step 2**-8 = 0.0039);
#: two attention kernels summing in different orders, compounded over 20 LoRA updates
LOSS_RTOL = 1e-2
GRAD_RTOL = 5e-2


def emit(kind: str, **fields) -> dict:
    record = {"kind": kind, **fields}
    print("RESULT " + json.dumps(record, default=str), flush=True)
    return record


# --------------------------------------------------------------------------- data


def alpaca_texts(assets: Path, eos: str) -> list[str]:
    rows = json.loads((assets / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    return [ALPACA_PROMPT.format(r["instruction"], r.get("input", ""), r["output"]) + eos for r in rows]


def packed_batches(tokenizer, texts: list[str], count: int, row_tokens: int, device) -> list[dict]:
    """``count`` padding-free batches as trl's collator makes them: one row of whole examples, position
    ids restarting at 0 for each, the first token of each example not trained."""
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:2048] for t in texts]
    batches, i = [], 0
    while len(batches) < count:
        row, positions, labels, lengths = [], [], [], []
        while sum(lengths) + len(ids[i % len(ids)]) <= row_tokens:
            example = ids[i % len(ids)]
            row += example
            positions += list(range(len(example)))
            labels += [-100] + example[1:]
            lengths.append(len(example))
            i += 1
        batches.append(
            {
                "input_ids": torch.tensor([row], device=device),
                "position_ids": torch.tensor([positions], device=device),
                "labels": torch.tensor([labels], device=device),
                "lengths": lengths,
            }
        )
    return batches


def model_inputs(batch: dict) -> dict:
    """The batch as trl's trainer hands it to the model (no cache: with one, transformers would not
    see the packing)."""
    return {**{k: v for k, v in batch.items() if k != "lengths"}, "use_cache": False}


# --------------------------------------------------------------------------- smoke: kernel


def kernel_check() -> dict:
    """One attention layer of the Qwen2.5-7B shape over 71 packed examples: qtune's varlen call against
    one SDPA call per example."""
    import inspect

    import torch
    import torch.nn.functional as F
    from torch.nn.attention.varlen import varlen_attn

    from qtune.plugins.varlen import _gqa_is_native, varlen_attention

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(40, 420, (71,), generator=generator)
    lengths[-1] += 16328 - int(lengths.sum())
    lengths = lengths.clamp(min=8)
    total = int(lengths.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device=device, dtype=torch.int32)
    max_len = int(lengths.max())

    def make(heads):
        return torch.randn(total, heads, 128, generator=generator).to(device, torch.bfloat16).requires_grad_()

    q, k, v = make(28), make(4), make(4)
    grad_out = torch.randn(total, 28, 128, generator=generator).to(device, torch.bfloat16)

    def varlen():
        out = varlen_attention(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0), enable_gqa=True)
        return out, torch.autograd.grad(out, (q, k, v), grad_out)

    def per_example():
        outs, start = [], 0
        for n in lengths.tolist():
            sl = slice(start, start + n)
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None], is_causal=True, enable_gqa=True
            )
            outs.append(o[0].transpose(0, 1))
            start += n
        out = torch.cat(outs)
        return out, torch.autograd.grad(out, (q, k, v), grad_out)

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps * 1000

    a, ga = varlen()
    b, gb = per_example()
    diffs = {name: float((x.float() - y.float()).abs().max()) for name, x, y in zip(("out", "dq", "dk", "dv"), (a, *ga), (b, *gb), strict=True)}
    return emit(
        "kernel",
        signature=str(inspect.signature(varlen_attn)),
        gqa_native=_gqa_is_native(varlen_attn, device),
        tokens=total,
        examples=len(lengths),
        max_abs_diff=diffs,
        varlen_ms=round(timed(varlen), 3),
        per_example_sdpa_ms=round(timed(per_example), 3),
    )


# --------------------------------------------------------------------------- smoke: small models


def build_small_model(assets: Path, dest: Path) -> Path:
    checkpoints.build(dest, "0.5B", tokenizer_dir=assets / "tokenizer")
    return dest


def layer_grads(model) -> dict[int, object]:
    """Each decoder layer's gradients (LoRA ones where LoRA is on), flattened in fp32."""
    import re

    import torch

    found: dict[int, list] = {}
    for name, p in model.named_parameters():
        match = re.search(r"layers\.(\d+)\.", name)
        if match and p.grad is not None:
            found.setdefault(int(match.group(1)), []).append(p.grad.detach().float().flatten())
    return {i: torch.cat(gs) for i, gs in sorted(found.items())}


def compare_paths(model, batches, use_default, use_varlen, trained_params) -> dict:
    """The numerics of one model under two attention paths (switches between calls)."""
    import torch

    model.train()  # as in training (dropout is 0: the two paths see the same computation)
    # per-layer gradients of the first batch
    grads = {}
    for name, switch in (("default", use_default), ("varlen", use_varlen)):
        switch()
        model.zero_grad(set_to_none=True)
        model(**model_inputs(batches[0])).loss.backward()
        grads[name] = layer_grads(model)
    model.zero_grad(set_to_none=True)
    per_layer = {
        i: float((grads["varlen"][i] - grads["default"][i]).norm() / grads["default"][i].norm().clamp_min(1e-30)) for i in grads["default"]
    }
    # 20 LoRA steps from the same weights on the same batches
    start = [p.detach().clone() for p in trained_params]
    losses = {}
    for name, switch in (("default", use_default), ("varlen", use_varlen)):
        switch()
        with torch.no_grad():
            for p, s in zip(trained_params, start, strict=True):
                p.copy_(s)
        optimizer = torch.optim.AdamW(trained_params, lr=2e-4, weight_decay=0.01)
        losses[name] = []
        for batch in batches:
            loss = model(**model_inputs(batch)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name].append(float(loss.detach()))
    rel = [abs(a - b) / abs(b) for a, b in zip(losses["varlen"], losses["default"], strict=True)]
    # isolation: change the middle example of the first batch; every other example's outputs stay bit-identical
    use_varlen()
    batch = batches[0]
    lengths = batch["lengths"]
    j = len(lengths) // 2
    start_j, end_j = sum(lengths[:j]), sum(lengths[: j + 1])
    changed = batch["input_ids"].clone()
    changed[0, start_j:end_j] = (changed[0, start_j:end_j] + 17) % 150000
    decoder = model.get_base_model().model  # the layers' output: Unsloth's training forward returns no logits
    with torch.no_grad():
        before = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state[0]
        after = decoder(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).last_hidden_state[0]
    keep = torch.ones(before.shape[0], dtype=torch.bool, device=before.device)
    keep[start_j:end_j] = False
    return {
        "batches": len(batches),
        "tokens_per_batch": [int(b["input_ids"].shape[1]) for b in batches],
        "examples_per_batch": [len(b["lengths"]) for b in batches],
        "layer_grad_rel_diff_max": max(per_layer.values()),
        "layer_grad_rel_diff": per_layer,
        "losses_default": losses["default"],
        "losses_varlen": losses["varlen"],
        "loss_rel_diff_max": max(rel),
        "loss_within_tolerance": max(rel) <= LOSS_RTOL,
        "grads_within_tolerance": max(per_layer.values()) <= GRAD_RTOL,
        "others_bit_identical": bool(torch.equal(before[keep], after[keep])),
        "changed_example_differs": not bool(torch.equal(before[~keep], after[~keep])),
    }


def unsloth_paths():
    """(patch note, call counter, use Unsloth's dispatch as shipped, use it with qtune's varlen patch,
    the kernel it shipped with): the switches only swap the kernel the dispatch reads at call time."""
    from unsloth.utils import attention_dispatch as dispatch

    from qtune.plugins.unsloth_backend import enable_unsloth_varlen

    shipped = dispatch._TORCH_VARLEN_ATTN
    note = enable_unsloth_varlen() or "applied"
    patched = dispatch._TORCH_VARLEN_ATTN
    calls = {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return patched(*a, **k)

    def use_default():
        dispatch._TORCH_VARLEN_ATTN = shipped

    def use_varlen():
        dispatch._TORCH_VARLEN_ATTN = counting

    return note, calls, use_default, use_varlen, shipped


def transformers_paths(model):
    """(use sdpa, use qtune_varlen) for a peft model: they switch its config's attn_implementation."""
    from qtune.plugins.varlen import register_transformers_varlen

    name = register_transformers_varlen()
    config = model.base_model.model.config

    def use(implementation):
        def switch():
            config._attn_implementation = implementation

        return switch

    return use("sdpa"), use(name)

def numerics(model, tokenizer, args: dict, use_default, use_varlen, calls: dict) -> dict:
    """:func:`compare_paths` on 20 packed batches of ~4,096 tokens, plus the varlen calls one forward makes."""
    import torch

    batches = packed_batches(tokenizer, alpaca_texts(Path(args["assets"]), tokenizer.eos_token), 20, 4096, "cuda")
    trained = [p for p in model.parameters() if p.requires_grad]
    result = compare_paths(model, batches, use_default, use_varlen, trained)
    use_varlen()
    calls["n"] = 0
    with torch.no_grad():
        model(**model_inputs(batches[1]))
    result["varlen_calls_per_forward"] = calls["n"]
    result["layers"] = model.get_base_model().config.num_hidden_layers
    return result


def worker_numerics_hf(args: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qtune.plugins.varlen as attention

    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    torch.manual_seed(3407)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
    use_sdpa, use_varlen = transformers_paths(model)
    calls = {"n": 0}

    kernel = attention.varlen_attention

    def counting(*a, **k):
        calls["n"] += 1
        return kernel(*a, **k)

    attention.varlen_attention = counting
    result = numerics(model, tokenizer, args, use_sdpa, use_varlen, calls)
    return emit("numerics", backend="transformers", default="sdpa (block-diagonal mask)", **result)


def worker_numerics_unsloth(args: dict) -> dict:
    from unsloth import FastLanguageModel  # noqa: I001  (first: it patches trl/transformers/peft)
    import torch

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args["model"], max_seq_length=4096, dtype=torch.bfloat16, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=TARGET_MODULES, lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing=False, random_state=3407
    )
    why_not, calls, use_default, use_varlen, shipped = unsloth_paths()
    result = numerics(model, tokenizer, args, use_default, use_varlen, calls)
    return emit(
        "numerics", backend="unsloth", shipped_varlen=repr(shipped), patch=why_not,
        default="Unsloth's dispatch as shipped", **result,
    )


# --------------------------------------------------------------------------- speed


def build_7b(assets: Path, dest: Path) -> dict:
    """Random-weight Qwen2.5-7B shape, saved as a bitsandbytes NF4 checkpoint (as Unsloth's -bnb-4bit)."""
    return {"build_s": checkpoints.build(dest, "7B", nf4=True, tokenizer_dir=assets / "tokenizer")["build_s"]}


def text_dataset(assets: Path, eos: str):
    from datasets import Dataset

    return Dataset.from_dict({"text": alpaca_texts(assets, eos)})


class PhaseTimer:
    """An HF TrainerCallback's worth of timing: per optimizer step, the wall time (device synced) and
    the tokens the step trained (input ids of padding-free rows, else the attention mask's sum), and
    a switch to the next phase (attention path) every ``per_phase`` steps."""

    def __init__(self, phases, warmup: int, timed: int, profile: bool):
        self.phases, self.warmup, self.timed, self.profile = phases, warmup, timed, profile
        self.per_phase = warmup + timed + (1 if profile else 0)
        self.steps: list[dict] = []
        self.tokens = 0
        self.profiles: dict = {}

    def watch(self, trainer):
        step = trainer.training_step

        def counted(*args, **kwargs):
            inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
            mask = inputs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return step(*args, **kwargs)

        trainer.training_step = counted

    def callback(self):
        import torch
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                index = state.global_step
                phase, within = divmod(index, timer.per_phase)
                if within == 0:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    timer.phases[phase][1]()  # switch the attention path
                timer.profiler = None
                if timer.profile and within == timer.per_phase - 1:
                    timer.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    timer.profiler.__enter__()
                torch.cuda.synchronize()
                timer.t0, timer.tokens = time.perf_counter(), 0

            def on_step_end(self, args, state, control, **kwargs):
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - timer.t0
                phase, within = divmod(state.global_step - 1, timer.per_phase)
                name = timer.phases[phase][0]
                if timer.profiler is not None:
                    timer.profiler.__exit__(None, None, None)
                    try:
                        timer.profiles[name] = summarize_profile(timer.profiler)
                    except Exception as error:  # a profile is a bonus: never lose the timings to it
                        timer.profiles[name] = {"error": repr(error)[:300]}
                    timer.profiler = None
                    return
                timer.steps.append({"phase": name, "step": within, "s": elapsed, "tokens": timer.tokens,
                                    "timed": within >= timer.warmup, "peak_gib": torch.cuda.max_memory_reserved() / GIB})

        return Callback()

    def result(self) -> dict:
        out = {}
        for name, _ in self.phases:
            timed = [s for s in self.steps if s["phase"] == name and s["timed"]]
            if not timed:
                continue
            seconds, tokens = sum(s["s"] for s in timed), sum(s["tokens"] for s in timed)
            out[name] = {"tokens_per_s": round(tokens / seconds, 1), "s_per_step": round(seconds / len(timed), 4), "timed_steps": len(timed),
                         "tokens_per_step": round(tokens / len(timed)), "peak_reserved_gib": round(max(s["peak_gib"] for s in timed), 2),
                         "step_s": [round(s["s"], 4) for s in timed], "profile": self.profiles.get(name)}
        return out


def summarize_profile(profiler) -> dict:
    """Kernel launches, attention kernels and the share of GPU time in copies/fills of one profiled step."""
    launches = attention = 0
    gpu_us = copy_us = attention_us = 0.0
    for event in profiler.events():
        if event.device_type.name != "CUDA":
            continue
        name = event.name.lower()
        duration = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        launches += 1
        gpu_us += duration
        if any(key in name for key in ("flash", "fmha", "cudnn", "attention", "attn")):
            attention += 1
            attention_us += duration
        elif any(key in name for key in ("copy", "memcpy", "memset", "fill", "pad", "cat", "elementwise_kernel<", "zero")):
            copy_us += duration
    return {"kernels": launches, "attention_kernels": attention, "gpu_ms": round(gpu_us / 1000, 1),
            "attention_ms": round(attention_us / 1000, 1), "copy_fill_share": round(copy_us / gpu_us, 3) if gpu_us else None}


def train_phases(model, tokenizer, args: dict, paths: dict, **sft_extra):
    """trl's SFTTrainer on the Alpaca texts with the seed's hyper-parameters and ``args["settings"]``
    (batch, accumulation, packing), one phase per entry of ``args["phases"]`` (a key of ``paths``,
    whose switch runs when its phase starts); returns the trainer and its :class:`PhaseTimer`."""
    from trl import SFTConfig, SFTTrainer

    s = args["settings"]
    timer = PhaseTimer([(p, paths[p]) for p in args["phases"]], args["warmup"], args["timed"], args.get("profile", False))
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=text_dataset(Path(args["assets"]), tokenizer.eos_token),
        args=SFTConfig(
            per_device_train_batch_size=s["batch"], gradient_accumulation_steps=s["accumulation"], warmup_steps=5,
            max_steps=len(args["phases"]) * timer.per_phase, learning_rate=2e-4, bf16=True, logging_steps=1, optim="adamw_8bit",
            weight_decay=0.01, lr_scheduler_type="linear", seed=3407, output_dir=str(Path(args["work"]) / "outputs"), report_to="none",
            save_strategy="no", dataset_text_field="text", max_length=2048, dataset_num_proc=2, packing=s["packing"], disable_tqdm=True,
            **sft_extra,
        ),
        callbacks=[timer.callback()],
    )
    timer.watch(trainer)
    trainer.train()
    return trainer, timer


def worker_raw_unsloth(args: dict) -> dict:
    """Unsloth without qtune: its best tuning (or the seed notebook's), each phase an attention path."""
    from unsloth import FastLanguageModel  # noqa: I001  (first: it patches trl/transformers/peft)

    s = args["settings"]
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args["model"], max_seq_length=2048, dtype=None, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=TARGET_MODULES, lora_alpha=16, lora_dropout=0, bias="none",
        use_gradient_checkpointing=s["gradient_checkpointing"], random_state=3407, use_rslora=False, loftq_config=None,
    )
    note, calls, default, varlen, _ = unsloth_paths()

    trainer, timer = train_phases(model, tokenizer, args, {"default": default, "varlen": varlen})
    return {"phases": timer.result(), "patch": note, "varlen_calls": calls["n"], "padding_free": bool(getattr(trainer.args, "padding_free", False))}


def worker_raw_transformers(args: dict) -> dict:
    """transformers + peft + bitsandbytes without Unsloth, packing; each phase an attn_implementation."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = args["settings"]
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(s["gradient_checkpointing"]),
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3407)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
    use_sdpa, use_varlen = transformers_paths(model)
    trainer, timer = train_phases(model, tokenizer, args, {"default": use_sdpa, "varlen": use_varlen}, gradient_checkpointing=False)
    return {"phases": timer.result()}


def qtune_setup(args: dict) -> dict:
    """`qtune run` on the seed's config pointed at the checkpoint and the rows (plus ``training`` and
    ``model_changes``): :func:`checkpoints.run_qtune`'s figures."""
    config = {"model": {"name": args["model"], **args.get("model_changes", {})}, "callbacks": ["memory_monitor"],
              "dataset": {"path": str(Path(args["assets"]) / "alpaca_en_demo.json")},
              "training": {"max_steps": args["warmup"] + args["timed"], **args.get("training", {})}}
    result = checkpoints.run_qtune(Path(args["work"]), args["name"], config, args["warmup"], args.get("timeout", 200))
    result.pop("config", None)
    return result


WORKERS = {"numerics_hf": worker_numerics_hf, "numerics_unsloth": worker_numerics_unsloth,
           "raw_unsloth": worker_raw_unsloth, "raw_transformers": worker_raw_transformers}


def in_process(worker: str, args: dict, timeout: float) -> dict:
    """Run ``worker`` in a fresh Python (``import unsloth`` patches the whole process)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "worker", worker, json.dumps(args)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout:.0f} s", "tail": str(exc.stdout or "")[-800:]}
    found = [ln[len("RETURN "):] for ln in proc.stdout.splitlines() if ln.startswith("RETURN ")]
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            print(line, flush=True)
    if proc.returncode != 0 or not found:
        return {"error": (proc.stdout[-800:] + proc.stderr[-2500:]), "wall_s": round(time.perf_counter() - t0, 1)}
    result = json.loads(found[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def versions() -> dict:
    import importlib.metadata as md

    import torch

    found = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "gpu_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1),
             "capability": torch.cuda.get_device_capability(0)}
    for name in ("transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "qtune"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def smoke(opts) -> dict:
    report = {"versions": versions()}
    report["kernel"] = kernel_check()
    work = Path(opts.work)
    model = build_small_model(Path(opts.assets), work / "qwen2.5-0.5b-shape")
    args = {"model": str(model), "assets": opts.assets}
    report["numerics_transformers"] = in_process("numerics_hf", args, 240)
    report["numerics_unsloth"] = in_process("numerics_unsloth", args, 300)
    return report


FAST = {"batch": 8, "accumulation": 1, "gradient_checkpointing": False, "packing": True}
SEED = {"batch": 2, "accumulation": 4, "gradient_checkpointing": "unsloth", "packing": False}


def speed(opts) -> dict:
    started = time.perf_counter()
    report = {"versions": versions()}
    work, assets = Path(opts.work), opts.assets
    model = work / "qwen2.5-7b-shape-bnb-4bit"
    report["build"] = build_7b(Path(assets), model)
    emit("build", **report["build"])
    base = {"model": str(model), "assets": assets, "work": str(work), "warmup": opts.warmup, "timed": opts.timed}
    from qtune.config import Config
    from qtune.plugins.models import SHAPES
    from qtune.profiles import PLAIN_KERNELS, apply_profile

    plain = Config()
    plain.training.profile = "fast"
    plain = apply_profile(plain, report["versions"]["gpu_gib"], shape=SHAPES["qwen2.5-7b"], kernels=PLAIN_KERNELS, varlen_unavailable=None)
    transformers_fast = {"batch": plain.training.per_device_train_batch_size, "accumulation": 1,
                         "gradient_checkpointing": plain.lora.gradient_checkpointing, "packing": True}
    fast_timed = {"warmup": opts.warmup, "timed": opts.timed}
    short = {"warmup": opts.warmup, "timed": max(3, opts.timed - 2)}
    plan = [  # most telling first: the call stops starting setups when its time runs short
        ("unsloth_best", lambda: in_process("raw_unsloth", {**base, **fast_timed, "settings": FAST, "phases": ["default", "varlen"], "profile": True}, 220)),
        ("qtune_fast_after", lambda: qtune_setup({**base, **fast_timed, "name": "fast-auto", "training": {"profile": "fast"}})),
        ("seed", lambda: in_process("raw_unsloth", {**base, **short, "settings": SEED, "phases": ["default", "varlen"]}, 200)),
        ("qtune_fast_10gib_after", lambda: qtune_setup({**base, **fast_timed, "name": "fast-10gib", "training": {"profile": "fast", "memory_budget_gib": 10}})),
        ("transformers_packing", lambda: in_process("raw_transformers", {**base, **short, "settings": transformers_fast, "phases": ["default", "varlen"]}, 220)),
        ("qtune_fast_before", lambda: qtune_setup({**base, **fast_timed, "name": "fast-default", "training": {"profile": "fast"},
                                                   "model_changes": {"attention": "default"}})),
    ]
    only = set(opts.only.split(",")) if opts.only else None
    for name, run in plan:
        if only and name not in only:
            continue
        left = opts.budget_s - (time.perf_counter() - started)
        if left < 0:
            report[name] = {"skipped": f"--budget-s {opts.budget_s:.0f} spent ({-left:.0f} s over) before it could start"}
            continue
        report[name] = run()
        emit("setup", name=name, **report[name])
        write(opts, "speed", report)
    report["transformers_settings"] = transformers_fast
    return report


def table(report: dict) -> list[str]:
    rows = ["setup | path | tokens/s | s/step | peak GiB | kernels/step | attention kernels | copy share"]
    for name, value in report.items():
        if not isinstance(value, dict):
            continue
        phases = value.get("phases") or ({"qtune": value} if "tokens_per_s" in value else {})
        for path, p in phases.items():
            prof = p.get("profile") or {}
            rows.append(f"{name} | {path if path != 'qtune' else value.get('attention', '')} | {p.get('tokens_per_s')} | {p.get('s_per_step')} | "
                        f"{p.get('peak_reserved_gib')} | {prof.get('kernels', '')} | {prof.get('attention_kernels', '')} | {prof.get('copy_fill_share', '')}")
    return rows


def write(opts, mode: str, report: dict) -> None:
    out = Path(opts.out or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_varlen-{mode}.json").write_text(json.dumps(report, indent=1, default=str))


def prepare(dest: Path) -> None:
    from assets import qwen25_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    if (dest / "tokenizer").exists():
        shutil.rmtree(dest / "tokenizer")
    qwen25_tokenizer(instruct=False, dest=dest / "tokenizer")
    source = Path(os.environ.get("BENCH_DATA", ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"))
    shutil.copyfile(source, dest / "alpaca_en_demo.json")
    print(f"prepared {dest}")


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        result = WORKERS[argv[1]](json.loads(argv[2]))
        print("RETURN " + json.dumps(result, default=str), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["prepare", "smoke", "speed"])
    parser.add_argument("dest", nargs="?", help="prepare: the folder to fill")
    parser.add_argument("--assets", default=str(ROOT / ".bench" / "varlen-assets"))
    parser.add_argument("--work", default="/tmp/bench_varlen")
    parser.add_argument("--out", default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--only", default="")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="start no setup after this many seconds (each takes ~100-120 s on an H200: give the call's limit minus ~130)")
    opts = parser.parse_args(argv)
    if opts.mode == "prepare":
        prepare(Path(opts.dest or opts.assets))
        return 0
    Path(opts.work).mkdir(parents=True, exist_ok=True)
    report = smoke(opts) if opts.mode == "smoke" else speed(opts)
    write(opts, opts.mode, report)
    print("\n".join(table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
