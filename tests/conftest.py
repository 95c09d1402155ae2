"""Shared fixtures: real offline assets (Qwen2.5 tokenizers, a tiny random Qwen2, SmolLM2-135M-Instruct)."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub, datasets or tokenizers, which read them at import:
# tests must never reach a hub, and forked workers must not deadlock on tokenizer threads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import signal  # noqa: E402

import pytest  # noqa: E402

import assets  # noqa: E402
from qtune.plugins.demo_model import smollm2_135m_instruct  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes several seconds on 2 CPU cores (model conversion or generation)")
    # The Ctrl-C tests send SIGINT to qtune processes. A shell's background job (`tox ... &`) starts
    # with SIGINT ignored, and every child would inherit that: Python then keeps it ignored, and the
    # runs those tests interrupt train on to their last step. The suite's processes get the default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """Qwen2.5 base tokenizer, built fresh for the session: eos <|endoftext|>, pad <|PAD_TOKEN|>."""
    return assets.qwen25_tokenizer(instruct=False, dest=tmp_path_factory.mktemp("tokenizers") / "qwen2.5")


@pytest.fixture(scope="session")
def qwen_instruct_tokenizer_dir(tmp_path_factory):
    """Qwen2.5-Instruct tokenizer, built fresh for the session: eos <|im_end|>, its chat template."""
    return assets.qwen25_tokenizer(instruct=True, dest=tmp_path_factory.mktemp("tokenizers") / "qwen2.5-instruct")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, qwen_tokenizer_dir):
    """A 2-layer random Qwen2 (hidden 256) with the Qwen2.5 base tokenizer, seed 0."""
    return assets.tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2", qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as safetensors, converted once into the qtune cache (~20 s the first time)."""
    return smollm2_135m_instruct()
