"""Training profiles and the GPU-memory estimate they are sized with.

``training.profile`` names a profile; :func:`apply_profile` turns the config into the one that runs:

``seed``
    The config as written: Unsloth's Qwen2.5-7B Alpaca notebook unless you changed a knob.

``fast``
    Maximises non-pad tokens per second within the GPU's memory:

    * packing on (trl's ``bfd`` strategy: padding-free batches whose ``position_ids`` restart at 0
      for every example, so no example attends to another; the loss is still the mean over the
      batch's trained tokens, as in the seed);
    * a micro-batch of :data:`FAST_TOKENS_PER_MICROBATCH` tokens (8 packed rows at 2048): on an
      H200, 16 rows of 2048 ran no faster than 8 (FACTS.md), so bigger micro-batches only cost
      memory;
    * gradient checkpointing off when :func:`estimate_memory_gib` says the whole micro-batch's
      activations fit in the card's memory (9.0x the seed's tokens/s on an H200, against 7.4x with
      checkpointing kept on);
    * gradient accumulation chosen so that an optimizer step still holds the seed's token capacity
      (``batch x accumulation x max_seq_length``, 2 x 4 x 2048 = 16,384 tokens): packed rows fill
      that capacity with real tokens where the seed's padded rows mostly held padding, so an
      optimizer step sees more examples (about 8x on Alpaca, whose examples average ~200 tokens).
      ``max_steps`` is kept: a fast run of N steps trains on more data than a seed run of N steps;
    * ``model.attention: auto`` becomes ``varlen`` (one variable-length attention call per layer on
      packed batches) where the backend runs it for this model on this machine
      (``Backend.varlen_reason``, :func:`attention_choice`), else ``default`` (the backend's own attention);
    * memory is planned for ``training.memory_budget_gib`` where that is less than the card's.

Nothing here imports torch: the estimate is arithmetic on the model's shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

PROFILES = ("seed", "fast")
#: what apply_profile assumes about varlen attention when the caller did not ask the backend
NOT_CHECKED = "the backend was not asked"

#: tokens per micro-batch the fast profile aims for (8 rows of 2048; more ran no faster on an H200)
FAST_TOKENS_PER_MICROBATCH = 16_384
#: share of the card's memory the fast profile plans to fill; the rest is left to the allocator's
#: fragmentation, the CUDA context and kernels' workspaces
MEMORY_HEADROOM_FRACTION = 0.90
#: a gradient-checkpointing-off micro-batch must hold at least this share of the target tokens to
#: be chosen over checkpointing with the full target (a tiny un-checkpointed batch is slower)
MIN_NO_CHECKPOINT_SHARE = 0.5

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that its memory use depends on."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: Optional[int] = None
    tied_embeddings: bool = False

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the output head (once when they are tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def linear_params_per_layer(self) -> int:
        """The 7 projections of one layer (q, k, v, o, gate, up, down); norms and biases are noise."""
        q = self.heads * self.dim_per_head
        kv = self.kv_heads * self.dim_per_head
        attention = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return attention + mlp

    @property
    def params(self) -> int:
        return self.embedding_params + self.layers * self.linear_params_per_layer

    def lora_params(self, r: int, target_modules: Optional[list[str]] = None) -> int:
        """Parameters of rank-``r`` LoRA adapters on ``target_modules`` (default: all 7 projections)."""
        q = self.heads * self.dim_per_head
        kv = self.kv_heads * self.dim_per_head
        shapes = {  # in, out
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        names = list(shapes) if target_modules is None else [m for m in target_modules if m in shapes]
        return self.layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in names)

    @classmethod
    def from_hf_config(cls, data: Mapping[str, Any]) -> ModelShape:
        """From a ``config.json`` mapping (its ``text_config`` for multimodal checkpoints)."""
        data = data.get("text_config") or data
        heads = int(data["num_attention_heads"])
        return cls(
            vocab=int(data["vocab_size"]),
            hidden=int(data["hidden_size"]),
            layers=int(data["num_hidden_layers"]),
            intermediate=int(data["intermediate_size"]),
            heads=heads,
            kv_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=data.get("head_dim"),
            tied_embeddings=bool(data.get("tie_word_embeddings", False)),
        )


# --- the memory estimate -------------------------------------------------------------------------

#: bytes a 4-bit NF4 weight takes: 4 bits + one 8-bit absmax per 64 weights + one fp32 scale per
#: 256 absmax blocks (bitsandbytes' double quantization)
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
#: LoRA parameter: fp32 weight (4) + fp32 gradient (4) + two 8-bit AdamW states (2)
LORA_BYTES_PER_PARAM = 10
#: activations one decoder layer keeps per token, in 16-bit values: a few x hidden (attention inputs
#: and outputs, residual, norms) + a few x intermediate (gate, up, their product). Fitted to FACTS.md:
#: Qwen2.5-7B with checkpointing off grew 3.55 MiB per micro-batch token (8 -> 16 packed rows of 2048);
#: these constants give 3.58.
LAYER_VALUES_PER_TOKEN = (3.5, 2.8)  # (x hidden, x intermediate)
#: CUDA context, cuBLAS workspaces and allocator slack, GiB
FIXED_OVERHEAD_GIB = 0.5


@dataclass(frozen=True)
class MemoryTraits:
    """How a backend's kernels spend memory per token; each :class:`qtune.api.Backend` declares its own
    (``memory_traits``) and the estimate below reads them."""

    #: bytes of logits kept per token and vocabulary entry: a chunked fused cross-entropy keeps a
    #: slice of the fp32 logits (about 0.5); plain transformers keeps whole fp32 logits, their
    #: log-softmax and their gradient (10)
    logit_bytes_per_vocab: float = 10.0
    #: activations one layer keeps, relative to fused kernels
    layer_factor: float = 2.3
    #: whether gradient checkpointing "unsloth" offloads each layer's input to host memory
    offloads_checkpoints: bool = False
    #: bytes per embedding and output-head weight of a 4-bit model: 2 where they stay 16-bit, 4
    #: where peft's prepare_model_for_kbit_training casts them to float32 (plain transformers)
    embedding_bytes_per_param: float = 4.0


#: Unsloth's fused kernels, as measured on an H200 (FACTS.md): what the seed notebook runs on
FUSED_KERNELS = MemoryTraits(logit_bytes_per_vocab=0.5, layer_factor=1.0, offloads_checkpoints=True, embedding_bytes_per_param=2.0)
#: transformers + peft without fused kernels (also the cautious default for any other backend),
#: fitted to the transformers backend on an H200 (benchmarks/gpu_plain_memory.py, docs/benchmarks.md:
#: Qwen2.5-7B NF4, packed rows of 2048 without checkpointing: 27.6 GiB for one row, 47.1 for two)
PLAIN_KERNELS = MemoryTraits()


def estimate_memory_gib(
    shape: ModelShape,
    tokens_per_microbatch: int,
    gradient_checkpointing: Union[bool, str] = "unsloth",
    lora_r: int = 16,
    target_modules: Optional[list[str]] = None,
    load_in_4bit: bool = True,
    kernels: MemoryTraits = FUSED_KERNELS,
) -> float:
    """Peak GPU memory (GiB) to fine-tune ``shape`` with LoRA on micro-batches of ``tokens_per_microbatch``.

    The sum of five terms, each a count times a documented size::

        frozen weights   linear params x 0.516 bytes (NF4 + double-quant scales), or x 2 in 16-bit,
                         + embeddings and head x 2 bytes (x 4 where the backend upcasts them)
        LoRA             r x (in + out) per target projection x 10 bytes
                         (fp32 weight + fp32 gradient + two 8-bit AdamW states)
        activations      per token, one layer keeps 2 bytes x (3.5 x hidden + 2.8 x intermediate):
                           checkpointing "unsloth": one layer's worth (inputs are offloaded to host)
                           checkpointing True:      one layer + every layer's 16-bit input
                           checkpointing off:       every layer's worth
        logits           per token, vocab x 0.5 bytes (Unsloth's chunked loss; x 10 without it)

    ``kernels`` are the backend's :class:`MemoryTraits` (the layer terms x ``layer_factor``, the
    logits x ``logit_bytes_per_vocab``; offloaded checkpointing only where ``offloads_checkpoints``).
        overhead         0.5 GiB, and 5% of the total for allocator fragmentation

    Checked against FACTS.md (Qwen2.5-7B, H200, peak reserved): 6.45 GiB for the seed's 2 x
    267-token micro-batch (measured 6.25), 9.66 for 8 packed rows of 2048 with checkpointing (9.2),
    66.4 without (63.8) and 126.5 for 16 rows without (122): 3-5% high, the safe side. For plain
    transformers (PLAIN_KERNELS, benchmarks/gpu_plain_memory.py on an H200): 28.4 GiB for one packed
    row of 2048 without checkpointing (measured 27.6) and 48.4 for two (47.1).
    """
    linear = shape.layers * shape.linear_params_per_layer
    embedding_bytes = kernels.embedding_bytes_per_param if load_in_4bit else 2.0
    weights = linear * (NF4_BYTES_PER_PARAM if load_in_4bit else 2.0) + shape.embedding_params * embedding_bytes
    lora = shape.lora_params(lora_r, target_modules) * LORA_BYTES_PER_PARAM
    a_hidden, a_inter = LAYER_VALUES_PER_TOKEN
    layer = 2.0 * (a_hidden * shape.hidden + a_inter * shape.intermediate) * kernels.layer_factor
    if gradient_checkpointing is False:
        per_token = shape.layers * layer
    elif gradient_checkpointing == "unsloth" and kernels.offloads_checkpoints:
        per_token = layer
    else:
        per_token = layer + shape.layers * shape.hidden * 2.0
    per_token += shape.vocab * kernels.logit_bytes_per_vocab
    total = weights + lora + tokens_per_microbatch * per_token
    return round((total / GIB + FIXED_OVERHEAD_GIB) * 1.05, 2)


def sharded_memory_gib(shape: ModelShape, tokens_per_microbatch: int, processes: int, gradient_checkpointing: Any = True,
                       lora_r: int = 16, target_modules: Optional[list[str]] = None, load_in_4bit: bool = True,
                       kernels: Any = None) -> float:
    """Peak memory (GiB) per GPU with FSDP over ``processes`` GPUs: :func:`estimate_memory_gib`
    for a whole replica, less the share of the decoder layers' weights and the LoRA weights (with
    their gradients and optimizer states) that other GPUs hold, plus two layers gathered at a time
    (the one computing and the one prefetched). Embeddings and the output head are counted whole:
    they sit in FSDP's root unit, gathered for the whole forward and backward, in 16-bit (FSDP shards
    weights of one dtype, so a sharded 4-bit model is not upcast as a single-GPU one may be).
    Activations are not sharded: each GPU keeps those of its own micro-batch.
    """
    kernels = dataclasses.replace(kernels or PLAIN_KERNELS, embedding_bytes_per_param=2.0)
    replica = estimate_memory_gib(shape, tokens_per_microbatch, gradient_checkpointing, lora_r, target_modules, load_in_4bit, kernels)
    linear = shape.layers * shape.linear_params_per_layer * (NF4_BYTES_PER_PARAM if load_in_4bit else 2.0)
    lora = shape.lora_params(lora_r, target_modules) * LORA_BYTES_PER_PARAM
    held_elsewhere = (linear + lora) * (1 - 1 / processes)
    gathered = 2 * linear / shape.layers if processes > 1 else 0.0
    return round(replica - (held_elsewhere - gathered) / GIB * 1.05, 2)



def seed_memory_gib(shape: ModelShape) -> float:
    """The catalogue's figure: QLoRA r16 on the 7 projections, 2 x 2048-token micro-batches, Unsloth's
    offloaded checkpointing (the seed notebook's settings at full sequence length)."""
    return estimate_memory_gib(shape, tokens_per_microbatch=2 * 2048)


# --- finding the shape of the configured model ---------------------------------------------------


def model_shape_for(name: str) -> Optional[ModelShape]:
    """The shape of ``name`` (a local folder, a catalogue name or a hub id) without loading weights:
    a catalogue entry's ``shape``, else a local or cached ``config.json``; None when none is at hand
    (no network call is made)."""
    expanded = os.path.expanduser(name)
    if Path(expanded).is_dir():
        return _shape_from_file(Path(expanded) / "config.json")
    repo = name
    try:
        from .plugin_manager import get_host

        models = get_host().models
        entry = models.items.get(name) or models.items.get(name.lower())
    except Exception:  # a broken plugin must not stop a shape lookup; the caller falls back
        entry = None
    if entry is not None:
        shape = getattr(entry, "shape", None)
        if isinstance(shape, ModelShape):
            return shape
        if entry.source is None:
            return None
        repo = entry.source
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "config.json")
    except Exception:
        return None
    return _shape_from_file(Path(cached)) if isinstance(cached, str) else None


def _shape_from_file(path: Path) -> Optional[ModelShape]:
    try:
        return ModelShape.from_hf_config(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- profiles ------------------------------------------------------------------------------------


def planned_memory_gib(gpu_total_gib: Optional[float], budget_gib: Optional[float]) -> Optional[float]:
    """The memory a profile plans for: the card's, or ``training.memory_budget_gib`` where smaller
    (the budget alone without a GPU, so plans for a card can be made anywhere)."""
    known = [value for value in (gpu_total_gib, budget_gib) if value is not None]
    return min(known) if known else None


def attention_choice(config: Config, varlen_unavailable: Optional[str]) -> tuple[str, Optional[str]]:
    """``(model.attention after the fast profile, why varlen was not chosen or None)``.

    ``varlen_unavailable`` is the backend's reason (``Backend.varlen_reason``), None when it runs
    varlen for this model here. Only ``auto`` is resolved: ``varlen`` and ``default`` are the user's
    choice and stay (a backend that cannot honour ``varlen`` says so when the model loads)."""
    chosen = config.model.attention
    if chosen != "auto":
        return chosen, None
    return ("default", varlen_unavailable) if varlen_unavailable else ("varlen", None)


def apply_profile(
    config: Config,
    gpu_total_gib: Optional[float],
    shape: Optional[ModelShape] = None,
    kernels: MemoryTraits = FUSED_KERNELS,
    varlen_unavailable: Optional[str] = NOT_CHECKED,
    processes: int = 1,
    sharded: bool = False,
) -> Config:
    """Return a copy of ``config`` with ``config.training.profile`` applied (see the module doc).

    ``gpu_total_gib`` is the card's memory (None on CPU: the fast profile then packs and sizes the
    micro-batch by tokens, but leaves gradient checkpointing as configured). ``shape`` defaults to
    :func:`model_shape_for` of ``config.model.name``; without one the fast profile keeps
    checkpointing on, which fits wherever the seed fits. ``kernels`` are the memory traits of the
    backend that will run (:class:`MemoryTraits`); the estimate for plain kernels is more cautious.
    ``varlen_unavailable``: why the backend would not run varlen attention for this model here, None
    when it would (:func:`attention_choice`); by default the backend counts as not asked and keeps
    its own attention.

    On ``processes`` GPUs the micro-batch is planned per GPU (with ``sharded``, against the memory
    of one FSDP shard, :func:`sharded_memory_gib`) and the accumulation is divided
    among the processes, so that an optimizer step still holds the seed's token capacity.
    """
    profile = getattr(config.training, "profile", "seed")
    new = config.model_copy(deep=True)
    if profile == "seed":
        return new
    if profile != "fast":
        raise ValueError(f"unknown training.profile {profile!r}; choose one of: {', '.join(PROFILES)}")

    seq = config.model.max_seq_length
    train = config.training
    target_rows = max(1, FAST_TOKENS_PER_MICROBATCH // seq)
    rows, checkpointing = target_rows, config.lora.gradient_checkpointing
    if shape is None:
        shape = model_shape_for(config.model.name)
    planned = planned_memory_gib(gpu_total_gib, train.memory_budget_gib)
    if planned is not None and shape is not None:
        budget = planned * MEMORY_HEADROOM_FRACTION

        def fits(n: int, ckpt: Union[bool, str]) -> bool:
            args = (n * seq, ckpt, config.lora.r, list(config.lora.target_modules), config.model.load_in_4bit)
            if sharded:
                return sharded_memory_gib(shape, args[0], processes, *args[1:], kernels=PLAIN_KERNELS) <= budget
            return estimate_memory_gib(shape, *args, kernels) <= budget

        no_ckpt_rows = next((n for n in range(target_rows, 0, -1) if fits(n, False)), 0)
        if no_ckpt_rows and no_ckpt_rows >= max(1, math.ceil(target_rows * MIN_NO_CHECKPOINT_SHARE)):
            rows, checkpointing = no_ckpt_rows, False
        else:
            if checkpointing is False:
                checkpointing = "unsloth"
            rows = next((n for n in range(target_rows, 0, -1) if fits(n, checkpointing)), 1)
    seed_capacity = train.per_device_train_batch_size * train.gradient_accumulation_steps
    new.training.packing = True
    new.training.per_device_train_batch_size = rows
    new.training.gradient_accumulation_steps = max(1, round(seed_capacity / (rows * processes)))
    new.lora.gradient_checkpointing = checkpointing
    new.model.attention = attention_choice(config, varlen_unavailable)[0]
    return new


def profile_changes(before: Config, after: Config) -> list[str]:
    """``["training.packing: False -> True", ...]`` for the settings a profile changed."""
    changes = []
    for section in ("model", "lora", "training"):
        old, new = getattr(before, section).model_dump(), getattr(after, section).model_dump()
        for key, value in new.items():
            if old.get(key) != value:
                changes.append(f"{section}.{key}: {old.get(key)!r} -> {value!r}")
    return changes


def resolve_profile(config: Config, backend: Any, console: Any, processes: int = 1, sharded: bool = False) -> Config:
    """Resolve ``training.profile`` for the GPU at hand (each of ``processes``); the run directory keeps the result."""
    if config.training.profile == "seed":
        return config
    from .backends import cuda_total_memory_gib

    shape = model_shape_for(config.model.name)
    varlen_unavailable = backend.varlen_reason(config, shape)
    applied = apply_profile(config, cuda_total_memory_gib(), shape=shape, kernels=backend.memory_traits,
                            varlen_unavailable=varlen_unavailable, processes=processes, sharded=sharded)
    changes = profile_changes(config, applied)
    console.print(f"profile [bold]{config.training.profile}[/]: {'; '.join(changes) or 'no change here'}", soft_wrap=True)
    _, why_not = attention_choice(config, varlen_unavailable)
    if why_not:
        console.print(f"[cyan]note:[/] varlen attention not chosen: {why_not}", soft_wrap=True)
    return applied
