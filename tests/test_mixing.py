"""Several token directories in one run: shares that follow the weights, the same sequence
on every construction, exact resumes (a dataset's state, and kill -9 in a real run), a
mismatched tokenizer refused, named validation sets evaluated and logged."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.datasets import PackedBlocks, SFTDataset
from data.mixing import Mixture, Source
from data.prepare import PrepareOptions, prepare
from data.sft import SFTPreparer
from data.shards import DataError, read_meta
from data.text import TextPreparer
from data.toy import chinese_documents, english_documents
from tests.helpers import ENV, FAST, SHARED_DATA, losses, metrics, one_error, require_shared, run, train_cmd
from tests.test_train_faults import final_tensors, tree_hashes, wait_for
from train.config import ConfigError, load_config

TOK = SHARED_DATA / "tokenizers" / "chinese_llama2_hf" / "tokenizer.model"
LLAMA_TOK = SHARED_DATA / "tokenizers" / "llama_tokenizer.model"
LUNYU = SHARED_DATA / "corpus" / "lunyu.txt"
LI_BAI = SHARED_DATA / "corpus" / "li_bai_wiki_doc.txt"
ALPACA = SHARED_DATA / "sft" / "alpaca_zh_demo.json"


def _text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> SimpleNamespace:
    """The Analects, an English text and Li Bai's article as token directories of the real
    Chinese-LLaMA-2 tokenizer; Alpaca and English instructions as SFT data."""
    require_shared(TOK, LUNYU, LI_BAI, ALPACA)
    root = tmp_path_factory.mktemp("mix")
    english = _text(root / "en.txt", english_documents(300, seed=3))
    records = [{"instruction": "Continue: " + d[:20], "input": "", "output": d[20:]}
               for d in english_documents(100, seed=4)]
    (root / "en.json").write_text(json.dumps(records), encoding="utf-8")
    out = SimpleNamespace()
    for name, src, preparer in (("zh", LUNYU, TextPreparer()), ("en", english, TextPreparer()),
                                ("libai", LI_BAI, TextPreparer()),
                                ("sft_zh", ALPACA, SFTPreparer(max_seq_length=256)),
                                ("sft_en", root / "en.json", SFTPreparer(max_seq_length=256))):
        prepare(PrepareOptions(TOK, (str(src),), root / name, preparer, num_workers=1))
        setattr(out, name, root / name)
    return out


def block_owner(dirs: dict[str, Path], block_size: int) -> dict[tuple[int, ...], str]:
    """Which directory each possible block (read straight from the token files) belongs to."""
    owner = {}
    for name, d in dirs.items():
        meta = read_meta(d)
        tokens = np.concatenate([np.fromfile(d / f["tokens"], dtype=meta["dtype"]) for f in meta["files"]])
        for i in range(len(tokens) // block_size):
            owner.setdefault(tuple(tokens[i * block_size : (i + 1) * block_size].tolist()), name)
    return owner


def mixture(dirs: dict[str, Path], weights: list[float], block_size: int = 32, **kw) -> Mixture:
    return Mixture([PackedBlocks(d, block_size=block_size, seed=5, **kw) for d in dirs.values()],
                   weights, list(dirs))


def mixture_after(dirs: dict[str, Path], batches: list) -> dict:
    """The state of a one-rank mixture (weights 0.7, 0.3) after drawing `batches`."""
    m = mixture(dirs, [0.7, 0.3])
    it = m.batches(len(batches[0]))
    for _ in batches:
        next(it)
    return m.state_dict()


def rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(r) for r in batch["tokens"].tolist()]


@pytest.mark.parametrize("weights", [[0.8, 0.2], [5, 3, 2]], ids=["0.8-0.2", "three-sources"])
def test_shares_follow_the_weights_over_1000_blocks(real, weights):
    dirs = dict(list({"zh": real.zh, "en": real.en, "libai": real.libai}.items())[: len(weights)])
    owner = block_owner(dirs, 32)
    mix = mixture(dirs, weights)
    it = mix.batches(8)
    drawn = [owner[r] for _ in range(125) for r in rows(next(it))]  # 1,000 blocks
    share = {name: w / sum(weights) for name, w in zip(dirs, weights)}
    for n in (100, 500, 1000):  # from early on, not only on average
        for name in dirs:
            assert abs(drawn[:n].count(name) / n - share[name]) <= 0.02, (n, name, drawn[:n].count(name))
    # what the logs say is what was drawn
    assert mix.log_fields() == {f"share/{name}": drawn.count(name) / 1000 for name in dirs}
    # libai has few blocks: it went through several epochs of its own while zh went through one
    if "libai" in dirs:
        assert mix.sources[2].epoch > mix.sources[0].epoch


def test_each_source_keeps_its_own_order_and_two_constructions_agree(real):
    dirs = {"zh": real.zh, "en": real.en}
    owner = block_owner(dirs, 32)
    first = [rows(b) for _, b in zip(range(40), mixture(dirs, [0.7, 0.3]).batches(4))]
    again = [rows(b) for _, b in zip(range(40), mixture(dirs, [0.7, 0.3]).batches(4))]
    assert first == again
    # every source's blocks arrive in the order that source alone deals them (its own epochs
    # and shuffle), whatever the mixture takes from the others in between
    for name, d in dirs.items():
        mine = [r for b in first for r in b if owner[r] == name]
        alone = [tuple(x.tolist()) for x in PackedBlocks(d, block_size=32, seed=5).take(len(mine))]
        assert mine == alone
    # two ranks, 2 rows each: the one-rank sequence of 4-row batches, dealt round-robin;
    # every rank counts every choice (so one saved state fits both, and any number of ranks)
    ranks = [mixture(dirs, [0.7, 0.3], rank=r, world_size=2) for r in (0, 1)]
    seen = [[r for _, b in zip(range(40), m.batches(2)) for r in rows(b)] for m in ranks]
    assert [row for pair in zip(*seen) for row in pair] == [r for b in first for r in b]
    assert ranks[0].state_dict() == ranks[1].state_dict() == mixture_after(dirs, first)


def test_resume_mid_way_equals_a_straight_pass(real):
    dirs = {"zh": real.zh, "en": real.en, "libai": real.libai}
    straight = mixture(dirs, [0.6, 0.3, 0.1])
    it = straight.batches(6)
    for _ in range(37):
        next(it)
    state = json.loads(json.dumps(straight.state_dict()))  # as a checkpoint stores it
    expected = [next(it)["tokens"] for _ in range(50)]
    resumed = mixture(dirs, [0.6, 0.3, 0.1])
    resumed.load_state_dict(state)
    got = [b["tokens"] for _, b in zip(range(50), resumed.batches(6))]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert resumed.log_fields() == straight.log_fields()
    with pytest.raises(DataError, match="cannot resume: .* mixture with weights"):
        mixture(dirs, [0.5, 0.4, 0.1]).load_state_dict(state)
    with pytest.raises(DataError, match="cannot resume: .*block_size"):
        mixture(dirs, [0.6, 0.3, 0.1], block_size=16).load_state_dict(state)


def test_sft_mixture_mixes_by_row_and_resumes(real):
    def make(pack: bool) -> Mixture:
        return Mixture([SFTDataset(d, seed=2, pack=pack, max_seq_length=256) for d in (real.sft_zh, real.sft_en)],
                       [0.75, 0.25], ["zh", "en"])

    english = {tuple(SFTDataset(real.sft_en).sample(i)[0].tolist()) for i in range(100)}
    mix = make(pack=True)
    it = mix.batches(4)
    from_english = []
    for _ in range(50):  # 200 rows
        batch = next(it)
        tokens, segments = batch["tokens"], batch["segment_ids"]
        for r in range(4):
            samples = [tuple(tokens[r][segments[r] == s].tolist()) for s in segments[r].unique().tolist()]
            samples = [t for t in samples if t[0] == 1]  # not the padding (it has a segment too)
            assert len({t in english for t in samples}) == 1, "a packed row mixes two sources"
            from_english.append(samples[0] in english)
    assert abs(sum(from_english) / 200 - 0.25) <= 0.02
    state = json.loads(json.dumps(mix.state_dict()))
    expected = [next(it)["tokens"] for _ in range(10)]
    again = make(pack=True)
    again.load_state_dict(state)
    assert all(torch.equal(x, b["tokens"]) for x, (_, b) in zip(expected, zip(range(10), again.batches(4))))
    plain = make(pack=False)
    drawn = [tuple(t[t != 0].tolist()) in english for _ in range(25) for t in next(plain.batches(4))["tokens"]]
    assert abs(sum(drawn) / 100 - 0.25) <= 0.02


def test_mixture_arguments_are_checked():
    for args, words in ((([], [], []), "at least one"), (([1], [0.0], ["a"]), "positive"),
                        (([1, 2], [1, 1], ["a", "a"]), "differ")):
        with pytest.raises(ValueError, match=words):
            Mixture(*args)
    assert Source("tokens/en/").label == "en" and Source("x", name="replay").label == "replay"


def test_directories_of_one_run_must_agree(real, tmp_path):
    from train.data_checks import check_inputs_agree

    def data(**kw):
        return load_config(None, ["--model.path=m", *(f"--data.{k}={v}" for k, v in kw.items())]).data

    require_shared(LLAMA_TOK)
    other = tmp_path / "llama"
    prepare(PrepareOptions(LLAMA_TOK, (str(LI_BAI),), other, TextPreparer(), num_workers=1))
    check_inputs_agree(data(path=real.zh, val_sets=json.dumps({"en": str(real.en)})))
    cases = [
        (dict(path="", sources=json.dumps([{"path": str(real.zh)}, {"path": str(other)}])),
         [str(other), str(real.zh), "tokenized with", "sha256"]),
        (dict(path=real.zh, val_sets=json.dumps({"x": str(other)})), [str(other), str(real.zh)]),
        (dict(path="", sources=json.dumps([{"path": str(real.zh)}, {"path": str(real.sft_en)}])),
         [str(real.sft_en), str(real.zh), "'sft' data", "'pretrain' data"]),
    ]
    for kw, words in cases:
        with pytest.raises(DataError) as e:
            check_inputs_agree(data(**kw))
        assert all(w in str(e.value) for w in words), str(e.value)
    prepare(PrepareOptions(TOK, (str(ALPACA),), tmp_path / "sft_other",
                           SFTPreparer(max_seq_length=256, template="alpaca"), num_workers=1))
    with pytest.raises(DataError, match="template 'alpaca', but .* 'cla_v1'"):
        check_inputs_agree(data(path=real.sft_zh, val_sets=json.dumps({"x": str(tmp_path / "sft_other")})))


def test_a_run_that_writes_into_an_input_is_refused(tmp_path):
    from train.resume import check_data_outside_output

    zh, en = tmp_path / "zh", tmp_path / "en"
    cases = [  # (overrides, the key named, how they overlap)
        ([f"--data.val_sets={json.dumps({'en': str(en)})}", f"--output_dir={en / 'run'}"],
         "data.val_sets.en", "lies inside"),
        (sources((zh, 1.0)) + [f"--output_dir={tmp_path}"], "data.sources[0].path", "contains"),
        ([f"--output_dir={zh}"], "data.path", "is"),
    ]
    for overrides, key, how in cases:
        cfg = load_config(None, ["--model.path=m", f"--data.path={zh}", *overrides])
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: output .* {how} the input "):
            check_data_outside_output(cfg)
    check_data_outside_output(load_config(None, ["--model.path=m", f"--data.path={zh}",
                                                 f"--output_dir={tmp_path / 'run'}"]))


# ---------------------------------------------------------------------------------------
# real runs


@pytest.fixture(scope="module")
def toy(world, tmp_path_factory) -> SimpleNamespace:
    """Chinese and English token directories (and English instructions) of the world's
    tokenizer, beside the world's own."""
    root = tmp_path_factory.mktemp("toy-mix")
    tok = world / "tokenizer.model"
    zh = _text(root / "zh.txt", chinese_documents(150, seed=12))
    en = _text(root / "en.txt", english_documents(150, seed=11))
    records = [{"instruction": "Go on: " + d[:16], "input": "", "output": d[16:]}
               for d in english_documents(60, seed=13)]
    (root / "en.json").write_text(json.dumps(records), encoding="utf-8")
    for name, src, preparer in (("zh", zh, TextPreparer()), ("en", en, TextPreparer()),
                                ("sft_en", root / "en.json", SFTPreparer(max_seq_length=320))):
        prepare(PrepareOptions(tok, (str(src),), root / name, preparer, num_workers=1))
    return SimpleNamespace(zh=root / "zh", en=root / "en", sft_en=root / "sft_en", world=world)


def sources(*pairs: tuple[Path, float]) -> list[str]:
    """Overrides that train on a mixture instead of the command's data.path."""
    return ["--data.path=", "--data.sources=" + json.dumps([{"path": str(p), "weight": w} for p, w in pairs])]


def test_kill_9_and_resume_with_sources_bit_for_bit(toy, tmp_path):
    common = [*FAST, "--optim.max_steps=8", "--checkpoint.every=2", "--checkpoint.keep_last=2",
              "--lora.dropout=0.2", *sources((toy.zh, 0.8), (toy.en, 0.2))]
    run(train_cmd("pretrain", "stage2.yaml", toy.world, tmp_path / "straight", *common))
    cmd = train_cmd("pretrain", "stage2.yaml", toy.world, tmp_path / "killed", *common)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_for(tmp_path / "killed" / "step-4" / "meta.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "resumed from" in run(cmd).stdout
    a, b = final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")
    shares = [(r["share/zh"], r["share/en"]) for r in metrics(tmp_path / "killed") if "loss" in r]
    assert shares == [(r["share/zh"], r["share/en"]) for r in metrics(tmp_path / "straight") if "loss" in r]
    assert len(shares) == 8 and all(abs(zh - 0.8) <= 0.1 and zh + en == pytest.approx(1) for zh, en in shares)
    # the mixture is part of what a run is: another weight cannot resume it
    before = tree_hashes(tmp_path / "killed")
    line = one_error(run([*cmd, "--optim.max_steps=10",
                          *sources((toy.zh, 0.7), (toy.en, 0.3))], ok=False))
    assert "cannot resume step-8" in line and "data.sources[0].weight: 0.8 → 0.7" in line, line
    assert tree_hashes(tmp_path / "killed") == before


def test_a_source_of_another_tokenizer_is_refused_before_anything_is_written(toy, tmp_path):
    require_shared(LLAMA_TOK, LI_BAI)
    other = tmp_path / "llama-tokens"
    prepare(PrepareOptions(LLAMA_TOK, (str(LI_BAI),), other, TextPreparer(), num_workers=1))
    out = tmp_path / "run"
    line = one_error(run(train_cmd("pretrain", "stage2.yaml", toy.world, out, *FAST, "--optim.max_steps=2",
                                   *sources((toy.zh, 0.8), (other, 0.2))), ok=False))
    assert str(other) in line and str(toy.zh) in line and "tokenized with" in line, line
    assert not out.exists()


def test_validation_sets_are_evaluated_and_logged(toy, tmp_path):
    from model.formats import read_checkpoint
    from model.lora import load_adapter
    from model.source import load_model

    out, block, batches = tmp_path / "run", 32, 3
    val_sets = json.dumps({"world": str(toy.world / "tokens")})
    run(train_cmd("pretrain", "stage2.yaml", toy.world, out, "--optim.max_steps=4", "--optim.warmup_steps=1",
                  f"--data.block_size={block}", "--data.val_fraction=0.1", "--log.eval_every=2",
                  f"--log.eval_batches={batches}", f"--data.val_sets={val_sets}",
                  *sources((toy.zh, 0.5), (toy.en, 0.5))))
    evals = [r for r in metrics(out) if any(k.startswith("val/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    for name in ("zh", "en", "world"):  # each source's held-out tail, and the named set
        for r in evals:
            assert r[f"val/{name}/ppl"] == pytest.approx(math.exp(r[f"val/{name}/loss"]))
            assert 0 <= r[f"val/{name}/acc"] <= 1
    assert not any("val_loss" in r for r in evals)
    # the last evaluation by hand: the first blocks of the whole directory, in order,
    # under the trained adapter
    meta = read_meta(toy.world / "tokens")
    tokens = np.concatenate([np.fromfile(toy.world / "tokens" / f["tokens"], dtype=meta["dtype"])
                             for f in meta["files"]]).astype(np.int64)
    micro = load_config(out / "config.yaml").optim.micro_batch_size
    n = batches * micro
    x = torch.from_numpy(tokens[: n * block].reshape(n, block))
    model = load_model(read_checkpoint(toy.world / "base"))
    load_adapter(model, out / "adapter")
    model.eval()
    with torch.no_grad():
        logp = model(x).log_softmax(-1)[:, :-1]
    nll = -logp.gather(-1, x[:, 1:, None]).mean()
    assert evals[-1]["val/world/loss"] == pytest.approx(float(nll), abs=1e-5)


def test_sft_with_sources_and_a_validation_set(toy, tmp_path):
    out = tmp_path / "sft"
    run(train_cmd("sft", "sft.yaml", toy.world, out, "--optim.max_steps=2", "--log.eval_every=2",
                  "--log.eval_batches=2", f"--data.val_sets={json.dumps({'en': str(toy.sft_en)})}",
                  *sources((toy.world / "sft", 0.75), (toy.sft_en, 0.25))))
    rows = metrics(out)
    assert all(r["share/sft"] + r["share/sft_en"] == pytest.approx(1) for r in rows if "loss" in r)
    assert any("val/en/loss" in r for r in rows)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
