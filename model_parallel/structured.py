"""Grammar-constrained decoding with xgrammar. A request's spec compiles once per (tokenizer, spec),
on a thread beside the engine loop so a slow schema never stalls a step; each sequence gets its
own matcher, and a step masks the logits of its constrained rows with one packed bitmask."""

from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    import xgrammar as xgr

GuideKind = Literal["json_object", "json_schema", "regex", "choice", "grammar", "structural_tag"]

# Longest run of whitespace a JSON grammar allows: enough for indented output, never a runaway of
# newlines (an open complaint against json mode elsewhere). NOTE: 2 was tried and is too few: the
# model indents with a newline and two spaces, and the seed's greedy json_object example, denied
# them, rambled to max_tokens instead of stopping after 56 tokens (as it does at 3 to 12).
MAX_JSON_WHITESPACE = 12
GRAMMAR_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class StructuredOutputSpec:
    """What a request's output must match. `spec` holds the JSON schema, the regex, the EBNF
    grammar or the structural tag (JSON text), or for `choice` a JSON list of the strings."""

    kind: GuideKind
    spec: str = ""


def build_grammar(guide: StructuredOutputSpec) -> xgr.Grammar:
    """The grammar of a spec, without a tokenizer (cheap). ValueError names what is wrong, so a
    front end can refuse a bad spec before anything is queued."""
    import xgrammar as xgr

    try:
        if guide.kind == "json_object":
            return xgr.Grammar.from_json_schema(
                '{"type": "object"}', strict_mode=False, max_whitespace_cnt=MAX_JSON_WHITESPACE
            )
        if guide.kind == "json_schema":
            return xgr.Grammar.from_json_schema(guide.spec, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if guide.kind == "regex":
            return xgr.Grammar.from_regex(guide.spec)
        if guide.kind == "grammar":
            return xgr.Grammar.from_ebnf(guide.spec)
        if guide.kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(guide.spec)
        if guide.kind == "choice":
            choices = json.loads(guide.spec)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in choices))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar reports bad input as RuntimeError and kin
        first_line = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise ValueError(f"invalid {guide.kind}: {first_line}"[:500]) from e
    raise ValueError(f"unknown structured output kind {guide.kind!r}")


class GrammarCompiler:
    """Compiled grammars for one tokenizer, cached by spec (LRU), compiled on a side thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self._tokenizer, self.vocab_size, self._stop = tokenizer, vocab_size, list(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[StructuredOutputSpec, Future] = OrderedDict()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._batch: xgr.BatchGrammarMatcher | None = None

    def compile(self, guide: StructuredOutputSpec) -> Future:
        """A future of the compiled grammar; it raises ValueError for a spec that does not
        compile."""
        future = self._cache.get(guide)
        if future is not None:
            self._cache.move_to_end(guide)
            return future
        future = self._executor.submit(self._compile, guide)
        self._cache[guide] = future
        if len(self._cache) > GRAMMAR_CACHE_SIZE:
            self._cache.popitem(last=False)
        return future

    def _compile(self, guide: StructuredOutputSpec) -> xgr.CompiledGrammar:
        import xgrammar as xgr

        if self._compiler is None:  # built on first use (one compile thread): ~0.2 s
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler.compile_grammar(build_grammar(guide))

    def matcher(self, compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def bitmask(self, seqs: list[Any]) -> tuple[list[int], torch.Tensor] | None:
        """The rows of `seqs` under a grammar and a [len(seqs), ceil(V / 32)] int32 mask (bit j of
        word i: token 32 i + j allowed), filled on several threads: the cores are idle between
        forward passes, and one matcher takes ~1 ms."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None
        import xgrammar as xgr

        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher(max_threads=max(torch.get_num_threads(), 1))
        bitmask = xgr.allocate_token_bitmask(len(seqs), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask(
            [seqs[i].grammar for i in rows], bitmask, indices=rows
        )
        return rows, bitmask

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """-inf, in place, on every token the grammar forbids in the given rows (xgrammar's CPU
    kernel; its plain-torch one elsewhere)."""
    import xgrammar as xgr

    backend = "cpu" if logits.device.type == "cpu" else "torch_native"
    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device, non_blocking=True), indices=rows, backend=backend
    )
