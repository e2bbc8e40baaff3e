"""The OpenAI-compatible HTTP app over one AsyncLLM: routes, request checks, errors, draining.

Each choice of a request is one AsyncLLM.generate call (n > 1: n calls sharing the prompt, so
the prefix cache shares its blocks). The engine loop runs in a child process (EngineProcess,
the CLI's default) or a thread (AsyncLLM); this event loop only parses, renders and waits.
How a request is run and answered (streams, disconnects) is respond.py's part.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from typing import AsyncIterator, Optional

import attrs
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from functional_llm.serve.metrics import Metrics
from functional_llm.serve.protocol import (UNLIMITED, APIError, ChatCompletionRequest,
                                           CompletionRequest, DetokenizeRequest, TokenizeRequest)
from functional_llm.serve.respond import respond


@attrs.frozen
class ServeConfig:
    model_name: str
    api_key: Optional[str] = None
    max_body_bytes: int = 4 << 20
    shutdown_timeout: float = 10.0


class Server:
    """The app's state: the engine, a tokenizer of its own (the engine's belongs to the loop
    thread), metrics, and whether it is draining or its engine has died."""

    def __init__(self, engine, tokenizer, config: ServeConfig):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.metrics = Metrics(engine)
        self.draining = False
        self.dead: Optional[str] = None
        self.live: set[str] = set()    # request ids in the engine, aborted when draining ends

    def begin_shutdown(self) -> None:
        """New requests get 503; those in flight run for up to shutdown_timeout, then are
        aborted (a stream ends with an error event). Call on the event loop's thread."""
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().create_task(self._abort_after_timeout())

    async def _abort_after_timeout(self) -> None:
        await asyncio.sleep(self.config.shutdown_timeout)
        for rid in list(self.live):
            await self.engine.abort(rid)

    # -- request checks -------------------------------------------------------------------------
    def guard(self, request: Request) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        key = self.config.api_key
        if key is not None:
            given = request.headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                raise APIError(401, "missing or wrong API key", type="authentication_error")
        dead = self.dead or getattr(self.engine, "dead_reason", None)
        if dead is not None:
            raise APIError(503, f"the engine has stopped: {dead}", type="engine_dead")

    async def body(self, request: Request, record):
        """The body parsed into `record`: 413 past max_body_bytes (read no further), 400 for
        malformed JSON or a field of the wrong type (naming it)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the body is over {limit} bytes", type="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the body is over {limit} bytes", type="request_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except ValueError as e:
            raise APIError(400, f"malformed JSON body: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            req = record.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]   # loc: the field, then where inside it (a union's branch...)
            raise APIError(400, f"{'.'.join(map(str, err['loc']))}: {err['msg']}", str(err["loc"][0])) from None
        if req.model is not None and req.model != self.config.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist", "model", "not_found_error")
        return req

    def encode(self, prompt) -> list:
        if not isinstance(prompt, str):
            return list(prompt)            # token ids: the engine checks their range
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", "prompt")
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list) -> list:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:   # the template's own checks (roles, order) raise what they like
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- generation -----------------------------------------------------------------------------
    async def outputs(self, choices: list, rid: str) -> AsyncIterator:
        """Lists of (choice, RequestOutput) from every choice's generate call: all that have
        come by the time the consumer asks (one or more; a slow consumer gets longer lists).
        Closing or cancelling this generator cancels the calls (the engine aborts them)."""
        if len(choices) == 1 and hasattr(self.engine, "generate_batches"):   # EngineProcess, n = 1
            one = self._one(choices[0], rid)
            try:
                async for batch in one:
                    yield batch
            finally:   # at once: its request is aborted before the engine's next step
                await one.aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice) -> None:   # one respond._Choice
            request_id, timer, last = f"{rid}-{choice.index}", self.metrics.request(), None
            self.live.add(request_id)
            try:
                async for last in self.engine.generate(choice.prompt_ids, choice.params, request_id):
                    timer.observe(last)
                    await queue.put((choice, last))
                if last is None or not last.finished:   # ended by engine.abort: shutdown
                    raise APIError(503, "aborted: the server is shutting down", type="service_unavailable")
            except Exception as e:
                await queue.put((choice, e))
            finally:
                self.live.discard(request_id)

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            unfinished = len(choices)
            while unfinished:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                ready = []
                for pair in batch:
                    if isinstance(pair[1], BaseException):
                        if ready:
                            yield ready
                        raise pair[1]
                    unfinished -= pair[1].finished
                    ready.append(pair)
                yield ready
        finally:
            for task in tasks:
                task.cancel()


    async def _one(self, choice, rid: str) -> AsyncIterator:
        """outputs() of a single choice, straight from the engine's batches (no task, no queue)."""
        request_id, timer, last = f"{rid}-{choice.index}", self.metrics.request(), None
        self.live.add(request_id)
        batches = self.engine.generate_batches(choice.prompt_ids, choice.params, request_id)
        try:
            async for batch in batches:
                for last in batch:
                    timer.observe(last)
                yield [(choice, out) for out in batch]
            if last is None or not last.finished:   # ended by engine.abort: shutdown
                raise APIError(503, "aborted: the server is shutting down", type="service_unavailable")
        finally:
            self.live.discard(request_id)
            await batches.aclose()


def build_app(engine, tokenizer, config: ServeConfig, owns_engine: bool = False) -> FastAPI:
    """The FastAPI app serving `engine`, an AsyncLLM or EngineProcess; with owns_engine the app shuts it down
    when the server stops (after the open requests have ended), else the caller does."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()   # where a signal handler hands the shutdown
        yield
        if owns_engine:
            engine.shutdown()

    app = FastAPI(title="functional_llm", docs_url=None, redoc_url=None, lifespan=lifespan)
    server = app.state.server = Server(engine, tokenizer, config)
    app.state.loop = None

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):   # unknown routes, wrong methods
        status = e.status_code
        return JSONResponse(APIError(status, str(e.detail), type="not_found_error" if status == 404
                                     else "invalid_request_error").body(), status_code=status)

    @app.get("/health")
    async def health():
        dead = server.dead or getattr(engine, "dead_reason", None)   # EngineProcess: a crash
        if dead is not None:
            return JSONResponse({"status": "unhealthy", "reason": dead}, status_code=503)
        return {"status": "draining" if server.draining else "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        server.guard(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "functional_llm"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        server.guard(request)
        req = await server.body(request, TokenizeRequest)
        if req.messages is not None:
            ids = server.encode_chat(ChatCompletionRequest(messages=req.messages).conversation())
        elif req.prompt is not None:
            if server.tokenizer is None:
                raise APIError(400, "this model has no tokenizer", "prompt")
            ids = server.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages", "prompt")
        return {"tokens": ids, "count": len(ids)}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        server.guard(request)
        req = await server.body(request, DetokenizeRequest)
        if server.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.guard(request)
        req = await server.body(request, CompletionRequest)
        req.refuse_unsupported()
        prompts = [server.encode(p) for p in req.prompts()]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens   # OpenAI's default, also for null
        return await respond(server, request, req, prompts, max_tokens, req.logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.guard(request)
        req = await server.body(request, ChatCompletionRequest)
        req.refuse_unsupported()
        prompt = server.encode_chat(req.conversation())
        k = (req.top_logprobs or 0) if req.logprobs else None
        return await respond(server, request, req, [prompt],
                               req.max_completion_tokens or req.max_tokens or UNLIMITED, k, chat=True)

    return app
