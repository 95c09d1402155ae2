"""Generation, checked against greedy decoding done here by hand: streaming (`stream_answer` and
`qtune generate RUN`), exact-match evaluation, and `qtune generate FILE.gguf` against llama.cpp
driven directly. Tiny random Qwen2 with the real Qwen2.5 tokenizer, a few new tokens each."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from test_export import make_run

from helpers import run_qtune
from qtune_cli.main import cli

#: the Alpaca prompt of Unsloth's notebook, written out here rather than taken from the template plugin
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n")
NEW_TOKENS = 10


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = NEW_TOKENS) -> str:
    """Greedy decoding by hand: the whole sequence through the model each step (no cache), arg max of
    the last position, stop at EOS; the new tokens decoded as the CLI prints them (special tokens left out)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            sequence = torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)
            token = int(model(sequence, logits_to_keep=1).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_qwen_dir):
    """A run directory: the tiny Qwen2 with a random LoRA on the seven projections (no training)."""
    return make_run(tmp_path_factory.mktemp("generation") / "runs" / "tiny", tiny_qwen_dir)


@pytest.fixture(scope="module")
def trained_model(lora_run, tiny_qwen_dir):
    """The run's model as peft loads it (base + adapter, float32), and the run's tokenizer. The random
    adapter makes the answers differ from prompt to prompt, which the bare random model's do not."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, lora_run / "adapter").eval(), AutoTokenizer.from_pretrained(lora_run / "adapter")


# --------------------------------------------------------------------------- streaming


def test_stream_answer_yields_pieces_that_join_to_the_greedy_answer(trained_model):
    from qtune_cli.generation import stream_answer

    model, tokenizer = trained_model
    prompt = ALPACA.format("Name three colours.", "")
    expected = greedy(model, tokenizer, prompt)
    pieces = list(stream_answer(model, tokenizer, prompt, NEW_TOKENS))
    assert len(pieces) > 1, pieces  # streamed, not handed over in one piece at the end
    assert "".join(pieces) == expected != ""


def test_qtune_generate_streams_the_trained_models_greedy_answer(lora_run, trained_model, monkeypatch):
    import click

    expected = greedy(*trained_model, ALPACA.format("Add the numbers.", "2 + 3"))

    printed = []
    echo = click.echo
    monkeypatch.setattr(click, "echo", lambda message=None, nl=True, **kw: (printed.append((message, nl)), echo(message, nl=nl, **kw)))
    args = ["generate", str(lora_run), "-i", "Add the numbers.", "--input", "2 + 3", "--max-new-tokens", str(NEW_TOKENS)]
    streamed = CliRunner().invoke(cli, args)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output == expected + "\n"
    pieces = [message for message, nl in printed if not nl]
    assert len(pieces) > 1 and "".join(pieces) == expected  # printed piece by piece as they came
    printed.clear()
    whole = CliRunner().invoke(cli, [*args, "--no-stream"])
    assert whole.exit_code == 0 and whole.output == expected + "\n"
    assert printed == [(expected, True)]
    # the instruction may also come right after RUN_DIR, as `llm "prompt"` takes it; not twice
    positional = CliRunner().invoke(cli, ["generate", str(lora_run), "Add the numbers.", "--input", "2 + 3",
                                          "--max-new-tokens", str(NEW_TOKENS), "--no-stream"])
    assert positional.exit_code == 0 and positional.output == expected + "\n"
    twice = CliRunner().invoke(cli, ["generate", str(lora_run), "Add the numbers.", "-i", "Add the numbers."])
    assert twice.exit_code != 0 and "give the instruction once" in twice.output


# --------------------------------------------------------------------------- exact match


def test_exact_match_scores_exactly_the_rows_greedy_decoding_gets_right(trained_model):
    from qtune.evaluation import exact_match
    from qtune.plugin_manager import get_host

    model, tokenizer = trained_model
    questions = [("Add the numbers.", "2 + 3"), ("Give the opposite of the word.", "hot"), ("Translate to French.", "cat"),
                 ("Name the colour of the sky.", ""), ("Reverse the words.", "red green blue")]
    answers = [greedy(model, tokenizer, ALPACA.format(i, x), 4).strip() for i, x in questions]
    assert all(answers) and len(set(answers)) > 1
    # rows 0, 2 and 3 carry the answer the model gives; rows 1 and 4 one it does not give
    outputs = [answers[0], answers[2], answers[2], answers[3], "答案是五"]
    assert outputs[1] != answers[1] and outputs[4] != answers[4]
    rows = [{"instruction": i, "input": x, "output": out} for (i, x), out in zip(questions, outputs, strict=True)]
    model.train()  # exact_match puts the model into eval mode for generation and restores it after
    result = exact_match(model, tokenizer, get_host().templates.get("alpaca"), rows, max_new_tokens=4, batch_size=2)
    assert model.training
    model.eval()
    assert (result["correct"], result["total"], result["accuracy"]) == (3, 5, 0.6)
    assert [s["answer"] for s in result["samples"]] == answers
    assert [s["expected"] for s in result["samples"]] == outputs


# --------------------------------------------------------------------------- GGUF


def llama_cpp_greedy(gguf, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding with llama.cpp by hand: tokenize as llama.cpp does, arg max, stop at end-of-generation."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, logits_all=True, verbose=False)  # keep the scores
    try:
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        llm.eval(tokens)
        out = b""
        for _ in range(max_new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
            out += llm.detokenize([token])
            llm.eval([token])
        return out.decode("utf-8", errors="replace")
    finally:
        llm.close()


@pytest.mark.slow
def test_qtune_generate_a_gguf_prints_what_llama_cpp_answers(lora_run):
    from qtune.export import export_run
    from qtune.run import FinishedRun

    result = export_run(FinishedRun.open(lora_run), "gguf", "f16", verify=False)
    gguf = result.path / "tiny.F16.gguf"
    expected = llama_cpp_greedy(gguf, ALPACA.format("Add the numbers.", "2 + 3"), 8)
    assert expected.strip()
    cli_run = run_qtune("generate", gguf, "-i", "Add the numbers.", "--input", "2 + 3", "--max-new-tokens", "8")
    assert cli_run.returncode == 0, cli_run.stderr
    assert cli_run.stdout == expected + "\n"
