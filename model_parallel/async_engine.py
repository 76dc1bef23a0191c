"""Async front ends over an LLMEngine loop that runs elsewhere: AsyncEngine steps it on a thread of
this process; ProcessEngine in a process of its own, so that the engine's Python never waits on
this process's GIL (a Serve replica's request threads hold it a lot; measured: a busy Python thread
beside the loop thread cuts throughput from 398 to 138 tok/s at 32 streams).

Both hand each request an async stream of RequestOutput; closing it early aborts the request."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from model_parallel.config import EngineConfig
from model_parallel.engine import EngineDeadError, EngineLimits, LLMEngine, validate_request
from model_parallel.request import RequestOutput, SamplingParams, coalesce

logger = logging.getLogger(__name__)


class _AsyncFrontEnd:
    """Per-request asyncio queues, fed from another thread; subclasses say where commands go."""

    limits: EngineLimits

    def __init__(self) -> None:
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._stopped = False

    def _submit(self, kind: str, payload: object) -> None:
        raise NotImplementedError

    def check_health(self) -> None:
        raise NotImplementedError

    @property
    def stopped(self) -> bool:
        return self._stopped or self._error is not None

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        output_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs, one per step. Closing the iterator early aborts it.
        `output_token_ids` continues a request (see LLMEngine.add_request)."""
        self.check_health()
        prior = list(output_token_ids or ())
        validate_request(list(prompt_token_ids) + prior, sampling_params, self.limits)
        stream: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._attach(loop)
        self._streams[request_id] = (loop, stream)
        self._submit("add", (request_id, list(prompt_token_ids), sampling_params, prior))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                # Coalesce what piled up while the consumer was busy into one item.
                while isinstance(item, RequestOutput) and not stream.empty():
                    nxt = stream.get_nowait()
                    if isinstance(nxt, BaseException):
                        stream.put_nowait(nxt)  # raised on the next turn, after this item
                        break
                    item = coalesce(item, nxt)
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    raise ValueError(item.error)
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """A consumer's loop is about to wait on outputs (a hook for where they are read)."""

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_step([(request_id, item)])

    def _deliver_step(
        self,
        items: list[tuple[str, RequestOutput | BaseException]],
        here: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """A step's outputs wake each consumer loop once, not once per request (each wake-up is
        a write to the loop's self-pipe and a turn of it); those on `here`, the loop this runs
        on, are put straight away."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, puts in by_loop.items():
            if loop is here:
                _put_all(puts)
            else:
                loop.call_soon_threadsafe(_put_all, puts)

    def _fail_all(self, error: BaseException) -> None:
        self._error = error
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError(f"engine failure: {error!r}"))


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in puts:
        stream.put_nowait(item)


def _drain(engine: LLMEngine, commands: Any, block: bool, on_error: Any) -> bool:
    """Apply queued commands (waiting a little for one when idle); False once told to stop."""
    while True:
        try:
            kind, payload = commands(block)
        except queue.Empty:
            return True
        block = False
        if kind == "add":
            request_id, prompt, params, prior = payload
            try:
                engine.add_request(request_id, prompt, params, prior)
            except ValueError as e:
                on_error(request_id, e)
        elif kind == "abort":
            engine.abort_request(payload)
        elif kind == "stop":
            return False


class AsyncEngine(_AsyncFrontEnd):
    """The engine on a thread of this process (what tensor-parallel rank 0 uses, and the tests)."""

    def __init__(self, config: EngineConfig):
        super().__init__()
        self.engine = LLMEngine(config)
        self.limits = self.engine.limits
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._num_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def _submit(self, kind: str, payload: object) -> None:
        self._inbox.put((kind, payload))

    def check_health(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine loop is dead: {self._error!r}")
        self.engine.check_health()

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)
        self.engine.shutdown()

    def _run(self) -> None:
        # NOTE: OpenMP thread counts are per thread: give the loop its creator's, not the env's.
        torch.set_num_threads(self._num_threads)

        def take(block: bool) -> tuple[str, object]:
            return self._inbox.get(block=block, timeout=0.5 if block else None)

        try:
            while not self._stopped:
                if not _drain(self.engine, take, not self.engine.has_unfinished(), self._deliver):
                    return
                self._deliver_step([(out.request_id, out) for out in self.engine.step()])
        except BaseException as e:  # noqa: BLE001 - any fault fails every request, never hangs
            logger.exception("engine loop failed")
            self._fail_all(e)


def _engine_process(config: EngineConfig, num_threads: int, commands: Any, results: Any) -> None:
    """The child: build the engine, then step it; every step's outputs go back as one message."""
    torch.set_num_threads(num_threads)
    engine = LLMEngine(config)
    results.send(("ready", (engine.limits, engine.stats())))

    def take(block: bool) -> tuple[str, object]:
        if commands.poll(0.5 if block else 0):
            return commands.recv()
        raise queue.Empty

    def refuse(request_id: str, e: ValueError) -> None:
        results.send(("refused", (request_id, str(e))))

    try:
        while _drain(engine, take, not engine.has_unfinished(), refuse):
            outs = engine.step()
            results.send(("step", (outs, engine.stats())))
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone
    except BaseException as e:  # noqa: BLE001
        logger.exception("engine process failed")
        results.send(("dead", repr(e)))
    finally:
        engine.shutdown()


class ProcessEngine(_AsyncFrontEnd):
    """The engine in a child process (one model replica on one device). Commands go down one pipe;
    each step's outputs come up another, read by the consumers' own event loop when the pipe is
    readable. A reader thread here would cost each token a thread wake-up and a GIL hand-off
    (measured: it was a quarter of a Serve replica's CPU per streamed token)."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 600.0):
        super().__init__()
        ctx = multiprocessing.get_context("spawn")
        cmd_recv, self._cmd = ctx.Pipe(duplex=False)
        self._results, res_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_engine_process,
            name="llmcluster-engine",
            daemon=True,
            args=(config, torch.get_num_threads(), cmd_recv, res_send),
        )
        self._proc.start()
        cmd_recv.close(), res_send.close()
        if not self._results.poll(startup_timeout_s):
            self._proc.kill()
            raise EngineDeadError("the engine process did not start in time")
        try:
            kind, (self.limits, self._stats) = self._results.recv()
        except EOFError as e:
            raise EngineDeadError("the engine process died while starting") from e
        self._lock = threading.Lock()
        self._reader_loop: asyncio.AbstractEventLoop | None = None

    def _submit(self, kind: str, payload: object) -> None:
        with self._lock:
            try:
                self._cmd.send((kind, payload))
            except (BrokenPipeError, OSError) as e:
                self._fail_all(e)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The first consumer's loop reads the results; a later loop takes over only once that one
        is closed (a loop per test, say). Streams on other loops get theirs thread-safely."""
        if self._reader_loop is loop or (
            self._reader_loop is not None and not self._reader_loop.is_closed()
        ):
            return
        self._reader_loop = loop
        loop.add_reader(self._results.fileno(), self._read, loop)

    def check_health(self) -> None:
        if self._error is not None or not self._proc.is_alive():
            raise EngineDeadError(f"the engine process is dead: {self._error!r}")

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def shutdown(self) -> None:
        self._stopped = True
        self._submit("stop", None)
        self._proc.join(timeout=15)
        if self._proc.is_alive():
            self._proc.kill()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """Everything the pipe holds now; the loop calls again when there is more."""
        try:
            while self._results.poll(0):
                kind, payload = self._results.recv()
                if kind == "step":
                    outs, self._stats = payload
                    self._deliver_step([(out.request_id, out) for out in outs], here=loop)
                elif kind == "refused":
                    request_id, message = payload
                    self._deliver_step([(request_id, ValueError(message))], here=loop)
                elif kind == "dead":
                    raise EngineDeadError(payload)
        except (EOFError, OSError, EngineDeadError) as e:
            loop.remove_reader(self._results.fileno())
            if not self._stopped:
                logger.error("engine process lost: %r", e)
                self._fail_all(e if isinstance(e, EngineDeadError) else EngineDeadError(repr(e)))
