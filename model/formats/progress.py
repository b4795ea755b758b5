"""A progress bar over the tensors a writer emits."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from tqdm.auto import tqdm

from ..tensor_io import TensorSpec


@contextlib.contextmanager
def tensor_progress(
    specs: dict[str, TensorSpec], desc: str, enabled: bool = True
) -> Iterator[Callable[[str], None]]:
    """Yield a callback to call after each tensor is written; shows bytes done."""
    total = sum(s.nbytes for s in specs.values())
    with tqdm(total=total, desc=f"writing {desc}", unit="B", unit_scale=True,
              disable=not enabled) as bar:
        yield lambda name: bar.update(specs[name].nbytes)
