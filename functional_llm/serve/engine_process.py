"""EngineProcess: AsyncLLM's interface with the LLM in a child process of its own.

In the server's process the engine-loop thread shares the GIL with the HTTP side (uvicorn,
asyncio, JSON, one SSE chunk per token): at saturation the HTTP side took most of it and the
engine stepped ~3x slower than offline. Here the child (a 'spawn' process: CUDA is never
initialised in the server's process) owns the LLM and runs the loop: it applies every command
queued between two steps (add, abort, shutdown), steps while anything is unfinished, blocks on
the command pipe when idle, and after each step sends ONE record with every request's delta,
the counters, the aborts done and the adds refused, as columns of plain ints and strings with
requests named by int handles (see _child_loop; cheap to build, pickle and read). In the
server's process a reader thread unpickles it and hands it to each event loop with one
call_soon_threadsafe. The adds made during one turn of the server's event loop go to the child
as one command (a burst of 256 requests: one pickle and one pipe write).

The interface is what the server uses of AsyncLLM: `generate` (an async iterator of outputs
carrying request_id, prompt_token_ids, finish_reason, finished, num_cached_tokens, delta_text,
delta_token_ids, delta_logprobs), `abort`, `counters`, `shutdown`, plus `dead_reason` (the
reason once the engine has stopped, e.g. the child crashed). A step that raises, or a child
that dies, fails every live request with EngineDead and every later call at once."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import itertools
import multiprocessing
import pickle
import queue
import signal
import threading
import uuid
from typing import AsyncIterator, Callable, Optional

from functional_llm import errors
from functional_llm.errors import EngineDead, InvalidConfig, QueueFull

_END = object()   # a stream's last item when its request was aborted by `abort`


class StreamOutput:
    """One request's delta from one step (RequestOutput's fields the server reads)."""
    __slots__ = ("request_id", "prompt_token_ids", "finish_reason", "num_cached_tokens",
                 "delta_text", "delta_token_ids", "delta_logprobs")

    def __init__(self, request_id, prompt_token_ids, finish_reason, num_cached_tokens, delta_text,
                 delta_token_ids, delta_logprobs):
        self.request_id, self.prompt_token_ids, self.finish_reason = request_id, prompt_token_ids, finish_reason
        self.num_cached_tokens, self.delta_text = num_cached_tokens, delta_text
        self.delta_token_ids, self.delta_logprobs = delta_token_ids, delta_logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Stream:
    """Where one generate() call's outputs go; `handle` names it in the engine's messages."""
    __slots__ = ("rid", "handle", "loop", "queue", "prompt_token_ids")

    def __init__(self, rid, loop, queue):
        self.rid, self.handle, self.loop, self.queue, self.prompt_token_ids = rid, None, loop, queue, ()


class EngineProcess:
    """`AsyncLLM(*args, max_waiting=..., **kwargs)` with the LLM in a child process.

    Construction starts the child and waits until its LLM is built: the LLM's typed errors are
    raised here. `child_setup`, a picklable callable, is called with the LLM in the child before
    the loop starts (tests use it to slow or break steps). Call shutdown() when done."""

    def __init__(self, *args, max_waiting: Optional[int] = None,
                 child_setup: Optional[Callable] = None, **kwargs):
        if max_waiting is not None and (type(max_waiting) is not int or max_waiting < 1):
            raise InvalidConfig("max_waiting", max_waiting, "must be a positive int or None")
        ctx = multiprocessing.get_context("spawn")
        commands_out, self._commands = ctx.Pipe(duplex=False)   # (reader, writer)
        self._events, events_in = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_child_main, name="functional-llm-engine", daemon=True,
                                    args=(commands_out, events_in, args, kwargs, max_waiting, child_setup))
        self._process.start()
        commands_out.close(), events_in.close()   # the child's ends: EOF when it exits
        self._send_lock = threading.Lock()        # the pipe's writers: event loops, shutdown
        self._lock = threading.Lock()             # streams registered vs the engine dying
        self._streams: dict[int, _Stream] = {}   # by handle
        self._rids: dict[str, int] = {}           # live request ids -> handles
        self._handles = itertools.count()
        self._pending: list = []                  # adds not sent yet (see _add)
        self._aborts: dict[int, concurrent.futures.Future] = {}
        self._next_abort = 0
        self._dead_reason: Optional[str] = None
        self._dead_cause: Optional[BaseException] = None
        try:
            kind, payload = self._events.recv()
        except EOFError:
            kind, payload = "failed", RuntimeError(f"the engine process exited ({self._process.exitcode})")
        if kind == "failed":
            self._process.join()
            self._close_pipes()
            raise _rebuild(payload)
        self._counter_names, self._counters = tuple(payload), tuple(payload.values())
        self._reader = threading.Thread(target=self._read, name="functional-llm-engine-reader", daemon=True)
        self._reader.start()

    # -- caller side ------------------------------------------------------------------------------
    async def generate(self, prompt, sampling_params=None,
                       request_id: Optional[str] = None) -> AsyncIterator[StreamOutput]:
        """As AsyncLLM.generate: the request's outputs as the engine makes them, the last one
        finished; the LLM's typed errors (or QueueFull) before anything is admitted; EngineDead
        if the engine stops. Closing or cancelling the iterator aborts the request."""
        batches = self.generate_batches(prompt, sampling_params, request_id)
        try:
            async for batch in batches:
                for out in batch:
                    yield out
        finally:
            await batches.aclose()

    async def generate_batches(self, prompt, sampling_params=None,
                               request_id: Optional[str] = None) -> AsyncIterator[list]:
        """generate's outputs in lists: every output that has arrived by the time the caller
        asks (one or more, in order). What the server streams from: a caller that falls behind
        takes several steps' outputs in one go instead of one task switch per token."""
        rid = uuid.uuid4().hex if request_id is None else str(request_id)
        loop = asyncio.get_running_loop()
        stream = _Stream(rid, loop, asyncio.Queue())
        if isinstance(prompt, (list, tuple)):   # token ids: the engine's prompt ids as given
            stream.prompt_token_ids = tuple(prompt)
        with self._lock:
            if self._dead_reason is not None:
                raise EngineDead.because(self._dead_reason, self._dead_cause)
            if rid in self._rids:
                raise errors.InvalidPrompt("request_id", rid, "is already in use by a live request")
            handle = stream.handle = next(self._handles)
            self._rids[rid] = handle
            self._streams[handle] = stream
        if not self._add(loop, (handle, rid, prompt, sampling_params)):
            self._forget(handle)
            raise EngineDead.because(self._dead_reason, self._dead_cause)
        ended, queue = False, stream.queue
        try:
            while not ended:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch = []
                for item in items:   # an error or _END is a stream's last item
                    if isinstance(item, BaseException):
                        ended = True
                        if batch:
                            yield batch
                        raise item
                    if item is _END:
                        ended = True
                        break
                    batch.append(item)
                    ended = item.finish_reason is not None
                if batch:
                    yield batch
        finally:
            if not ended and self._forget(handle) is not None:
                self._send(("abort", rid, None))

    async def abort(self, request_id: str) -> None:
        """Abort a request and free its blocks; returns once the engine has done it (ids not
        live are ignored). Its stream ends without a further output."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._dead_reason is not None:
                return
            token, self._next_abort = self._next_abort, self._next_abort + 1
            self._aborts[token] = done
        if self._send(("abort", str(request_id), token)):
            await asyncio.wrap_future(done)

    @property
    def counters(self) -> dict:
        """LLM.counters as of the engine's last message (a copy)."""
        return dict(zip(self._counter_names, self._counters))

    @property
    def dead_reason(self) -> Optional[str]:
        """None while the engine runs; why it stopped once it has."""
        return self._dead_reason

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort every request (their callers get EngineDead), stop the child, close the LLM.
        Idempotent; returns when the child has exited (killed after `timeout` seconds)."""
        self._send(("shutdown", None, None))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self._die("the engine was shut down", None)
        self._close_pipes()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.shutdown()

    def _forget(self, handle: int) -> Optional[_Stream]:
        """Drop a live stream (None if it has ended already)."""
        stream = self._streams.pop(handle, None)
        if stream is not None:
            self._rids.pop(stream.rid, None)
        return stream

    def _add(self, loop, add) -> bool:
        """Queue an add; the adds queued during one turn of the event loop go out as one
        command (a burst of requests: one pickle and one pipe write, not one each)."""
        with self._send_lock:
            if self._dead_reason is not None or self._commands.closed:
                return False
            self._pending.append(add)
            if len(self._pending) > 1:
                return True
        loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        with self._send_lock:
            self._send_locked(None)

    def _send(self, command) -> bool:
        with self._send_lock:
            return self._send_locked(command)

    def _picklable(self, add) -> bool:
        """Whether an add pickles; if not, its caller gets the error."""
        try:
            pickle.dumps(add, protocol=pickle.HIGHEST_PROTOCOL)
            return True
        except Exception as exc:
            stream = self._forget(add[0])
            if stream is not None:
                with contextlib.suppress(RuntimeError):
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
            return False

    def _send_locked(self, command) -> bool:
        """Queued adds first (an abort never overtakes its add), then `command` (if any)."""
        if self._dead_reason is not None or self._commands.closed:
            return False
        try:
            if self._pending:
                adds, self._pending = self._pending, []
                try:
                    blob = pickle.dumps(("adds", adds), protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:   # one that does not pickle fails alone
                    blob = pickle.dumps(("adds", [add for add in adds if self._picklable(add)]),
                                        protocol=pickle.HIGHEST_PROTOCOL)
                self._commands.send_bytes(blob)
            if command is not None:
                self._commands.send_bytes(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))
            return True
        except (OSError, ValueError):   # the child is gone: the reader reports why
            return False

    def _close_pipes(self) -> None:
        with self._send_lock:
            self._commands.close()
        with contextlib.suppress(Exception):
            if threading.current_thread() is not getattr(self, "_reader", None):
                self._events.close()

    # -- the reader thread ------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                message = pickle.loads(self._events.recv_bytes())
                if message[0] == "dead":
                    return self._die(message[1], _rebuild(message[2]) if message[2] is not None else None)
                for step in message[1]:
                    self._handle(step)
        except (EOFError, OSError):
            self._die(f"the engine process exited (exit code {self._process.exitcode})", None)
        except BaseException as exc:   # a message that did not unpickle...: nothing more is trusted
            self._die(f"the engine's messages failed: {type(exc).__name__}: {exc}", exc)
            with contextlib.suppress(Exception):
                self._process.kill()

    def _handle(self, step) -> None:
        """One step's record (see _child_loop): counters first, so a caller seeing its last
        output (or its abort done) sees its blocks freed."""
        (self._counters, aborts_done, refused, ended, handles, texts, token_ids, counts, cached,
         finished, logprobs, prompts) = step
        per_loop: dict = {}
        streams = self._streams
        for handle, exc in refused:
            stream = self._forget(handle)
            if stream is not None:
                per_loop.setdefault(stream.loop, []).append((stream.queue, _rebuild(exc)))
        for handle in ended:
            stream = self._forget(handle)
            if stream is not None:
                per_loop.setdefault(stream.loop, []).append((stream.queue, _END))
        if handles:
            finish = dict(finished) if finished else None
            lps = dict(logprobs) if logprobs else None
            for k, prompt in prompts:
                stream = streams.get(handles[k])
                if stream is not None:
                    stream.prompt_token_ids = prompt
            if counts is None:   # one token each
                token_ids = [(t,) for t in token_ids]
            else:
                offsets = list(itertools.accumulate(counts, initial=0))
                token_ids = [tuple(token_ids[a:b]) for a, b in zip(offsets, offsets[1:])]
            loop = items = None
            for k, (handle, text, ids, num_cached) in enumerate(zip(handles, texts, token_ids, cached)):
                stream = streams.get(handle)
                if stream is None:
                    continue   # its caller has gone (the abort is on its way)
                reason = finish.get(k) if finish else None
                if reason is not None:
                    self._forget(handle)
                if stream.loop is not loop:
                    loop = stream.loop
                    items = per_loop.setdefault(loop, [])
                items.append((stream.queue, StreamOutput(stream.rid, stream.prompt_token_ids, reason, num_cached,
                                                         text, ids, lps.get(k) if lps else None)))
        for loop, items in per_loop.items():
            with contextlib.suppress(RuntimeError):   # a closed loop: nobody reads those streams
                loop.call_soon_threadsafe(_put_all, items)
        for token in aborts_done:
            done = self._aborts.pop(token, None)
            if done is not None and done.set_running_or_notify_cancel():
                done.set_result(None)

    def _die(self, reason: str, cause: Optional[BaseException]) -> None:
        """Every live stream gets EngineDead, every pending abort is done; later calls fail fast."""
        with self._lock:
            if self._dead_reason is not None:
                return
            self._dead_reason, self._dead_cause = reason, cause
            streams, self._streams, self._rids = self._streams, {}, {}
            aborts, self._aborts = self._aborts, {}
        per_loop: dict = {}
        for stream in streams.values():
            err = EngineDead.because(self._dead_reason, self._dead_cause)
            per_loop.setdefault(stream.loop, []).append((stream.queue, err))
        for loop, items in per_loop.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)
        for done in aborts.values():
            if done.set_running_or_notify_cancel():
                done.set_result(None)
        counters = dict(self.counters, num_running=0, num_waiting=0, blocks_in_use=0)
        self._counters = tuple(counters[name] for name in self._counter_names)


def _put_all(items) -> None:
    for target, item in items:
        target.put_nowait(item)


def _portable(exc: BaseException):
    """An exception that pickles: the package's typed errors travel as (class name, parameter,
    value, message) (their __init__ does not take their args back), others as themselves, or as
    a RuntimeError naming them when they do not pickle."""
    if isinstance(exc, errors.FunctionalLLMError):
        value = exc.value
        try:
            pickle.dumps(value)
        except Exception:
            value = repr(value)
        return ("typed", type(exc).__name__, exc.parameter, value, str(exc))
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _rebuild(payload) -> BaseException:
    if isinstance(payload, tuple) and payload[:1] == ("typed",):
        _, name, parameter, value, message = payload
        cls = getattr(errors, name, errors.FunctionalLLMError)
        exc = cls.__new__(cls)
        ValueError.__init__(exc, message)
        exc.parameter, exc.value = parameter, value
        return exc
    return payload


# -- the child process --------------------------------------------------------------------------
def _child_main(commands, events, args, kwargs, max_waiting, child_setup) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a terminal's ^C reaches the whole group: the
    try:                                           # server decides when the engine stops
        from functional_llm.llm import LLM
        llm = LLM(*args, **kwargs)
        if child_setup is not None:
            child_setup(llm)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            events.send(("failed", _portable(exc)))
        return
    events.send(("ready", llm.counters))
    sender = _Sender(events)
    try:
        reason, cause = _child_loop(llm, commands, sender, max_waiting)
    except (EOFError, OSError, BrokenPipeError):   # the server's process has gone
        reason, cause = None, None
    except BaseException as exc:   # the LLM may be inconsistent now: no further step
        reason, cause = f"the engine loop failed: {type(exc).__name__}: {exc}", _portable(exc)
    with contextlib.suppress(Exception):
        llm.close()
    if reason is not None:
        sender.send(("dead", reason, cause))
    sender.close()
    events.close()


class _Sender:
    """The child's step records go out from a thread of their own, so a step never waits for
    a full pipe (a server busy with its HTTP side reads late): the records queued meanwhile go
    out together, one pickle and one write, as ("steps", [record, ...])."""

    def __init__(self, events):
        self._events, self._queue = events, queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="functional-llm-sender", daemon=True)
        self._thread.start()

    def send(self, message) -> None:
        """A step record (a list), or another message (a tuple: ("dead", ...))."""
        self._queue.put(message)

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        get, empty = self._queue.get, self._queue.empty
        while True:
            messages = [get()]
            while not empty():
                messages.append(get())
            out, steps = [], []
            for m in messages:
                if type(m) is list:
                    steps.append(m)
                    continue
                if steps:
                    out.append(("steps", steps))
                    steps = []
                out.append(m)
            if steps:
                out.append(("steps", steps))
            for m in out:
                if m is None:
                    return
                try:
                    self._events.send_bytes(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL))
                except (OSError, ValueError):   # the server's process has gone
                    return


def _child_loop(llm, commands, sender, max_waiting):
    """Returns (reason, cause) when told to shut down; a failing step raises.

    After every step it sends one record of plain lists of ints and strings (cheap to build,
    pickle and read): [counters (LLM.counters' values), aborts done (tokens), refused adds
    ((handle, error)), ended handles (aborted by abort()), then the step's outputs as columns:
    handles, delta texts, delta token ids (flat), their counts (None when each output has one
    token), num_cached_tokens, sparse (index, finish_reason), sparse (index, delta_logprobs),
    sparse (index, prompt ids) for a first output whose prompt was text]. The collector is
    paused while requests run (as LLM.generate does: the per-step records are acyclic) and
    runs when the engine goes idle, or every GC_EVERY busy steps."""
    handles: dict = {}          # request ids in the LLM -> their handles
    waiting: set = set()        # admitted, no token yet
    text_prompts: set = set()   # prompt given as text, no output sent yet (the first carries the ids)
    busy_steps = 0
    try:
        while True:
            if llm.has_unfinished_requests():
                batch = []
            else:   # idle: collect, then sleep
                gc.enable()
                gc.collect()
                batch = [pickle.loads(commands.recv_bytes())]
                gc.disable()
            while commands.poll():
                batch.append(pickle.loads(commands.recv_bytes()))
            aborts_done, refused, ended = [], [], []
            for command in batch:
                kind = command[0]
                if kind == "adds":
                    for handle, rid, prompt, params in command[1]:
                        try:
                            if max_waiting is not None and len(waiting) >= max_waiting:
                                raise QueueFull("max_waiting", max_waiting,
                                                f"{len(waiting)} requests are waiting to start; retry later")
                            llm.add_request(prompt, params, rid)
                        except Exception as exc:   # raised before admitting anything: only this caller fails
                            refused.append((handle, _portable(exc)))
                            continue
                        handles[rid] = handle
                        waiting.add(rid)
                        if not isinstance(prompt, (list, tuple)):
                            text_prompts.add(rid)
                elif kind == "abort":
                    _, rid, token = command
                    handle = handles.pop(rid, None)
                    if handle is not None:
                        llm.abort(rid)
                        waiting.discard(rid), text_prompts.discard(rid)
                        if token is not None:
                            ended.append(handle)
                    if token is not None:
                        aborts_done.append(token)
                else:   # shutdown: free every live request's blocks
                    for rid in handles:
                        with contextlib.suppress(Exception):
                            llm.abort(rid)
                    return "the engine was shut down", None
            hs, texts, token_ids, counts, cached, finished, logprobs, prompts = [], [], [], [], [], [], [], []
            if llm.has_unfinished_requests():
                uniform = True
                for out in llm.step():
                    rid = out.request_id
                    handle = handles.get(rid)
                    if handle is None:
                        continue
                    ids = out.delta_token_ids
                    n = len(ids)
                    if n != 1:
                        uniform = False
                    reason = out.finish_reason
                    if reason is not None:
                        finished.append((len(hs), reason))
                        del handles[rid]
                        waiting.discard(rid)
                    elif n and waiting:
                        waiting.discard(rid)
                    if out.delta_logprobs is not None:
                        logprobs.append((len(hs), out.delta_logprobs))
                    if text_prompts and rid in text_prompts:
                        text_prompts.discard(rid)
                        prompts.append((len(hs), tuple(out.prompt_token_ids)))
                    hs.append(handle)
                    texts.append(out.delta_text)
                    token_ids += ids
                    counts.append(n)
                    cached.append(out.num_cached_tokens)
                if uniform:
                    counts = None
                busy_steps += 1
                if busy_steps % GC_EVERY == 0:   # never idle: collect now and then all the same
                    gc.collect()
            sender.send([tuple(llm.counters.values()), aborts_done, refused, ended, hs, texts, token_ids,
                         counts, cached, finished, logprobs, prompts])
    finally:
        gc.enable()


GC_EVERY = 4096   # steps
