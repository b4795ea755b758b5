"""Generate text with a KV cache: greedy or sampled, streamed to stdout.

    python -m model.generate MODEL [--lora_model A[,B,..] [--force_base]] --prompt TEXT
        [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P]
        [--repetition_penalty R] [--seed S] [--interactive]
        [--template cla_v1|alpaca|llama2_cla_v2 [--system_prompt TEXT]]

MODEL is a model directory or anything `model.convert` reads. --lora_model applies
adapters (ours or PEFT's) in the order given, as `model.merge_lora` would, but in memory
as the weights are loaded: nothing is written, and the output is that of the merged
model. Temperature 0 is greedy. An empty prompt starts from BOS alone. Generation stops
at EOS. The prompt and its continuation are printed as one text, the decoding of all
their tokens together (so the continuation's first space is kept). With --template, each
prompt is an instruction put into the template the model was tuned with (exactly as
`data.prepare --sft` formatted its training data), and only the response is printed,
decoded as training encoded it: on its own.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenizer.cli import (ArgumentParser, command_errors, non_negative_float, positive_float,
                           positive_int, probability)
from tokenizer.spm_io import load_sp
from tokenizer.templates import TEMPLATES, format_prompt

from .formats import read_checkpoint
from .llama import KVCache, Transformer
from .merge_lora import merge
from .source import Checkpoint, check_tokenizer_rows, load_model
from .tensor_io import FormatError, parse_dtype


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits."""

    temperature: float = 0.8  # 0: greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely (CTRL's rule: divide positive logits, multiply negative)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set the logits of tokens outside the top-k / nucleus to -inf (logits: (vocab,))."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token if the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> int:
    """Choose one token id from the last position's logits (vocab,)."""
    logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    cfg: SamplingConfig = SamplingConfig(),
    *,
    stop_ids: tuple[int, ...] = (),
    allowed_vocab: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; the prompt is run once, then one token per step.

    Args:
        allowed_vocab: ids at or above it are never produced (rows added to pad the
            embedding have no piece in the tokenizer).
    """
    if not prompt:
        raise ValueError("the prompt needs at least one token (BOS)")
    device = model.tok_embeddings.weight.device
    max_len = min(len(prompt) + max_new_tokens, model.args.max_seq_len)
    if len(prompt) >= max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; max_seq_len is {model.args.max_seq_len}")
    cache = KVCache(model.args, 1, max_len, device=device, dtype=model.tok_embeddings.weight.dtype)
    tokens = torch.tensor([prompt], device=device)
    context = list(prompt)
    start_pos = 0  # the position of tokens[0, 0]; the cache holds every one before it
    for _ in range(max_len - len(prompt)):
        logits = model(tokens, start_pos=start_pos, cache=cache)[0, -1]
        if allowed_vocab is not None and allowed_vocab < logits.shape[-1]:
            logits[allowed_vocab:] = float("-inf")
        token = next_token(logits, torch.tensor(context, device=device), cfg, generator)
        if token in stop_ids:
            return
        yield token
        start_pos += tokens.shape[1]
        context.append(token)
        tokens = torch.tensor([[token]], device=device)


class TextStream:
    """The text of a growing sequence of ids, given out piece by piece as it grows.

    All pieces joined are `sp.decode(prefix + ids)`. Decoding the whole sequence each time
    and giving out what is new keeps spaces right: decoded alone, a continuation loses the
    space of its first piece (sentencepiece drops a leading ▁ as the dummy prefix).
    Multi-byte characters split over byte tokens are held back until their last byte has
    come; `flush` gives what is left at the end, as it decodes.
    """

    def __init__(self, sp, prefix: Sequence[int] = ()) -> None:
        self.sp = sp
        self.tokens = list(prefix)
        self.prefix_text = sp.decode(self.tokens) if self.tokens else ""
        self.shown = self.text = self.prefix_text

    def push(self, token: int) -> str | None:
        """The text `token` adds; None while it ends inside a character (nothing shown yet)."""
        self.tokens.append(token)
        self.text = self.sp.decode(self.tokens)
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            return None
        piece, self.shown = self.text[len(self.shown):], self.text
        return piece

    def flush(self) -> str:
        """What is held back when the ids end inside a character, decoded as decoding does."""
        piece, self.shown = self.text[len(self.shown):], self.text
        return piece


def stream_text(sp, ids: Iterator[int], prefix: Sequence[int] = ()) -> Iterator[str]:
    """Turn ids into text pieces as they arrive; all pieces joined are `sp.decode(prefix + ids)`.

    The text of `prefix` (e.g. the prompt's ids) comes first, then what each new id adds
    (see `TextStream`).
    """
    stream = TextStream(sp, prefix)
    if stream.prefix_text:
        yield stream.prefix_text
    for token in ids:
        piece = stream.push(token)
        if piece is not None:
            yield piece
    if rest := stream.flush():  # generation ended inside a character: show it as decoding does
        yield rest


def pick_device(name: str | None) -> torch.device:
    """The device `--device` names (default: cuda if available), checked to be usable here.

    Raises:
        ValueError: not a device name, or a device this machine or torch build lacks.
    """
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps …)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (no GPU visible, or torch "
                             "built without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    try:  # other backends (mps, xpu …) say themselves whether they are there
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device {name}: not usable here ({' '.join(str(e).split())})") from None
    return device


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --lora_model, --force_base, --tokenizer, --device and --dtype: which model a
    command opens and where it runs, the same for generate, evaluate and serve (read with
    `adapter_dirs`, `open_model`, `pick_device` and `model_dtype`)."""
    p.add_argument("model", help="model directory, or any checkpoint model.convert reads")
    p.add_argument("--lora_model", help="adapter directories (ours or PEFT's), comma-separated, "
                   "applied in this order in memory, as model.merge_lora would merge them")
    p.add_argument("--force_base", action="store_true",
                   help="apply adapters even if one recorded another base (other parameters, "
                        "tokenizer or weights); sizes must still fit")
    p.add_argument("--tokenizer", help="sentencepiece model, if not beside the checkpoint "
                   "(overrides the base's and the adapters')")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="default: bfloat16 on GPU, float32 on CPU")


def model_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype's value; by default bfloat16 on a GPU and float32 elsewhere."""
    return parse_dtype(name) or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m model.generate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt", default="", help="text to continue (empty: start from BOS)")
    p.add_argument("--max_new_tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top_k", type=positive_int)
    p.add_argument("--top_p", type=probability)
    p.add_argument("--repetition_penalty", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--template", choices=tuple(TEMPLATES),
                   help="treat each prompt as an instruction in this SFT template; print the response only")
    p.add_argument("--system_prompt", help="the system prompt of templates that have one (default: theirs)")
    return p


def _respond(model, sp, prompt: str, a: argparse.Namespace, cfg: SamplingConfig) -> None:
    echo = a.template is None
    if not echo:
        prompt = format_prompt(a.template, prompt, system=a.system_prompt)
    ids = [sp.bos_id()] + sp.encode(prompt)
    if len(ids) >= model.args.max_seq_len:  # before the prompt is echoed, not after
        raise ValueError(f"the prompt has {len(ids)} tokens, but the model's max_seq_len is "
                         f"{model.args.max_seq_len}: shorten it")
    generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(a.seed)
    stream = generate_ids(model, ids, a.max_new_tokens, cfg, stop_ids=(sp.eos_id(),),
                          allowed_vocab=sp.vocab_size(), generator=generator)
    # Echoed, the prompt is decoded with its continuation, so the continuation's first
    # space stays. A response is decoded alone: training encoded it on its own
    # (`data.sft.encode_sample`), so its first ▁ is that encoding's dummy prefix, not text.
    for piece in stream_text(sp, stream, ids if echo else ()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def adapter_dirs(option: str | None) -> tuple[str, ...]:
    """The adapter directories of a --lora_model value (comma-separated, in order).

    Raises:
        ValueError: the option was given, but names no directory.
    """
    dirs = tuple(d.strip() for d in (option or "").split(",") if d.strip())
    if option is not None and not dirs:
        raise ValueError("--lora_model: no adapter directory given")
    return dirs


def open_model(model: str | Path, lora_models: Sequence[str | Path] = (), *,
               tokenizer: str | Path | None = None, force_base: bool = False) -> Checkpoint:
    """The checkpoint to generate from: `model`, with the adapters applied in order.

    The adapters are folded in lazily, tensor by tensor as the model is loaded (the same
    merge `model.merge_lora` writes out), so the merged weights exist only in memory.

    Raises:
        FormatError: no tokenizer was found beside the checkpoint nor given.
    """
    if not lora_models:
        ckpt = read_checkpoint(model, tokenizer=tokenizer, progress=False)
    else:
        ckpt = merge(model, list(lora_models), tokenizer=tokenizer, force_base=force_base,
                     progress=False)
    if ckpt.tokenizer is None:
        raise FormatError(f"{model}: no tokenizer.model found; pass --tokenizer")
    return ckpt


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    with command_errors():
        cfg = SamplingConfig(a.temperature, a.top_k, a.top_p, a.repetition_penalty)
        adapters = adapter_dirs(a.lora_model)
        ckpt = open_model(a.model, adapters, tokenizer=a.tokenizer, force_base=a.force_base)
        if note := check_tokenizer_rows(ckpt):
            print(note, file=sys.stderr)
        sp = load_sp(ckpt.tokenizer)
        device = pick_device(a.device)
        model = load_model(ckpt, device=device, dtype=model_dtype(a.dtype, device)).eval()
        if not a.interactive:
            _respond(model, sp, a.prompt, a, cfg)
            return
        print("Enter a prompt (Ctrl-D to quit).", file=sys.stderr)
        for prompt in stdin_lines():
            _respond(model, sp, prompt, a, cfg)


def stdin_lines(poll_seconds: float = 0.2) -> Iterator[str]:
    """Lines of stdin as UTF-8 text, without their newline.

    Read as bytes and decoded here: the text layer would let undecodable bytes through
    as surrogates (or fail without saying where), and sentencepiece cannot encode them.
    Waiting is done in short `select` rounds because Ctrl-C's SIGINT may be delivered to
    one of torch's threads, which leaves a blocking read() in the main thread asleep: the
    KeyboardInterrupt would only come after the next line, or at exit as a traceback.
    """
    fd, pending, lineno = sys.stdin.fileno(), b"", 0
    while True:
        while b"\n" not in pending:
            if not select.select([fd], [], [], poll_seconds)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # end of input; a last line without newline still counts
                if pending:
                    yield _decode_line(pending, lineno + 1)
                return
            pending += chunk
        raw, pending = pending.split(b"\n", 1)
        lineno += 1
        yield _decode_line(raw, lineno)


def _decode_line(raw: bytes, lineno: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
        raise ValueError(f"stdin line {lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                         f"{e.start + 1} of the line); send UTF-8 text") from None


if __name__ == "__main__":
    main()
