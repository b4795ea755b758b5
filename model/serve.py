"""Serve a model over OpenAI's API: the `openai` client, chat UIs and evaluation harnesses
talk to it as to OpenAI's service.

    python -m model.serve MODEL [--lora_model A[,B,..] [--force_base]] [--template NAME]
        [--host 127.0.0.1] [--port 8000] [--api_key_env VAR] [--max_batch_size 8]
        [--max_queue 64] [--max_tokens 512] [--max_request_bytes 1000000]
        [--served_model_name NAME] [--device DEV] [--dtype DT]

Endpoints: POST /v1/chat/completions (messages in the model's prompt template, or its
chat_template), POST /v1/completions (the prompt continued, as `model.generate` without
a template), GET /v1/models; streamed (server-sent events, `"stream": true`) or not;
temperature, top_p, max_tokens, stop, seed and n, and usage counted in tokens.

Batching: static, per wave. Requests wait in one bounded queue (--max_queue; beyond it
the answer is 503); whenever the model is free, every waiting request that fits
--max_batch_size sequences becomes the next wave, decoded together with one KV cache.
A request that arrives during a wave waits for the wave's end. Each sequence gets the
tokens `model.generate` gives it alone: at temperature 0, the same text.

The API key, if any, is read from the environment variable --api_key_env names and
checked on every request (`Authorization: Bearer KEY`); it is never printed. Errors are
JSON in OpenAI's error shape. Run it behind a reverse proxy when it faces the internet:
it is built on the standard library's HTTP server (see the README).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from tokenizer.cli import ArgumentParser, CommandError, command_errors, positive_int
from tokenizer.spm_io import load_sp
from tokenizer.templates import TEMPLATES, chat_template, render_chat

from . import openai_api as api
from .batching import Job, QueueFull, Sequence, WaveScheduler, generate_batch
from .generate import add_model_arguments, adapter_dirs, model_dtype, open_model, pick_device
from .source import check_tokenizer_rows, load_model
from .tensor_io import FormatError

# Slow or idle connections are closed after this long without a byte from the client.
CLIENT_TIMEOUT_S = 120
# A body over --max_request_bytes but under this is read (and dropped) before the 413, so
# that a client still sending it hears the answer instead of a reset connection; a larger
# one gets the answer at once, and the connection is closed.
DRAIN_BYTES = 64 << 20


@dataclass(frozen=True)
class ServeOptions:
    """What `python -m model.serve` was asked for."""

    model: str
    lora_models: tuple[str, ...] = ()
    force_base: bool = False
    template: str | None = None
    tokenizer: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_tokens: int = 512
    max_request_bytes: int = 1_000_000
    served_model_name: str | None = None
    device: str | None = None
    dtype: str | None = None
    quiet: bool = False


class App:
    """The served model behind the HTTP handler: what requests are checked against, the
    scheduler that runs them, and the key they must carry."""

    def __init__(self, served: api.Served, scheduler: WaveScheduler, device: torch.device,
                 api_key: str | None, max_request_bytes: int, quiet: bool) -> None:
        self.served, self.scheduler, self.device = served, scheduler, device
        self._key = None if api_key is None else api_key.encode()
        self.max_request_bytes, self.quiet = max_request_bytes, quiet
        self.created = int(time.time())

    def authorized(self, header: str | None) -> bool:
        if self._key is None:
            return True
        given = (header or "").removeprefix("Bearer ").strip().encode()
        return hmac.compare_digest(given, self._key)  # constant time: no key by timing


class Server(ThreadingHTTPServer):
    """One thread per connection; the generating is the scheduler's single worker."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the listen backlog: socketserver's 5 drops bursts of clients

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client gone between requests: its own business
            return
        sys.stderr.write(f"error: {client_address[0]}: {type(error).__name__}: {error}\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams are chunked
    timeout = CLIENT_TIMEOUT_S
    server: Server

    # -- routing ------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route({"/v1/models": self._models}, prefix_routes={"/v1/models/": self._model})

    def do_POST(self) -> None:
        self._route({"/v1/chat/completions": lambda: self._generate(api.parse_chat),
                     "/v1/completions": lambda: self._generate(api.parse_completion)})

    def _route(self, routes: dict[str, Any], prefix_routes: dict[str, Any] | None = None) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        app = self.server.app
        self._body_read = self.command != "POST"  # an unread body ends the connection's reuse
        self._streaming = False
        try:
            handler = routes.get(path)
            arg = None
            for prefix, h in (prefix_routes or {}).items():
                if handler is None and path.startswith(prefix):
                    handler, arg = h, path[len(prefix):]
            if handler is None:
                known = path in ("/v1/models", "/v1/chat/completions", "/v1/completions")
                raise api.APIError(405 if known else 404,
                                   f"{self.command} {path} is not served here" if known else
                                   f"Unknown path {path}: this server has /v1/chat/completions, "
                                   "/v1/completions and /v1/models",
                                   code="method_not_allowed" if known else "unknown_url")
            if not app.authorized(self.headers.get("Authorization")):
                raise api.APIError(401, "Incorrect or missing API key (send it as "
                                        "'Authorization: Bearer KEY')", code="invalid_api_key")
            handler() if arg is None else handler(arg)
        except api.APIError as e:
            self._fail(e)
        except OSError:  # the client went away, or stopped reading for CLIENT_TIMEOUT_S
            self.close_connection = True
        except Exception as e:  # a bug of ours: still an answer in OpenAI's shape, and a line
            sys.stderr.write(f"error: {self.command} {path}: {type(e).__name__}: {e}\n")
            self._fail(api.APIError(500, f"internal error: {type(e).__name__}: {e}",
                                    type="server_error"))

    def _fail(self, e: api.APIError) -> None:
        try:
            if self._streaming:  # headers are out: the error is the stream's last event
                self._event(e.body())
                self._write_chunk(b"")
            else:
                self._send_json(e.status, e.body(), close=not self._body_read)
        except OSError:
            self.close_connection = True

    # -- endpoints ----------------------------------------------------------------------

    def _models(self) -> None:
        app = self.server.app
        self._send_json(200, api.models_list(app.served.name, app.created))

    def _model(self, name: str) -> None:
        app = self.server.app
        if name != app.served.name:
            raise api.APIError(404, f"The model {name!r} does not exist: this server serves "
                                    f"{app.served.name!r}", param="model", code="model_not_found")
        self._send_json(200, api.model_card(name, app.created))

    def _generate(self, parse) -> None:
        app = self.server.app
        request = parse(self._read_json(), app.served)
        sp = app.served.sp
        seeds = iter(request.seeds())
        seqs = [Sequence(list(prompt), request.max_tokens, request.cfg,
                         torch.Generator(device=app.device).manual_seed(next(seeds)))
                for prompt in request.prompts for _ in range(request.n)]
        prefixes = [request.prompts[i // request.n] if request.kind == "text" else []
                    for i in range(len(seqs))]
        texts = [api.ChoiceText(sp, prefix, request.stop) for prefix in prefixes]
        job = Job(seqs)
        try:
            app.scheduler.submit(job)
        except QueueFull:
            raise api.APIError(503, "The server is busy (its queue is full); retry later",
                               type="server_error", code="overloaded") from None
        rid = api.new_id(request.kind)
        try:
            if request.stream:
                self._stream(request, job, texts, rid)
            else:
                self._collect(request, job, texts, rid)
        except BaseException:
            job.cancel()  # the client went away, or answering failed: stop generating for it
            raise

    def _events(self, job: Job, texts: list[api.ChoiceText]):
        """(k, piece, finished) for each choice's text as it comes; cancels a choice at
        its stop string."""
        pending = len(job.seqs)
        while pending:
            event = job.events.get()
            if event[0] == "error":
                raise api.APIError(500, f"generation failed: {event[1]}", type="server_error")
            if event[0] == "tokens":
                for k, token in event[1]:
                    piece = texts[k].push(token)
                    if texts[k].stopped:
                        job.seqs[k].finish_reason = "stop"
                    if piece:
                        yield k, piece, False
            else:
                k = event[1]
                pending -= 1
                yield k, texts[k].finish(), True

    def _usage(self, request: api.Request, job: Job) -> dict[str, int]:
        return api.usage(sum(len(p) for p in request.prompts), sum(len(s.tokens) for s in job.seqs))

    def _collect(self, request: api.Request, job: Job, texts: list[api.ChoiceText], rid: str) -> None:
        parts: list[list[str]] = [[] for _ in texts]
        for k, piece, _ in self._events(job, texts):
            parts[k].append(piece)
        out = ["".join(p) for p in parts]
        if request.echo:
            out = [t.prefix_text + o for t, o in zip(texts, out)]
        reasons = [_reason(s, t) for s, t in zip(job.seqs, texts)]
        self._send_json(200, api.response(request.kind, rid, self.server.app.served.name, out,
                                          reasons, self._usage(request, job)))

    def _stream(self, request: api.Request, job: Job, texts: list[api.ChoiceText], rid: str) -> None:
        name = self.server.app.served.name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        for k, t in enumerate(texts):  # each choice opens: a chat's role, an echo's prompt
            if request.kind == "chat":
                self._event(api.chunk("chat", rid, name, k, "", role=True))
            elif request.echo and t.prefix_text:
                self._event(api.chunk("text", rid, name, k, t.prefix_text))
        for k, piece, finished in self._events(job, texts):
            if piece:
                self._event(api.chunk(request.kind, rid, name, k, piece))
            if finished:
                self._event(api.chunk(request.kind, rid, name, k, None if request.kind == "chat"
                                      else "", _reason(job.seqs[k], texts[k])))
        if request.include_usage:
            self._event(api.usage_chunk(request.kind, rid, name, self._usage(request, job)))
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    # -- the wire -----------------------------------------------------------------------

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            raise api.APIError(411, "send the request body with a Content-Length")
        if not length.isdigit():
            raise api.APIError(400, f"bad Content-Length {length!r}")
        limit = self.server.app.max_request_bytes
        if int(length) > limit:
            if int(length) <= DRAIN_BYTES:  # read and dropped, so the client hears the answer
                left = int(length)
                while left > 0 and (got := self.rfile.read(min(1 << 16, left))):
                    left -= len(got)
                self._body_read = left == 0
            raise api.APIError(413, f"the request body has {int(length):,} bytes; this server "
                                    f"takes at most {limit:,} (--max_request_bytes)")
        raw = self.rfile.read(int(length))
        self._body_read = len(raw) == int(length)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise api.APIError(400, f"the request body is not JSON: {e}") from None

    def _send_json(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:  # the unread body stays on the socket: the connection cannot be reused
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _event(self, obj: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.app.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


def _reason(seq: Sequence, text: api.ChoiceText) -> str:
    return "stop" if text.stopped or seq.finish_reason == "stop" else "length"


def hf_chat_template(model: Path) -> str | None:
    """The chat template a Hugging Face model directory ships, if any: `chat_template.jinja`,
    or the `chat_template` of tokenizer_config.json (a string, or named templates, of
    which "default" is taken)."""
    if not model.is_dir():
        return None
    if (model / "chat_template.jinja").is_file():
        return (model / "chat_template.jinja").read_text(encoding="utf-8")
    config = model / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise FormatError(f"{config}: not a JSON object ({e})") from None
    if isinstance(found, list):
        found = next((t.get("template") for t in found
                      if isinstance(t, dict) and t.get("name") == "default"), None)
    if found is not None and not isinstance(found, str):
        raise FormatError(f"{config}: chat_template: expected a string, got {type(found).__name__}")
    return found


def chat_source(opts: ServeOptions, recorded: str | None) -> tuple[str | None, str]:
    """The chat template messages are rendered with, and what it is (for the start line):
    --template, else the template recorded with the model, else a Hugging Face
    directory's own chat_template, else none (chat requests are then refused)."""
    name = opts.template or recorded
    if name is not None:
        return chat_template(name), f"template {name}" + ("" if opts.template else " (recorded)")
    source = hf_chat_template(Path(opts.model))
    if source is None:
        return None, "no chat template (give --template for /v1/chat/completions)"
    try:  # a template that cannot render one message is refused now, not per request
        render_chat(source, [{"role": "user", "content": "?"}], bos_token="", eos_token="")
    except ValueError as e:
        raise FormatError(f"{opts.model}: its {e}") from None
    return source, "the model's chat_template"


def build_app(opts: ServeOptions) -> tuple[App, str]:
    """Load the model and everything requests need; returns the app and its description."""
    api_key = None
    if opts.api_key_env is not None:
        api_key = os.environ.get(opts.api_key_env, "")
        if not api_key.strip():
            raise CommandError(f"--api_key_env {opts.api_key_env}: that environment variable is "
                               "not set or empty")
    ckpt = open_model(opts.model, opts.lora_models, tokenizer=opts.tokenizer,
                      force_base=opts.force_base)
    if note := check_tokenizer_rows(ckpt):
        print(note, file=sys.stderr)
    template, described = chat_source(opts, ckpt.template)
    sp = load_sp(ckpt.tokenizer)
    device = pick_device(opts.device)
    model = load_model(ckpt, device=device, dtype=model_dtype(opts.dtype, device)).eval()
    name = opts.served_model_name or Path(opts.model).resolve().name
    served = api.Served(name, sp, model.args.max_seq_len, opts.max_tokens, opts.max_batch_size,
                        template, render_chat)
    stop_ids, vocab = (sp.eos_id(),), sp.vocab_size()

    def run_wave(seqs: list[Sequence]):
        return generate_batch(model, seqs, stop_ids=stop_ids, allowed_vocab=vocab)

    log = None if opts.quiet else (lambda line: sys.stderr.write(line + "\n"))  # one write: whole lines
    scheduler = WaveScheduler(run_wave, opts.max_batch_size, opts.max_queue, log)
    app = App(served, scheduler, device, api_key, opts.max_request_bytes, opts.quiet)
    return app, f"chat: {described}; {'API key required' if api_key else 'no API key'}"


def serve(opts: ServeOptions) -> None:
    """Serve until interrupted (Ctrl-C)."""
    app, described = build_app(opts)
    try:
        server = Server((opts.host, opts.port), app)
    except OSError as e:
        raise CommandError(f"cannot listen on {opts.host}:{opts.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    app.scheduler.start()
    # the one line a supervisor (or a test) waits for; with --port 0 it names the port taken
    print(f"serving {app.served.name} at http://{host}:{port}/v1 ({described}; static "
          f"batching: waves of up to {opts.max_batch_size} sequences, {opts.max_queue} requests "
          "may wait)", file=sys.stderr, flush=True)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)  # short joins, so Ctrl-C reaches the main thread promptly
    finally:
        server.shutdown()
        server.server_close()


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m model.serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--template", choices=tuple(TEMPLATES),
                   help="the prompt template chat messages go into (default: the one recorded "
                        "with the model, else a Hugging Face directory's chat_template)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface; mind --api_key_env)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the start line says which)")
    p.add_argument("--api_key_env", metavar="VAR",
                   help="require the API key held by this environment variable on every request")
    p.add_argument("--max_batch_size", type=positive_int, default=8,
                   help="the most sequences decoded together in one wave (static batching)")
    p.add_argument("--max_queue", type=positive_int, default=64,
                   help="the most requests waiting for a wave; more are answered 503")
    p.add_argument("--max_tokens", type=positive_int, default=512,
                   help="the most new tokens a request may ask for, and what it gets by default")
    p.add_argument("--max_request_bytes", type=positive_int, default=1_000_000,
                   help="larger request bodies are answered 413")
    p.add_argument("--served_model_name", help="the model's name in the API (default: MODEL's "
                   "directory name)")
    p.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    return p


def options_from_args(a: argparse.Namespace) -> ServeOptions:
    adapters = adapter_dirs(a.lora_model)
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port: expected 0..65535, got {a.port}")
    if a.served_model_name is not None and not re.fullmatch(r"\S+", a.served_model_name):
        raise ValueError(f"--served_model_name: expected a name without spaces, got {a.served_model_name!r}")
    return ServeOptions(a.model, adapters, a.force_base, a.template, a.tokenizer, a.host, a.port,
                        a.api_key_env, a.max_batch_size, a.max_queue, a.max_tokens,
                        a.max_request_bytes, a.served_model_name, a.device, a.dtype, a.quiet)


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    with command_errors():
        try:
            serve(options_from_args(a))
        except KeyboardInterrupt:
            raise KeyboardInterrupt("stopped") from None


if __name__ == "__main__":
    main()
