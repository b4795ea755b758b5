"""Shared test fixtures: where the real test material lives, and tiny models.

The session fixtures (the real material, stories260K converted once, the training tests'
toy world) live in tests/helpers.py and are registered here by importing them.
"""

from __future__ import annotations

import pytest

from tests.helpers import REPO, SHARED_DATA, require_shared  # noqa: F401  (imported by tests)
from tests.helpers import shared_data, stories260k, world  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never reach a hub: every reference is loaded from local files.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def random_model(args, seed: int = 0, std: float = 0.1):
    """A model with weights large enough that a wrong rotary layout or permutation shows.

    (At the usual std of 0.02 attention is nearly uniform and such bugs hide.)
    Norm weights are randomised too, so a swapped norm is caught.
    """
    import torch

    from model.llama import INIT_STD, build_model

    torch.manual_seed(seed)
    model = build_model(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:  # the model's own initialisation, scaled from std INIT_STD to `std`
                p.mul_(std / INIT_STD)
    return model.eval()
