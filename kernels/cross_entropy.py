"""Cross-entropy of a linear output layer, computed in chunks of tokens.

With a 50K vocabulary, the logits of a 8 × 512 batch are 8·512·50K floats (0.8 GB in
fp32) and their gradient as much again, more than the whole transformer's activations for
a small model. `linear_cross_entropy` never holds more than one chunk of logits: for each
chunk it computes the logits, the loss, and at once the chunk's gradients with respect to
the hidden states and the weight (softmax − one-hot), which backward then only scales.
The matrix multiplications are the same three as the plain path (logits, d hidden,
d weight), so it costs no extra compute.

`linear_cross_entropy_reference` is the plain computation it must equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenizer.labels import IGNORE_INDEX


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Sum over tokens of -log softmax(hidden · weightᵀ)[label]; labels of -100 are skipped.

    hidden: (n, dim); weight: (vocab, dim); labels: (n,). Logits are computed in float32.
    """
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, grad_enabled):  # type: ignore[override]
        # needs_input_grad follows requires_grad even under no_grad, so evaluation passes
        # grad_enabled=False to skip the two gradient products it would never use.
        need_dh = grad_enabled and ctx.needs_input_grad[0]
        need_dw = grad_enabled and ctx.needs_input_grad[1]
        loss = hidden.new_zeros((), dtype=torch.float32)
        d_hidden = torch.zeros_like(hidden) if need_dh else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if need_dw else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # (chunk, dim)
            y = labels[start : start + chunk_size]  # (chunk,)
            logits = (h @ weight.t()).float()  # (chunk, vocab): the only large tensor
            valid = y != IGNORE_INDEX
            safe_y = torch.where(valid, y, 0)
            # log-sum-exp written out, in the logits' own buffer (torch.logsumexp would make
            # a hidden (chunk, vocab) temporary): with m the row's largest logit,
            # loss = log Σ exp(l − m) − (l_label − m), and softmax = exp(l − m) / Σ exp(l − m)
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            picked = logits.gather(1, safe_y[:, None])[:, 0]
            probs = logits.exp_()
            total = probs.sum(dim=-1)
            loss += ((total.log() - picked) * valid).sum()
            if need_dh or need_dw:
                # d loss / d logits = softmax − one-hot, zero on ignored rows, still in the
                # same buffer: a chunk holds one (chunk, vocab) float32 tensor
                grad = probs.div_(total[:, None])
                grad[torch.arange(len(y), device=y.device), safe_y] -= 1.0
                grad *= valid[:, None]
                if need_dh:
                    d_hidden[start : start + chunk_size] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_dw:
                    # accumulated in place: `d_weight += grad.t() @ h` would first make a
                    # second (vocab, dim) float32 tensor, 0.8 GB at LLaMA-7B's width
                    d_weight.addmm_(grad.t(), h.float())
                del grad
            # freed before the next chunk's logits exist, not when the name is rebound
            del logits, probs
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)  # accumulated in fp32, kept in the weight's dtype
        ctx.save_for_backward(d_hidden, d_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        # The gradients were computed in forward; the chain rule only scales them.
        d_hidden, d_weight = ctx.saved_tensors
        gh = d_hidden * grad_loss.to(d_hidden.dtype) if d_hidden is not None else None
        gw = d_weight * grad_loss.to(d_weight.dtype) if d_weight is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """`linear_cross_entropy_reference` without materialising all logits.

    Args:
        hidden: (n, dim) final hidden states.
        weight: (vocab, dim) output projection.
        labels: (n,) target ids, -100 where no loss is taken.
        chunk_size: tokens per chunk; the extra memory is one chunk of float32 logits
            (chunk_size × vocab × 4 bytes), plus its copy in the weight's dtype if narrower.

    Returns:
        The summed loss, a float32 scalar.
    """
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {labels.shape[0]} labels")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size, torch.is_grad_enabled())


@torch.no_grad()
def linear_cross_entropy_stats(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """For evaluation: (summed loss, number of tokens whose argmax is the label), in chunks.

    Same shapes as `linear_cross_entropy`; labels of -100 count in neither. No gradients.
    """
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        y = labels[start : start + chunk_size]
        logits = (hidden[start : start + chunk_size] @ weight.t()).float()
        loss += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        correct += ((logits.argmax(-1) == y) & (y != IGNORE_INDEX)).sum()
    return loss, correct
