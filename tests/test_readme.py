"""README.zh.md keeps in step with README.md: the same commands, real ones, the same figures.

Both files are read as Markdown. A *command line* is a line of a fenced code block that
starts with `zhllama `, `python `, `python -m`, `torchrun `, `make ` or `pip ` once a
leading `$ ` (a prompt) and `VAR=value ` assignments are set aside; a `\\` continuation is
joined to it, the comment after ` #` left out (the Chinese README comments in Chinese),
and runs of spaces collapsed. A *subcommand* is the word after `zhllama ` in a fenced
block (comments included) or in inline code. The English README is the source of truth:
the Chinese one shows exactly its command lines and subcommands, each subcommand is one
that `zhllama --help` lists (train/cli.py COMMANDS), and each figure the Chinese README
quotes (a number with a decimal point or thousands separator) is one the English states.
Every failure names the file and line of what is missing and where it should go.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO
from train.cli import COMMANDS

EN, ZH = REPO / "README.md", REPO / "README.zh.md"
COMMAND_START = ("zhllama ", "python ", "python -m", "torchrun ", "make ", "pip ")
_ASSIGNMENTS = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+")
_COMMENT = re.compile(r"(?:^|\s)#.*$")
_SUBCOMMAND = re.compile(r"\bzhllama\s+([a-z][a-z0-9-]*)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE = re.compile(r"`([^`]+)`")
# A figure: digits with a decimal point or thousands separators (16.891, 49,953, 0.513).
_FIGURE = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)+")


@dataclass(frozen=True)
class Readme:
    """What one README shows: command lines, subcommands and figures, each with the line
    (1-based) where it first appears."""

    path: Path
    commands: dict[str, int]
    subcommands: dict[str, int]
    figures: dict[str, int]

    def where(self, line: int) -> str:
        return f"{self.path.name}:{line}"


def command_of(line: str) -> str | None:
    """The command a fenced line runs, normalised; None when it runs none of ours."""
    text = line.strip().removeprefix("$ ")
    text = _COMMENT.sub("", text).strip()
    if not _ASSIGNMENTS.sub("", text).startswith(COMMAND_START):
        return None
    return " ".join(text.split())


def read_readme(path: Path) -> Readme:
    """Parse one README (see the module's docstring for what counts)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    commands: dict[str, int] = {}
    subcommands: dict[str, int] = {}
    figures: dict[str, int] = {}
    prose: list[tuple[int, str]] = []  # (line number, text) outside fenced blocks
    fenced, i = False, 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        i += 1
        if _FENCE.match(line):
            fenced = not fenced
            continue
        for m in _FIGURE.finditer(line):
            figures.setdefault(m.group(), number)
        if not fenced:
            prose.append((number, line))
            continue
        while line.rstrip().endswith("\\") and i < len(lines):  # a continued command
            line = line.rstrip()[:-1] + " " + lines[i]
            i += 1
        for m in _SUBCOMMAND.finditer(line):  # comments too: they name commands as well
            subcommands.setdefault(m.group(1), number)
        if (command := command_of(line)) is not None:
            commands.setdefault(command, number)
    if fenced:
        raise AssertionError(f"{path.name}: a fenced code block is never closed")
    # Inline code may wrap onto the next line, never past a paragraph: pair backticks
    # within each paragraph so one stray backtick cannot shift the rest of the file.
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        text = "\n".join(t for _, t in paragraph)
        starts = [n for n, t in paragraph for _ in range(len(t) + 1)]  # line of each offset
        for m in _INLINE.finditer(text):
            for sub in _SUBCOMMAND.finditer(m.group(1)):
                line = starts[m.start()]
                subcommands[sub.group(1)] = min(line, subcommands.get(sub.group(1), line))
        paragraph = []
    return Readme(path, commands, subcommands, figures)


@pytest.fixture(scope="module")
def readmes() -> tuple[Readme, Readme]:
    assert ZH.is_file(), "README.zh.md is missing"
    return read_readme(EN), read_readme(ZH)


def test_the_english_readme_links_the_chinese_one_and_back():
    en = EN.read_text(encoding="utf-8").splitlines()
    zh = ZH.read_text(encoding="utf-8").splitlines()
    assert any("README.zh.md" in line for line in en[:5]), \
        "README.md: no link to README.zh.md in its first lines (under the title)"
    assert any("English" in line and "README.md" in line for line in zh[:5]), \
        "README.zh.md: no 'English: README.md' link in its first lines"


def test_the_parser_finds_the_readmes_commands(readmes):
    """The extraction itself, on what README.md is known to hold, so that an empty parse
    cannot pass the comparisons below."""
    en, _ = readmes
    assert {"make demo", "make test"} <= en.commands.keys()
    assert {"train-tokenizer", "merge-tokenizer", "resize", "prepare", "pretrain", "sft",
            "merge-lora", "convert", "generate", "evaluate", "serve"} <= en.subcommands.keys()
    continued = [c for c in en.commands if c.startswith("zhllama merge-tokenizer ")]
    assert continued and "--output_dir" in continued[0], "a \\ continuation was not joined"


def test_both_readmes_show_the_same_command_lines(readmes):
    en, zh = readmes
    problems = [f"{zh.where(line)}: `{c}` is not a command of README.md (take it from there, "
                "or add it there first)" for c, line in zh.commands.items() if c not in en.commands]
    problems += [f"{en.where(line)}: `{c}` is missing from README.zh.md (add it to a fenced "
                 "block there, with a Chinese comment if any)"
                 for c, line in en.commands.items() if c not in zh.commands]
    assert not problems, "\n".join(problems)


def test_both_readmes_name_the_same_subcommands(readmes):
    en, zh = readmes
    problems = [f"{en.where(line)}: `zhllama {s}` is never mentioned in README.zh.md"
                for s, line in en.subcommands.items() if s not in zh.subcommands]
    problems += [f"{zh.where(line)}: `zhllama {s}` is never mentioned in README.md"
                 for s, line in zh.subcommands.items() if s not in en.subcommands]
    assert not problems, "\n".join(problems)


def test_every_subcommand_named_is_a_real_command(readmes):
    real = {c.name for c in COMMANDS}
    problems = [f"{r.where(line)}: `zhllama {s}` is not a command (train/cli.py COMMANDS: "
                f"{', '.join(sorted(real))})"
                for r in readmes for s, line in r.subcommands.items() if s not in real]
    assert not problems, "\n".join(problems)


def test_every_script_and_config_a_command_runs_exists(readmes):
    """A path a command line runs (`*.py`, `configs/*.yaml`) is in the repository."""
    problems = [f"{r.where(line)}: `{c}` runs {word}, which is not in the repository"
                for r in readmes for c, line in r.commands.items() for word in c.split()
                if (word.endswith(".py") or word.startswith("configs/")) and not (REPO / word).is_file()]
    assert not problems, "\n".join(problems)


def test_every_figure_of_the_chinese_readme_is_the_english_ones(readmes):
    """Figures are measured once, in README.md; a quoted one must still be there."""
    en, zh = readmes
    problems = [f"{zh.where(line)}: {f} is not a figure of README.md (copy it again from there)"
                for f, line in zh.figures.items() if f not in en.figures]
    assert not problems, "\n".join(problems)
