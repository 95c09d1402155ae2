"""Variable-length attention for packed batches, shared by the built-in backends: one
``torch.nn.attention.varlen.varlen_attn`` call per layer instead of one attention call per example
(or per run of equal lengths). The core knows none of this: the fast profile asks the backend
(``Backend.varlen_reason``) whether to choose ``model.attention: varlen``, and the backend's ``load``
honours it.

A packed / padding-free batch from trl is one row of many examples whose ``position_ids`` restart at
0 for every example. Attention must stay inside each example. Without FlashAttention's own package
(no wheel for new torch builds) both backends did that in pieces: Unsloth with one SDPA call per run
of equal lengths (~38 calls per layer on Alpaca rows), transformers with a dense block-diagonal
mask. torch 2.10+ ships FlashAttention's variable-length kernel as ``varlen_attn``: it takes the
example boundaries (``cu_seqlens``, computed once per batch here and shared by every layer) and
covers the whole row in one call.

Here:

* :func:`varlen_unsupported_reason`: the choice logic (pure, CPU-testable): why the kernel cannot
  run a model on this machine, or None;
* :func:`varlen_machine_reason`: the machine's part of it, read without importing torch (the
  profile runs before Unsloth, which must be imported before torch); :func:`profile_varlen_reason`
  adds the model's shape: the backends' ``varlen_reason``;
* :func:`varlen_attention`: ``varlen_attn`` with the signature of torch 2.12+ (``enable_gqa``) on any
  build that has the kernel: grouped-query heads are handed over as they are where the build's
  kernel takes them (FlashAttention does), else K/V are expanded;
* :func:`register_transformers_varlen`: ``attn_implementation="qtune_varlen"`` for transformers
  (padded batches and generation with a cache take transformers' SDPA, unchanged).

Importing this module loads nothing heavy.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Optional

#: the name transformers' ``attn_implementation`` knows the packed path by
TRANSFORMERS_VARLEN = "qtune_varlen"
#: widest head FlashAttention's kernels take (and head dims must be multiples of 8)
MAX_HEAD_DIM = 256
MIN_CAPABILITY = (8, 0)
#: devices whose tensors take the varlen call (the kernel is CUDA-only; tests add "cpu" with a reference kernel)
VARLEN_DEVICES = {"cuda"}


def varlen_unsupported_reason(
    *,
    has_kernel: bool,
    capability: Optional[tuple[int, int]],
    head_dim: int,
    heads: int,
    kv_heads: int,
    dtype: str = "auto",
    sliding_window: Optional[int] = None,
    takes_window: bool = True,
) -> Optional[str]:
    """Why one varlen call per layer cannot run this model here (one clause), or None when it can.

    ``has_kernel``: the torch build has ``varlen_attn``; ``capability``: the CUDA GPU's compute
    capability (None: no GPU); ``dtype``: ``model.dtype`` (the kernel takes bf16/fp16, and "auto"
    is bf16 on these GPUs); ``sliding_window``: the model's window, if its layers use one;
    ``takes_window``: the build's ``varlen_attn`` has ``window_size`` (torch 2.11+).
    """
    if not has_kernel:
        return "this torch build has no torch.nn.attention.varlen.varlen_attn (torch 2.10+ with CUDA)"
    if capability is None:
        return "no CUDA GPU"
    if tuple(capability) < MIN_CAPABILITY:
        return f"the GPU's compute capability is {capability[0]}.{capability[1]}; FlashAttention's kernel needs 8.0+"
    if dtype == "float32":
        return "model.dtype is float32; the kernel takes bfloat16 or float16"
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        return f"head dim {head_dim} is not one FlashAttention takes (a multiple of 8, at most {MAX_HEAD_DIM})"
    if kv_heads <= 0 or heads % kv_heads:
        return f"{heads} query heads do not share {kv_heads} key/value heads evenly"
    if sliding_window is not None and not takes_window:
        return "the model uses a sliding window and this torch's varlen_attn takes none"
    return None


# --- the machine, without importing torch ---------------------------------------------------------


def _torch_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("torch")  # a top-level spec: torch is not imported
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def torch_has_varlen() -> bool:
    """Whether the installed torch ships ``varlen_attn`` (read from its source, torch not imported)."""
    if "torch" in __import__("sys").modules:
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError:
            return False
        return True
    folder = _torch_dir()
    source = folder / "nn" / "attention" / "varlen.py" if folder else None
    try:
        return source is not None and "def varlen_attn(" in source.read_text(encoding="utf-8")
    except OSError:
        return False


def varlen_machine_reason() -> Optional[str]:
    """The machine's part of :func:`varlen_unsupported_reason` (torch build and GPU), or None."""
    from qtune.api import cuda_capability

    if not torch_has_varlen():
        return varlen_unsupported_reason(has_kernel=False, capability=None, head_dim=128, heads=1, kv_heads=1)
    return varlen_unsupported_reason(has_kernel=True, capability=cuda_capability(), head_dim=128, heads=1, kv_heads=1)


def profile_varlen_reason(config: Any, shape: Any) -> Optional[str]:
    """``Backend.varlen_reason`` of the built-in backends: the machine's reason, else the model's from
    its shape (:class:`qtune.api.ModelShape`, None when unknown) and ``model.dtype``, before it loads."""
    reason = varlen_machine_reason()
    if reason is None and shape is not None:
        reason = varlen_unsupported_reason(has_kernel=True, capability=MIN_CAPABILITY, head_dim=shape.dim_per_head, heads=shape.heads,
                                           kv_heads=shape.kv_heads, dtype=config.model.dtype)
    return reason


def model_varlen_reason(model_config: Any, dtype: Any = None) -> Optional[str]:
    """:func:`varlen_unsupported_reason` for a loaded model (its transformers config) on this machine."""
    import torch

    config = getattr(model_config, "get_text_config", lambda: model_config)()
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        window = getattr(config, "sliding_window", None)
    kernel = _varlen_kernel()
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    name = {torch.float32: "float32"}.get(dtype, "auto")
    return varlen_unsupported_reason(
        has_kernel=kernel is not None,
        capability=capability,
        head_dim=head_dim,
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        dtype=name,
        sliding_window=window,
        takes_window=kernel is not None and "window_size" in inspect.signature(kernel).parameters,
    )


# --- the kernel ------------------------------------------------------------------------------------


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _kernel_params(kernel) -> frozenset:
    return frozenset(inspect.signature(kernel).parameters)


_GQA_NATIVE: dict[Any, bool] = {}


def _gqa_is_native(kernel, device) -> bool:
    """Whether this build's ``varlen_attn`` takes fewer key/value heads than query heads as they are
    (FlashAttention's kernel does, with the right gradients): checked once per device on a tiny
    problem against expanded K/V; False if it refuses them or differs."""
    if device in _GQA_NATIVE:
        return _GQA_NATIVE[device]
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=torch.bfloat16).requires_grad_()

    def probe() -> bool:
        q, k, v = tensor(24, 4, 64), tensor(24, 2, 64), tensor(24, 2, 64)
        cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=device)
        out = kernel(q, k, v, cu, cu, 14, 14, window_size=(-1, 0))
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        k2, v2 = (x.detach().repeat_interleave(2, dim=1).requires_grad_() for x in (k, v))
        q2 = q.detach().requires_grad_()
        ref = kernel(q2, k2, v2, cu, cu, 14, 14, window_size=(-1, 0))
        ref_grads = torch.autograd.grad(ref.float().sum(), (q2, k2, v2))
        dk = ref_grads[1].unflatten(1, (2, 2)).sum(2)
        dv = ref_grads[2].unflatten(1, (2, 2)).sum(2)
        return all(
            torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
            for a, b in ((out, ref), (grads[0], ref_grads[0]), (grads[1], dk), (grads[2], dv))
        )

    # The first call comes from inside a forward pass: with gradients possibly off (evaluation), and
    # possibly inside a non-reentrant checkpoint, whose saved-tensor hooks would count the probe's
    # tensors in the forward but not in the recomputation (the answer is cached by then), which torch
    # refuses. Identity hooks keep the probe's tensors to itself.
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            native = probe()
    except (RuntimeError, ValueError, TypeError):
        native = False
    _GQA_NATIVE[device] = native
    return native


def varlen_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """``torch.nn.attention.varlen.varlen_attn`` with torch 2.12's signature on any build that has it.

    ``query`` (tokens, heads, dim), ``key``/``value`` (tokens, kv_heads, dim); ``window_size=(-1, 0)``
    is causal. With ``enable_gqa`` and a build whose ``varlen_attn`` has no such argument (2.10, 2.11),
    grouped heads go to the kernel as they are where it takes them (:func:`_gqa_is_native`), else K/V
    are expanded to the query heads first.
    """
    kernel = _varlen_kernel()
    if kernel is None:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is not in this torch build")
    params = _kernel_params(kernel)
    kwargs: dict[str, Any] = {"scale": scale}
    if "window_size" in params:
        kwargs["window_size"] = tuple(window_size)
    else:  # torch 2.10: causal or not, no window
        if tuple(window_size) not in ((-1, 0), (-1, -1)):
            raise RuntimeError("this torch's varlen_attn takes no sliding window")
        kwargs["is_causal"] = tuple(window_size) == (-1, 0)
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = enable_gqa
    elif key.shape[1] != query.shape[1] and not _gqa_is_native(kernel, query.device):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)


# --- the example boundaries, once per batch ---------------------------------------------------------


class _Boundaries:
    """The last batch's ``(cu_seqlens, max_seqlen)``, keyed on its ``position_ids`` tensor: every layer
    of one forward (and a checkpointed layer's recomputation) gets the same tensor object, so the
    boundaries are computed, and the host waits for the device, once per batch."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.value: Optional[tuple] = None

    def get(self, position_ids):
        key = (id(position_ids), position_ids.data_ptr(), position_ids._version, tuple(position_ids.shape))
        if key != self.key:
            self.value = packed_cu_seqlens(position_ids)
            self.key = key
        return self.value


BOUNDARIES = _Boundaries()


def packed_cu_seqlens(position_ids):
    """``(cu_seqlens, max_seqlen)`` for rows of ``position_ids`` (batch, tokens): an example starts
    wherever a position is not the previous one plus 1, and at every row's start. int32 cumulative
    offsets on the ids' device, as varlen kernels take them."""
    import torch

    rows, length = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts.view(rows, length)[:, 0] = True
    begin = torch.nonzero(starts).flatten()
    cu = torch.cat([begin, begin.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# --- transformers ----------------------------------------------------------------------------------


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """A transformers attention function (``AttentionInterface``): query (batch, heads, tokens, dim),
    key/value (batch, kv_heads, tokens, dim) -> ((batch, tokens, heads, dim), None).

    Packed and unpadded batches (no attention mask, as many keys as queries) take one varlen call over
    the examples ``position_ids`` delimits. Anything else (a padding mask, generation with a cache,
    attention dropout) takes transformers' SDPA, exactly as ``attn_implementation="sdpa"``.
    """
    position_ids = kwargs.get("position_ids")
    batch, heads, tokens, dim = query.shape
    if attention_mask is not None or dropout or key.shape[2] != tokens or query.device.type not in VARLEN_DEVICES:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs)
    if position_ids is None:
        import torch

        position_ids = torch.arange(tokens, device=query.device).expand(batch, tokens)
    elif position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    cu, max_len = BOUNDARIES.get(position_ids)
    kv_heads = key.shape[1]
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    returned_dtype = query.dtype
    if (kernel_dtype := half_dtype_for(query, module)) is not None:
        query, key, value = query.to(kernel_dtype), key.to(kernel_dtype), value.to(kernel_dtype)
    out = varlen_attention(
        query.transpose(1, 2).reshape(batch * tokens, heads, dim),
        key.transpose(1, 2).reshape(batch * tokens, kv_heads, dim),
        value.transpose(1, 2).reshape(batch * tokens, kv_heads, dim),
        cu,
        cu,
        max_len,
        max_len,
        scale=scaling,
        window_size=window,
        enable_gqa=kv_heads != heads,
    )
    return out.view(batch, tokens, heads, dim).to(returned_dtype), None


def half_dtype_for(query, module):
    """The 16-bit dtype to hand FlashAttention's kernel float32 CUDA tensors in, or None to pass them
    as they are. A QLoRA model prepared by peft keeps its norms in float32, so the projections'
    outputs arrive in float32, which the kernel refuses ("FlashAttention only support fp16 and bf16");
    transformers' own flash-attention path casts them the same way: to the autocast dtype, else the
    dtype the model was loaded in (``_pre_quantization_dtype`` of a bitsandbytes model, or its
    ``dtype``), else bfloat16."""
    import torch

    if query.dtype != torch.float32 or query.device.type != "cuda":
        return None
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    config = getattr(module, "config", None)
    for dtype in (getattr(config, "_pre_quantization_dtype", None), getattr(config, "dtype", None)):
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return torch.bfloat16


def varlen_mask(*, attention_mask=None, **kwargs):
    """The mask function registered with :func:`varlen_attention_forward`: no mask where the batch
    has no padding mask (packed batches: the varlen call keeps the examples apart, so the dense
    block-diagonal mask SDPA would need is never built), else SDPA's own mask."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register_transformers_varlen() -> str:
    """Register :func:`varlen_attention_forward` (and :func:`varlen_mask`) as
    ``attn_implementation="qtune_varlen"``; idempotent; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(TRANSFORMERS_VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(TRANSFORMERS_VARLEN, varlen_mask)
    return TRANSFORMERS_VARLEN
