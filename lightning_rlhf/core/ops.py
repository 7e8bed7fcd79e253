"""Masked reductions and memory-careful log-prob / entropy from logits.

Pure functions of tensors. Conventions used everywhere in ``core/``:

- ``mask`` is a bool or 0/1 tensor broadcastable to ``x``; ``True``/1 marks a real element. Masked
  (padded) elements never change a result, even when they hold ``inf``/``NaN``: they are removed
  with ``torch.where`` rather than multiplied by 0, so they also get exactly zero gradient.
- A mean over an empty set (all-masked row or tensor) is 0, not NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_moments",
    "moments_mean_var",
    "logprobs_from_logits",
    "entropy_from_logits",
]

# Rows of logits processed at once by `logprobs_from_logits` / `entropy_from_logits`: about
# 4M elements (16 MiB in fp32) per chunk, so the fp32 temporaries stay small whatever B*T is.
_CHUNK_ELEMENTS = 1 << 22


def _bool_mask(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(device=x.device)
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the elements where ``mask`` is set.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: bool or 0/1, broadcastable to ``x``.
        dim: reduce over this dimension only (e.g. ``-1`` gives per-row sums ``(B,)``); ``None``
            sums everything to a scalar.
    """
    m = _bool_mask(x, mask)
    xm = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xm.sum() if dim is None else xm.sum(dim)


def _count(x: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    m = _bool_mask(x, mask)
    m = m.expand(torch.broadcast_shapes(x.shape, m.shape))
    c = m.sum() if dim is None else m.sum(dim)
    return c.to(x.dtype if x.is_floating_point() else torch.float32)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the masked-in elements: ``masked_sum / count``, 0 where the count is 0.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: bool or 0/1, broadcastable to ``x``.
        dim: ``None`` -> scalar mean over all real elements (a "token mean" over the batch);
            ``-1`` on ``(B, T)`` -> per-row means ``(B,)``, 0 for an all-masked row.
    """
    total = masked_sum(x, mask, dim)
    count = _count(x, mask, dim)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, dim: int | None = None) -> Tensor:
    """Variance of ``x`` over the masked-in elements.

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` (as TRL's ``masked_var``, which
    its ``masked_whiten`` uses). Where fewer than 2 elements (unbiased) or no element (biased) are
    real, the variance is undefined and 0 is returned instead of NaN/inf.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: bool or 0/1, broadcastable to ``x``.
        unbiased: divide by ``n - 1`` instead of ``n``.
        dim: ``None`` -> scalar; an int -> variance along that dimension.
    """
    m = _bool_mask(x, mask)
    # zero the padding before squaring so inf/NaN there cannot reach the gradient (0 * inf = NaN)
    xm = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    mean = masked_mean(xm, m, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    total = masked_sum((xm - mean) ** 2, m, dim)
    n = _count(x, mask, dim)
    denom = n - 1 if unbiased else n
    return torch.where(denom > 0, total / denom.clamp(min=1), torch.zeros_like(total))


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """The additive statistics of ``x``'s real elements: ``(3,)`` float64 ``[count, sum, sum of squares]``.

    Statistics of a union of batches are the sum of theirs, so an all-reduce (sum) of each rank's
    moments gives the statistics of every rank's elements at once: what :func:`moments_mean_var`
    and ``whiten(..., moments=...)`` take to normalise over the global batch (2 processes x B rows
    then equal 1 process x 2B rows). float64, so that ``sum of squares - sum^2 / count`` keeps its
    digits (it loses about ``log10(mean^2 / var)`` of float64's 16).

    Args:
        x: any shape, e.g. ``(B, T)`` advantages.
        mask: bool or 0/1, broadcastable to ``x``.
    """
    m = _bool_mask(x, mask)
    xm = torch.where(m, x.detach().double(), torch.zeros((), dtype=torch.float64, device=x.device))
    count = m.expand(torch.broadcast_shapes(x.shape, m.shape)).sum().double()
    return torch.stack([count, xm.sum(), (xm * xm).sum()])


def moments_mean_var(moments: Tensor, unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """Mean and variance from :func:`masked_moments` (possibly summed over ranks): float64 scalars.

    ``var = (sum of squares - count * mean^2) / (count - 1)`` (``/ count`` with ``unbiased=False``),
    clamped at 0 against rounding; as :func:`masked_var`, an undefined variance (fewer than 2
    elements, unbiased; none, biased) is 0, and the mean of no element is 0.
    """
    count, total, squares = moments.double().unbind()
    mean = total / count.clamp(min=1)
    denom = count - 1 if unbiased else count
    var = ((squares - count * mean * mean) / denom.clamp(min=1)).clamp(min=0)
    return mean, torch.where(denom > 0, var, torch.zeros_like(var))


# --------------------------------------------------------------------------------------------
# Log-probs and entropy from logits, without a second vocab-sized tensor.
# --------------------------------------------------------------------------------------------


def _row_blocks(logits: Tensor) -> list[Tensor]:
    """2-D ``(rows, V)`` views covering all rows of ``logits`` in row-major order, without a copy
    where possible (``logits[:, :-1]`` of a ``(B, T, V)`` tensor is not viewable as ``(-1, V)``,
    but each ``logits[b]`` is)."""
    V = logits.shape[-1]
    if logits.dim() == 1:
        return [logits.unsqueeze(0)]
    if logits.dim() == 2:
        return [logits]
    try:
        return [logits.view(-1, V)]
    except RuntimeError:
        if logits.dim() == 3:
            return list(logits.unbind(0))
        return [logits.reshape(-1, V)]  # rare: >3-D and non-viewable, one copy


def _chunks(logits: Tensor, chunk_size: int | None):
    """Yield ``(offset, chunk)`` with ``chunk`` a ``(n, V)`` view of rows ``offset:offset+n``."""
    V = logits.shape[-1]
    rows = chunk_size or max(1, _CHUNK_ELEMENTS // max(V, 1))
    offset = 0
    for block in _row_blocks(logits):
        for start in range(0, block.shape[0], rows):
            chunk = block[start : start + rows]
            yield offset, chunk
            offset += chunk.shape[0]


def _log_softmax_fp32(chunk: Tensor, temperature: float) -> Tensor:
    """``log_softmax(chunk / temperature)`` in fp32 for a ``(n, V)`` chunk: one fused kernel (the
    upcast of bf16/fp16 happens inside), allocating only chunk-sized temporaries."""
    if temperature != 1.0:
        chunk = chunk.float() / temperature
    return torch.log_softmax(chunk, dim=-1, dtype=torch.float32)


class _LogprobsFromLogits(torch.autograd.Function):
    """Forward: chunked fp32 ``log_softmax(chunk).gather(labels)``; saves only the input logits
    (already alive) and labels. Backward: recomputes the chunk's softmax and writes
    ``(onehot - softmax) * grad`` straight into the gradient tensor (which autograd needs anyway),
    so no vocab-sized fp32 copy is ever alive."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float, chunk_size: int | None):
        flat_labels = labels.reshape(-1)
        n_rows = flat_labels.numel()
        out = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        safe = flat_labels.clamp(min=0)
        for off, chunk in _chunks(logits, chunk_size):
            n = chunk.shape[0]
            logp = _log_softmax_fp32(chunk, temperature)  # (n, V) fp32, chunk-sized
            out[off : off + n] = logp.gather(-1, safe[off : off + n].unsqueeze(-1)).squeeze(-1)
        out = out.masked_fill(flat_labels < 0, 0.0)
        ctx.save_for_backward(logits, labels)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out.view(labels.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        V = logits.shape[-1]
        flat_labels = labels.reshape(-1)
        g = grad_out.reshape(-1).float().masked_fill(flat_labels < 0, 0.0)  # (N,)
        safe = flat_labels.clamp(min=0)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # contiguous
        grad_rows = grad.view(-1, V)
        for off, chunk in _chunks(logits, ctx.chunk_size):
            n = chunk.shape[0]
            gn = g[off : off + n].unsqueeze(-1)  # (n, 1)
            # d(logp[y])/dx = onehot(y) - softmax(x); in place on the fp32 chunk-sized temporary.
            d = _log_softmax_fp32(chunk, ctx.temperature).exp_().mul_(-gn)
            d.scatter_add_(-1, safe[off : off + n].unsqueeze(-1), gn)
            if ctx.temperature != 1.0:
                d.div_(ctx.temperature)
            grad_rows[off : off + n] = d
        return grad, None, None, None


class _EntropyFromLogits(torch.autograd.Function):
    """Chunked fp32 entropy ``H = -sum p log p`` of ``softmax(logits)``; backward
    ``dH/dx = -p * (log p + H)``, computed chunk by chunk like `_LogprobsFromLogits`."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, chunk_size: int | None):
        out_shape = logits.shape[:-1]
        n_rows = out_shape.numel()
        ent = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        for off, chunk in _chunks(logits, chunk_size):
            n = chunk.shape[0]
            logp = _log_softmax_fp32(chunk, temperature)  # (n, V)
            # p * logp with 0 * (-inf) := 0 (logits of -inf, e.g. a masked vocabulary).
            plogp = torch.where(logp > float("-inf"), logp.exp() * logp, 0.0)
            ent[off : off + n] = -plogp.sum(-1)
        ctx.save_for_backward(logits, ent)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return ent.view(out_shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        V = logits.shape[-1]
        g = grad_out.reshape(-1).float()
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad.view(-1, V)
        for off, chunk in _chunks(logits, ctx.chunk_size):
            n = chunk.shape[0]
            logp = _log_softmax_fp32(chunk, ctx.temperature)
            d = torch.where(logp > float("-inf"), logp.exp() * (logp + ent[off : off + n].unsqueeze(-1)), 0.0)
            d.mul_(-g[off : off + n].unsqueeze(-1))
            if ctx.temperature != 1.0:
                d.div_(ctx.temperature)
            grad_rows[off : off + n] = d
        return grad, None, None


def logprobs_from_logits(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``, in fp32.

    ``log_softmax(logits).gather(labels)`` materialises a second vocab-sized tensor (and, from bf16
    logits, a third: the fp32 upcast). Here rows are processed in chunks of about 4M elements:
    ``logits[label] - logsumexp(logits)`` in fp32 per chunk; backward writes ``onehot - softmax``
    chunk by chunk into the gradient. Peak extra memory is one chunk, not ``(B, T, V)``.
    (The same approach as TRL's ``selective_log_softmax`` and verl's chunked log-probs.)

    Args:
        logits: ``(..., V)``, any float dtype (bf16/fp16/fp32); typically ``(B, T, V)``. Views such
            as ``logits[:, :-1]`` are processed without a copy.
        labels: ``(...)`` long, same leading shape. A negative label (e.g. ``-100``) gives log-prob
            0 and zero gradient.
        temperature: logits are divided by it (per chunk) before the softmax.
        chunk_size: rows per chunk; default ``2**22 // V``.

    Returns:
        ``(...)`` fp32 log-probs. Differentiable w.r.t. ``logits`` (first order).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logprobs_from_logits: logits {tuple(logits.shape)} vs labels {tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"logprobs_from_logits: temperature must be > 0, got {temperature}")
    return _LogprobsFromLogits.apply(logits, labels, float(temperature), chunk_size)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``softmax(logits / temperature)`` per position, in fp32.

    Chunked over rows like :func:`logprobs_from_logits` (no vocab-sized fp32 copy of ``logits``);
    ``-inf`` logits (a masked vocabulary) contribute 0.

    Args:
        logits: ``(..., V)``, e.g. ``(B, T, V)``, any float dtype.
        temperature: logits are divided by it before the softmax.
        chunk_size: rows per chunk; default ``2**22 // V``.

    Returns:
        ``(...)`` fp32 entropies, e.g. ``(B, T)``. Differentiable w.r.t. ``logits`` (first order).
    """
    if temperature <= 0:
        raise ValueError(f"entropy_from_logits: temperature must be > 0, got {temperature}")
    return _EntropyFromLogits.apply(logits, float(temperature), chunk_size)
