"""AsyncLLM: many asyncio callers share one LLM through one engine-loop thread.

The loop thread owns the LLM; callers never touch it. They submit commands (add, abort, close,
shutdown) through a thread-safe queue; the loop applies every queued command between two steps,
steps while anything is unfinished, blocks on the queue when idle, and hands each output to its
caller's asyncio queue with `loop.call_soon_threadsafe`. All callers' requests are batched
together in the same steps. Because commands are applied in order, a caller's close always
follows its add, whatever the timing of a cancellation.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import queue
import threading
from typing import Any, AsyncIterator, Optional

import attrs

from functional_llm.errors import EngineDead, InvalidConfig, QueueFull

_END = object()        # a stream's last item when its request was aborted by `abort`
_SHUTDOWN = object()   # the command that stops the loop


@attrs.frozen(eq=False)   # identity-hashed: one per generate() call
class _Stream:
    """Where one generate() call's outputs go: its event loop and asyncio queue."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> bool:
        """Hand `item` to the caller (from the loop thread); False if its event loop is closed."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        return False


@attrs.frozen
class _Add:
    stream: _Stream
    prompt: Any
    params: Any
    request_id: Optional[str]


@attrs.frozen
class _Abort:                 # engine.abort(request_id): answered through `done`
    request_id: str
    done: concurrent.futures.Future


@attrs.frozen
class _Close:                 # the caller stopped listening (cancelled, aclose, break)
    stream: _Stream


class AsyncLLM(contextlib.AbstractAsyncContextManager):
    """`LLM` for asyncio: `async for out in engine.generate(prompt, params)`.

    Construction takes the LLM's arguments (the LLM is built in the calling thread, so its
    typed errors are raised here) plus `max_waiting`: when set, a request arriving while that
    many requests wait to start (admitted, no token yet) raises QueueFull in its caller.
    Call shutdown() (or use `async with`) when done: the loop thread holds the LLM."""

    def __init__(self, *args, max_waiting: Optional[int] = None, **kwargs):
        if max_waiting is not None and (type(max_waiting) is not int or max_waiting < 1):
            raise InvalidConfig("max_waiting", max_waiting, "must be a positive int or None")
        from functional_llm.llm import LLM   # torch stays out of `import functional_llm`
        self._llm = LLM(*args, **kwargs)
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # held while submitting and while the loop dies, so no command is queued after the
        # loop's last look at the queue (such a command would never be answered: a hang)
        self._lock = threading.Lock()
        self._dead_reason, self._dead_cause = None, None   # why the loop stopped, and what stopped it
        self._counters = self._llm.counters   # replaced (never mutated) by the loop thread
        # loop-thread state: live requests and those admitted but without a token yet
        self._streams: dict[str, _Stream] = {}
        self._rid_of: dict[_Stream, str] = {}
        self._waiting: set[str] = set()
        self._batch: collections.deque = collections.deque()   # commands being applied
        self._answers: list = []   # aborts done, answered once the counters show them
        self._thread = threading.Thread(target=self._loop, name="functional-llm-engine", daemon=True)
        self._thread.start()

    # -- caller side (the event loop) -----------------------------------------------------------
    async def generate(self, prompt, sampling_params=None, request_id: Optional[str] = None) -> AsyncIterator:
        """Yield the request's RequestOutputs as the engine makes them; the last one is finished.
        Raises the LLM's typed error (or QueueFull) before anything is admitted, EngineDead if
        the engine loop stops. Cancelling the consuming task or closing the generator (aclose,
        or breaking out of `async for` once the generator is collected) aborts the request,
        freeing its blocks before the next step. After `abort(request_id)` the stream ends
        without a further output."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        if not self._submit(_Add(stream, prompt, sampling_params, request_id)):
            raise EngineDead.because(self._dead_reason, self._dead_cause)
        ended = False
        try:
            while not ended:
                item = await stream.queue.get()
                ended = item is _END or isinstance(item, BaseException) or item.finished
                if isinstance(item, BaseException):
                    raise item
                if item is not _END:
                    yield item
        finally:
            if not ended:
                self._submit(_Close(stream))

    async def abort(self, request_id: str) -> None:
        """Abort a request and free its blocks; returns once the loop has done it. Ids that are
        not live are ignored: a request may finish while its abort is on the way."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        if self._submit(_Abort(str(request_id), done)):
            await asyncio.wrap_future(done)

    @property
    def counters(self) -> dict:
        """LLM.counters as of the loop's last step or command (a copy, read without the LLM)."""
        return dict(self._counters)

    def shutdown(self) -> None:
        """Abort every request (their callers get EngineDead), stop the loop, close the LLM.
        Idempotent; returns when the loop has stopped (at most one step's wait)."""
        self._submit(_SHUTDOWN)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    async def __aexit__(self, *exc) -> None:
        self.shutdown()

    def _submit(self, command) -> bool:
        with self._lock:
            if self._dead_reason is None:
                self._commands.put(command)
                return True
        return False

    # -- the loop thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        llm = self._llm
        try:
            while True:
                if not llm.has_unfinished_requests():   # idle: sleep until a command arrives
                    self._batch.append(self._commands.get())
                self._batch.extend(_drain(self._commands))
                while self._batch:
                    command = self._batch.popleft()
                    if command is _SHUTDOWN:
                        return self._die("the engine was shut down", None)
                    self._apply(command)
                self._counters = llm.counters   # before answering: an abort's awaiter sees it
                self._answer()
                if llm.has_unfinished_requests():
                    outputs = llm.step()
                    self._counters = llm.counters   # before the outputs: a caller seeing its
                    self._deliver(outputs)          # last output sees its blocks freed
        except BaseException as exc:   # the LLM may be inconsistent now: no further step
            self._die(f"the engine loop failed: {type(exc).__name__}: {exc}", exc)

    def _apply(self, command) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Close) and command.stream in self._rid_of:   # else it ended already
            self._end(self._rid_of[command.stream])
        elif isinstance(command, _Abort):
            if command.request_id in self._streams:
                self._end(command.request_id).put(_END)
            self._answers.append(command.done)

    def _add(self, command: _Add) -> None:
        try:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull("max_waiting", self.max_waiting,
                                f"{len(self._waiting)} requests are waiting to start; retry later")
            rid = self._llm.add_request(command.prompt, command.params, command.request_id)
        except Exception as exc:   # add_request raises before admitting anything: only this caller fails
            command.stream.put(exc)
            return
        self._streams[rid], self._rid_of[command.stream] = command.stream, rid
        self._waiting.add(rid)

    def _end(self, rid: str) -> _Stream:
        """Abort a live request in the LLM and forget its stream (returned)."""
        self._llm.abort(rid)
        stream = self._streams.pop(rid)
        del self._rid_of[stream]
        self._waiting.discard(rid)
        return stream

    def _deliver(self, outputs) -> None:
        for out in outputs:
            rid = out.request_id
            if (stream := self._streams.get(rid)) is None:
                continue
            if out.token_ids or out.finished:
                self._waiting.discard(rid)
            if out.finished:
                del self._streams[rid], self._rid_of[stream]
            if not stream.put(out) and not out.finished:
                self._end(rid)   # its event loop is gone: nobody will read the rest

    def _die(self, reason: str, cause: Optional[BaseException]) -> None:
        """Answer everyone: live requests and commands not yet applied get EngineDead (aborts
        are simply done); shutdown also frees the live requests' blocks. Never raises."""
        with self._lock:
            self._dead_reason, self._dead_cause = reason, cause
            leftover = list(self._batch) + _drain(self._commands)
        self._batch.clear()
        for rid, stream in list(self._streams.items()):
            if cause is None:
                with contextlib.suppress(Exception):
                    self._llm.abort(rid)
            stream.put(EngineDead.because(self._dead_reason, self._dead_cause))
        self._streams.clear(), self._rid_of.clear(), self._waiting.clear()
        for command in leftover:
            if isinstance(command, _Add):
                command.stream.put(EngineDead.because(self._dead_reason, self._dead_cause))
            elif isinstance(command, _Abort):
                self._answers.append(command.done)
        with contextlib.suppress(Exception):
            self._counters = self._llm.counters
            self._llm.close()
        self._answer()

    def _answer(self) -> None:
        for done in self._answers:
            if done.set_running_or_notify_cancel():   # False: its awaiter was cancelled
                done.set_result(None)
        self._answers.clear()


def _drain(commands: queue.SimpleQueue) -> list:
    """The commands queued now. The loop thread is the queue's only reader, so qsize() items
    are there to take (more may arrive meanwhile: the next drain takes them)."""
    return [commands.get_nowait() for _ in range(commands.qsize())]
