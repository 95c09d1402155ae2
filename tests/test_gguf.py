"""A real model through the GGUF path: SmolLM2-135M-Instruct with a small random LoRA, exported to
q4_k_m with llama.cpp's own converter and quantizer, verified, and answering through stream_generate."""

from __future__ import annotations

import json

import pytest
from test_export import make_run


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, smollm2_dir):
    from qtune.run import FinishedRun

    # A small adapter (lora_B ~ N(0, 0.001)): the merge changes every projection and the model still
    # answers. (At 0.002 the f16 GGUF still says Paris but q4_k_m's first token flips to French.)
    return FinishedRun.open(make_run(tmp_path_factory.mktemp("smol") / "smol", smollm2_dir, template="chatml", b_std=0.001))


def test_smollm2_q4_k_m_verifies_and_generates(smol_run):
    from qtune.export import export_run
    from qtune.plugins.gguf_export import gguf_metadata, load_llama, stream_generate

    result = export_run(smol_run, "gguf", "q4_k_m", verify=True)
    report = result.details["verify"]
    print(json.dumps({k: report[k] for k in ("top1_agreement", "top5_agreement", "max_abs_logit_diff", "tokens")}),
          result.details["bytes"], result.details["seconds"])
    assert report["passed"] and report["tokenization_identical"]
    # a system message and two exchanges through the GGUF's own chat template, tokenized by llama.cpp:
    # the very ids the run trains on for that conversation
    assert report["checks"]["multi-turn conversation gives the trained token ids"] is True
    # the SmolLM2 asset's tokenizer is byte-level BPE as saved: write_gguf had nothing to repair
    assert not any("byte_fallback" in note for note in result.details.get("notes", []))
    # SmolLM2's 576-wide rows do not fit K-quant blocks of 256: llama.cpp says which tensors fell back
    assert result.details["fallback_tensors"]["fallback"] == 180 and result.details["fallback_tensors"]["tensors"] == 272
    assert any(note.startswith("180 of 272 tensors could not use q4_k_m") for note in result.details["notes"])
    # 0.853 / 0.985 measured on 68 tokens (one token out of the top 5); the random tiny model: 0.61.
    # (0.82 / 1.00 when chatml still put Qwen's default system prompt before every SmolLM2 prompt.)
    assert report["top1_agreement"] >= 0.75 and report["top5_agreement"] >= 0.95
    gguf = result.path / "smol.Q4_K_M.gguf"
    metadata = gguf_metadata(gguf)
    eos = int(metadata["tokenizer.ggml.eos_token_id"])
    template = smol_run.template
    prompt = template.render_prompt({"instruction": "What is the capital of France?"})
    llm = load_llama(gguf, n_ctx=512)
    try:
        assert llm.detokenize([eos], special=True) == b"<|im_end|>"
        pieces = list(stream_generate(gguf, prompt, max_new_tokens=48, stop=template.stop_strings(), llm=llm))
        answer = "".join(pieces)
        assert len(pieces) > 1  # streamed piece by piece
        assert "Paris" in answer, answer
        # it stopped by itself at <|im_end|> (EOS), well before the token budget, and left it out
        assert "<|im_end|>" not in answer and len(llm.tokenize(answer.encode(), add_bos=False)) < 40
    finally:
        llm.close()
    modelfile = (result.path / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n' in modelfile


def test_tokenizer_repair_for_runs_trained_on_a_gguf_converted_tokenizer(smollm2_dir, tmp_path):
    """Runs trained on a tokenizer that transformers converted from a GGUF (qtune's SmolLM2 asset
    before recipe 2) carry byte_fallback and a SentencePiece decoder; write_gguf repairs a copy."""
    from tokenizers import Tokenizer

    from qtune.plugins.gguf_export import normalize_byte_level_tokenizer

    clean = tmp_path / "clean.json"
    clean.write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    assert normalize_byte_level_tokenizer(clean) is False
    hybrid = json.loads(clean.read_text(encoding="utf-8"))
    hybrid["model"]["byte_fallback"] = True
    hybrid["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(hybrid), encoding="utf-8")
    before = Tokenizer.from_file(str(path))
    assert normalize_byte_level_tokenizer(path) is True
    repaired = json.loads(path.read_text(encoding="utf-8"))
    assert repaired["model"]["byte_fallback"] is False and repaired["decoder"]["type"] == "ByteLevel"
    after = Tokenizer.from_file(str(path))
    for text in ("Grüße, 世界! 😀", "tab\t42 and  007", "plain ascii"):
        assert before.encode(text).ids == after.encode(text).ids
        assert after.decode(after.encode(text).ids) == text
    assert normalize_byte_level_tokenizer(path) is False
