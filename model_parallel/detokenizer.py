"""Incremental detokenization to valid UTF-8 deltas; stop strings that never leak into one."""

from __future__ import annotations

from typing import Any

# A few tokens of left context make the tokenizer decode spaces and merges as in the full text.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's new output tokens into text deltas.

    Text that could still be the start of a stop string is held back until it cannot be, and a
    character split across tokens is held back until whole.
    """

    def __init__(
        self, tokenizer: Any, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool
    ):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = prompt_ids[-_CONTEXT_TOKENS:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all decoded output text
        self.emitted = 0  # chars of `text` already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Appends a token; returns the stop string it completed, if any (and `check_stop`)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            start = max(0, len(self.text) - self.hold)
            self.text += new
            stops = self.stop if check_stop else []
            hits = [(at, s) for s in stops if (at := self.text.find(s, start)) != -1]
            if hits:
                at, s = min(hits)
                self.text = self.text[:at]
                return s
        return None

    def replay(self, token_ids: list[int]) -> None:
        """Take in tokens whose text the client already has (a continued request), so that the
        next delta starts where the client's text ends."""
        for token_id in token_ids:
            self.add(token_id, check_stop=False)
        self.delta(final=False)

    def delta(self, final: bool) -> str:
        """New text safe to show: all of it once the sequence is done."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
