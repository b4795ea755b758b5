"""`zhllama`: every command of the recipe under one name.

    zhllama COMMAND [ARGS ..]            zhllama COMMAND --help
    zhllama pretrain CONFIG [--key=value ..]                         # one process
    zhllama pretrain CONFIG --nproc_per_node 8 [--key=value ..]      # torchrun's options: N

Each command is the `main(argv)` of one module — what `python -m module` runs — given the
rest of the command line, and named `zhllama COMMAND` in its usage and help. A console
script finds our packages where they are installed; `python -m data.prepare` puts the
working directory first on sys.path, so there a folder such as data/ or data/sft/ stands
in for ours.

`pretrain` and `sft` train in this process; given any of torchrun's options
(--nproc_per_node, --nnodes, --node_rank, --rdzv_endpoint, --standalone, …) they run the
installed train/pretrain.py or train/sft.py on that many processes through train.launch
(torchrun in this process, zhllama's one-line endings).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from tokenizer.cli import ArgumentParser, program_name

# torchrun options that change what is launched rather than how: not ours to pass on,
# since the launched script is always the installed one.
_NOT_LAUNCH_OPTIONS = {"help", "module", "no_python", "run_path"}


@dataclass(frozen=True)
class Command:
    """One subcommand: the module whose `main(argv)` runs it, and its line in --help."""

    name: str
    module: str
    summary: str
    script: str | None = None  # a training script, launched by torchrun on request


# In the order of the recipe (README), so `zhllama --help` reads as its table of contents.
COMMANDS = (
    Command("train-tokenizer", "tokenizer.train", "train the Chinese sentencepiece model"),
    Command("merge-tokenizer", "tokenizer.merge",
            "merge it into LLaMA's tokenizer, as Chinese-LLaMA did (+ Hugging Face files)"),
    Command("tokenizer-report", "tokenizer.report",
            "compare tokenizers on a corpus: tokens, byte fallback, speed"),
    Command("convert", "model.convert",
            "convert a checkpoint: Meta .pth, Hugging Face, llama2.c, zhllama, GGUF"),
    Command("resize", "model.resize", "grow the embeddings to a merged tokenizer"),
    Command("self-instruct", "data.self_instruct",
            "make instruction data by asking a model (any OpenAI-compatible endpoint)"),
    Command("prepare", "data.prepare",
            "tokenize text, or instruction data (--sft), into token shards"),
    Command("plan", "train.plan",
            "will it fit? a config's memory per GPU, and the change that makes it fit"),
    Command("pretrain", "train.pretrain",
            "continued pretraining (stages 1 and 2): CONFIG [--key=value ..] [torchrun options]",
            script="pretrain.py"),
    Command("sft", "train.sft",
            "instruction tuning: CONFIG [--key=value ..] [torchrun options]", script="sft.py"),
    Command("evaluate", "train.evaluate",
            "loss, perplexity, accuracy and bits per character/byte on text or instruction data"),
    Command("launch", "train.launch", "torchrun in this process, with zhllama's endings"),
    Command("plot", "train.plot", "loss curves of runs in one picture (metrics.jsonl -> PNG)"),
    Command("merge-lora", "model.merge_lora",
            "merge LoRA adapters (ours or PEFT's) into a base; export zhllama, HF, .pth, GGUF"),
    Command("adapters", "model.adapters", "write our adapters in PEFT's layout"),
    Command("generate", "model.generate",
            "generate text (KV cache, templates, LoRAs applied live, interactive)"),
    Command("serve", "model.serve",
            "serve a model over OpenAI's API (chat, completions, streaming, batching)"),
    Command("demo", "train.recipe", "the whole recipe at toy scale, on the embedded corpus"),
)

LAUNCH_HELP = ("launching: torchrun's options (--nproc_per_node N, --nnodes, --node_rank, "
               "--rdzv_endpoint, --standalone, …; see zhllama launch --help) run it on N "
               "processes per node")


def command_line(*args: str) -> list[str]:
    """The argv that runs `zhllama ARGS` in a new process.

    The console script installed beside this Python when there is one (no folder of the
    working directory can shadow it), else `python -m train.cli`.
    """
    bindir = Path(sys.executable).parent
    for name in ("zhllama", "zhllama.exe"):
        if (bindir / name).is_file():
            return [str(bindir / name), *args]
    return [sys.executable, "-m", "train.cli", *args]


def build_parser() -> argparse.ArgumentParser:
    width = max(len(c.name) for c in COMMANDS)
    listing = "\n".join(f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS)
    p = ArgumentParser(prog="zhllama", description="Every command of the Chinese-LLaMA recipe.",
                       epilog=f"commands:\n{listing}\n\n`python -m MODULE` runs each of "
                              "them too (e.g. python -m data.prepare).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", metavar="COMMAND", help="one of the commands below")
    p.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER,
                   help="the command's own (zhllama COMMAND --help)")
    return p


def find_command(name: str, parser: argparse.ArgumentParser) -> Command:
    """The command called `name`, or a usage error (one line, exit status 2)."""
    for command in COMMANDS:
        if command.name == name:
            return command
    parser.error(f"unknown command {name!r} (choose from {', '.join(c.name for c in COMMANDS)})")
    raise AssertionError("unreachable")  # parser.error exits


def split_launch_options(args: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's options among `args` (each with its value), and the rest, in order.

    The options are read from torchrun's own parser, so every one it has is recognised.
    A training script's overrides are always `--section.key=value`, which none of
    torchrun's options look like.
    """
    from torch.distributed.run import get_args_parser

    takes_value = {option: action.nargs != 0
                   for action in get_args_parser()._actions if action.dest not in _NOT_LAUNCH_OPTIONS
                   for option in action.option_strings if option.startswith("--")}
    launch: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name in takes_value:
            with_value = takes_value[name] and "=" not in args[i] and i + 1 < len(args)
            launch += args[i : i + 1 + with_value]
            i += 1 + with_value
        else:
            rest.append(args[i])
            i += 1
    return launch, rest


def run_training(command: Command, args: list[str]) -> None:
    """`zhllama pretrain|sft CONFIG ..`: here on one process, or launched by torchrun."""
    launch, rest = split_launch_options(args)
    if launch:
        from train import launch as launcher

        # the installed script, by path: torchrun's workers run it as a file
        script = Path(__file__).resolve().parent / str(command.script)
        launcher.main([*launch, str(script), *rest])
        return
    try:
        importlib.import_module(command.module).main(rest)
    except SystemExit as e:
        if e.code in (0, None) and {"-h", "--help"} & set(rest):
            print(f"\n{LAUNCH_HELP}")
        raise


def main(argv: list[str] | None = None) -> None:
    """Run `zhllama COMMAND ARGS ..` (the console script's entry point)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.error("the following arguments are required: COMMAND")
    if argv[0] in ("-h", "--help"):
        parser.parse_args(argv[:1])  # prints the help and exits
    if argv[0].startswith("-"):
        parser.error(f"unrecognized option {argv[0]} (the command comes first)")
    command = find_command(argv[0], parser)
    with program_name(f"zhllama {command.name}"):
        if command.script is not None:
            run_training(command, argv[1:])
        else:
            importlib.import_module(command.module).main(argv[1:])


if __name__ == "__main__":
    main()
