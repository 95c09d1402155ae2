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
    from qtune.gguf import gguf_metadata, load_llama, stream_generate

    result = export_run(smol_run, "gguf", "q4_k_m", verify=True)
    report = result.details["verify"]
    print(json.dumps({k: report[k] for k in ("top1_agreement", "top5_agreement", "max_abs_logit_diff", "tokens")}),
          result.details["bytes"], result.details["seconds"])
    assert report["passed"] and report["tokenization_identical"]
    assert report["top1_agreement"] >= 0.75 and report["top5_agreement"] >= 0.99  # 0.82 / 1.00 measured; the random tiny model: 0.61
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
