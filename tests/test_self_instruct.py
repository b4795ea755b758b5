"""Self-instruct data generation: ROUGE-L against the rouge-score package on real Chinese
instructions, the seed formats, the reply parser, and the generator run end to end
through the official `openai` client against a scripted endpoint on loopback that
answers with rate limits, server errors, a timeout, malformed bodies and untidy,
duplicated and truncated task lists, then killed with SIGKILL and resumed.

(The generator against `model.serve` itself is in tests/test_serve.py.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data.instruct_tasks import check_task, parse_reply, read_seed_tasks
from data.rouge import CharTokenizer, RougeIndex, rouge_l, rouge_tokens
from data.endpoint import RateLimiter
from data.self_instruct import main, progress_path
from tests.helpers import SHARED_DATA, require_shared

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
pytest.importorskip("openai")

BELLE = SHARED_DATA / "sft" / "belle_zh_seed_tasks.jsonl"
ALPACA = SHARED_DATA / "sft" / "alpaca_zh_demo.json"
KEY = "sk-test-7f3a9c1e5b"  # what the endpoint expects; must never reach a file or a log
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ZHLLAMA_TEST_KEY": KEY}


@pytest.fixture(scope="module")
def real() -> tuple[list[str], list[dict]]:
    """BELLE's seed instructions and LLaMA-Factory's 1,000 Alpaca records."""
    require_shared(BELLE, ALPACA)
    seeds = [json.loads(line)["instruction"] for line in BELLE.read_text(encoding="utf-8").splitlines()]
    return seeds, json.loads(ALPACA.read_text(encoding="utf-8"))


def scorer():
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer())


def test_rouge_l_is_rouge_score_on_real_instructions(real):
    seeds, records = real
    texts = seeds + [r["instruction"] for r in records]
    rng = random.Random(0)
    ref = scorer()
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(1500)]
    for _ in range(1500):  # near-duplicates, where the threshold is decided
        a = rng.choice(texts)
        cut = rng.randrange(len(a) + 1)
        b = a[:cut] + rng.choice(["", "请", "一下", "，并解释原因"]) + a[cut + rng.randrange(3):]
        pairs.append((a, b))
    for a, b in pairs:
        assert rouge_l(rouge_tokens(a), rouge_tokens(b)) == ref.score(a, b)["rougeL"].fmeasure, (a, b)
    index = RougeIndex()
    for t in texts[:300]:
        index.add(rouge_tokens(t))
    for a, _ in pairs[1500:1600]:
        best = max(ref.score(t, a)["rougeL"].fmeasure for t in texts[:300])
        assert index.highest(rouge_tokens(a))[0] == best
    # characters for Chinese: rouge-score's own tokenizer finds nothing in it
    assert rouge_scorer.RougeScorer(["rougeL"]).score(seeds[0], seeds[0])["rougeL"].fmeasure == 0
    assert rouge_tokens("用Python算２０２３年的GDP！") == ["用", "python", "算", "2023", "年", "的", "gdp"]


def test_seed_formats(real, tmp_path):
    belle = read_seed_tasks(BELLE)
    # SOURCES.md: 175 tasks, each with one instance, 126 of them with an input
    assert len(belle) == 175 and sum(bool(t.input) for t in belle) == 126
    first = json.loads(BELLE.read_text(encoding="utf-8").splitlines()[0])
    assert (belle[0].instruction, belle[0].input, belle[0].output) == (
        first["instruction"], first["instances"][0]["input"], first["instances"][0]["output"])
    alpaca = read_seed_tasks(ALPACA)  # Alpaca records serve as seeds too
    assert len(alpaca) == 1000 and sum(bool(t.input) for t in alpaca) == 139


REPLY = """好的，下面是新的任务：

###
4. 指令：把下面的句子翻译成英文。
4. 输入：今天天气很好。
4. 输出：The weather is nice today.
###
5、指令: 计算 12 乘以 3 等于多少？
5、输入:
<无输入>
5、输出:
36
### 6
**指令：** 写一首关于秋天的短诗
**输入：** 无
**输出：** 秋风起，落叶黄。
（7）指令：。请解释光合作用
（7）输出：植物利用光能把二氧化碳和水变成有机物。
8) 输入：一段没有指令的输入
第9条 指令：看这张图片并描述它
第9条 输出：无法
１０. Instruction：Explain recursion to a child in simple words.
１０. Output：A function that calls itself.
11. 指令：列出三种常见的水果
11. 输出：
1. 苹果
2. 香蕉
12. 指令：写一段关于大海的描写
12. 输出：大海"""


def test_parse_reply_variants():
    items, rejected = parse_reply(REPLY, truncated=True)
    results = [check_task(i, "zh") for i in items]
    kept = [(t.instruction, t.input, t.output) for t in results if not isinstance(t, str)]
    assert kept == [("把下面的句子翻译成英文。", "今天天气很好。", "The weather is nice today."),
                    ("计算 12 乘以 3 等于多少？", "", "36"),
                    ("写一首关于秋天的短诗", "", "秋风起，落叶黄。"),
                    ("列出三种常见的水果", "", "1. 苹果\n2. 香蕉")]
    reasons = [t for t in results if isinstance(t, str)]
    assert reasons == ["starts_with_punctuation", "forbidden_keyword", "wrong_language"]
    assert rejected == {"missing_instruction": 1, "truncated": 1}
    assert parse_reply("抱歉，我无法完成这个请求。", False) == ([], {})
    as_json = '```json\n[{"instruction": "写一首五言绝句", "input": "", "output": "春眠不觉晓"}]\n```'
    assert parse_reply(as_json, False)[0] == [{"instruction": "写一首五言绝句", "input": "", "output": "春眠不觉晓"}]
    assert check_task({"instruction": "写一首诗吧", "output": ""}, "zh") == "missing_output"
    assert check_task({"instruction": "写诗", "output": "x"}, "zh") == "too_short"
    assert check_task({"instruction": "《红楼梦》的作者是谁？", "output": "曹雪芹"}, "zh").output == "曹雪芹"


def test_rate_limiter_spaces_requests():
    now, slept = [100.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # 2 a second
    for _ in range(4):
        limiter.wait()
    assert slept == [0.5, 0.5, 0.5]
    now[0] += 10  # idle time is not saved up for a burst
    limiter.wait()
    limiter.wait()
    assert slept[3:] == [0.5]


# --------------------------------------------------------------------------------------
# a scripted endpoint

def style(n: int, task: dict, which: int) -> str:
    """Task number n written the way replies write tasks (five ways)."""
    i, x, o = task["instruction"], task["input"], task["output"]
    return [f"###\n{n}. 指令：{i}\n{n}. 输入：{x or '<无输入>'}\n{n}. 输出：{o}",
            f"{n}、指令: {i}\n{n}、输入:\n{x or '无'}\n{n}、输出:\n{o}",
            f"### {n}\n**指令：** {i}\n**输入：** {x or '无'}\n**输出：** {o}",
            f"（{n}）Instruction：{i}\n（{n}）Input：{x or '<noinput>'}\n（{n}）Output：{o}",
            f"###\n{n}. 指令：{i}\n{n}. 输出：{o}" if not x else
            f"###\n{n}. 指令：{i}\n{n}. 输入：{x}\n{n}. 输出：{o}"][which % 5]


class Scripted(ThreadingHTTPServer):
    """A chat-completions endpoint on loopback: its first answers are failures of every
    kind, then task lists built from real instructions, in untidy formats and with planted
    rejects (a seed repeated, a near-duplicate, a picture task, a leading punctuation mark,
    no output, a truncated last task)."""

    daemon_threads = True
    FAILURES = [("status", 429), ("status", 500), ("sleep", 2.0), ("raw", b"<html>oops</html>"),
                ("reply", ""), ("reply", "抱歉，我不能完成这个请求。")]

    def __init__(self, pool: list[dict], seeds: list[str], delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.pool, self.seeds, self.delay = pool, seeds, delay
        self.count, self.good, self.auth, self.lock = 0, 0, [], threading.Lock()
        self.planted = {"duplicates": 0, "forbidden_keyword": 0, "starts_with_punctuation": 0,
                        "missing_output": 0, "truncated": 0}
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_step(self) -> tuple:
        with self.lock:
            n, self.count = self.count, self.count + 1
            if n < len(self.FAILURES):
                return self.FAILURES[n]
            k, self.good = self.good, self.good + 1
        fresh = self.pool[4 * k: 4 * k + 4]
        parts = [style(4 + j, t, k + j) for j, t in enumerate(fresh)]
        near = dict(fresh[0], instruction=fresh[0]["instruction"].rstrip("。？?") + "吧")
        planted = [dict(fresh[1], instruction=self.seeds[k % len(self.seeds)]), near,
                   {"instruction": "请描述这张图片里的内容", "input": "", "output": "一只猫。"},
                   {"instruction": "。。写一首关于春天的诗", "input": "", "output": "春来了。"},
                   {"instruction": "给这篇文章起一个标题", "input": "一篇文章", "output": ""}]
        parts += [style(8 + j, t, j) for j, t in enumerate(planted)]
        truncated = k % 2 == 1
        if truncated:
            parts.append("###\n13. 指令：写一段关于大海的描写\n13. 输出：大海")
        with self.lock:
            for key in ("duplicates", "forbidden_keyword", "starts_with_punctuation", "missing_output"):
                self.planted[key] += 1
            self.planted["duplicates"] += 1  # the seed and the near-duplicate
            self.planted["truncated"] += truncated
        return ("reply", "好的，以下是新任务：\n\n" + "\n".join(parts), "length" if truncated else "stop")


class ScriptedHandler(BaseHTTPRequestHandler):
    server: Scripted

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.auth.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": {"message": "Incorrect API key provided",
                                              "type": "invalid_request_error"}})
        step = self.server.next_step()
        if step[0] == "status":
            return self._send(step[1], {"error": {"message": "slow down", "type": "x"}},
                              {"Retry-After": "0"})
        if step[0] == "sleep":  # past the client's timeout: it gives up and retries
            time.sleep(step[1])
            return
        if step[0] == "raw":
            return self._send(200, step[1])
        time.sleep(self.server.delay)
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": step[1]},
                                      "finish_reason": step[2] if len(step) > 2 else "stop"}]})

    def _send(self, status: int, body, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away (its timeout)
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def endpoint(real):
    seeds, records = real
    # single-line records: their fields can be expected back verbatim from any layout
    pool = [r for r in records if "\n" not in r["output"] + r["instruction"] + r["input"]
            and len(r["output"]) < 200]
    random.Random(1).shuffle(pool)
    server = Scripted(pool, seeds)
    yield server
    server.shutdown()
    server.server_close()


def generator_cmd(url: str, out: Path, num: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data.self_instruct", "--endpoint", url, "--model", "m",
            "--seed_tasks", str(BELLE), "--num", str(num), "--output", str(out), "--batch", "8",
            "--api_key_env", "ZHLLAMA_TEST_KEY", "--timeout", "1", "--backoff", "0.01",
            "--no_progress", *extra]


def check_alpaca(out: Path, seeds: list[str], pool: list[dict], threshold: float = 0.7) -> list[dict]:
    """The output is an Alpaca list of pool tasks, with no pair at or above the threshold."""
    tasks = json.loads(out.read_text(encoding="utf-8"))
    assert isinstance(tasks, list)
    by_instruction = {r["instruction"]: r for r in pool}
    for t in tasks:
        assert set(t) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in t.values())
        source = by_instruction.get(t["instruction"])
        if source is not None:  # parsed back exactly, from whichever layout it came in
            assert t == {k: source[k] for k in ("instruction", "input", "output")}, t
    ref, instructions = scorer(), [t["instruction"] for t in tasks]
    for i, a in enumerate(instructions):
        for b in instructions[:i] + seeds:
            assert ref.score(a, b)["rougeL"].fmeasure < threshold, (a, b)
    return tasks


def no_key_anywhere(root: Path, *texts: str) -> None:
    for text in texts:
        assert KEY not in text
    for p in root.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p


def test_end_to_end_against_a_scripted_endpoint(endpoint, real, tmp_path, shared_data):
    seeds, _ = real
    out = tmp_path / "data" / "tasks.json"
    r = subprocess.run(generator_cmd(endpoint.url, out, 20), capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    tasks = check_alpaca(out, seeds, endpoint.pool)
    assert len(tasks) == 20
    assert set(endpoint.auth) == {f"Bearer {KEY}"}  # the key was sent, and only there
    no_key_anywhere(tmp_path, r.stdout, r.stderr)
    lines = [json.loads(line) for line in progress_path(out).read_text(encoding="utf-8").splitlines()]
    records = lines[1:]
    failed = [x.get("failed") for x in records if x.get("failed")]
    # 429, 500 and the timeout were retried; the malformed, the empty and the apology counted
    assert sum(x["retries"] for x in records) == 3
    assert sorted(failed) == ["empty_reply", "malformed_response", "no_tasks"]
    rejected: dict[str, int] = {}
    for x in records:
        for k, v in x["rejected"].items():
            rejected[k] = rejected.get(k, 0) + v
    planted = endpoint.planted
    for reason in ("forbidden_keyword", "starts_with_punctuation", "missing_output", "truncated"):
        assert rejected.get(reason, 0) >= planted[reason] > 0, (reason, rejected, planted)
    assert sum(x["duplicates"] for x in records) >= planted["duplicates"] // 2
    print("\n".join(r.stdout.splitlines()))  # the summary, for the README (pytest -s)
    assert "tasks kept" in r.stdout and "truncated" in r.stdout

    # the output feeds data.prepare --sft as it is
    prepared = tmp_path / "sft"
    p = subprocess.run([sys.executable, "-m", "data.prepare", "--sft", "--tokenizer",
                        str(shared_data / "tokenizers" / "chinese_sp.model"), "--input", str(out),
                        "--output_dir", str(prepared), "--num_workers", "1"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads((prepared / "meta.json").read_text())["num_documents"] == 20


def test_killed_and_resumed_without_duplicates(real, tmp_path):
    seeds, records = real
    pool = [r for r in records if "\n" not in r["output"] + r["instruction"] + r["input"]]
    random.Random(2).shuffle(pool)
    server = Scripted(pool, seeds, delay=0.3)
    server.FAILURES = []  # instance attribute: only good replies here
    out = tmp_path / "tasks.json"
    log = progress_path(out)
    try:
        proc = subprocess.Popen(generator_cmd(server.url, out, 24), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=ENV)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log.exists() and len(log.read_text(encoding="utf-8").splitlines()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        before = [t for line in log.read_text(encoding="utf-8").splitlines()[1:]
                  for t in json.loads(line)["kept"]]
        assert 0 < len(before) < 24 and not out.exists()
        with open(log, "a", encoding="utf-8") as f:  # what a kill in the middle of a write leaves
            f.write('{"request": 7, "kept": [{"instruction": "半')
        with server.lock:  # the endpoint now repeats its earlier answers: all duplicates
            server.good = 0
        r = subprocess.run(generator_cmd(server.url, out, 24), capture_output=True, text=True,
                           env=ENV, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stderr
    assert "torn last line" in r.stderr
    tasks = check_alpaca(out, seeds, pool)
    assert len(tasks) == 24 and tasks[:len(before)] == before
    assert len({t["instruction"] for t in tasks}) == 24
    no_key_anywhere(tmp_path, r.stdout, r.stderr)
    # --finalize writes the same list again from the progress file alone
    out.unlink()
    assert subprocess.run([sys.executable, "-m", "data.self_instruct", "--output", str(out),
                           "--finalize"], capture_output=True, env=ENV).returncode == 0
    assert json.loads(out.read_text(encoding="utf-8")) == tasks


def run_main(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_refusals_are_one_error_line(endpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZHLLAMA_TEST_KEY", "sk-wrong-key-123")
    out = tmp_path / "tasks.json"
    line = run_main(generator_cmd(endpoint.url, out, 5)[3:], capsys)
    assert "refused the request (401)" in line and "ZHLLAMA_TEST_KEY" in line
    assert "sk-wrong-key-123" not in line
    assert list(tmp_path.iterdir()) == []  # no output, no progress file
    line = run_main(generator_cmd("http://127.0.0.1:9/v1", out, 5, "--retries", "1")[3:], capsys)
    assert "no answer after 1 retries (APIConnectionError" in line and list(tmp_path.iterdir()) == []
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "写诗", "instances": [{"input": ""}]}\n', encoding="utf-8")
    line = run_main(["--endpoint", endpoint.url, "--model", "m", "--seed_tasks", str(bad),
                     "--num", "5", "--output", str(tmp_path / "b.json")], capsys)
    assert line == f"error: {bad}:1: instances[0].output: missing"
    taken = tmp_path / "taken.json"
    taken.write_text("[]")
    line = run_main(["--endpoint", endpoint.url, "--model", "m", "--seed_tasks", str(BELLE),
                     "--num", "5", "--output", str(taken)], capsys)
    assert "already exists" in line and taken.read_text() == "[]"
    line = run_main(["--output", str(tmp_path / "none.json"), "--finalize"], capsys)
    assert "nothing to finalize" in line
