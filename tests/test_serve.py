"""`model.serve` over real HTTP on loopback, talked to by the official `openai` client.

The server runs as its own process on 127.0.0.1 with stories260K (a real, trained
llama2.c model); at temperature 0 (and at a given seed) its answers must be exactly the
text `model.generate` prints for the same prompt, streamed or not, alone or in a wave of
16 concurrent requests. Bad requests get OpenAI's error shape with OpenAI's status codes,
a full queue 503, and the self-instruct generator runs end to end against the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from model.batching import Sequence, generate_batch
from model.generate import SamplingConfig, generate_ids
from model.generate import main as generate_main
from tests.test_generate_lora import base_and_adapters  # noqa: F401 (a fixture)

openai = pytest.importorskip("openai")

KEY = "zk-serve-test-91d2c4"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ZHLLAMA_TEST_KEY": KEY}
NAME = "stories"
PROMPTS = ["Tell a story.", "What did the cat see?", "Write about a red ball.", "Lily and Tom",
           "A dog ran", "Once upon a time, in a big forest,", "Why is the sky blue?", "Sing"]


@pytest.fixture(scope="module")
def model_dir(stories260k, tmp_path_factory) -> Path:
    """stories260K with room for self-instruct's prompt: ~760 of tok512's tokens, more than
    the 512 positions it was trained on (its rotary positions go on; only the limit moves)."""
    out = tmp_path_factory.mktemp("served") / NAME
    shutil.copytree(stories260k, out)
    params = json.loads((out / "params.json").read_text())
    (out / "params.json").write_text(json.dumps({**params, "max_seq_len": 2048}))
    return out


class Server:
    """`python -m model.serve` in its own process, on a port of its choosing."""

    def __init__(self, model: Path, log: Path, *args: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "model.serve", str(model), "--port", "0", "--device", "cpu",
             "--served_model_name", NAME, *args],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=ENV)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", log.read_text())
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                raise AssertionError(log.read_text())
            time.sleep(0.05)
        raise AssertionError("the server did not start: " + log.read_text())

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(api_key=key or "none", base_url=self.url, max_retries=0, timeout=120)

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(30)
        return self.log.read_text()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--template", "alpaca",
               "--api_key_env", "ZHLLAMA_TEST_KEY", "--max_batch_size", "8", "--max_tokens", "256")
    yield s
    log = s.stop()
    assert KEY not in log


@pytest.fixture(scope="module")
def reference(model_dir):
    """What `model.generate` prints, and the model and tokenizer it prints it with."""
    import sentencepiece as spm

    from model.formats import read_checkpoint
    from model.source import load_model

    model = load_model(read_checkpoint(model_dir)).eval()
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))

    def printed(prompt: str, n: int, *args: str) -> str:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            generate_main([str(model_dir), "--prompt", prompt, "--max_new_tokens", str(n),
                           "--device", "cpu", *args])
        assert out.getvalue().endswith("\n")
        return out.getvalue()[:-1]

    return printed, model, sp


def chat(client, prompt: str, max_tokens: int, stream: bool = False, **kw):
    args = dict(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, **kw)
    if not stream:
        return client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, **args))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_batched_generation_is_each_prompt_alone(reference):
    """Left-padded prompts of different lengths, greedy and sampled, with budgets that end
    at different steps: each sequence's tokens are generate_ids' for it alone."""
    _, model, sp = reference
    cfgs = [SamplingConfig(0), SamplingConfig(1.0, top_p=0.9), SamplingConfig(0.7, top_k=20),
            SamplingConfig(0, repetition_penalty=1.3)]
    prompts = [[sp.bos_id()] + sp.encode(p) for p in PROMPTS[:6]]
    seqs = [Sequence(p, 10 + 7 * i, cfgs[i % 4], torch.Generator().manual_seed(i))
            for i, p in enumerate(prompts)]
    for _ in generate_batch(model, seqs, stop_ids=(sp.eos_id(),), allowed_vocab=sp.vocab_size()):
        pass
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        alone = list(generate_ids(model, p, 10 + 7 * i, cfgs[i % 4], stop_ids=(sp.eos_id(),),
                                  allowed_vocab=sp.vocab_size(),
                                  generator=torch.Generator().manual_seed(i)))
        assert s.tokens == alone and len(alone) > 3, i


def test_chat_and_completions_are_generates_text(server, reference):
    printed, _, sp = reference
    from tokenizer.templates import format_prompt

    client = server.client()
    for prompt in PROMPTS[:2]:
        expected = printed(prompt, 40, "--template", "alpaca", "--temperature", "0")
        r = chat(client, prompt, 40, temperature=0)
        assert r.choices[0].message.content == expected and expected
        assert r.usage.prompt_tokens == 1 + len(sp.encode(format_prompt("alpaca", prompt)))
        assert r.choices[0].finish_reason in ("stop", "length")
        text, chunks = chat(client, prompt, 40, stream=True, temperature=0,
                            stream_options={"include_usage": True})
        assert text == expected and len(chunks) > 5
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # completions continue the prompt as model.generate does without a template
    prompt = "Once upon a time there was"  # continued with a ▁ piece: the space must stay
    expected = printed(prompt, 30, "--temperature", "0")
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0)
    assert prompt + r.choices[0].text == expected and r.choices[0].text.startswith(" ")
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    echo = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, echo=True)
    assert echo.choices[0].text == expected
    assert [m.id for m in client.models.list().data] == [NAME]


def test_seed_n_top_p_and_stop(server, reference):
    printed, _, _ = reference
    client = server.client()
    expected = printed(PROMPTS[2], 30, "--template", "alpaca", "--temperature", "1.0",
                       "--top_p", "0.9", "--seed", "5")
    r = chat(client, PROMPTS[2], 30, temperature=1.0, top_p=0.9, seed=5, n=3)
    texts = [c.message.content for c in r.choices]
    assert texts[0] == expected  # choice k draws with seed + k
    assert texts[1] == printed(PROMPTS[2], 30, "--template", "alpaca", "--temperature", "1.0",
                               "--top_p", "0.9", "--seed", "6")
    assert len(set(texts)) > 1 and [c.index for c in r.choices] == [0, 1, 2]
    again = chat(client, PROMPTS[2], 30, temperature=1.0, top_p=0.9, seed=5, n=3)
    assert [c.message.content for c in again.choices] == texts
    # a stop string ends the text before it, streamed (held back while it may be starting) or not
    greedy = printed(PROMPTS[0], 60, "--template", "alpaca", "--temperature", "0")
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 4]
    cut = greedy[:greedy.index(stop)]
    r = chat(client, PROMPTS[0], 60, temperature=0, stop=[stop, "never-seen"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    text, chunks = chat(client, PROMPTS[0], 60, stream=True, temperature=0, stop=stop)
    assert text == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_requests(server, reference):
    printed, _, _ = reference
    client = server.client()
    jobs = [(PROMPTS[i % 8], 20 + 3 * i, i % 2 == 1, i % 3 == 0) for i in range(16)]
    expected = [printed(p, n, "--temperature", "0") if text else
                printed(p, n, "--template", "alpaca", "--temperature", "0")
                for p, n, _, text in jobs]

    def ask(job):
        prompt, n, stream, text = job
        if text:
            r = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                          stream=stream)
            return prompt + ("".join(c.choices[0].text for c in r) if stream else r.choices[0].text)
        return chat(client, prompt, n, stream, temperature=0)[0] if stream else \
            chat(client, prompt, n, temperature=0).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == expected
    waves = [int(m) for m in re.findall(r"wave \d+: \d+ requests, (\d+) sequences",
                                         server.log.read_text())]
    assert max(waves) > 1 and max(waves) <= 8  # batched, and never beyond --max_batch_size


def raw(server, path: str, body: bytes | None, key: str | None = KEY,
        headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.url.removesuffix("/v1") + path, data=body,
                                     method="POST" if body is not None else "GET")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    for k, v in (headers or {"Content-Type": "application/json"}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors(server):
    client = server.client()
    cases = [(openai.NotFoundError, 404, "model", dict(model="gpt-4")),
             (openai.BadRequestError, 400, "max_tokens", dict(max_tokens=-5)),
             (openai.BadRequestError, 400, "max_tokens", dict(max_tokens=100_000)),
             (openai.BadRequestError, 400, "n", dict(n=9)),
             (openai.BadRequestError, 400, "temperature", dict(temperature=3)),
             (openai.BadRequestError, 400, "messages", dict(messages=[{"role": "assistant", "content": "x"}])),
             (openai.BadRequestError, 400, "messages", dict(messages=[{"role": "user", "content": "a " * 3000}]))]
    for error, status, param, change in cases:
        args = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, **change}
        with pytest.raises(error) as e:
            client.chat.completions.create(**args)
        assert e.value.status_code == status and e.value.body["param"] == param, change
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        server.client("wrong-key").models.list()
    assert e.value.body["code"] == "invalid_api_key"
    assert raw(server, "/v1/models", None, key=None)[0] == 401
    status, body = raw(server, "/v1/chat/completions", b'{"model": "stories", "messages": [')
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert "not JSON" in body["error"]["message"]
    status, body = raw(server, "/v1/chat/completions", b"x" * 2_000_000)
    assert status == 413 and "at most" in body["error"]["message"]
    assert raw(server, "/v1/nothing", b"{}")[0] == 404
    status, body = raw(server, "/v1/completions", json.dumps({"model": NAME, "prompt": [99999]}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=3).choices  # still serving


def test_a_full_queue_is_503(model_dir, reference, tmp_path):
    printed, _, _ = reference
    s = Server(model_dir, tmp_path / "log", "--max_batch_size", "1", "--max_queue", "1")
    try:
        client = s.client(None)

        def ask(i: int):
            try:
                r = client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=400,
                                              temperature=0)
                return PROMPTS[i] + r.choices[0].text
            except openai.InternalServerError as e:
                return e.status_code, e.body["code"]

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
    finally:
        s.stop()
    busy = [a for a in answers if a == (503, "overloaded")]
    done = [(i, a) for i, a in enumerate(answers) if isinstance(a, str)]
    assert busy and len(done) >= 2  # the one decoding, the one waiting; the rest turned away
    for i, a in done:
        assert a == printed(PROMPTS[i], 400, "--temperature", "0")


def test_hf_chat_template_and_conversations(stories260k, tmp_path):
    """A Hugging Face directory's own chat_template, multi-turn with a system message: the
    prompt ids are transformers' apply_chat_template ids for the same export."""
    transformers = pytest.importorskip("transformers")
    import sentencepiece as spm

    from model import openai_api as api
    from model.convert import convert
    from model.serve import hf_chat_template
    from tokenizer.templates import render_chat

    convert(stories260k, tmp_path / "hf", "hf", template="llama2_cla_v2", progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(stories260k / "tokenizer.model"))
    served = api.Served(NAME, sp, 512, 16, 8, hf_chat_template(tmp_path / "hf"), render_chat)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", use_fast=False)
    messages = [{"role": "system", "content": "You tell stories."},
                {"role": "user", "content": "Tell a story."},
                {"role": "assistant", "content": "Once upon a time there was a cat."},
                {"role": "user", "content": "And then?"}]
    for turns in (messages[1:2], messages, messages[1:]):
        theirs = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
        assert api.chat_ids(served, turns) == list(theirs)


def test_the_generator_against_the_server(server, tmp_path):
    seeds = tmp_path / "seed_tasks.jsonl"  # Stanford Alpaca's format, in English for this model
    seeds.write_text("\n".join(json.dumps(r) for r in [
        {"id": "seed_task_0", "name": "story", "instruction": "Write a short story about a cat.",
         "instances": [{"input": "", "output": "Once upon a time, a cat found a ball."}],
         "is_classification": False},
        {"id": "seed_task_1", "name": "rhyme", "instruction": "Give a word that rhymes with the input.",
         "instances": [{"input": "dog", "output": "log"}], "is_classification": False}]) + "\n")
    out = tmp_path / "tasks.json"
    r = subprocess.run([sys.executable, "-m", "data.self_instruct", "--endpoint", server.url,
                        "--model", NAME, "--seed_tasks", str(seeds), "--num", "4", "--output",
                        str(out), "--api_key_env", "ZHLLAMA_TEST_KEY", "--language", "en",
                        "--examples", "1", "--batch", "2", "--max_tokens", "64",
                        "--max_requests", "3", "--concurrency", "3", "--no_progress"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    tasks = json.loads(out.read_text())
    assert isinstance(tasks, list) and all(set(t) == {"instruction", "input", "output"} for t in tasks)
    print("\n" + r.stdout)  # the summary, for the README (pytest -s)
    assert "from 3 requests" in r.stdout
    for p in tmp_path.rglob("*"):
        assert KEY.encode() not in p.read_bytes()
    assert KEY not in r.stdout + r.stderr


def test_served_adapters_answer_as_generate_with_them(base_and_adapters, capsys, tmp_path):
    """`--lora_model A,B` on the server: the two adapters are applied in memory as
    model.generate applies them (itself tested equal to the merged model), nothing is
    written beside them, and the answer differs from the bare base's."""
    from tests.test_generate_lora import PROMPT, run_generate, tree_hash

    _, base, a, b = base_and_adapters
    before = tree_hash(a.parent)
    expected = run_generate(capsys, base, "--lora_model", f"{a},{b}")[:-1]  # its line, echoed
    bare = run_generate(capsys, base)[:-1]
    s = Server(base, tmp_path / "server.log", "--lora_model", f"{a},{b}")
    try:
        r = s.client(None).completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    finally:
        s.stop()
    assert PROMPT + r.choices[0].text == expected != bare
    assert tree_hash(a.parent) == before
