"""The shell's output transition: engine Deltas -> RequestOutputs (vLLM-shaped), with
incremental detokenization and stop strings.

`apply(outputs, deltas, decode) -> (outputs, Emitted)` is pure: the per-request state is a
frozen `OutputState` in an immutable map, and `decode` (token ids -> str, the tokenizer's) is
passed in. Its cost per step depends on what is new, never on how long the outputs already
are: token ids and text pieces are persistent vectors (append shares structure), each step
decodes only the new tokens with a little context, and stop strings are searched in the new
text plus a window of max(len(stop)) - 1 earlier characters (docs/transitions.md, *Outputs*).
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable, Optional, Sequence

import attrs
import immutables
from pyrsistent import PVector, pvector

from functional_llm.core.records import Deltas, Request, SamplingParams

REPLACEMENT = "\ufffd"   # what decode gives for the bytes of an unfinished UTF-8 character
EMPTY = pvector()


@attrs.frozen(slots=True)
class Logprob:
    """One token's log-probability under the model (before temperature and filters), its rank
    (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: Optional[str] = None


@attrs.frozen(slots=True, repr=False)
class RequestOutput:
    """One request's output after a step. `text` and `token_ids` are cumulative; `delta_text`
    and `delta_token_ids` hold what is new since this request's previous output (the first
    output's delta is everything so far). The cumulative fields share the shell's persistent
    vectors and are joined on first read, so an output costs the same at any length."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: tuple
    finish_reason: Optional[str]     # 'stop' | 'length' | 'abort' | None while running
    num_cached_tokens: int           # prompt tokens served from the prefix cache
    delta_text: str = ""
    delta_token_ids: tuple = ()
    _token_ids: Sequence = attrs.field(default=(), eq=tuple)     # init: token_ids=
    _text_parts: Sequence = attrs.field(default=(), eq="".join)  # init: text_parts=
    # with SamplingParams(logprobs=k): one {token id: Logprob} per token of token_ids (the
    # sampled token and the top k), and delta_logprobs per token of delta_token_ids; with
    # prompt_logprobs=k: the same per prompt token (None for the first). None when not asked.
    logprobs: Optional[Sequence] = attrs.field(default=None, eq=lambda v: v if v is None else tuple(v))
    delta_logprobs: Optional[tuple] = None
    prompt_logprobs: Optional[tuple] = None

    @cached_property
    def text(self) -> str:
        return "".join(self._text_parts)

    @cached_property
    def token_ids(self) -> tuple:
        return tuple(self._token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, text={self.text!r}, token_ids="
                f"{self.token_ids!r}, finish_reason={self.finish_reason!r}, delta_text={self.delta_text!r})")


@attrs.frozen(slots=True)
class OutputState:
    """A live request as the shell sees it. The detokenizer's offsets index token_ids:
    tokens[prefix_offset:read_offset] were already turned into text and are decoded again as
    context for the new ones; tokens[read_offset:] are not text yet (an unfinished multi-byte
    character). `held` is decoded text not emitted yet because it may begin a stop string."""

    request_id: str
    prompt: Optional[str]            # the prompt string, if one was given
    prompt_token_ids: tuple
    params: SamplingParams
    stream: bool                     # emit every step (else only the final output)
    token_ids: PVector = EMPTY       # generated tokens
    prefix_offset: int = 0
    read_offset: int = 0
    text_parts: PVector = EMPTY      # emitted text, one piece per output
    held: str = ""
    tail: str = ""                   # the last max(len(stop)) - 1 characters decoded
    num_cached: int = 0
    logprobs: PVector = EMPTY        # one {id: Logprob} per generated token (logprobs=k)
    prompt_logprobs: PVector = EMPTY   # (None, then one per prompt token: prompt_logprobs=k)


@attrs.frozen(slots=True)
class Emitted:
    """What one apply gives the shell: the outputs (every changed streamed request, every
    finished one), and the requests that reached a stop string while the engine still runs
    them: the shell ends each with engine.finish(rid, "stop")."""

    outputs: tuple = ()
    stops: tuple = ()


def start(req: Request, prompt: Optional[str], stream: bool) -> OutputState:
    """A new request's output state (the shell adds it to the map when it adds the request).
    The offsets start at the first generated token: the text is the decode of the generated
    tokens alone, the same text generate's one decode at the end gives."""
    return OutputState(request_id=req.rid, prompt=prompt, prompt_token_ids=req.prompt,
                       params=req.params, stream=stream,
                       prompt_logprobs=EMPTY if req.params.prompt_logprobs is None else pvector([None]))


def apply(outputs: immutables.Map, deltas: Deltas, decode: Callable[[list], str]
          ) -> tuple[immutables.Map, Emitted]:
    """Fold a step's deltas into the shell's output states.

    Pre: every rid with a row or a finish in `deltas` is in `outputs` (rid -> OutputState).
    A rid may have several rows (their tokens in order); a finish with no row ends a request
    after the tokens it has (the shell's aborts: Deltas(finished={rid: "abort"})).
    Post: each request's new tokens are appended; when streamed or with stop strings, text is
    decoded token by token (else once, at the end), and the first token whose text completes a
    stop string ends the request there (later tokens of the same delta are dropped; the text
    stops before the stop string). Finished requests leave the map. Raises KeyError for a rid
    not in `outputs` (a shell bug)."""
    new: dict = {}
    for rid, tok in zip(deltas.rids, deltas.tokens):
        new.setdefault(rid, []).append(tok)     # the engine sends one row per request and step
    for rid in deltas.finished:
        new.setdefault(rid, [])
    emitted, stops = [], []
    with outputs.mutate() as live:              # one batch of map updates
        for rid in deltas.prompt_logprobs.keys() - new.keys():    # a chunk that samples nothing
            live[rid] = _with_logprobs(live[rid], None, deltas.prompt_logprobs[rid], decode)
        for rid, toks in new.items():
            finish, st = deltas.finished.get(rid), live[rid]
            st = _with_logprobs(st, deltas.logprobs.get(rid), deltas.prompt_logprobs.get(rid, ()), decode)
            st, out = _advance(st, toks, finish, deltas.num_cached.get(rid, st.num_cached), decode)
            if out.finish_reason is not None:
                del live[rid]
                if finish is None:
                    stops.append(rid)
            else:
                live[rid] = st
            if st.stream or out.finish_reason is not None:
                emitted.append(out)
        outputs = live.finish()
    return outputs, Emitted(outputs=tuple(emitted), stops=tuple(stops))


def _with_logprobs(st: OutputState, sampled, prompt: tuple, decode) -> OutputState:
    """st with this step's logprobs (the engine's TokenLogprobs) appended as {id: Logprob}."""
    def as_map(e):   # the top k by rank, then the token itself (it may be one of them)
        return {**{tid: Logprob(lp, r + 1, decode([tid])) for r, (tid, lp) in enumerate(e.top)},
                e.token: Logprob(e.logprob, e.rank, decode([e.token]))}
    if sampled is None and not prompt:
        return st
    return attrs.evolve(st, logprobs=st.logprobs if sampled is None else st.logprobs.append(as_map(sampled)),
                        prompt_logprobs=st.prompt_logprobs.extend(map(as_map, prompt)))


def _advance(st: OutputState, toks: list, finish: Optional[str], num_cached: int, decode
             ) -> tuple[OutputState, RequestOutput]:
    """One request's part of apply: its new tokens (and finish, if any) -> (state', output)."""
    tokens, parts, taken, stops = st.token_ids, st.text_parts, len(toks), st.params.stop
    prefix, read, held, tail, delta = st.prefix_offset, st.read_offset, st.held, st.tail, []
    if not (st.stream or stops):                # text only at the end: one decode
        tokens = tokens.extend(toks)
        if finish is not None:                  # the only decode of such a request
            delta.append(decode(list(tokens)))
    else:
        window = max(map(len, stops)) - 1 if stops else 0   # all a match can reach back
        for i in range(len(toks) + (finish is not None)):
            final = i == len(toks)              # the pass that flushes what is left at the end
            if not final:
                tokens = tokens.append(toks[i])
            piece, prefix, read = _detokenize(decode, tokens, prefix, read, final)
            hit = False
            if stops and (piece or final):      # new text to search, or the end to flush
                piece, held, tail, hit = _scan(piece, held, tail, stops, window, final)
            delta.append(piece)
            if hit:
                finish, taken = "stop", min(i + 1, len(toks))   # later tokens are dropped
                break
    if text := "".join(delta):
        parts = parts.append(text)
    new = OutputState(request_id=st.request_id, prompt=st.prompt, prompt_token_ids=st.prompt_token_ids,
                      params=st.params, stream=st.stream, token_ids=tokens, prefix_offset=prefix,
                      read_offset=read, text_parts=parts, held=held, tail=tail, num_cached=num_cached,
                      logprobs=st.logprobs if len(st.logprobs) <= len(tokens) else st.logprobs[:len(tokens)],
                      prompt_logprobs=st.prompt_logprobs)
    first = not st.stream and finish is not None  # a request's only output carries everything
    wants, lps = st.params.logprobs is not None, new.logprobs
    extra = dict(logprobs=lps if wants else None,
                 delta_logprobs=tuple(lps[len(lps) - (len(tokens) if first else taken):]) if wants else None,
                 prompt_logprobs=tuple(st.prompt_logprobs) if st.params.prompt_logprobs is not None else None)
    out = RequestOutput(request_id=st.request_id, prompt=st.prompt, prompt_token_ids=st.prompt_token_ids,
                        finish_reason=finish, num_cached_tokens=num_cached, token_ids=tokens,
                        delta_text="".join(parts) if first else text, text_parts=parts,
                        delta_token_ids=tuple(tokens) if first else tuple(toks[:taken]), **extra)
    return new, out


def _detokenize(decode, tokens: PVector, prefix: int, read: int, final: bool) -> tuple[str, int, int]:
    """The text of tokens[read:] by the prefix / read-offset method -> (text, prefix', read').
    Decoding from prefix gives the new tokens their context (a word's leading space, merges);
    the new text is released only once it no longer ends in U+FFFD (a character whose bytes
    span tokens), or at the end (final), when whatever is left is all there will be."""
    if read == len(tokens):
        return "", prefix, read
    before, after = decode(list(tokens[prefix:read])), decode(list(tokens[prefix:]))
    if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
        return after[len(before):], read, len(tokens)
    return "", prefix, read


def _scan(piece: str, held: str, tail: str, stops: tuple, window: int, final: bool
          ) -> tuple[str, str, str, bool]:
    """Stop strings over the new text -> (text to emit, held', tail', stopped).
    A stop string cannot begin in text already emitted: any suffix of the text that begins one
    is held (the longest such suffix, shorter than the stop), so `held` is a suffix of `tail`,
    and a match is searched in `tail + piece` only."""
    region = tail + piece
    if hits := [i for i in (region.find(s) for s in stops) if i >= 0]:
        # emit from where the held text starts in region up to the first match
        return region[len(tail) - len(held):min(hits)], "", "", True
    pending = held + piece
    cut = len(pending) - (0 if final else _stop_prefix(pending, stops))
    return pending[:cut], pending[cut:], region[max(len(region) - window, 0):], False


def _stop_prefix(text: str, stops: tuple) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)
