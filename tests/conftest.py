"""Shared test fixtures: where the real test material lives, and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real test material (tokenizers, corpus, stories260K) lies beside the checkout.
SHARED_DATA = Path(os.environ.get("ZHLLAMA_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never reach a hub: every reference is loaded from local files.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def require_shared(*paths: Path) -> None:
    """Skip the test when some real test material is absent, or fail with
    ZHLLAMA_REQUIRE_SHARED_DATA=1 (so a CI that has the files cannot pass by skipping)."""
    missing = [str(p) for p in (paths or (SHARED_DATA,)) if not p.exists()]
    if not missing:
        return
    message = f"real test material not found: {', '.join(missing)}"
    if os.environ.get("ZHLLAMA_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(message + " (ZHLLAMA_REQUIRE_SHARED_DATA=1)")
    pytest.skip(message)


@pytest.fixture
def shared_data() -> Path:
    """The real test material; tests that use it skip cleanly when it is absent."""
    require_shared(SHARED_DATA)
    return SHARED_DATA


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
