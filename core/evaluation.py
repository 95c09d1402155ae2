"""Generation-based evaluation: exact match on held-out rows."""

from __future__ import annotations

from typing import Any

from .types import ChatTemplate, PromptTemplate


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     add_special_tokens: bool = True, stop_ids: list[int] | None = None) -> list[str]:
    """Greedy answers for many prompts, batched with left padding. A chat template's prompts carry
    their special tokens already (``add_special_tokens=False``) and stop at its end-of-turn token
    too (``stop_ids``)."""
    import torch

    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with torch.inference_mode():
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    eos_token_id=stop_ids or tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def exact_match(model, tokenizer, template: PromptTemplate, rows, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Share of rows whose greedy answer equals the reference completion (whitespace-trimmed). With
    a chat template the reference is a conversation's last assistant turn, answered after the
    turns before it."""
    examples = [dict(row) for row in rows]
    options: dict[str, Any] = {}
    if isinstance(template, ChatTemplate):
        from .chat import end_of_turn_ids

        pairs = [last_turn_prompt(template, tokenizer, row) for row in examples]
        prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
        options = {"add_special_tokens": False, "stop_ids": end_of_turn_ids(template, tokenizer)}
    else:
        prompts = [template.render_prompt(row) for row in examples]
        references = [template.render_completion(row).strip() for row in examples]
    was_training = model.training
    model.eval()
    try:
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, **options)
    finally:
        model.train(was_training)
    correct = [a.strip() == r for a, r in zip(answers, references, strict=True)]
    samples = [
        {"input": ex.get("input", ""), "instruction": ex.get("instruction", ""), "prompt": p[-300:], "expected": r,
         "answer": a.strip()}
        for ex, p, r, a in list(zip(examples, prompts, references, answers, strict=True))[:5]
    ]
    return {"accuracy": sum(correct) / len(correct), "correct": sum(correct), "total": len(correct), "samples": samples}


def last_turn_prompt(template: ChatTemplate, tokenizer, example: dict) -> tuple[str, str]:
    """(prompt, reference): the conversation up to its last assistant turn, rendered with the
    generation prompt, and that turn's text (trimmed)."""
    from .chat import example_conversation

    messages, tools = example_conversation(template, example)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = template.render(messages[:last], tokenizer, tools=tools, add_generation_prompt=True)
    return prompt, str(messages[last]["content"]).strip()
