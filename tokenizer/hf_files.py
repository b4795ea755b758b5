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


def special_tokens(sp_model_file: str | Path) -> dict[str, dict[str, Any] | None]:
    """Piece and id of unk/bos/eos/pad in a sentencepiece model (None when absent)."""
    sp = load_sp(sp_model_file)
    ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    return {
        name: ({"id": i, "piece": sp.id_to_piece(i)} if 0 <= i < sp.vocab_size() else None)
        for name, i in ids.items()
    }


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def write_hf_tokenizer_files(
    sp_model_file: str | Path, out_dir: str | Path, *, model_max_length: int | None = None
) -> None:
    """Copy `tokenizer.model` into `out_dir` and write the two JSON files beside it."""
    src = resolve_model_file(sp_model_file)
    out_dir = Path(out_dir)
    specials = special_tokens(src)
    if src.resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(src, out_dir / "tokenizer.model")
    token_map = {f"{name}_token": _added_token(tok["piece"])
                 for name, tok in specials.items() if tok is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        **{k: {"__type": "AddedToken", **v} for k, v in token_map.items()},
        "pad_token": token_map.get("pad_token", {}).get("content"),
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        # Text "<s>" or "<pad>" stays text, as in sentencepiece (and in our data prep);
        # transformers would otherwise turn it into the special token's id.
        "split_special_tokens": True,
        "sp_model_kwargs": {},
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(token_map, indent=2) + "\n")
