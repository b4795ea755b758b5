"""Chunked linear cross-entropy against the plain computation: value and gradients."""

from __future__ import annotations

import pytest
import torch

from kernels.cross_entropy import (
    linear_cross_entropy, linear_cross_entropy_reference, linear_cross_entropy_stats,
)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_value_and_gradients_equal_plain_loss(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(100, 32, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(500, 32, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 500, (100,), generator=g)
    labels[::7] = -100  # ignored positions
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    dh_ref, dw_ref = torch.autograd.grad(3.0 * ref, (hidden, weight))
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    dh, dw = torch.autograd.grad(3.0 * out, (hidden, weight))
    # (float64 in, float32 logits inside both paths)
    assert torch.allclose(out.double(), ref.double(), rtol=1e-6)
    assert torch.allclose(dh, dh_ref, atol=1e-5) and torch.allclose(dw, dw_ref, atol=1e-5)


def test_frozen_weight_and_all_ignored():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen: no weight gradient is computed
    labels = torch.full((10,), -100)
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    out.backward()
    assert out.item() == 0.0 and not hidden.grad.any()


def test_bfloat16_matches_reference():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(300, 32, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (64,), generator=g)
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    ref.backward()
    dh_ref, dw_ref = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    out.backward()
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-4)
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert torch.allclose(hidden.grad.float(), dh_ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(weight.grad.float(), dw_ref.float(), atol=2e-2, rtol=2e-2)


def _count_matmuls(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_evaluation_skips_the_gradient_products():
    hidden = torch.randn(40, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (40,))
    train = _count_matmuls(lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=10))
    with torch.no_grad():
        evaluated = _count_matmuls(lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=10))
        assert torch.equal(linear_cross_entropy(hidden, weight, labels, chunk_size=10),
                           linear_cross_entropy(hidden.detach(), weight.detach(), labels, 10))
    assert (train, evaluated) == (12, 4)  # 4 chunks: logits, d hidden, d weight vs logits only


@pytest.mark.parametrize("chunk", [1, 9, 100])
def test_evaluation_stats_equal_plain_loss_and_argmax(chunk):
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(50, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (50,), generator=g)
    logits = hidden @ weight.t()
    labels[:10] = logits[:10].argmax(-1)  # some right for sure
    labels[::6] = -100
    loss, correct = linear_cross_entropy_stats(hidden, weight, labels, chunk)
    valid = labels != -100
    assert torch.allclose(loss, linear_cross_entropy_reference(hidden, weight, labels))
    assert int(correct) == int(((logits.argmax(-1) == labels) & valid).sum()) >= 8


def profiled_peak(fn) -> int:
    """The most bytes the CPU allocator held while `fn()` ran (its result freed after)."""
    import gc

    from torch.profiler import ProfilerActivity, profile, record_function

    from train.plan_trace import allocator_peak

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("measured"):
            fn()
        gc.collect()
    events = prof.profiler.kineto_results.events()
    mark = next(e for e in events if e.name() == "measured")
    return allocator_peak([e for e in events if e.name() == "[memory]"], mark.start_ns(), mark.end_ns())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_holds_one_float32_logits_buffer(dtype):
    """Peak memory of forward + backward, read from the CPU allocator's profiler events,
    against what must be alive. Forward: d hidden, d weight (accumulated in float32) and
    one chunk's float32 logits — reused for the softmax gradient, with its copy in the
    weight's dtype for the d-hidden product when that is narrower — and whatever the CPU's
    matrix product itself takes for one chunk's product (on CPUs with AMX, oneDNN packs a
    bf16 weight into a copy of its own), measured here alone. Backward: the saved gradients
    and their scaled copies. The first chunked loop held about four chunk buffers (the
    previous chunk's logits, logsumexp's hidden temporary among them) and a second d weight."""
    g = torch.Generator().manual_seed(0)
    n, dim, vocab, chunk = 512, 64, 4000, 128
    hidden = torch.randn(n, dim, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, dim, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    size = dtype.itemsize
    with torch.no_grad():  # the two products of a chunk, each beyond its own output
        grad = torch.randn(chunk, vocab, generator=g).to(dtype)
        workspace = max(profiled_peak(lambda: hidden[:chunk] @ weight.t()) - chunk * vocab * size,
                        profiled_peak(lambda: grad @ weight) - chunk * dim * size, 0)
        del grad
    peak = profiled_peak(lambda: linear_cross_entropy(hidden, weight, labels, chunk).backward())
    forward = n * dim * size + vocab * dim * 4 + chunk * vocab * (4 + (size if size < 4 else 0)) + workspace
    backward = 2 * (n + vocab) * dim * size
    assert peak <= 1.1 * max(forward, backward), (peak, forward, backward, workspace)
