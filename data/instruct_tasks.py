"""Self-instruct's tasks: the seed tasks, the prompt that asks for new ones, the parser of
the replies and the filters a new task must pass.

A prompt shows `examples` seed tasks as a numbered list ("###", then "1. 指令：…",
"1. 输入：…", "1. 输出：…") and asks for the next `batch`. Replies are rarely that tidy,
so the parser takes numbering as "3.", "3、", "3)", "(3)", "第3条", "**3.**" or none,
labels in Chinese or English with half- or full-width colons, bold or not, fields on the
label's line or the lines below, items separated by "###" or not at all, and, failing
that, tasks written as JSON objects. Each task it cannot use is counted under a reason:
the last one of a reply cut short by the length limit (`truncated`), no output, an
instruction too short or too long, one asking for what a text model cannot do
(pictures, files, audio …: `forbidden_keyword`), one starting with punctuation, or one
not in the language asked for. The near-duplicate filter (ROUGE-L) is the caller's.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizer.schema import Field, check_fields

from .sft import raw_records
from .shards import DataError


@dataclass(frozen=True)
class Task:
    """One instruction-following example, as Alpaca's records hold it."""

    instruction: str
    input: str
    output: str

    def record(self) -> dict[str, str]:
        return asdict(self)


_ALPACA_SEED = {"instruction": Field("string"), "input": Field("string", required=False),
                "output": Field("string")}
# Stanford Alpaca's seed_tasks.jsonl, which BELLE's zh_seed_tasks.json follows
_SELF_INSTRUCT_SEED = {"instruction": Field("string"), "instances": Field("list", items=Field(
    "object", fields={"input": Field("string", required=False), "output": Field("string")}))}


def read_seed_tasks(path: Path) -> list[Task]:
    """The seed tasks of a JSON Lines file or JSON list: self-instruct's records
    ({"instruction", "instances": [{"input", "output"}], …}; the first instance is
    taken) or Alpaca's ({"instruction", "input", "output"}).

    Raises:
        DataError: naming the file, the record and the key that does not fit.
    """
    tasks = []
    for where, raw in raw_records(path):
        if isinstance(raw, dict) and "instances" in raw:
            rec = check_fields(raw, _SELF_INSTRUCT_SEED, where, DataError)
            if not rec["instances"]:
                raise DataError(f"{where}: instances: expected at least one instance")
            first = rec["instances"][0]
            task = Task(rec["instruction"].strip(), first.get("input", "").strip(),
                        first["output"].strip())
        else:
            rec = check_fields(raw, _ALPACA_SEED, where, DataError)
            task = Task(rec["instruction"].strip(), rec.get("input", "").strip(),
                        rec["output"].strip())
        if not task.instruction or not task.output:
            raise DataError(f"{where}: an empty {'instruction' if not task.instruction else 'output'}")
        tasks.append(task)
    if not tasks:
        raise DataError(f"{path}: no seed tasks in it")
    return tasks


# --------------------------------------------------------------------------------------
# the prompt

@dataclass(frozen=True)
class Language:
    """What the prompt and the parser say in one language."""

    labels: tuple[str, str, str]  # instruction, input, output
    no_input: str
    request: str  # with {batch}, {examples}, {first}, {last}


_ZH_REQUEST = """请想出{batch}个各不相同的任务，每个任务包括一条指令、指令的输入，以及对它的回答（输出）。这些任务将用来教一个中文语言模型听从指令。

要求：
1. 指令用中文书写，一到两句话，可以是祈使句，也可以是问句。
2. 尽量不要重复使用同一个动词；指令的措辞和任务类型都要多样，例如开放式写作、分类、改写、摘要、问答、推理、数学、编程等。
3. 模型只能读写文字：不要让它看图片、听声音、打开文件、上网，或在现实中做事。
4. 不是每条指令都需要输入。需要时，输入应具体、真实，不超过一百字；不需要时，输入写“{no_input}”。
5. 输出是对指令和输入的恰当回答，不超过一百字。

格式如下面的{examples}个例子：每个任务以“###”开头，再写编号和指令、输入、输出。

{listing}

请用同样的格式写出第{first}到第{last}个任务。"""

_EN_REQUEST = """Come up with {batch} diverse tasks, each an instruction, an input for it and a good answer (the output). They will teach a language model to follow instructions.

Requirements:
1. Each instruction is one or two sentences in English, an imperative or a question.
2. Try not to repeat a verb; vary the wording and the kind of task: open-ended writing, classification, rewriting, summarising, question answering, reasoning, maths, coding.
3. The model only reads and writes text: never ask it to look at pictures, listen to audio, open files, browse the web or act in the world.
4. Not every instruction needs an input. When one does, make it concrete and realistic, at most 100 words; when not, write "{no_input}" as the input.
5. The output answers the instruction and input well, in at most 100 words.

The format is that of the {examples} examples below: each task starts with "###", then its number and its instruction, input and output.

{listing}

Write tasks {first} to {last} in the same format."""

LANGUAGES = {
    "zh": Language(("指令", "输入", "输出"), "<无输入>", _ZH_REQUEST),
    "en": Language(("Instruction", "Input", "Output"), "<noinput>", _EN_REQUEST),
}


def format_task(number: int, task: Task, language: str) -> str:
    lang = LANGUAGES[language]
    sep = "：" if language == "zh" else ": "
    fields = (task.instruction, task.input or lang.no_input, task.output)
    return "###\n" + "\n".join(f"{number}. {label}{sep}{value}"
                               for label, value in zip(lang.labels, fields))


def build_prompt(examples: Sequence[Task], batch: int, language: str) -> str:
    """The request for `batch` new tasks after the numbered `examples`."""
    listing = "\n".join(format_task(i, t, language) for i, t in enumerate(examples, 1))
    k = len(examples)
    return LANGUAGES[language].request.format(batch=batch, examples=k, listing=listing,
                                              first=k + 1, last=k + batch,
                                              no_input=LANGUAGES[language].no_input)


# --------------------------------------------------------------------------------------
# the replies

_FIELD_NAMES = {"指令": "instruction", "instruction": "instruction", "任务": "instruction",
                "输入": "input", "input": "input",
                "输出": "output", "output": "output", "回答": "output", "答案": "output"}
_NUMBER = r"(?:第\s*)?[(（\[【]?\s*(?P<number>\d+)\s*[)）\]】]?\s*(?:条|个|项)?\s*[.．、:：)）\-]?"
# a field's first line: markdown marks, an optional number, a label, a colon, the value
_LABEL = re.compile(r"^[\s#>*_\-]*(?:" + _NUMBER + r")?[\s*_]*(?P<label>"
                    + "|".join(_FIELD_NAMES) + r")[\s*_]*[:：][\s*_]*(?P<rest>.*)$", re.I)
# a line that is only a separator ("###", "### 4", "---"): it ends the task before it (a
# bare number does not: it may be an output's line, the answer to a sum)
_SEPARATOR = re.compile(r"^\s*(?:#+|-{3,}|\*{3,}|={3,})\s*(?:" + _NUMBER + r")?[\s*#]*$")
NO_INPUT = {"", "<无输入>", "<noinput>", "无输入", "无", "<无>", "（无）", "(无)", "空", "n/a",
            "none", "<none>", "no input", "<no input>", "-", "无需输入", "不需要输入"}


def parse_reply(text: str, truncated: bool) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The tasks a reply holds (dicts of whichever fields they have) and the count of
    pieces that are no task, by reason: the last one when the reply was `truncated`
    (cut by the length limit), and fields that come before any instruction."""
    items = _labelled_items(text)
    if not items:
        items = _json_items(text)
    rejected: dict[str, int] = {}
    tasks = []
    for item in items:
        item.pop("_number", None)
        if item.pop("_orphan", False):
            rejected["missing_instruction"] = rejected.get("missing_instruction", 0) + 1
        else:
            tasks.append(item)
    if truncated and tasks:
        tasks.pop()
        rejected["truncated"] = rejected.get("truncated", 0) + 1
    return tasks, rejected


def _labelled_items(text: str) -> list[dict[str, str]]:
    items: list[dict] = []
    current: dict | None = None
    field_name: str | None = None
    for line in text.replace("\r\n", "\n").split("\n"):
        m = _LABEL.match(line)
        if m:
            name = _FIELD_NAMES[m.group("label").lower()]
            number = None if m.group("number") is None else int(m.group("number"))
            other_number = number is not None and current is not None and \
                current.get("_number", number) != number
            if name == "instruction" or current is None or name in current or other_number:
                # a field before any instruction, or repeated, or of another number: a
                # task without its instruction
                current = {} if name == "instruction" else {"_orphan": "1"}
                if number is not None:
                    current["_number"] = number
                items.append(current)
            current[name] = m.group("rest")
            field_name = name
        elif _SEPARATOR.match(line):
            current, field_name = None, None
        elif current is not None and field_name is not None:
            current[field_name] += "\n" + line
    # bold markers closing a field ("**输出：** …**") are markdown, not text
    return [{k: v if k.startswith("_") else v.strip().strip("*").strip() for k, v in item.items()}
            for item in items]


def _json_items(text: str) -> list[dict[str, str]]:
    """Tasks written as JSON: one object a line, or a list of objects (code fences allowed)."""
    body = re.sub(r"^```\w*\s*$", "", text, flags=re.M).strip()
    candidates: list[object] = []
    try:
        whole = json.loads(body)
        candidates = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        for line in body.split("\n"):
            line = line.strip().rstrip(",")
            if line.startswith("{"):
                try:
                    candidates.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    out = []
    for c in candidates:
        if isinstance(c, dict) and isinstance(c.get("instruction"), str):
            out.append({k: c[k].strip() for k in ("instruction", "input", "output")
                        if isinstance(c.get(k), str)})
    return out


# --------------------------------------------------------------------------------------
# the filters

# what a text-only model cannot do (self-instruct's list, and its Chinese words)
FORBIDDEN = {
    "en": ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
           "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"),
    "zh": ("图片", "图像", "照片", "图表", "画图", "绘制", "画出", "画一", "文件", "附件", "地图",
           "视频", "音频", "音乐", "录音", "流程图", "示意图", "截图", "上网"),
}
MIN_LENGTH, MAX_LENGTH = 4, 150  # instruction length in ROUGE units (characters / words)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def units(text: str) -> int:
    """Length for the filters: each CJK character one, each other word one."""
    return len(_CJK.findall(text)) + len(_CJK.sub(" ", text).split())


def check_task(item: dict[str, str], language: str) -> Task | str:
    """The task an item is, or the reason it is not one."""
    instruction = item.get("instruction", "").strip()
    output = item.get("output", "").strip()
    given_input = item.get("input", "").strip()
    if not output:
        return "missing_output"
    n = units(instruction)
    if n < MIN_LENGTH:
        return "too_short"
    if n > MAX_LENGTH:
        return "too_long"
    if unicodedata.category(instruction[0]) in ("Pc", "Pd", "Pe", "Pf", "Po"):
        return "starts_with_punctuation"  # opening brackets and quotes (《, “, () are fine
    lowered = instruction.lower()
    if language == "en":
        if any(re.search(rf"\b{re.escape(w)}\b", lowered) for w in FORBIDDEN["en"]):
            return "forbidden_keyword"
        if not instruction[0].isascii():
            return "wrong_language"
    else:
        if any(w in lowered for w in FORBIDDEN["zh"]) or any(
                re.search(rf"\b{re.escape(w)}\b", lowered) for w in FORBIDDEN["en"]):
            return "forbidden_keyword"
        if not _CJK.search(instruction):
            return "wrong_language"
    if given_input.lower() in NO_INPUT:
        given_input = ""
    return Task(instruction, given_input, output)
