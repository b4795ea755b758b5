"""The Hugging Face tokenizer files that go beside a `tokenizer.model`.

transformers' `LlamaTokenizer` reads `tokenizer.model` itself; `tokenizer_config.json` and
`special_tokens_map.json` tell it which pieces are BOS/EOS/UNK/PAD and that BOS is added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .spm_io import load_sp, resolve_model_file
from .templates import chat_template


def special_tokens(sp_model_file: str | Path) -> dict[str, dict[str, Any] | None]:
    """Piece and id of unk/bos/eos/pad in a sentencepiece model (None when absent)."""
    sp = load_sp(sp_model_file)
    ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    return {
        name: ({"id": i, "piece": sp.id_to_piece(i)} if 0 <= i < sp.vocab_size() else None)
        for name, i in ids.items()
    }


def _added_token(content: str) -> dict[str, Any]:
    # `normalized: true` as in the published files: tokenizer.model has no normaliser
    # (identity), so it changes nothing, and keeping it keeps the files comparable.
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def hf_tokenizer_config(
    sp_model_file: str | Path, *, model_max_length: int | None = None, template: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_config.json, special_tokens_map.json) for a sentencepiece model.

    The keys and values are those of Chinese-LLaMA-2's published files
    (scripts/tokenizer/ of Chinese-LLaMA-Alpaca-2), except where a comment says why not.
    In particular there is no `split_special_tokens`: with it, transformers 4.3x splits
    the text "</s>" that the published SFT script appends to each response into four
    ordinary pieces, and the model never learns to stop.

    Args:
        sp_model_file: the tokenizer.model (or a directory holding it).
        model_max_length: the model's context length, when known.
        template: a name in `tokenizer.templates.TEMPLATES`: the SFT template the model was
            tuned with, written as `chat_template`.
    """
    specials = special_tokens(sp_model_file)
    tokens = {f"{n}_token": _added_token(t["piece"]) for n, t in specials.items()
              if t is not None and n != "pad"}

    def added(name: str) -> dict[str, Any] | None:
        return {"__type": "AddedToken", **tokens[name]} if name in tokens else None

    pad = specials["pad"]["piece"] if specials["pad"] else None
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added("bos_token"),
        "clean_up_tokenization_spaces": False,
        "eos_token": added("eos_token"),
        # Not in the published file, whose transformers (4.31) had no such option: it keeps
        # sentencepiece's segmentation after a special token (4.3x warns and does the same
        # when it is absent; 5.x would otherwise drop the "▁" before the text that follows
        # "<s>" in a chat template, which training never saw).
        "legacy": True,
        # The published file leaves it out (transformers then writes 1e30, "no limit").
        **({"model_max_length": model_max_length} if model_max_length is not None else {}),
        # The published file says null here and "<pad>" in special_tokens_map.json; both
        # name the pad piece here, so either file gives one pad id, and neither names a
        # piece that tokenizer.model lacks (transformers would append it as a new token).
        "pad_token": pad,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added("unk_token"),
        "use_fast": False,
    }
    if template is not None:
        config["chat_template"] = chat_template(template)  # not published: see templates.py
    token_map: dict[str, Any] = {k: v for k, v in tokens.items() if k != "unk_token"}
    if pad is not None:
        token_map["pad_token"] = pad
    if "unk_token" in tokens:  # the published key order
        token_map["unk_token"] = tokens["unk_token"]
    return config, token_map


def write_hf_tokenizer_files(
    sp_model_file: str | Path, out_dir: str | Path, *, model_max_length: int | None = None,
    template: str | None = None,
) -> None:
    """Copy `tokenizer.model` into `out_dir` and write the two JSON files beside it
    (`hf_tokenizer_config`; `template`: the SFT template, as `chat_template`)."""
    src = resolve_model_file(sp_model_file)
    out_dir = Path(out_dir)
    config, token_map = hf_tokenizer_config(src, model_max_length=model_max_length,
                                            template=template)
    if src.resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(src, out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(token_map, indent=2) + "\n")
