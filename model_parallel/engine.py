"""LLMEngine runs one step: schedule, forward, sample, update. AsyncEngine drives it from one
background thread and hands each request an async stream of its outputs."""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch

from model_parallel.block_manager import BlockManager
from model_parallel.config import EngineConfig, LlamaArchConfig
from model_parallel.detokenizer import IncrementalDetokenizer
from model_parallel.distributed import create_master_store
from model_parallel.loader import resolve_model_path
from model_parallel.request import (
    CompletionOutput,
    RequestOutput,
    SamplingParams,
    Sequence,
    TokenLogprobs,
)
from model_parallel.sampler import Sampler, SamplingMetadata
from model_parallel.scheduler import Scheduler
from model_parallel.step_inputs import split_batch
from model_parallel.structured import GrammarCompiler
from model_parallel.worker import WorkerPool, build_runner

logger = logging.getLogger(__name__)

GRAMMAR_COMPILE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What a request is checked against before it is queued (known to any front end)."""

    max_model_len: int
    pool_tokens: int
    vocab_size: int
    max_n: int


def validate_request(
    prompt_token_ids: list[int], params: SamplingParams, limits: EngineLimits
) -> None:
    """Refuse what cannot be served, before it is queued."""
    n, vocab = len(prompt_token_ids), limits.vocab_size
    if n == 0:
        raise ValueError("the prompt is empty")
    if n >= limits.max_model_len:
        raise ValueError(
            f"the prompt has {n} tokens, but the model's context length is "
            f"{limits.max_model_len} (and at least one token must be generated)"
        )
    if n >= limits.pool_tokens:
        raise ValueError(
            f"the prompt has {n} tokens, but the whole KV cache holds {limits.pool_tokens} tokens"
        )
    if any(not 0 <= t < vocab for t in prompt_token_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if params.n > limits.max_n:
        raise ValueError(f"n must be in [1, {limits.max_n}], got {params.n}")
    for name, ids in (
        ("logit_bias", params.logit_bias or {}),
        ("stop_token_ids", params.stop_token_ids),
    ):
        if any(not 0 <= int(t) < vocab for t in ids):
            raise ValueError(f"{name} token ids must be in [0, {vocab})")


@dataclass(slots=True)
class _RequestState:
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    pending: list[Sequence] = field(
        default_factory=list
    )  # n > 1 siblings, admitted after seq 0's prefill


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        self.model_path = path = resolve_model_path(config.model.model, config.model.cache_dir)
        self.arch = LlamaArchConfig.from_checkpoint(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        device = config.parallel.torch_device()
        self.workers: WorkerPool | None = None
        if config.parallel.tensor_parallel_size > 1:
            store, address = create_master_store(config.parallel.collective_timeout_s)
            self.workers = WorkerPool(config, address)
            self.runner = build_runner(config, 0, address, store)
            self.workers.start()
        else:
            self.runner = build_runner(config, 0, "")
        self.max_model_len = self.runner.max_model_len
        bs = config.cache.block_size
        self.block_manager = BlockManager(
            self.runner.num_blocks, bs, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.pool_tokens = self.runner.num_blocks * bs
        self.max_seq_len = min(self.max_model_len, self.pool_tokens)
        eos = set(self.arch.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.sampler = Sampler()
        self.device = device
        self.grammars = GrammarCompiler(self.tokenizer, self.arch.vocab_size, self.eos_token_ids)
        self._requests: dict[str, _RequestState] = {}
        self._compiling: dict[str, tuple[Future, float]] = {}  # structured requests, not queued yet
        self._seq_ids = itertools.count()

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(
            self.max_model_len, self.pool_tokens, self.arch.vocab_size, self.config.scheduler.max_n
        )

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.limits)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: list[int] | None = None,
    ) -> None:
        """`output_token_ids` continues a request another replica began (n == 1): they count as
        output for max_tokens, penalties, stops and grammars, and their text is not sent again."""
        prompt, prior = list(prompt_token_ids), list(output_token_ids or ())
        if prior and params.n != 1:
            raise ValueError("only a request with n == 1 can be continued")
        self.validate(prompt + prior, params)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        seqs, detoks = [], []
        for i in range(params.n):
            seq = Sequence(
                next(self._seq_ids),
                request_id,
                i,
                prompt + prior,
                len(prompt),
                params,
            )
            if params.seed is not None:
                seq.generator = torch.Generator(self.device)
            seqs.append(seq)
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt, params.stop, params.skip_special_tokens
            )
            detok.replay(prior)
            detoks.append(detok)
        self._requests[request_id] = _RequestState(seqs, detoks, pending=seqs[1:])
        if params.structured is not None:
            future = self.grammars.compile(params.structured)
            self._compiling[request_id] = (future, time.monotonic())
        else:
            self.scheduler.add(seqs[0])

    def _admit_compiled(self) -> list[RequestOutput]:
        """Queue the structured requests whose grammar is ready; refuse those whose grammar failed
        to compile, or took too long."""
        refused = []
        for request_id, (future, since) in list(self._compiling.items()):
            if future.done() and future.exception() is None:
                del self._compiling[request_id]
                state = self._requests[request_id]
                for seq in state.seqs:
                    seq.grammar = self.grammars.matcher(future.result())
                    for token in seq.output_token_ids:  # a continuation's tokens so far
                        seq.grammar.accept_token(token)
                self.scheduler.add(state.seqs[0])
                continue
            if future.done():
                error = str(future.exception())
            elif time.monotonic() - since > GRAMMAR_COMPILE_TIMEOUT_S:
                error = f"the grammar took over {GRAMMAR_COMPILE_TIMEOUT_S:.0f} s to compile"
            else:
                continue
            del self._compiling[request_id]
            state = self._requests.pop(request_id)
            for seq in state.seqs:
                seq.finish_reason = "abort"
            refused.append(self._request_output(request_id, state, [], True, error))
        return refused

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        queued = self._compiling.pop(request_id, None) is None
        outs = []
        for seq in state.seqs:
            if seq.finish_reason is None:
                if queued and seq not in state.pending:
                    self.scheduler.finish(seq, "abort")
                seq.finish_reason = "abort"
                outs.append(CompletionOutput(seq.index, "", [], None, "abort"))
        return self._request_output(request_id, state, outs, finished=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._compiling)

    def check_health(self) -> None:
        """Raise if a tensor-parallel rank is gone."""
        if self.workers is not None:
            self.workers.check()

    def shutdown(self) -> None:
        if self.workers is not None:
            try:
                self.runner.stop_workers()
            except RuntimeError:  # a rank is already gone: the group is broken, kill the rest
                logger.warning("tensor-parallel group broken at shutdown", exc_info=True)
            self.workers.shutdown()
            self.workers = None
        self.grammars.shutdown()

    def step(self) -> list[RequestOutput]:
        refused = self._admit_compiled() if self._compiling else []
        out = self.scheduler.schedule()
        if not out.scheduled:
            if self._compiling:  # nothing else to do: wait for a grammar, without spinning
                wait([f for f, _ in self._compiling.values()], 0.01, FIRST_COMPLETED)
            return refused
        self.check_health()
        sampling = [s.seq for part in split_batch(out.scheduled) for s in part if s.samples]
        logits = self.runner.execute(out.scheduled)
        md = SamplingMetadata.build(
            sampling,
            self.arch.vocab_size,
            self.eos_token_ids,
            self.device,
            self.grammars.bitmask(sampling),
        )
        result = self.sampler(logits, md)
        self.scheduler.update(out)
        per_request: dict[str, list[CompletionOutput]] = {}
        for i, seq in enumerate(sampling):
            lp = result.logprobs[i] if result.logprobs is not None else None
            per_request.setdefault(seq.request_id, []).append(
                self._append_token(seq, result.token_ids[i], lp)
            )
        return refused + [self._finish_step(rid, outs) for rid, outs in per_request.items()]

    def _append_token(
        self, seq: Sequence, token: int, lp: TokenLogprobs | None
    ) -> CompletionOutput:
        p = seq.params
        seq.token_ids.append(token)
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            logger.error("request %s: token %d broke its grammar", seq.request_id, token)
        state = self._requests[seq.request_id]
        if seq.index == 0 and state.pending:
            for sibling in state.pending:  # seq 0's prompt blocks are cached now: share them
                self.scheduler.add(sibling)
            state.pending = []
        can_stop = seq.num_output_tokens >= p.min_tokens  # stops are ignored before min_tokens
        stop_str = state.detokenizers[seq.index].add(token, check_stop=can_stop)
        reason, stop_reason = None, None
        if can_stop and stop_str is not None:
            reason, stop_reason = "stop", stop_str
        elif can_stop and token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif can_stop and not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif seq.grammar is not None and seq.grammar.is_terminated():
            reason = "stop"  # the grammar is complete: it ended on a stop token
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            reason = "length"
        elif seq.num_tokens >= self.max_seq_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            seq.stop_reason = stop_reason
        if lp is not None and p.logprobs is not None:
            lp = TokenLogprobs(lp.chosen, lp.top[: p.logprobs])
        text = state.detokenizers[seq.index].delta(final=reason is not None)
        return CompletionOutput(
            seq.index, text, [token], [lp] if p.logprobs is not None else None, reason, stop_reason
        )

    def _finish_step(self, request_id: str, outs: list[CompletionOutput]) -> RequestOutput:
        state = self._requests[request_id]
        done = not state.pending and all(s.finish_reason is not None for s in state.seqs)
        if done:
            del self._requests[request_id]
        return self._request_output(request_id, state, outs, done)

    @staticmethod
    def _request_output(
        request_id: str,
        state: _RequestState,
        outs: list[CompletionOutput],
        finished: bool,
        error: str | None = None,
    ) -> RequestOutput:
        first = state.seqs[0]
        return RequestOutput(
            request_id,
            outs,
            first.num_prompt_tokens,
            first.num_cached_tokens,
            sum(s.num_output_tokens for s in state.seqs),
            finished,
            error,
        )

    def stats(self) -> dict[str, float]:
        s, bm = self.scheduler, self.block_manager
        return {
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "prefix_queried_tokens": s.prefix_queried_tokens,
            "prefix_hit_tokens": s.prefix_hit_tokens,
            "num_preemptions": s.num_preemptions,
        }


class EngineDeadError(RuntimeError):
    """The engine loop stopped; the request cannot finish."""
