"""GGUF export and inference through llama.cpp, without cloning or building llama.cpp.

* Conversion runs llama.cpp's own ``convert_hf_to_gguf.py`` (with its ``conversion/`` package and its
  own ``gguf-py``; PyPI's ``gguf`` lags behind the converter) in a subprocess. The three are taken
  once from the llama-cpp-python source distribution of exactly the installed llama_cpp version
  and kept in ``qtune.api.cache_dir()/llama.cpp/VERSION/``, so converter and runtime always
  agree. ``QTUNE_LLAMA_CPP_DIR`` (or ``--llama-cpp-dir``) points at an existing llama.cpp checkout
  instead; ``QTUNE_LLAMA_CPP_SDIST`` at an already downloaded sdist (machines without PyPI).
* Quantization calls ``llama_cpp.llama_model_quantize`` (the C API behind ``llama-quantize``).
* The run template's chat template and the tokenizer's EOS go into the GGUF metadata
  (``tokenizer.chat_template``, ``tokenizer.ggml.eos_token_id``) through the merged model's
  tokenizer files, which the converter reads; an Ollama ``Modelfile`` is written beside the GGUF.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtune.api import (
    ChatTemplate,
    Exporter,
    ExportResult,
    FinishedRun,
    QtuneError,
    atomic_dir,
    atomic_file,
    cache_dir,
    check_free_space,
    free_memory,
    hookimpl,
    load_merged,
    missing_modules,
    save_merged,
    tokenize_chat_example,
    verify_with,
    weights_bytes,
)

INSTALL_HINT = "pip install 'qtune[gguf]'"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs from the sdist's vendor/llama.cpp/ (conversion/ exists from 0.3.3x on).
CONVERTER_PARTS = (CONVERTER, "conversion", "gguf-py", "LICENSE")
#: sha256 of the llama-cpp-python sdists whose converter qtune runs (measured on the file pip
#: downloads from PyPI; setup.cfg's gguf extra pins the version). Any other file is refused.
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}


@dataclass(frozen=True)
class GGUFQuant:
    name: str
    #: the converter's --outtype, or None for "convert to 16-bit, then llama_model_quantize"
    outtype: str | None
    #: the llama_cpp LLAMA_FTYPE_* constant quantize uses (None when the converter writes it)
    ftype: str | None
    bits_per_weight: float


GGUF_QUANTS: dict[str, GGUFQuant] = {
    q.name: q
    for q in (
        GGUFQuant("f32", "f32", None, 32),
        GGUFQuant("f16", "f16", None, 16),
        GGUFQuant("bf16", "bf16", None, 16),
        GGUFQuant("q8_0", None, "LLAMA_FTYPE_MOSTLY_Q8_0", 8.5),
        GGUFQuant("q6_k", None, "LLAMA_FTYPE_MOSTLY_Q6_K", 6.6),
        GGUFQuant("q5_k_m", None, "LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.7),
        GGUFQuant("q5_k_s", None, "LLAMA_FTYPE_MOSTLY_Q5_K_S", 5.5),
        GGUFQuant("q4_k_m", None, "LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.9),
        GGUFQuant("q4_k_s", None, "LLAMA_FTYPE_MOSTLY_Q4_K_S", 4.6),
        GGUFQuant("q4_0", None, "LLAMA_FTYPE_MOSTLY_Q4_0", 4.5),
        GGUFQuant("q3_k_m", None, "LLAMA_FTYPE_MOSTLY_Q3_K_M", 3.9),
        GGUFQuant("q2_k", None, "LLAMA_FTYPE_MOSTLY_Q2_K", 3.4),
    )
}
QUANT_ALIASES = {"fp16": "f16", "float16": "f16", "bfloat16": "bf16", "fp32": "f32", "float32": "f32", "q8": "q8_0",
                 "q4_k": "q4_k_m", "q5_k": "q5_k_m"}

# (minimum top-1, minimum top-5 agreement) with the trained model in llama.cpp, per quantization.
# Each bound is set below what was measured on the random tiny Qwen2 (2 layers, hidden 256) and
# SmolLM2-135M-Instruct (with a small random LoRA), top-1 / top-5; a random model's logits are
# nearly flat, so rounding flips its arg max far more often than a real model's:
#
#     gguf f16     1.00 / 1.00   1.00 / 1.00      gguf q4_k_m  0.61 / 0.99   0.79-0.82 / 1.00
#     gguf bf16    0.94 / 1.00   1.00 / 1.00      gguf q4_0    0.50 / 0.91   0.69 / 0.96
#     gguf q8_0    0.93 / 1.00   0.99 / 1.00      gguf q3_k_m  0.63 / 0.92   0.88 / 1.00
#     gguf q6_k    0.84 / 1.00   0.92 / 1.00      gguf q2_k    0.26 / 0.52   0.71 / 0.92
#     gguf q5_k_m  0.83 / 1.00   0.85 / 1.00
#
# f32 and f16 allow one flip in 50 tokens at top-1: the demo's trained run (120 steps) gave 0.985 in
# f16 on the 68 probe tokens with a largest logit difference of 0.055, one position where the
# reference's best two tokens were closer than f16's rounding.
BOUNDS: dict[str, tuple[float, float]] = {
    "f32": (0.98, 0.99),
    "f16": (0.98, 0.99),
    "bf16": (0.9, 0.99),
    "q8_0": (0.85, 0.98),
    "q6_k": (0.75, 0.95),
    "q5_k_m": (0.7, 0.9),  # top-5 0.941 on the demo's trained run (4 of 68 tokens); q4_k_m gave 1.000
    "q5_k_s": (0.7, 0.9),
    "q4_k_m": (0.5, 0.9),
    "q4_k_s": (0.5, 0.9),
    "q4_0": (0.45, 0.85),
    "q3_k_m": (0.35, 0.75),
    "q2_k": (0.2, 0.5),
}


# --------------------------------------------------------------------------- llama.cpp pieces


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version (without importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        raise QtuneError(f"GGUF export needs llama-cpp-python; install it with: {INSTALL_HINT}") from None


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise QtuneError(f"GGUF export needs llama-cpp-python ({exc}); install it with: {INSTALL_HINT}") from None
    except (OSError, RuntimeError) as exc:  # the shared library failed to load
        raise QtuneError(f"llama-cpp-python is installed but its library does not load ({exc}); reinstall it: {INSTALL_HINT}") from None
    return llama_cpp


def converter_dir(llama_cpp_dir: str | Path | None = None) -> Path:
    """A folder holding ``convert_hf_to_gguf.py`` (+ ``conversion/``) and ``gguf-py/``.

    An explicit ``llama_cpp_dir`` or ``QTUNE_LLAMA_CPP_DIR`` wins; otherwise the parts are taken
    once from the sdist of the installed llama-cpp-python version.
    """
    explicit = llama_cpp_dir or os.environ.get("QTUNE_LLAMA_CPP_DIR")
    if explicit:
        folder = Path(explicit).expanduser()
        missing = [part for part in (CONVERTER, "gguf-py") if not (folder / part).exists()]
        if missing:
            raise QtuneError(
                f"llama.cpp directory {str(folder)!r} lacks {', '.join(missing)}; point --llama-cpp-dir / "
                f"QTUNE_LLAMA_CPP_DIR at a llama.cpp checkout, or unset it to use the installed llama-cpp-python's converter"
            )
        return folder
    version = llama_cpp_version()
    folder = cache_dir() / "llama.cpp" / version
    if not (folder / CONVERTER).is_file():
        fetch_converter(version, folder)
    return folder


def fetch_converter(version: str, dest: Path) -> None:
    """Extract the converter, conversion/ and gguf-py/ of llama-cpp-python ``version``'s sdist to ``dest``."""
    with tempfile.TemporaryDirectory(prefix="qtune-llama-sdist-") as tmp:
        sdist = os.environ.get("QTUNE_LLAMA_CPP_SDIST")
        if sdist:
            archive = Path(sdist).expanduser()
            if not archive.is_file():
                raise QtuneError(f"QTUNE_LLAMA_CPP_SDIST {sdist!r} is not a file; point it at llama_cpp_python-{version}.tar.gz")
        else:
            archive = _download_sdist(version, Path(tmp))
        check_sdist_hash(archive, version)
        check_free_space(dest.parent, 16 * 2**20, "llama.cpp's converter")
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for member in tar.getmembers():
                parts = Path(member.name).parts
                # <top>/vendor/llama.cpp/<part>/...
                if len(parts) >= 4 and parts[1:3] == ("vendor", "llama.cpp") and parts[3] in CONVERTER_PARTS:
                    if member.isfile() or member.isdir():
                        member.name = str(Path(*parts[3:]))
                        members.append(member)
            if not any(m.name == CONVERTER for m in members):
                raise QtuneError(f"{archive.name} holds no vendor/llama.cpp/{CONVERTER}; use --llama-cpp-dir with a llama.cpp checkout")
            if dest.exists():  # another process finished first
                return
            with atomic_dir(dest) as out:
                tar.extractall(out, members=members, filter="data")


def check_sdist_hash(archive: Path, version: str) -> None:
    """Refuse an sdist whose sha256 is not the one pinned for ``version`` (its converter is run)."""
    import hashlib

    expected = SDIST_SHA256.get(version)
    if expected is None:
        raise QtuneError(f"qtune has no pinned sha256 for the llama-cpp-python {version} sdist, so it will not run its converter; "
                         f"install a pinned version ({INSTALL_HINT}) or pass --llama-cpp-dir with a llama.cpp checkout")
    digest = hashlib.sha256()
    with open(archive, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise QtuneError(f"{archive.name}: sha256 {digest.hexdigest()[:16]}... is not the pinned {expected[:16]}... of "
                         f"llama-cpp-python {version}; the file is damaged or not the release; download it again from PyPI")


def _download_sdist(version: str, folder: Path) -> Path:
    # --no-binary for this one package only: its build requirements (cmake, ...) may come as wheels,
    # which pip needs to read the sdist's metadata; building them from source takes many minutes
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "--disable-pip-version-check",
               "--quiet", "-d", str(folder), f"llama-cpp-python=={version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QtuneError(
            f"could not download the llama-cpp-python {version} sdist for its GGUF converter ({last[0]}); go online "
            f"once, set QTUNE_LLAMA_CPP_SDIST to a downloaded sdist, or pass --llama-cpp-dir with a llama.cpp checkout"
        )
    return found[0]


def convert_hf_to_gguf(model_dir: Path, outfile: Path, outtype: str, llama_cpp_dir: str | Path | None = None) -> None:
    """Run llama.cpp's converter on a transformers folder, with its own gguf-py first on the path."""
    folder = converter_dir(llama_cpp_dir)
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "gguf-py")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, str(folder / CONVERTER), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not Path(outfile).is_file():
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line] or lines or ["no output"]
        problem = errors[-1].strip()
        hint = "check that the model's architecture is one llama.cpp supports"
        if "pre-tokenizer" in problem or "BPE pre-tokenizer" in "".join(lines):
            hint = "this llama.cpp version does not know the tokenizer; pass --llama-cpp-dir with a newer llama.cpp checkout"
        raise QtuneError(f"llama.cpp's converter failed: {problem[:300]}; {hint}")


@contextlib.contextmanager
def _captured_native_output() -> Iterator[Path]:
    """Send the C library's stdout/stderr to a temporary file (llama.cpp logs every tensor)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.NamedTemporaryFile(prefix="qtune-llama-", suffix=".log", delete=False) as log:
        path = Path(log.name)
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield path
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


@contextlib.contextmanager
def _llama_log(llama_cpp) -> Iterator[list[str]]:
    """Collect llama.cpp's log messages (all levels) while the block runs.

    llama-cpp-python's own log callback prints to ``sys.stderr`` and, once any model has been
    loaded with ``verbose=False``, drops everything below ERROR, which would hide the quantizer's
    per-tensor warnings; its callback is put back afterwards.
    """
    import ctypes

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        try:
            from llama_cpp._logger import llama_log_callback as original
        except ImportError:  # pragma: no cover - a llama-cpp-python without its logger module
            original = None
        llama_cpp.llama_log_set(original, ctypes.c_void_p(0))


def quantize_gguf(source: Path, dest: Path, quant: str, threads: int | None = None) -> dict[str, Any]:
    """``llama_model_quantize`` from a 16-bit GGUF to ``quant`` (q8_0, q4_k_m, ...).

    Returns ``{"fallback": N, "tensors": M, "fallback_types": [...]}``: the N of M tensors that
    llama.cpp stored in another type because their rows do not fit the quantization's block
    (K-quants need row widths that are multiples of 256), and the types it used instead.
    """
    import ctypes

    llama_cpp = import_llama_cpp()
    spec = GGUF_QUANTS[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, spec.ftype)
    params.nthread = threads or os.cpu_count() or 1
    with _captured_native_output() as log, _llama_log(llama_cpp) as logged:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    text = "".join(logged) + log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    if status != 0 or not Path(dest).is_file():
        lines = [line for line in text.splitlines() if line.strip()]
        raise QtuneError(f"llama.cpp could not quantize to {quant}: {lines[-1] if lines else f'status {status}'}; try another --quant")
    return quantize_fallbacks(text)


def quantize_fallbacks(log: str) -> dict[str, Any]:
    """Read llama.cpp's quantize log: one "-> falling back to TYPE" warning per tensor, and a
    summary "N of M tensor(s) required fallback quantization"."""
    import re

    per_tensor = re.findall(r"falling back to\s+(\w+)", log)
    summary = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log)
    tensors = re.search(r"loaded meta data with \d+ key-value pairs and (\d+) tensors", log)
    return {
        "fallback": int(summary.group(1)) if summary else len(per_tensor),
        "tensors": int(summary.group(2)) if summary else (int(tensors.group(1)) if tensors else None),
        "fallback_types": sorted(set(per_tensor)),
    }


# --------------------------------------------------------------------------- loading and generating


def load_llama(path: str | Path, n_ctx: int = 2048, logits_all: bool = False, **kwargs: Any):
    """A ``llama_cpp.Llama`` on the CPU (or wherever the installed build offloads), quiet."""
    llama_cpp = import_llama_cpp()
    if not Path(path).is_file():
        raise QtuneError(f"GGUF file {str(path)!r} not found; give the path of a .gguf file")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, **kwargs)
    except ValueError as exc:
        raise QtuneError(f"llama.cpp could not load {str(path)!r}: {exc}; check that the file is a complete GGUF") from None


@contextlib.contextmanager
def gguf_vocab(path: str | Path) -> Iterator[Any]:
    """The GGUF's tokenizer and metadata only (no weights, no context), as llama.cpp reads them."""
    llama_cpp = import_llama_cpp()
    from llama_cpp._internals import LlamaModel

    if not Path(path).is_file():
        raise QtuneError(f"GGUF file {str(path)!r} not found; give the path of a .gguf file")
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
    except ValueError as exc:
        raise QtuneError(f"llama.cpp could not read {str(path)!r}: {exc}; check that the file is a complete GGUF") from None
    try:
        yield model
    finally:
        model.close()


def gguf_metadata(path: str | Path) -> dict[str, str]:
    """The GGUF's key/value metadata as llama.cpp reads it (values as strings)."""
    with gguf_vocab(path) as model:
        return model.metadata()


def gguf_tokenize(llm, text: str) -> list[int]:
    """Token ids the way llama.cpp encodes a prompt (BOS as the GGUF says, special tokens parsed).

    ``llm`` is a ``llama_cpp.Llama`` or the vocabulary from :func:`gguf_vocab`.
    """
    return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))


def gguf_logits(path: str | Path, prompts: list[str]) -> tuple[list[list[int]], list[Any]]:
    """Token ids and the logits at every position for each prompt."""
    import numpy as np

    with gguf_vocab(path) as vocab:
        ids = [gguf_tokenize(vocab, p) for p in prompts]
    n_ctx = max(64, -(-max(len(i) for i in ids) // 64) * 64)
    llm = load_llama(path, n_ctx=n_ctx, logits_all=True)
    logits = []
    try:
        for tokens in ids:
            llm.reset()
            llm.eval(tokens)
            logits.append(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    finally:
        llm.close()
    return ids, logits


def stream_generate(gguf_path: str | Path, prompt: str, max_new_tokens: int = 256, stop: list[str] | None = None,
                    n_ctx: int | None = None, llm: Any = None) -> Iterator[str]:
    """Yield the answer to ``prompt`` piece by piece, greedy, with llama.cpp.

    Stops at the GGUF's end-of-generation tokens (EOS/EOT) or at any of the ``stop`` strings (not
    yielded). Pass a loaded ``llm`` (:func:`load_llama`) to reuse it across prompts.
    """
    own = llm is None
    if own:
        llm = load_llama(gguf_path, n_ctx=n_ctx or 4096)
    try:
        budget = llm.n_ctx() - len(gguf_tokenize(llm, prompt))
        if budget <= 0:
            raise QtuneError(f"the prompt is longer than the context ({llm.n_ctx()} tokens); shorten it or raise n_ctx")
        pieces = llm.create_completion(
            prompt,
            max_tokens=min(max_new_tokens, budget),
            temperature=0.0,
            top_k=1,
            repeat_penalty=1.0,
            stop=list(stop or []),
            stream=True,
        )
        for piece in pieces:
            text = piece["choices"][0]["text"]
            if text:
                yield text
    finally:
        if own:
            llm.close()


# --------------------------------------------------------------------------- Ollama


def ollama_template(template, eos_token: str, tokenizer: Any = None) -> str:
    """A Go template for Ollama that renders exactly like ``template.render_prompt`` for one turn.

    The user's text goes where the template's first prompt field sits, a ``system`` field (if the
    template has one) becomes ``.System`` with the template's default in the ``else`` branch, the
    other optional fields are left empty, and the response is followed by EOS as in training.
    A chat template's turn (rendered with ``tokenizer``) is followed by its end-of-turn token.
    """
    if isinstance(template, ChatTemplate):
        return _chat_ollama_template(template, eos_token, tokenizer)
    marks = {name: f"@@QTUNE{index}@@" for index, name in enumerate(template.fields + template.optional_fields)}
    example = {name: "" for name in template.optional_fields}
    example.update({name: marks[name] for name in template.fields})
    has_system = "system" in marks
    if has_system:
        example["system"] = marks["system"]
    rendered = template.render_prompt(example)
    user_field = next((name for name in template.fields if marks[name] in rendered), None)
    if user_field is None:
        raise QtuneError(f"template {template.name!r} renders none of its fields into the prompt; cannot write an Ollama TEMPLATE")
    text = _go_literal(rendered).replace(marks[user_field], "{{ .Prompt }}")
    if has_system and marks["system"] in rendered:
        before, after = rendered.split(marks["system"], 1)
        default = template.render_prompt({**example, "system": ""})
        system = "{{ .System }}"
        if default.startswith(before) and default.endswith(after) and len(default) >= len(before) + len(after):
            fallback = default[len(before): len(default) - len(after)]
            if fallback:
                system = "{{ if .System }}{{ .System }}{{ else }}" + _go_literal(fallback) + "{{ end }}"
        text = text.replace(marks["system"], system)
    leftover = [name for name, mark in marks.items() if mark in text]
    if leftover:
        raise QtuneError(f"template {template.name!r} puts field(s) {', '.join(leftover)} in the prompt; Ollama has only the user message")
    return text + "{{ .Response }}" + _go_literal(eos_token or "")


def _chat_ollama_template(template, eos_token: str, tokenizer: Any = None) -> str:
    """One turn of a chat template as Go: the conversation rendered with and without a system
    message share their end (the user turn and the generation prompt, where ``.Prompt`` goes); what
    comes before it is the ``if .System`` branch and its ``else``."""
    system_mark, user_mark = "@@QTUNE_SYSTEM@@", "@@QTUNE_USER@@"
    user = [{"role": "user", "content": user_mark}]
    with_system = template.render([{"role": "system", "content": system_mark}] + user, tokenizer, add_generation_prompt=True)
    without = template.render(user, tokenizer, add_generation_prompt=True)
    shared = 0
    while shared < min(len(with_system), len(without)) and with_system[-1 - shared] == without[-1 - shared]:
        shared += 1
    head_system, head_plain = with_system[: len(with_system) - shared], without[: len(without) - shared]
    tail = with_system[len(with_system) - shared:]
    if system_mark not in head_system or user_mark not in tail:
        raise QtuneError(f"template {template.name!r} does not render a system and a user message apart; cannot write an Ollama TEMPLATE")
    system = _go_literal(head_system).replace(system_mark, "{{ .System }}")
    go = "{{ if .System }}" + system + "{{ else }}" + _go_literal(head_plain) + "{{ end }}" if system != _go_literal(head_plain) else system
    end = template.end_of_turn_token(tokenizer) or eos_token or ""
    return go + _go_literal(tail).replace(user_mark, "{{ .Prompt }}") + "{{ .Response }}" + _go_literal(end)


def _multi_turn_parity(gguf_path: Path, embedded: str | None, template, tokenizer) -> bool:
    """Whether a multi-turn conversation rendered through the GGUF's own chat template (as
    llama-cpp-python's Jinja chat formatter renders it) and tokenized by llama.cpp gives exactly the
    token ids the run trained on for it."""
    if not embedded:
        return False
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=embedded, eos_token=tokenizer.eos_token or "", bos_token=tokenizer.bos_token or "",
                                    add_generation_prompt=False)  # its default (True) would add an open assistant turn
    prompt = formatter(messages=[dict(m) for m in PARITY_CONVERSATION]).prompt
    trained = tokenize_chat_example({"messages": PARITY_CONVERSATION}, template, tokenizer, 1 << 20, assistant_only=True)
    with gguf_vocab(gguf_path) as vocab:
        return gguf_tokenize(vocab, prompt) == trained.input_ids


#: the conversation GGUF verify renders through the exported template (system, two exchanges)
PARITY_CONVERSATION = (
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And twice that?"},
    {"role": "assistant", "content": "8"},
)


def _go_literal(text: str) -> str:
    # "{{" opens an action in Go templates; print it through a string action instead.
    return text.replace("{{", '{{ "{{" }}')


def modelfile_text(gguf_name: str, template, eos_token: str, tokenizer: Any = None) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, the training prompt as TEMPLATE, stop strings."""
    go_template = ollama_template(template, eos_token, tokenizer)
    if '"""' in go_template:
        raise QtuneError(f"template {template.name!r} contains '\"\"\"', which a Modelfile TEMPLATE cannot hold")
    stops = []
    for stop in [eos_token, *template.stop_strings()]:
        if stop and stop not in stops:
            stops.append(stop)
    lines = [
        f"# Ollama model for a qtune run (template {template.name!r}); create it with:",
        "#   ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        "",
        f'TEMPLATE """{go_template}"""',
        "",
    ]
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in stops]
    lines += ["PARAMETER temperature 0", ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# --------------------------------------------------------------------------- the export


def gguf_file_name(run: FinishedRun, quant: str) -> str:
    return f"{run.run_dir.name}.{quant.upper()}.gguf"


def write_gguf(run: FinishedRun, dest: Path, quant: str = "q8_0", llama_cpp_dir: str | Path | None = None,
               device: str | None = None) -> tuple[list[Path], dict[str, Any]]:
    """Merge, convert and quantize ``run`` into ``dest``/NAME.QUANT.gguf plus a Modelfile.

    The merged model is written in 16-bit to a temporary folder beside ``dest`` (float16 for f16,
    bfloat16 for bf16, float32 for f32; for quantized types bfloat16 when the base checkpoint is
    bfloat16, else float16), converted, quantized when needed, and removed.
    """
    spec = GGUF_QUANTS[quant]
    llama_cpp_version()  # fail before any heavy work when llama-cpp-python is missing
    folder = converter_dir(llama_cpp_dir)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {}
    notes: list[str] = []
    merged_dtype = _merged_dtype(run, quant)
    started = time.perf_counter()
    model, tokenizer = load_merged(run, merged_dtype, device)
    size16 = weights_bytes(model)
    final_bytes = int(size16 / (2 if merged_dtype != "float32" else 4) * spec.bits_per_weight / 8)
    needed = size16 + (size16 if spec.outtype is None else 0) + final_bytes
    check_free_space(dest.parent, int(needed * 1.05), f"the {quant} GGUF and its intermediate files")
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.work-", dir=dest.parent))
    name = gguf_file_name(run, quant)
    try:
        merged_dir = work / "merged"
        merged_dir.mkdir()
        save_merged(model, tokenizer, merged_dir, run.template)
        eos_token = tokenizer.eos_token
        # Runs trained on a tokenizer converted from a GGUF (see the function) need this repair.
        if normalize_byte_level_tokenizer(merged_dir / "tokenizer.json"):
            notes.append("tokenizer.json: byte_fallback turned off for the byte-level BPE (no effect on encoding)")
        del model
        free_memory()
        timings["merge_s"] = time.perf_counter() - started
        with atomic_dir(dest) as out:
            started = time.perf_counter()
            if spec.outtype is not None:
                convert_hf_to_gguf(merged_dir, out / name, spec.outtype, folder)
                timings["convert_s"] = time.perf_counter() - started
            else:
                intermediate = work / f"model.{'bf16' if merged_dtype == 'bfloat16' else 'f16'}.gguf"
                convert_hf_to_gguf(merged_dir, intermediate, "bf16" if merged_dtype == "bfloat16" else "f16", folder)
                timings["convert_s"] = time.perf_counter() - started
                shutil.rmtree(merged_dir)
                started = time.perf_counter()
                fallbacks = quantize_gguf(intermediate, out / name, quant)
                if fallbacks["fallback"]:
                    of = f" of {fallbacks['tensors']}" if fallbacks["tensors"] else ""
                    kinds = ", ".join(fallbacks["fallback_types"]) or "another type"
                    notes.append(f"{fallbacks['fallback']}{of} tensors could not use {quant} (row width not a multiple "
                                 f"of its block) and were stored as {kinds} by llama.cpp")
                    extra["fallback_tensors"] = fallbacks
                timings["quantize_s"] = time.perf_counter() - started
            with atomic_file(out / "Modelfile") as handle:
                handle.write(modelfile_text(name, run.template, eos_token, tokenizer))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    details = {"gguf": str(dest / name), "merged_dtype": merged_dtype, "llama_cpp": str(folder),
               **{k: round(v, 2) for k, v in timings.items()}, **extra}
    if notes:
        details["notes"] = notes
    return sorted(p for p in dest.iterdir() if p.is_file()), details


def normalize_byte_level_tokenizer(path: Path) -> bool:
    """Turn off ``byte_fallback`` in a byte-level BPE tokenizer.json, where it can never fire.

    Tokenizers that transformers rebuilds from a llama-architecture GGUF combine a ByteLevel
    pre-tokenizer with ``byte_fallback`` and a SentencePiece-style decoder. Without ``<0xXX>`` byte
    tokens in the vocabulary the fallback has nothing to fall back to, so encoding is plain
    byte-level BPE. llama.cpp's converter, though, takes the flag for a SentencePiece vocabulary and
    writes one that aborts llama.cpp on non-ASCII text. Returns whether the file was changed.

    qtune's own SmolLM2 asset is saved clean since asset recipe 2 (:mod:`qtune.plugins.demo_model`); this
    repair is for the runs whose adapter/ still holds such a tokenizer: runs trained on a recipe-1
    SmolLM2 (November 2026 builds), and any base model whose tokenizer came from transformers'
    GGUF conversion. Only a temporary copy is changed, never the run.
    """
    import json

    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    if '"ByteLevel"' not in json.dumps(data.get("pre_tokenizer")):
        return False
    vocab = model.get("vocab") or {}
    if any(f"<0x{byte:02X}>" in vocab for byte in range(256)):
        return False  # real byte tokens: the fallback can fire
    model["byte_fallback"] = False
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return True


def _merged_dtype(run: FinishedRun, quant: str) -> str:
    if quant in ("f16", "bf16", "f32"):
        return {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}[quant]
    import json

    config_file = Path(run.model_path()) / "config.json"
    stored = None
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        stored = config.get("dtype") or config.get("torch_dtype")
    return "bfloat16" if stored == "bfloat16" else "float16"


def verify_gguf(run: FinishedRun, gguf_path: Path, quant: str):
    """Compare the GGUF in llama.cpp with the trained model; also check EOS and the chat template."""
    def checks(reference) -> dict[str, bool]:
        metadata = gguf_metadata(gguf_path)
        tokenizer = reference.tokenizer
        result = {"EOS id matches tokenizer": metadata.get("tokenizer.ggml.eos_token_id") == str(tokenizer.eos_token_id)}
        expected = run.template.chat_template()
        if expected:
            embedded = metadata.get("tokenizer.chat_template")
            result["chat template embedded"] = embedded == expected
            result["chat template renders the prompt"] = _renders_prompt(embedded, run.template, tokenizer)
        if isinstance(run.template, ChatTemplate):
            embedded = metadata.get("tokenizer.chat_template")
            result["multi-turn conversation gives the trained token ids"] = _multi_turn_parity(
                gguf_path, embedded, run.template, tokenizer)
        return result

    return verify_with(run, "gguf", quant, "llama.cpp", lambda prompts: gguf_logits(gguf_path, prompts), BOUNDS[quant], checks)


def _renders_prompt(chat_template: str | None, template, tokenizer) -> bool:
    """Whether the embedded Jinja chat template turns one user message into ``render_prompt``'s text."""
    if not chat_template:
        return False
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = "What is 2 + 2?"
    example = {name: "" for name in template.optional_fields}
    example.update({name: text for name in template.fields})
    rendered = env.from_string(chat_template).render(
        messages=[{"role": "user", "content": text}], add_generation_prompt=True,
        eos_token=tokenizer.eos_token or "", bos_token=tokenizer.bos_token or "",
    )
    return rendered == template.render_prompt(example)


class GGUFExporter(Exporter):
    name = "gguf"
    description = "llama.cpp / Ollama file with the run's chat template and a Modelfile (llama-cpp-python)"
    quantizations = tuple(GGUF_QUANTS)
    default_quantization = "q8_0"
    quantization_aliases = QUANT_ALIASES
    options = {"llama_cpp_dir": "use this llama.cpp checkout's converter instead of the installed llama-cpp-python's "
                                "(or set QTUNE_LLAMA_CPP_DIR)"}
    artifact_suffix = ".gguf"

    def unavailable_reason(self):
        if missing_modules("llama_cpp"):
            return f"llama-cpp-python is not installed; install it with: {INSTALL_HINT}"
        return missing_modules("torch", "transformers", "peft")

    def export(self, run, out_dir: Path, quantization: str | None, llama_cpp_dir: str | Path | None = None) -> ExportResult:
        quant = quantization or self.default_quantization
        files, details = write_gguf(run, out_dir, quant, llama_cpp_dir)
        return ExportResult(self.name, Path(out_dir), files, details)

    def verify(self, run, result: ExportResult):
        return verify_gguf(run, Path(result.details["gguf"]), result.details.get("quant"))

    def stream_generate(self, path, prompt, *, max_new_tokens, stop):
        return stream_generate(path, prompt, max_new_tokens=max_new_tokens, stop=stop)


@hookimpl
def register_exporters(register):
    register(GGUFExporter())
