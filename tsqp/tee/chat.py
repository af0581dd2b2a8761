"""A multi-turn conversation that keeps its KV cache between turns: each turn feeds only the new tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tsqp.errors import ContextTooLong
from tsqp.tee.generation import Generation

CONTEXT = 4096  # positions a conversation's cache holds at most (SmolLM2's 8192 would take 0.4 GB)


class Conversation:
    """Messages under the chat template, and a cache holding the longest prefix of them already computed.

    A turn re-renders the whole conversation, keeps the cached positions it shares with it (the
    template may re-tokenize an answer differently from how it was generated: the cache is cut
    back to the common prefix) and feeds the rest.
    """

    def __init__(self, session: Any, system: str | None = None, context: int = CONTEXT) -> None:
        self.session = session
        self.system = system
        self.context = context
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = self.session.llama.new_cache(self.context)  # capped by the model's own context
        self.cached_ids: list[int] = []  # the token ids whose keys and values the cache holds, in order

    def say(self, text: str, max_new_tokens: int = 256, on_text: Callable[[str], None] | None = None, **sampling: Any) -> Generation:
        """The assistant's answer to the user's `text`; both join the conversation (nothing joins if it fails)."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.session.chat_ids(messages)
        kept = common_prefix(self.cached_ids, ids[:-1])  # at least one token must be fed to get logits
        if len(ids) + max_new_tokens > self.cache.max_len:
            raise ContextTooLong(f"the conversation ({len(ids)} tokens) + {max_new_tokens} new tokens exceed the model's context of "
                             f"{self.cache.max_len}; start over (/reset) or ask for fewer tokens")  # fmt: skip
        self.cache.length = kept
        self.cached_ids = self.cached_ids[:kept]
        try:
            result = self.session.generate(ids[kept:], max_new_tokens, on_text=on_text, cache=self.cache, **sampling)
        except BaseException:
            self.cache.length, self.cached_ids = 0, []  # half-filled: recompute next turn
            raise
        self.cached_ids = ids + result.token_ids[:-1]  # the last token sampled was never fed
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        result.prompt_token_ids = ids
        result.timings["reused_tokens"] = kept
        return result


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
