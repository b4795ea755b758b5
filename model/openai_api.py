"""OpenAI's HTTP API as `model.serve` speaks it: requests checked and turned into token
ids and sampling settings, answers and stream chunks in OpenAI's shapes, and errors in
OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`).

Nothing here knows of HTTP or threads: `parse_chat` and `parse_completion` take the
decoded JSON body, `ChoiceText` turns one choice's tokens into the text to send (stop
strings cut, and held back while they may still be starting), and the `*_response` /
`*_chunk` functions build the JSON. Parameters OpenAI's API has and this server does
not honour (log probabilities, penalties other than zero, tools) are refused with a 400
rather than ignored; `top_k` and `repetition_penalty` are accepted as vLLM accepts them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenizer.schema import Field, check_fields, describe

from .generate import SamplingConfig, TextStream

# Stand-ins for BOS and EOS in a rendered chat: private-use characters no message holds,
# so that only the template's own BOS/EOS become those ids, never a user's "<s>".
BOS_MARK, EOS_MARK = "\U000f0001", "\U000f0002"
MAX_STOPS = 4  # as OpenAI's API


class APIError(Exception):
    """A request the server answers with an error: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _BadField(ValueError):
    """check_fields' error: "key: what is wrong" (its key is the error's param)."""


@dataclass(frozen=True)
class Served:
    """What a request is checked against: the model as served and the server's limits.

    Attributes:
        name: the model's name in requests and /v1/models.
        sp: the sentencepiece processor.
        max_seq_len: the model's context.
        max_tokens: the most new tokens a choice may ask for (also the default).
        max_sequences: the most sequences one request may make (prompts × n): a batch.
        chat_template: the Jinja chat template messages are rendered with (None: no chat).
        render: renders a chat template (`tokenizer.templates.render_chat`).
    """

    name: str
    sp: Any
    max_seq_len: int
    max_tokens: int
    max_sequences: int
    chat_template: str | None
    render: Callable[..., str]


@dataclass(frozen=True)
class Request:
    """A checked request: the prompts as ids, and how to sample them.

    Attributes:
        kind: "chat" or "text" (/v1/completions).
        prompts: each prompt's ids (BOS first); a chat has one.
        n: choices per prompt.
        max_tokens: new tokens per choice, at most.
        cfg: the sampling settings.
        seed: the seed of choice 0 (choice k of a prompt uses seed + k); None: random.
        stop: strings that end a choice (not included in its text).
        stream: answer with server-sent events.
        include_usage: a last stream chunk with the usage counts.
        echo: (text only) the prompt's text comes first in each choice's text.
    """

    kind: str
    prompts: list[list[int]]
    n: int
    max_tokens: int
    cfg: SamplingConfig
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool = False

    def seeds(self) -> list[int]:
        """One seed per sequence, prompt by prompt, choice by choice."""
        base = self.seed if self.seed is not None else secrets.randbits(62)
        return [base + k for _ in self.prompts for k in range(self.n)]


_COMMON = {
    "model": Field("string"),
    "max_tokens": Field("integer", min=1, required=False, nullable=True),
    "temperature": Field("number", min=0, max=2, required=False, nullable=True),
    "top_p": Field("number", above=0, max=1, required=False, nullable=True),
    "top_k": Field("integer", min=1, required=False, nullable=True),
    "repetition_penalty": Field("number", above=0, required=False, nullable=True),
    "n": Field("integer", min=1, required=False, nullable=True),
    "seed": Field("integer", required=False, nullable=True),
    "stream": Field("boolean", required=False, nullable=True),
    "stream_options": Field("object", required=False, nullable=True,
                            fields={"include_usage": Field("boolean", required=False)}),
    "frequency_penalty": Field("number", min=-2, max=2, required=False, nullable=True),
    "presence_penalty": Field("number", min=-2, max=2, required=False, nullable=True),
    "user": Field("string", required=False, nullable=True),
}
_CHAT = {**_COMMON, "messages": Field("list", items=Field("object", fields={
    "role": Field("string", choices=("system", "user", "assistant", "developer"))})),
    "max_completion_tokens": Field("integer", min=1, required=False, nullable=True),
    "logprobs": Field("boolean", required=False, nullable=True)}
_TEXT = {**_COMMON, "echo": Field("boolean", required=False, nullable=True),
         "logprobs": Field("integer", min=0, max=0, required=False, nullable=True)}
# what a request may ask for that is refused (not ignored): it would change the answer
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "top_logprobs",
                "response_format", "suffix", "best_of", "audio", "prediction")


def _checked(body: Any, table: Mapping[str, Field]) -> dict[str, Any]:
    try:
        return check_fields(body, table, error=_BadField)
    except _BadField as e:
        param = str(e).split(":", 1)[0] if isinstance(body, dict) else None
        raise APIError(400, str(e), param=param) from None


def _common(body: dict[str, Any], served: Served, kind: str, n_prompts: int,
            max_tokens: int | None) -> dict[str, Any]:
    """The settings both endpoints share, checked against the served model and limits."""
    if body["model"] != served.name:
        raise APIError(404, f"The model {body['model']!r} does not exist: this server serves "
                            f"{served.name!r} (GET /v1/models).", param="model", code="model_not_found")
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, [], {}):
            raise APIError(400, f"{key} is not supported by this server", param=key)
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key):
            raise APIError(400, f"{key} is not supported by this server (only 0); "
                                "repetition_penalty is", param=key)
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    n = body.get("n") or 1
    if n * n_prompts > served.max_sequences:
        raise APIError(400, f"n: {n} choices of {n_prompts} prompt(s) make {n * n_prompts} "
                            f"sequences; this server batches at most {served.max_sequences}",
                       param="n")
    if max_tokens is not None and max_tokens > served.max_tokens:
        raise APIError(400, f"max_tokens: {max_tokens} is more than this server allows "
                            f"({served.max_tokens}, its --max_tokens)", param="max_tokens")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: expected a non-empty string or a list of at most {MAX_STOPS}, "
                            f"got {describe(stop)}", param="stop")
    temperature = body.get("temperature")
    cfg = SamplingConfig(1.0 if temperature is None else float(temperature),  # OpenAI's default
                         body.get("top_k"), body.get("top_p"),
                         float(body.get("repetition_penalty") or 1.0))
    options = body.get("stream_options") or {}
    return dict(kind=kind, n=n, max_tokens=max_tokens or served.max_tokens, cfg=cfg,
                seed=body.get("seed"), stop=stops, stream=bool(body.get("stream")),
                include_usage=bool(options.get("include_usage")))


def _fits(prompts: list[list[int]], served: Served, param: str) -> None:
    for ids in prompts:
        if len(ids) >= served.max_seq_len:
            raise APIError(400, f"This model's maximum context length is {served.max_seq_len} "
                                f"tokens; the prompt has {len(ids)}, which leaves no room for an "
                                "answer.", param=param, code="context_length_exceeded")


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)  # content parts: text only
    raise APIError(400, f"messages[{i}].content: expected a string or a list of text parts, "
                        f"got {describe(content)}", param=f"messages[{i}].content")


def chat_ids(served: Served, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt of a conversation: the chat template rendered with BOS and EOS marks,
    each mark that id and each text between them encoded as sentencepiece encodes it (so
    one user message is BOS + `format_prompt`'s ids, exactly as training saw them)."""
    if served.chat_template is None:
        raise APIError(400, "this model has no chat template: start the server with "
                            "--template NAME, or use /v1/completions", param="messages")
    if not messages:
        raise APIError(400, "messages: expected at least one message", param="messages")
    turns = [{"role": "system" if m["role"] == "developer" else m["role"],
              "content": _content(m, i)} for i, m in enumerate(messages)]
    try:
        text = served.render(served.chat_template, turns, bos_token=BOS_MARK, eos_token=EOS_MARK)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    sp, ids = served.sp, []
    for i, part in enumerate(text.split(BOS_MARK)):
        if i:
            ids.append(sp.bos_id())
        for j, piece in enumerate(part.split(EOS_MARK)):
            if j:
                ids.append(sp.eos_id())
            if piece:
                ids += sp.encode(piece)
    return ids


def parse_chat(body: Any, served: Served) -> Request:
    """A /v1/chat/completions body as a Request (raises APIError for a bad one)."""
    body = _checked(body, _CHAT)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    common = _common(body, served, "chat", 1, max_tokens)
    prompt = chat_ids(served, body["messages"])
    _fits([prompt], served, "messages")
    return Request(prompts=[prompt], **common)


def parse_completion(body: Any, served: Served) -> Request:
    """A /v1/completions body as a Request: the prompt a string, a list of strings, a
    list of token ids or a list of such lists; each string gets BOS first, as
    `model.generate` gives it."""
    body = _checked(body, _TEXT)
    prompt = body.get("prompt")
    sp = served.sp
    if isinstance(prompt, str):
        prompts = [[sp.bos_id()] + sp.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [[sp.bos_id()] + sp.encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_ids(p, sp) for p in prompt):
        prompts = [list(p) for p in prompt]
    elif _is_ids(prompt, sp) and prompt:
        prompts = [list(prompt)]
    else:
        raise APIError(400, "prompt: expected a string, a list of strings, or token ids below "
                            f"{sp.vocab_size()}, got {describe(prompt)}", param="prompt")
    common = _common(body, served, "text", len(prompts), body.get("max_tokens"))
    if any(not p for p in prompts):
        raise APIError(400, "prompt: a list of token ids may not be empty", param="prompt")
    _fits(prompts, served, "prompt")
    return Request(prompts=prompts, echo=bool(body.get("echo")), **common)


def _is_ids(value: Any, sp) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < sp.vocab_size() for t in value)


class ChoiceText:
    """One choice's text as its tokens come: what to send now, with stop strings applied.

    A chat's answer is decoded on its own (as training encoded responses); a completion's
    after its prompt, so that its first space stays (as `model.generate` prints it). Text
    that may be the start of a stop string is held back until it is known not to be.
    """

    def __init__(self, sp, prefix: list[int], stops: tuple[str, ...]) -> None:
        self._stream = TextStream(sp, prefix)
        self.prefix_text = self._stream.prefix_text
        self._stops = stops
        self.text = ""  # the choice's text so far (after the prompt)
        self._sent = 0
        self.stopped = False  # a stop string was found: nothing more comes

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        piece = self._stream.push(token)
        return "" if piece is None else self._add(piece)

    def finish(self) -> str:
        """What is left to send once the choice has ended."""
        if not self.stopped:
            self._add(self._stream.flush(), final=True)
        out, self._sent = self.text[self._sent:], len(self.text)
        return out

    def _add(self, piece: str, final: bool = False) -> str:
        self.text += piece
        cuts = [i for i in (self.text.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
        hold = 0 if self.stopped or final else max(
            (k for s in self._stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        out = self.text[self._sent:len(self.text) - hold]
        self._sent += len(out)
        return out


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: str, rid: str, model: str, texts: list[str], reasons: list[str],
             use: dict[str, int]) -> dict[str, Any]:
    """The whole answer of a request that was not streamed."""
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t},
                    "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chunk(kind: str, rid: str, model: str, index: int, text: str | None,
          finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
    """One server-sent event of a streamed answer: a piece of choice `index`'s text, its
    opening (a chat's role) or its end (finish_reason)."""
    if kind == "chat":
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice]}


def usage_chunk(kind: str, rid: str, model: str, use: dict[str, int]) -> dict[str, Any]:
    """The last event when the request asked for `stream_options.include_usage`."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [], "usage": use}


def models_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, created)]}


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "zhllama"}
