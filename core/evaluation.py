"""Generation-based evaluation: exact match on held-out rows."""

from __future__ import annotations

from typing import Any

from .types import PromptTemplate


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for many prompts, batched with left padding."""
    import torch

    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=True)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with torch.inference_mode():
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def exact_match(model, tokenizer, template: PromptTemplate, rows, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Share of rows whose greedy answer equals the reference completion (whitespace-trimmed)."""
    examples = [dict(row) for row in rows]
    prompts = [template.render_prompt(row) for row in examples]
    references = [template.render_completion(row).strip() for row in examples]
    was_training = model.training
    model.eval()
    try:
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    correct = [a.strip() == r for a, r in zip(answers, references, strict=True)]
    samples = [
        {"input": ex.get("input", ""), "instruction": ex.get("instruction", ""), "expected": r, "answer": a.strip()}
        for ex, r, a in list(zip(examples, references, answers, strict=True))[:5]
    ]
    return {"accuracy": sum(correct) / len(correct), "correct": sum(correct), "total": len(correct), "samples": samples}
