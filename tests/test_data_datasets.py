"""PackedBlocks and SFTDataset: blocks across files, ranks and epochs, exact resume,
validation by whole documents, SFT batches (labels, padding, packing), tokenizer check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from data.datasets import IGNORE_INDEX, PackedBlocks, SFTDataset, TokenStream, collate, collate_packed
from data.prepare import PrepareOptions, prepare
from data.sft import SFTPreparer
from data.text import TextPreparer
from data.shards import DataError, check_tokenizer


@pytest.fixture
def tok(shared_data: Path) -> Path:
    return shared_data / "tokenizers" / "chinese_llama2_hf" / "tokenizer.model"


@pytest.fixture
def lunyu(tok, shared_data, tmp_path) -> Path:
    """The Analects as token files of ~8 KB of text each (several files)."""
    out = tmp_path / "lunyu"
    prepare(PrepareOptions(tok, (str(shared_data / "corpus" / "lunyu.txt"),), out,
                           TextPreparer(chunk_mb=0.008)))
    return out


@pytest.fixture
def alpaca(tok, shared_data, tmp_path) -> Path:
    out = tmp_path / "alpaca"
    prepare(PrepareOptions(tok, (str(shared_data / "sft" / "alpaca_zh_demo.json"),), out,
                           SFTPreparer(max_seq_length=256)))
    return out


def rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(r) for r in batch["tokens"].tolist()]


def test_stream_and_blocks_across_files(lunyu, tok, shared_data):
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    lines = (shared_data / "corpus" / "lunyu.txt").read_text(encoding="utf-8").split("\n")
    expected = np.array([i for line in lines if line.strip() for i in [1] + sp.encode(line) + [2]])
    stream = TokenStream(lunyu, release_bytes=4096)
    assert len(stream.files) > 2 and np.array_equal(stream.read(0, len(stream)), expected)
    data = PackedBlocks(lunyu, block_size=100)
    assert data.n_blocks == len(expected) // 100
    boundary = int(stream.starts[1])  # a block that straddles the first two files
    i = boundary // 100
    assert i * 100 < boundary < (i + 1) * 100
    assert np.array_equal(data.block(i), expected[i * 100 : (i + 1) * 100])
    for _ in range(300):  # maps are dropped every release_bytes, and reads stay right
        j = int(np.random.default_rng(_).integers(0, len(expected) - 50))
        assert np.array_equal(stream.read(j, 50), expected[j : j + 50])
    assert len(stream._maps) <= len(stream.files)
    batch = next(data.batches(4))
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
    assert batch["tokens"].shape == batch["labels"].shape == (4, 100)
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert (batch["labels"][:, -1] == IGNORE_INDEX).all()


def interleave(per_rank: list[list[tuple[int, ...]]], batch: int) -> list[tuple[int, ...]]:
    """The rows of W ranks' batches of `batch` rows in the global order: batch k of rank r
    holds global rows k·b·W + r, k·b·W + r + W, …"""
    world, out = len(per_rank), []
    for k in range(len(per_rank[0]) // batch):
        mine = [rows_[k * batch : (k + 1) * batch] for rows_ in per_rank]
        out += [mine[j % world][j // world] for j in range(batch * world)]
    return out


@pytest.mark.parametrize("block_size", [64, 65])
def test_any_number_of_ranks_reads_one_global_order(lunyu, block_size):
    one = PackedBlocks(lunyu, block_size=block_size, seed=7)
    n = one.n_blocks
    blocks = [tuple(one.block(i).tolist()) for i in range(n)]
    assert len(set(blocks)) == n and n % 6  # all different; epochs end inside a step
    # the global order: each epoch's permutation after the last, every block once per epoch
    order = [tuple(x.tolist()) for x in one.take(2 * n + 12)]
    assert sorted(order[:n]) == sorted(blocks) == sorted(order[n : 2 * n]) and order[:n] != order[n : 2 * n]
    assert sorted(order[:n]) != order[:n]  # shuffled
    for world, batch in ((1, 6), (2, 3), (3, 2)):  # the same 6 rows per step
        ranks = [PackedBlocks(lunyu, block_size=block_size, seed=7, rank=r, world_size=world)
                 for r in range(world)]
        seen = [[row for _, b in zip(range((2 * n + 12) // 6), d.batches(batch)) for row in rows(b)]
                for d in ranks]
        assert interleave(seen, batch) == order[: len(interleave(seen, batch))], world
        assert len({d.state_dict()["position"] for d in ranks}) == 1  # one position, on every rank
    # validation passes: each rank its own share, disjoint and equal
    halves = [[row for b in PackedBlocks(lunyu, block_size=block_size, seed=7, rank=r, world_size=2)
               .iter_epoch(8) for row in rows(b)] for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == n // 2 and not set(halves[0]) & set(halves[1])


def test_resume_mid_epoch_on_any_number_of_ranks(lunyu):
    kw = dict(block_size=64, val_fraction=0.1, seed=3)
    ranks = [PackedBlocks(lunyu, **kw, rank=r, world_size=2) for r in (0, 1)]
    its = [d.batches(3) for d in ranks]
    taken = ranks[0].n_blocks // 6 - 2
    for _ in range(taken):
        for it in its:
            next(it)
    state = ranks[1].state_dict()
    assert taken > 0 and state == ranks[0].state_dict()
    assert state["epoch"] == 0 and state["position"] == 6 * taken  # blocks drawn by both ranks
    expected = [[row for _ in range(8) for row in rows(next(it))] for it in its]  # into the next epoch
    assert ranks[0].state_dict()["epoch"] == 1
    again = PackedBlocks(lunyu, **kw, rank=1, world_size=2)
    again.load_state_dict(state)
    assert [row for _, b in zip(range(8), again.batches(3)) for row in rows(b)] == expected[1]
    # on one rank, 6 rows a batch: the two ranks' blocks, in the global order
    alone = PackedBlocks(lunyu, **kw)
    alone.load_state_dict(state)
    assert [row for _, b in zip(range(8), alone.batches(6)) for row in rows(b)] == interleave(expected, 3)
    for change in ({"block_size": 32}, {"seed": 4}, {"val_fraction": 0.2}):
        with pytest.raises(DataError, match="cannot resume"):
            PackedBlocks(lunyu, **{**kw, **change}).load_state_dict(state)
    with pytest.raises(DataError, match="split"):
        PackedBlocks(lunyu, **{**kw, "split": "val"}).load_state_dict(state)


def test_validation_holds_out_whole_documents(lunyu):
    train = PackedBlocks(lunyu, block_size=32, val_fraction=0.1)
    val = PackedBlocks(lunyu, block_size=32, split="val", val_fraction=0.1)
    starts = train.stream.document_starts()
    total = len(train.stream)
    assert train.region == (0, val.region[0]) and val.region[1] == total
    assert val.region[0] in set(starts.tolist()) and val.region[0] >= 0.9 * total
    assert val.region[0] == starts[np.searchsorted(starts, int(0.9 * total))]  # the first such boundary
    # every training block lies before the boundary, every validation block after it
    assert train.n_blocks * 32 <= val.region[0]
    first = val.block(0)
    assert first[0] == 1 and np.array_equal(first, train.stream.read(val.region[0], 32))
    # one pass, in order, the last batch smaller; twice the same
    passes = [[b["tokens"] for b in val.batches(5)] for _ in range(2)]
    assert sum(len(t) for t in passes[0]) == val.n_blocks and len(passes[0][-1]) == (val.n_blocks % 5 or 5)
    assert all(torch.equal(x, y) for x, y in zip(*passes))
    assert torch.equal(passes[0][0][1], torch.from_numpy(val.block(1).astype(np.int64)))
    with pytest.raises(DataError, match="no validation split"):
        PackedBlocks(lunyu, split="val")
    with pytest.raises(ValueError, match="rank"):
        PackedBlocks(lunyu, rank=2, world_size=2)


def test_collate_labels_by_hand():
    a, b = np.array([1, 10, 11, 20, 21, 2]), np.array([1, 12, 22, 2])  # prompts: 3 and 2 tokens
    batch = collate([(a, 3), (b, 2)], pad_id=99)
    assert batch["tokens"].tolist() == [[1, 10, 11, 20, 21, 2], [1, 12, 22, 2, 99, 99]]
    assert batch["labels"].tolist() == [[-100, -100, 20, 21, 2, -100], [-100, 22, 2, -100, -100, -100]]
    packed = collate_packed([[(a, 3), (b, 2)], [(b, 2)]], pad_id=99)
    assert packed["tokens"].tolist() == [[1, 10, 11, 20, 21, 2, 1, 12, 22, 2],
                                         [1, 12, 22, 2, 99, 99, 99, 99, 99, 99]]
    assert packed["segment_ids"].tolist() == [[0] * 6 + [1] * 4, [0] * 4 + [2] * 6]
    assert packed["labels"].tolist() == [[-100, -100, 20, 21, 2, -100, -100, 22, 2, -100],
                                         [-100, 22, 2] + [-100] * 7]


def test_sft_dataset_batches_packing_and_resume(alpaca, tok):
    data = SFTDataset(alpaca, seed=1)
    assert data.pad_id == 0 and data.stream.meta["special_ids"]["pad"] == -1  # no pad piece
    it = data.batches(4)
    for _ in range(100):
        batch = next(it)
    for row, labels in zip(batch["tokens"], batch["labels"]):
        n = int((row != 0).sum())  # id 0 (<unk>) never occurs in these samples
        assert row[n - 1] == 2 and (labels[n - 1 :] == IGNORE_INDEX).all()
        targets = labels[labels != IGNORE_INDEX]
        assert targets[-1] == 2 and torch.equal(targets, row[n - len(targets) : n])
    state = data.state_dict()
    expected = [next(it)["tokens"] for _ in range(200)]  # past the end of the epoch (250)
    again = SFTDataset(alpaca, seed=1)
    again.load_state_dict(state)
    got = [b["tokens"] for _, b in zip(range(200), again.batches(4))]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    with pytest.raises(DataError, match="cannot resume"):
        SFTDataset(alpaca, seed=1, pack=True).load_state_dict(state)
    packed = next(SFTDataset(alpaca, seed=1, pack=True, max_seq_length=1024).batches(4))
    tokens, segments, labels = packed["tokens"], packed["segment_ids"], packed["labels"]
    assert tokens.shape[1] <= 1024 and (segments[:, 1:] >= segments[:, :-1]).all()
    assert int((tokens == 1).sum()) > 2 * 4  # short Alpaca samples share rows
    for r in range(4):
        n_samples = int((tokens[r] == 1).sum())
        starts = torch.nonzero(torch.diff(segments[r], prepend=torch.tensor([-1]))).flatten()
        for s in starts[:n_samples]:
            assert tokens[r, s] == 1 and (s == 0 or (tokens[r, s - 1] == 2 and labels[r, s - 1] == IGNORE_INDEX))


@pytest.mark.parametrize("pack", [False, True], ids=["samples", "packed"])
def test_sft_rows_are_the_same_on_any_number_of_ranks(alpaca, pack):
    """Packed rows too: packed from the global order by the samples' lengths, so each rank
    knows where the rows it skips end without reading them."""
    def rows_of(world: int, batch: int, steps: int) -> list[list[tuple[int, ...]]]:
        ranks = [SFTDataset(alpaca, seed=1, pack=pack, max_seq_length=1024, rank=r, world_size=world)
                 for r in range(world)]
        return [[row for _, b in zip(range(steps), d.batches(batch)) for row in rows(b)] for d in ranks]

    one = rows_of(1, 4, 70)[0]  # past the end of the first epoch (250 samples)
    two = rows_of(2, 2, 70)
    # rows are padded to their batch's longest: compare them without the padding
    unpad = lambda r: tuple(t for t in r if t != 0)  # id 0 (<unk>) never occurs in these samples
    assert [unpad(r) for r in interleave(two, 2)] == [unpad(r) for r in one]


def test_check_tokenizer_and_kinds(alpaca, lunyu, tok, shared_data):
    meta = TokenStream(alpaca).meta
    check_tokenizer(meta, tok, alpaca)
    with pytest.raises(DataError, match="tokenized with tokenizer.model .* sha256"):
        check_tokenizer(meta, shared_data / "tokenizers" / "llama_tokenizer.model", alpaca)
    with pytest.raises(DataError, match="not SFT"):
        SFTDataset(lunyu)
    with pytest.raises(DataError, match="no meta.json"):
        TokenStream(shared_data / "corpus")
