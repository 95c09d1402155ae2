"""Conversations end to end on the tiny Qwen2 (real Qwen2.5 tokenizer): a ShareGPT file with tool
calls and an OpenAI messages file train a few LoRA steps; packing keeps conversations apart;
`qtune validate --show`, `qtune generate --conversation` and `qtune chat` in real processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import OFFLINE_ENV, QTUNE, one_line_error, run_qtune, tiny_run_config

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_qwen_dir):
    """A finished run on the ShareGPT tool-call file with the qwen2.5 template (3 LoRA steps)."""
    tmp = tmp_path_factory.mktemp("chat-run")
    config = tiny_run_config(tmp, tiny_qwen_dir, DATA / "sharegpt_toolcall.json", template="qwen2.5",
                             model={"max_seq_length": 384}, training={"max_steps": 3})
    result = run_qtune("run", config, "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "runs" / "tiny"


def test_sharegpt_file_with_tool_calls_trains_every_assistant_turn(chat_run):
    summary = json.loads((chat_run / "summary.json").read_text())
    assert summary["steps"] == 3
    preflight = json.loads((chat_run / "preflight.json").read_text())
    # 4 + 2 + 2 + 2 assistant turns (function calls included) in the file's four conversations
    assert preflight["data"]["assistant_turns"] == 10
    assert preflight["data"]["examples"] == 4


def test_messages_file_trains_packed(tmp_path, tiny_qwen_dir):
    config = tiny_run_config(tmp_path, tiny_qwen_dir, DATA / "messages.jsonl", template="chatml",
                             training={"max_steps": 2, "packing": True})
    result = run_qtune("run", config, "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    stats = json.loads((tmp_path / "runs" / "tiny" / "preflight.json").read_text())["data"]
    assert stats["assistant_turns"] == 2 + 2 + 1 + 3


def test_validate_show_tells_trained_turns_apart(tmp_path, tiny_qwen_dir):
    config = tiny_run_config(tmp_path, tiny_qwen_dir, DATA / "messages.jsonl", template="chatml")
    result = run_qtune("validate", config, "--show", "1", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    # trained: "Water boils at 100 degrees Celsius at sea level." (13 Qwen tokens: digits are single
    # tokens) and "That is 212 degrees Fahrenheit." (9), each with its <|im_end|>
    assert "2 assistant turns, 24 of 68 tokens trained" in result.stdout
    assert "<|im_start|>assistant\nThat is 212 degrees Fahrenheit.<|im_end|>" in result.stdout
    assert "valid (4 training examples" in result.stdout


def test_packed_conversations_restart_positions_and_match_unpacked_losses(tiny_qwen_dir):
    """trl's packing (bfd, padding-free) on qtune's encoded conversations: position ids restart at
    each conversation, so none attends to another, and the loss equals the unpacked one."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qtune.data import tokenize_chat_example
    from qtune.plugin_manager import get_host

    template = get_host().templates.get("chatml")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    rows = [json.loads(line) for line in (DATA / "messages.jsonl").read_text().splitlines()]
    encoded = [tokenize_chat_example(row, template, tokenizer, 512, assistant_only=True) for row in rows]
    lengths = [len(e.input_ids) for e in encoded]
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])
    packed = pack_dataset(dataset, seq_length=sum(lengths), strategy="bfd")
    assert len(packed) == 1  # all four in one row
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([packed[0]])
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert sorted(b - a for a, b in zip(starts, starts[1:] + [len(positions)], strict=True)) == sorted(lengths)
    assert all(positions[i] == positions[i - 1] + 1 for i in range(1, len(positions)) if i not in starts)

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        # use_cache=False as trl's SFTTrainer passes it: transformers tells the packed conversations
        # apart by their position ids (a block-diagonal mask) only when no KV cache is built
        packed_loss = model(**batch, use_cache=False).loss
        total, count = 0.0, 0
        for e in encoded:
            labels = torch.tensor([e.labels])
            n = int((labels[0, 1:] != -100).sum())
            total += float(model(input_ids=torch.tensor([e.input_ids]), labels=labels).loss) * n
            count += n
    assert abs(float(packed_loss) - total / count) < 1e-4


def test_generate_answers_a_conversation_from_stdin(chat_run):
    conversation = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                               {"role": "user", "content": "Convert 3 USD to EUR."}])
    result = subprocess.run([QTUNE, "generate", str(chat_run), "-c", "-", "--max-new-tokens", "4", "--no-stream"],
                            input=conversation, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV}, timeout=300)
    # a random tiny model may answer nothing but its end-of-turn token: the path is what is tested
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_generate_refuses_a_conversation_ending_in_an_answer(chat_run, tmp_path):
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}))
    line = one_line_error(run_qtune("generate", chat_run, "--conversation", path))
    assert "ends in an assistant turn" in line


def test_chat_streams_turns_with_reset_and_system(chat_run):
    """A real `qtune chat` process fed through its standard input, as a script would."""
    typed = "Hi there\n/system Answer in French.\nAnd now?\n/reset\n/nonsense\nAgain\n"
    result = subprocess.run([QTUNE, "chat", str(chat_run), "--max-new-tokens", "3"], input=typed, capture_output=True,
                            text=True, env={**os.environ, **OFFLINE_ENV}, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("assistant> ") == 3
    assert "(system prompt set)" in out and "(conversation reset)" in out and "(unknown command /nonsense" in out
    assert "template qwen2.5" in out


def test_chat_session_keeps_history_within_the_context(tiny_qwen_dir):
    from transformers import AutoTokenizer

    from qtune.plugin_manager import get_host
    from qtune_cli.generation import ChatSession

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    prompts = []

    def generate(prompt):
        prompts.append(prompt)
        yield "ok"

    def count(prompt):
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    # Qwen tokens: the system turn 8, a question turn 7, an "ok" answer 6, the generation prompt 3. The
    # second prompt is 8+7+6+7+3 = 31 (+10 to answer: fits in 45); the third would be 44 (+10 > 45),
    # so the first exchange (2 messages) goes and it is 31 again.
    session = ChatSession(get_host().templates.get("chatml"), tokenizer, generate, count, context=45, max_new_tokens=10,
                          system="Be brief.")
    for text in ("first question", "second question", "third question"):
        assert "".join(session.ask(text)) == "ok"
    assert [count(p) for p in prompts] == [18, 31, 31]
    assert "first question" in prompts[1] and "first question" not in prompts[2] and session.dropped == 2
    assert prompts[2].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsecond question")
    session.reset()
    "".join(session.ask("again"))
    assert prompts[-1] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
                           "<|im_start|>assistant\n")
