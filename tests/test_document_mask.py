"""Document-masked packing: a packed row equals each of its documents run alone — logits,
losses and gradients — through the dense reference mask (SDPA), through flex attention's
block mask (the GPU path, run here by its reference implementation) and through the varlen
path's layout, with activation checkpointing too; pretraining blocks carry segment ids from
the shards' document index, and packed SFT rows take the same path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from data.datasets import PackedBlocks, SFTDataset, TokenStream
from model.llama import named_args, segment_varlen
from tests.conftest import random_model
from tests.helpers import FAST, metrics, one_error, run, train_cmd

ARGS = named_args("tiny", vocab_size=300, n_kv_heads=2)  # GQA too
LENGTHS = [5, 17, 1, 9, 32]  # one row of 64: the documents, and padding of its own


def packed_row(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, ARGS.vocab_size, (n,), generator=g) for n in LENGTHS]
    tokens = torch.cat(docs)[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])[None]
    return tokens, segments, docs


def per_segment_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), **rest):
    """What torch's varlen_attn computes, by its documented contract: q, k, v (total tokens,
    heads, head_dim), segment s at cu_seq[s]..cu_seq[s+1]-1, window_size (-1, 0) causal. The
    flash kernel behind it is CUDA-only, so on the CPU this stands in for it and the tests
    check what is ours: the offsets, the flattening, GQA's heads and the output's layout (the
    GPU suite's (c) compares the real kernel with the dense mask)."""
    assert window_size == (-1, 0) and not rest
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    lengths = cu_seq_q[1:] - cu_seq_q[:-1]
    assert max_q == max_k == int(lengths.max()) and int(cu_seq_q[-1]) == q.shape[0]
    assert q.shape == k.shape == v.shape  # GQA's key/value heads already expanded
    bounds = cu_seq_q.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True).transpose(0, 1)
        for a, b in zip(bounds, bounds[1:])])


@pytest.fixture
def stand_in_varlen(monkeypatch):
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", per_segment_varlen_attn)


def test_varlen_offsets_split_at_every_segment_and_row():
    """Equal ids in two rows are two segments: the rows are flattened into one sequence."""
    segments = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2], [0, 0, 0, 0, 0]])
    got = segment_varlen(segments)
    assert got.cu_seqlens.tolist() == [0, 2, 5, 7, 10, 15] and got.max_len == 5
    assert got.cu_seqlens.dtype == torch.int32


def test_varlen_offsets_of_real_packed_rows(world):
    """On packed SFT rows and document-masked pretraining blocks: the offsets are each row's
    runs of equal ids, counted here by walking the rows."""
    import itertools

    sft = next(SFTDataset(world / "sft", pack=True, max_seq_length=320).batches(4))["segment_ids"]
    blocks = next(PackedBlocks(world / "tokens", block_size=64, document_mask=True).batches(8))["segment_ids"]
    for segments in (sft, blocks):
        lengths = [len(list(run)) for row in segments.tolist() for _, run in itertools.groupby(row)]
        assert len(lengths) > len(segments)  # some row holds more than one document
        got = segment_varlen(segments)
        assert got.cu_seqlens.tolist() == np.cumsum([0] + lengths).tolist()
        assert got.max_len == max(lengths)


@pytest.mark.parametrize("kind", ["sdpa", "flex", "varlen"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_packed_row_equals_its_documents_alone(kind, checkpointed, request):
    if kind == "varlen":
        request.getfixturevalue("stand_in_varlen")
    model = random_model(ARGS)
    model.packed_attention = kind
    if checkpointed:
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    tokens, segments, docs = packed_row()
    with torch.set_grad_enabled(kind == "sdpa"):  # torch's flex attention has no CPU backward
        logits = model(tokens, segment_ids=segments)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    assert (logits - alone).abs().max() <= 1e-5
    if kind == "flex":
        return
    # gradients: the packed row's loss (no target across a boundary) vs the documents' losses
    labels = torch.full_like(tokens, -100)
    starts = np.cumsum([0] + LENGTHS[:-1])
    for s, d in zip(starts, docs):
        labels[0, s : s + len(d) - 1] = d[1:]
    model.zero_grad()
    model.loss(tokens, labels, segment_ids=segments).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(model.loss(d[None], torch.cat([d[1:], torch.tensor([-100])])[None]) for d in docs).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(packed[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_flex_attention_never_builds_a_dense_mask():
    """The flex path hands the kernel a BlockMask (which tiles are empty, full or partial),
    not an L×L tensor."""
    from torch.nn.attention.flex_attention import BlockMask

    model = random_model(ARGS)
    model.packed_attention = "flex"
    _, segments, _ = packed_row()
    assert isinstance(model._segment_mask(segments), BlockMask)
    model.packed_attention = "auto"  # on the CPU: the dense reference
    assert isinstance(model._segment_mask(segments), torch.Tensor)
    model.packed_attention = "dense"
    with pytest.raises(ValueError, match="'dense' is not one of auto, flex, varlen, sdpa"):
        model._segment_mask(segments)


def test_blocks_carry_segments_from_the_document_index(world):
    blocks = PackedBlocks(world / "tokens", block_size=64, document_mask=True)
    stream = TokenStream(world / "tokens")
    starts = set(stream.document_starts().tolist())
    batch = next(blocks.batches(8))
    order = blocks._order(0)[:8]
    for row, i in enumerate(order):
        begin = int(i) * 64
        seg, labels = batch["segment_ids"][row], batch["labels"][row]
        for j in range(1, 64):
            new_document = begin + j in starts
            assert bool(seg[j] != seg[j - 1]) == new_document
            if new_document:
                assert labels[j - 1] == -100  # nothing predicted across the boundary
            elif j < 64:
                assert labels[j - 1] == batch["tokens"][row, j]
    plain = next(PackedBlocks(world / "tokens", block_size=64).batches(8))
    assert torch.equal(plain["tokens"], batch["tokens"]) and "segment_ids" not in plain


def test_pretraining_with_document_mask_takes_each_document_alone(world, tmp_path):
    """A run with data.document_mask: its first loss equals the mean, over the batch's
    targets, of each document piece's loss computed alone."""
    from model.formats import read_checkpoint
    from model.source import load_model

    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "run", *FAST, "--optim.max_steps=2",
                  "--data.document_mask=true", "--checkpoint.every=0", "--optim.micro_batch_size=2",
                  "--optim.grad_accum=1"))
    first = [m for m in metrics(tmp_path / "run") if "loss" in m][0]["loss"]
    blocks = PackedBlocks(world / "tokens", block_size=32, document_mask=True)
    batch = next(blocks.batches(2))
    model = load_model(read_checkpoint(world / "base"))
    total = count = 0.0
    with torch.no_grad():
        for row in range(2):
            tokens, labels, seg = (batch[k][row] for k in ("tokens", "labels", "segment_ids"))
            for s in seg.unique():
                piece = seg == s
                logits = model(tokens[piece][None])[0]
                target = labels[piece]
                keep = target != -100
                total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
                count += int(keep.sum())
    assert first == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("kind, size, rows", [("flex", "tiny", 2), ("varlen", "tiny-gqa", 3)])
def test_packed_sft_rows_take_each_path_alike(world, request, kind, size, rows):
    if kind == "varlen":
        request.getfixturevalue("stand_in_varlen")
    data = SFTDataset(world / "sft", pack=True, max_seq_length=320)
    batch = next(data.batches(rows))
    model = random_model(named_args(size, vocab_size=json.loads((world / "sft" / "meta.json").read_text())["vocab_size"]))
    with torch.no_grad():
        model.packed_attention = "sdpa"
        dense = model(batch["tokens"], segment_ids=batch["segment_ids"])
        model.packed_attention = kind
        other = model(batch["tokens"], segment_ids=batch["segment_ids"])
    real = batch["labels"] != -100
    assert (dense - other)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("case", ["fp32", "cpu"])
def test_varlen_refused_where_flash_cannot_run(world, tmp_path, case):
    """The varlen kernel is flash attention's: CUDA, in bf16 or fp16. A config that asks for
    it elsewhere gets one error line naming the key, before anything is written."""
    out = tmp_path / "out"
    precision = "fp32" if case == "fp32" else "bf16"
    line = one_error(run(train_cmd("sft", "sft.yaml", world, out, "--model.packed_attention=varlen",
                                   f"--parallel.precision={precision}", "--data.pack=true"), ok=False))
    assert line.startswith("error: model.packed_attention: varlen"), line
    assert ("parallel.precision" in line) if case == "fp32" else ("CUDA" in line and "cpu" in line), line
    assert not out.exists()
