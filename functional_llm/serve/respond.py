"""Running one completions / chat request and answering it, whole or as an SSE stream.

A client that goes away is noticed from the ASGI disconnect message itself, raced against the
work (`_unless_disconnected` for the whole answer or a stream's first output, `_SSE` for the
rest of a stream): the work is cancelled, which closes its generate calls, and AsyncLLM aborts
them before its next step. A stream's first output (or the request's error) is awaited before
the 200 goes out, so a refused request gets its status; later errors end the stream with an
error event. A stream sends what has come by the time it writes: several outputs of a choice
make one chunk (their text joined), and a slow HTTP side sends fewer, larger chunks rather than
holding the engine back."""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Optional

import attrs
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from functional_llm.errors import EngineDead, FunctionalLLMError, QueueFull
from functional_llm.serve.protocol import (APIError, chat_logprobs, completion_logprobs, envelope,
                                           new_id, usage)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@attrs.define(eq=False)   # a dict key by identity (respond groups outputs by choice)
class _Choice:
    """One choice being generated: its prompt, params, and what has come so far."""
    index: int
    prompt_ids: list
    params: object
    text: str = ""
    token_ids: list = attrs.Factory(list)
    logprobs: list = attrs.Factory(list)
    finish_reason: Optional[str] = None


async def respond(server, request: Request, req, prompts: list, max_tokens: int,
                    k: Optional[int], chat: bool):
    """Run every choice (prompt i, sample j: index i * n + j) and answer, streamed or whole."""
    try:
        params = req.params(max_tokens, k)
    except FunctionalLLMError as e:   # chat's top_logprobs is the engine's logprobs
        raise APIError(400, str(e), "top_logprobs" if chat and e.parameter == "logprobs" else e.parameter) from None
    choices = [_Choice(i * req.n + j, ids, p) for i, ids in enumerate(prompts) for j, p in enumerate(params)]
    rid = new_id("chatcmpl" if chat else "cmpl")
    model, num_prompt = server.config.model_name, sum(map(len, prompts))
    stream = server.outputs(choices, rid)
    try:
        if req.stream:   # the first output (or the request's error) before the 200 goes out
            first = await _unless_disconnected(request, _engine_errors(server, anext(stream)))
        else:
            await _unless_disconnected(request, _engine_errors(server, _drain(stream, k)))
    except _ClientGone:
        return Response(status_code=499)
    if not req.stream:
        body = [_choice_body(c, k, chat, final=True) for c in choices]
        return envelope("chat.completion" if chat else "text_completion", rid, model, body,
                        usage(num_prompt, sum(len(c.token_ids) for c in choices)))

    kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    async def events():
        try:
            if chat:   # the role comes first, once per choice (as OpenAI sends it)
                yield _sse(envelope(kind, rid, model, [{"index": c.index, "delta": {"role": "assistant",
                           "content": ""}, "logprobs": None, "finish_reason": None} for c in choices]))
            batch = first
            while batch is not None:   # all outputs queued by now: one chunk per choice, one write
                chunks = []
                for choice, outs in _by_choice(batch).items():
                    piece = _take(choice, outs, k)
                    if piece["text"] or choice.finish_reason is not None:
                        chunks.append(_sse(envelope(kind, rid, model, [_choice_body(choice, k, chat, piece=piece)])))
                if chunks:
                    yield "".join(chunks)
                batch = await _engine_errors(server, anext(stream, None))
            if include_usage:
                yield _sse(envelope(kind, rid, model, [], usage(num_prompt, sum(len(c.token_ids) for c in choices))))
        except APIError as e:   # the 200 is out: the stream ends with an error event
            yield _sse(e.body())
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    return _SSE(events(), media_type="text/event-stream")


def _by_choice(batch) -> dict:
    """A batch's outputs grouped by choice, in order (choices in the order they first appear)."""
    grouped: dict = {}
    for choice, out in batch:
        grouped.setdefault(choice, []).append(out)
    return grouped


def _take(choice: _Choice, outs: list, k) -> dict:
    """Fold a choice's consecutive outputs into it; returns the new piece they make together
    (text and token ids, logprobs concatenated; the finish reason is the last output's)."""
    piece = {"text": "".join(o.delta_text for o in outs), "token_ids": [t for o in outs for t in o.delta_token_ids],
             "logprobs": [lp for o in outs for lp in (o.delta_logprobs or ())], "offset": len(choice.text)}
    choice.text += piece["text"]
    choice.token_ids += piece["token_ids"]
    choice.logprobs += piece["logprobs"]
    choice.finish_reason = outs[-1].finish_reason
    return piece


def _choice_body(choice: _Choice, k, chat: bool, final: bool = False, piece: Optional[dict] = None) -> dict:
    """One choice as the API shows it: the whole (final) or one streamed piece."""
    part = piece or {"text": choice.text, "token_ids": choice.token_ids, "logprobs": choice.logprobs,
                     "offset": 0}
    logprobs = None
    if k is not None:
        logprobs = (chat_logprobs(part["token_ids"], part["logprobs"], k) if chat else
                    completion_logprobs(part["token_ids"], part["logprobs"], k, part["offset"]))
    body = {"index": choice.index, "logprobs": logprobs, "finish_reason": choice.finish_reason}
    if not chat:
        body["text"] = part["text"]
    elif final:
        body["message"] = {"role": "assistant", "content": part["text"]}
    else:
        body["delta"] = {"content": part["text"]} if part["text"] else {}
    return body


async def _drain(stream: AsyncIterator, k) -> None:
    async for batch in stream:
        for choice, outs in _by_choice(batch).items():
            _take(choice, outs, k)


async def _engine_errors(server, awaitable):
    """The engine's errors as API errors: a parameter's -> 400 naming it, QueueFull -> 429,
    EngineDead -> 503 (and /health turns unhealthy)."""
    try:
        return await awaitable
    except QueueFull as e:
        raise APIError(429, str(e), e.parameter, "rate_limit_error") from None
    except FunctionalLLMError as e:
        raise APIError(400, str(e), e.parameter) from None
    except EngineDead as e:
        server.dead = str(e)
        raise APIError(503, f"the engine has stopped: {e}", type="engine_dead") from None


async def _disconnected(request: Request) -> None:
    """Returns when the ASGI server reports that the client has gone."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable):
    """awaitable's result, unless the client disconnects first: then the work is cancelled
    (closing its generate calls) and _ClientGone raised."""
    work, gone = asyncio.ensure_future(awaitable), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled():
        raise _ClientGone()
    return work.result()


class _SSE(StreamingResponse):
    """A stream that always races the body against the client's disconnect message (Starlette
    skips the race for ASGI servers of spec 2.4, noticing only when a send fails: one token
    late at best, never while the engine is busy elsewhere)."""

    async def __call__(self, scope, receive, send) -> None:
        scope = dict(scope, asgi=dict(scope.get("asgi", {}), spec_version="2.3"))
        await super().__call__(scope, receive, send)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

