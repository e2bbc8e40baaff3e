"""The OpenAI API's request records (pydantic, unknown fields ignored) and what they become:
SamplingParams per choice, and the response shapes built from RequestOutputs.

Everything here is pure: no HTTP, no engine. A field the engine cannot honour raises APIError
(400) naming it, so a client never silently gets something other than what it asked for."""
from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Union

import xxhash
from pydantic import BaseModel, ConfigDict

from functional_llm.core.records import SamplingParams

UNLIMITED = 1 << 30   # chat's max_tokens when unset: the engine stops at max_model_len


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat share (OpenAI's fields and vLLM's extras)."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = None
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None

    def refuse_unsupported(self) -> None:
        """APIError naming the first field the engine cannot honour."""
        checks = {"best_of": self.best_of not in (None, 1),
                  "presence_penalty": self.presence_penalty != 0,
                  "frequency_penalty": self.frequency_penalty != 0,
                  "logit_bias": bool(self.logit_bias)}
        checks.update(self._unsupported())
        for field, bad in checks.items():
            if bad:
                raise APIError(400, f"{field} is not supported by this server", field)
        if self.n < 1:
            raise APIError(400, "n must be >= 1", "n")

    def _unsupported(self) -> dict:
        return {}

    def params(self, max_tokens: Optional[int], logprobs: Optional[int]) -> list[SamplingParams]:
        """One SamplingParams per choice. Choice 0 keeps the seed as given (so n=1 equals an
        offline request with that seed); choice j > 0 gets one derived from (seed, j). Without
        a seed the engine derives one per request id. Raises InvalidSamplingParams."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=stop,
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos, logprobs=logprobs,
            seed=self.seed if self.seed is None or j == 0 else
            xxhash.xxh64_intdigest(f"{self.seed}:{j}".encode()) & (2**63 - 1))
            for j in range(self.n)]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None

    def _unsupported(self) -> dict:
        return {"echo": self.echo, "suffix": bool(self.suffix)}

    def prompts(self) -> list:
        """The prompts: one str or token-id list each."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", "prompt")
        return list(p)


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None

    def _unsupported(self) -> dict:
        return {"tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none"),
                "response_format": (self.response_format or {}).get("type", "text") != "text"}

    def conversation(self) -> list[dict]:
        """The messages with text content (a list of text parts is joined)."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.get("content") or ""
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise APIError(400, "only text content parts are supported", f"messages[{i}].content")
                content = "".join(part.get("text", "") for part in content)
            if not isinstance(content, str) or not isinstance(m.get("role"), str):
                raise APIError(400, "each message needs a str role and text content", f"messages[{i}]")
            out.append({"role": m["role"], "content": content})
        return out


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    tokens: list[int]


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(kind: str, rid: str, model: str, choices: list, usage: Optional[dict] = None) -> dict:
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _top(alternatives: dict, k: int) -> list:
    """The k most likely of one token's {id: Logprob} (the sampled token may rank below k)."""
    return sorted((lp for lp in alternatives.values() if lp.rank <= k), key=lambda lp: lp.rank)


def completion_logprobs(token_ids, logprobs, k: int, offset: int) -> dict:
    """The completions API's logprobs object for these tokens; offset: their text's start."""
    tokens, offsets = [], []
    for tid, alternatives in zip(token_ids, logprobs):
        offsets.append(offset)
        tokens.append(alternatives[tid].decoded_token or "")
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [a[t].logprob for t, a in zip(token_ids, logprobs)],
            "top_logprobs": [{lp.decoded_token: lp.logprob for lp in _top(a, k)} for a in logprobs],
            "text_offset": offsets}


def chat_logprobs(token_ids, logprobs, k: int) -> dict:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(lp):
        text = lp.decoded_token or ""
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}
    return {"content": [dict(entry(a[t]), top_logprobs=[entry(lp) for lp in _top(a, k)])
                        for t, a in zip(token_ids, logprobs)]}
