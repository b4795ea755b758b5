"""YAML configs: typed, strict, overridable; every shipped config parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import ConfigError, dump, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    again = tmp_path / "resolved.yaml"
    again.write_text(dump(cfg))
    assert load_config(again) == cfg


def test_overrides_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\ndata: {path: d}\noptim: {lr: 1.0e-4}\n")
    cfg = load_config(f, ["--optim.lr=3e-4", "--lora.targets=q_proj,v_proj", "--parallel.compile=true"])
    assert cfg.optim.lr == 3e-4 and cfg.lora.targets == ("q_proj", "v_proj") and cfg.parallel.compile
    bad = [
        (["--optim.lrr=1"], "optim.lrr: unknown key"),
        (["--optim.max_steps=1.5"], "optim.max_steps: expected an integer"),
        (["--parallel.precision=fp8"], "parallel.precision: 'fp8' is not one of"),
        (["--stage=pretrain"], "stage: 'pretrain' is not one of"),
        (["--optim.lr=fast"], "optim.lr: expected a number"),
        (["--nonsense.key=1"], "nonsense: unknown key"),
        (["optim.lr=1"], "expected --section.key=value"),
        (["--optim.micro_batch_size=0"], "optim.micro_batch_size: must be positive"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config(f, overrides)
    f.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(f)
