"""Asking an OpenAI-compatible endpoint for self-instruct: the official `openai` client's
chat completions, spaced to a rate, retried with backoff when a retry may help, and the
one error line when it cannot; the API key is never part of any message.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenizer.cli import CommandError

if TYPE_CHECKING:  # the options live with the command; only their type is needed here
    from .self_instruct import SelfInstructOptions


class RateLimiter:
    """Spaces the starts of requests at least 60/R seconds apart, across threads."""

    def __init__(self, per_minute: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = float("-inf")
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            at = max(now, self._next)
            self._next = at + self.interval
        if at > now:
            self._sleep(at - now)


@dataclass(frozen=True)
class Reply:
    """One request's outcome: the reply's text, or why there is none."""

    index: int
    text: str | None
    finish_reason: str | None
    retries: int
    failed: str | None = None  # "unavailable", "malformed_response", "empty_reply"
    error: str | None = None  # the last error, when unavailable


def retry_after(error: Exception) -> float | None:
    """The wait the server asked for (Retry-After or retry-after-ms), in seconds."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(float(headers.get(name)) * scale, 0.0)
        except (TypeError, ValueError):
            continue
    return None


def backoff_seconds(attempt: int, opts: SelfInstructOptions, asked: float | None,
                    jitter: float) -> float:
    """Exponential backoff (jitter in [0, 1) spreads it ×0.5–1.5), or the server's wait."""
    delay = min(opts.backoff * 2 ** attempt * (0.5 + jitter), opts.max_backoff)
    return max(delay, min(asked, 10 * opts.max_backoff)) if asked is not None else delay


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def ask(client: Any, opts: SelfInstructOptions, index: int, prompt: str, limiter: RateLimiter,
        secret: str | None, sleep: Callable[[float], None] = time.sleep) -> Reply:
    """Send one request, retrying what may pass on a second try.

    Raises:
        CommandError: a refusal that retrying cannot change (401, 403, 404, 400 …).
    """
    import openai

    transient = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
    rng = random.Random(f"{opts.seed}-backoff-{index}")
    for attempt in range(opts.retries + 1):
        limiter.wait()
        try:
            response = client.chat.completions.create(
                model=opts.model, messages=[{"role": "user", "content": prompt}],
                temperature=opts.temperature, top_p=opts.top_p, max_tokens=opts.max_tokens)
        except transient as e:  # 429, 5xx, timeouts, refused or dropped connections
            if attempt == opts.retries:
                return Reply(index, None, None, attempt, "unavailable", f"{type(e).__name__}: {e}")
            sleep(backoff_seconds(attempt, opts, retry_after(e), rng.random()))
            continue
        except openai.APIStatusError as e:
            if e.status_code in (408, 409) and attempt < opts.retries:
                sleep(backoff_seconds(attempt, opts, retry_after(e), rng.random()))
                continue
            hint = (f" (is {opts.api_key_env} the endpoint's key?)" if e.status_code in (401, 403)
                    else f" (is --model {opts.model} served there, and is --endpoint the API's base "
                         "URL, e.g. ending in /v1?)" if e.status_code == 404 else "")
            raise CommandError(redact(f"{opts.endpoint} refused the request ({e.status_code}): "
                                      f"{e.message}{hint}", secret)) from None
        except (openai.APIResponseValidationError, ValueError):
            return Reply(index, None, None, attempt, "malformed_response")
        return _reply(index, response, attempt)
    raise AssertionError("unreachable")


def _reply(index: int, response: Any, retries: int) -> Reply:
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list):
        return Reply(index, None, None, retries, "malformed_response")
    message = getattr(choices[0], "message", None) if choices else None
    text = getattr(message, "content", None)
    if not isinstance(text, str) or not text.strip():
        return Reply(index, None, None, retries, "empty_reply")
    return Reply(index, text, getattr(choices[0], "finish_reason", None), retries)


def make_client(opts: SelfInstructOptions, secret: str | None) -> Any:
    """The official client, pointed at --endpoint; retrying is `ask`'s, not the client's."""
    try:
        import openai
    except ImportError:
        raise CommandError("the openai package is missing: pip install zhllama[instruct]") from None
    # local servers need no key, but the client insists on one: a placeholder is sent
    return openai.OpenAI(api_key=secret or "none", base_url=opts.endpoint, max_retries=0,
                         timeout=opts.timeout)
