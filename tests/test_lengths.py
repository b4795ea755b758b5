"""Characters and bytes per token (tokenizer/lengths.py) against sentencepiece's own decode:
for every document of the real corpora, with the LLaMA tokenizer (byte fallback), the
Chinese-LLaMA-2 one and stories260K's tok512, the table's count equals len(decode(ids))."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from tests.helpers import SHARED_DATA, require_shared
from tokenizer.lengths import text_lengths

TOKENIZERS = {
    "llama": SHARED_DATA / "tokenizers" / "llama_tokenizer.model",
    "chinese_llama2": SHARED_DATA / "tokenizers" / "chinese_llama2_hf" / "tokenizer.model",
    "tok512": SHARED_DATA / "models" / "stories260K" / "tok512.model",
}
CORPORA = ["lunyu.txt", "cmrc2018_contexts.txt", "li_bai_wiki_doc.txt"]


def documents() -> list[str]:
    docs = []
    for name in CORPORA:
        docs += [l for l in (SHARED_DATA / "corpus" / name).read_text(encoding="utf-8").splitlines() if l]
    # English and mixed text, spaces at the edges, digits, and characters outside every vocabulary
    docs += ["Once upon a time, there was a little girl named Lily.", "  two  spaces  ",
             "GPU 显存 24 GB，学习率 2e-4。", "emoji 🙂 and 𠀀 (outside the BMP)"]
    return docs


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_counts_equal_sentencepiece_decode(name):
    require_shared(TOKENIZERS[name], *(SHARED_DATA / "corpus" / c for c in CORPORA))
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZERS[name]))
    table = text_lengths(TOKENIZERS[name])
    total_chars = 0
    for doc in documents():
        ids = sp.encode(doc)
        decoded = sp.decode(ids)
        with_specials = [sp.bos_id(), *ids, sp.eos_id()]
        assert table.of_document(ids) == (len(decoded), len(decoded.encode("utf-8"))), doc[:40]
        assert table.of_document(with_specials) == (len(decoded), len(decoded.encode("utf-8")))
        total_chars += len(decoded)
    assert total_chars > 100_000  # the corpora were read


def test_a_batch_counts_only_its_targets():
    """In a batch, labels mark the targets; -100 positions (prompts, padding) count nothing,
    and a document that starts after <s> inside a block loses its dummy prefix."""
    require_shared(TOKENIZERS["llama"])
    import torch

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZERS["llama"]))
    table = text_lengths(TOKENIZERS["llama"])
    a, b = sp.encode("Hello world"), sp.encode("学而时习之")
    stream = [sp.bos_id(), *a, sp.eos_id(), sp.bos_id(), *b, sp.eos_id()]
    tokens = torch.tensor([stream[:-1]])
    labels = torch.tensor([stream[1:]])
    want = len("Hello world") + len("学而时习之")
    assert table.of_targets(tokens, labels)[0] == want
    labels[0, : len(a) + 2] = -100  # the first document (and its </s>, the next <s>) not scored
    assert table.of_targets(tokens, labels)[0] == len("学而时习之")
