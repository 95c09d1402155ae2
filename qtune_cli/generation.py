"""Streaming generation with a trained run, and multi-turn chat sessions (``qtune chat``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

from qtune.errors import QtuneError


def stream_answer(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                  add_special_tokens: bool = True, stop_ids: Optional[list[int]] = None) -> Iterator[str]:
    """Yield the answer's text piece by piece as tokens are generated (transformers' streamer).
    A chat template's prompt holds its special tokens (``add_special_tokens=False``) and its turns
    end in an end-of-turn token that may not be EOS (``stop_ids``)."""
    import torch
    from transformers import TextIteratorStreamer

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    kwargs = dict(
        **inputs,
        streamer=streamer,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        eos_token_id=stop_ids or tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if errors:
        raise errors[0]


@dataclass
class ChatSession:
    """A conversation with a trained model: the run's chat template renders the history, ``generate``
    streams the next assistant turn for a rendered prompt, and the oldest turns are dropped (the
    system message is kept) so the prompt plus ``max_new_tokens`` fits in ``context`` tokens."""

    template: Any
    tokenizer: Any
    generate: Callable[[str], Iterator[str]]
    count_tokens: Callable[[str], int]
    context: int
    max_new_tokens: int
    system: Optional[str] = None
    history: list[dict[str, str]] = field(default_factory=list)
    #: turns dropped to stay within the context, since the last reset
    dropped: int = 0

    def reset(self) -> None:
        self.history.clear()
        self.dropped = 0

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt(self) -> str:
        return self.template.render(self.messages(), self.tokenizer, add_generation_prompt=True)

    def fit(self) -> int:
        """Drop the oldest exchanges until the prompt leaves room for an answer; returns how many
        messages went."""
        dropped = 0
        while self.count_tokens(self.prompt()) + self.max_new_tokens > self.context:
            if len(self.history) <= 1:
                raise QtuneError(
                    f"the message does not fit in the context ({self.context} tokens with {self.max_new_tokens} for the "
                    f"answer); shorten it or lower --max-new-tokens"
                )
            # one user message and the answers after it
            cut = next((i for i in range(1, len(self.history)) if self.history[i]["role"] == "user"), len(self.history) - 1)
            del self.history[:cut]
            dropped += cut
        self.dropped += dropped
        return dropped

    def ask(self, text: str) -> Iterator[str]:
        """Add the user's message, stream the answer, and keep it in the history."""
        self.history.append({"role": "user", "content": text})
        try:
            self.fit()
        except QtuneError:
            self.history.pop()
            raise
        pieces = []
        for piece in self.generate(self.prompt()):
            pieces.append(piece)
            yield piece
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})
