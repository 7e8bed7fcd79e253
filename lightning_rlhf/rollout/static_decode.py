"""Fixed-shape decoding for `rollout.generate`: a static KV cache and, on CUDA, the decode step in a CUDA graph.

With transformers' dynamic cache every decode step grows the cache by concatenation and rebuilds the
attention mask (host-side shape logic, data-dependent checks): at batch 64 on a GPU the step is bound
by Python and kernel launches, not by the weights' memory traffic. Here:

- the cache is transformers' ``StaticCache`` (``StaticCache(config=..., max_cache_len=...)``, the
  same constructor in transformers 5.17 and 5.19), sized prompt + ``max_new_tokens``, allocated at
  the prefill and written in place; its write position is a device tensor advanced by the cache
  itself, so a step needs no host-side position;
- the decode step reads fixed buffers: the token ids ``(N, 1)``, the position ids ``(N, 1)`` and a
  ready 4D attention mask ``(N, 1, 1, L)`` (transformers passes a 4D mask through untouched, so its
  mask builder, which checks ``mask.all()`` on the host, never runs). Columns not written yet are
  masked, so the step attends to exactly the tokens the dynamic cache holds;
- ``cuda_graphs``: on a CUDA device the step (model forward, 16 layers = hundreds of kernels) is
  captured once per call in a ``torch.cuda.CUDAGraph`` and replayed per token; the inputs are copied
  into the buffers before each replay. The first ``WARMUP_STEPS`` decode steps run eagerly on a side
  stream (the warm-up that capture needs, done with real tokens, so nothing is run twice or undone).

Sampling, EOS bookkeeping and the stop check stay in `generate`'s loop, shared with the dynamic path.
"""

from __future__ import annotations

import time

import torch

WARMUP_STEPS = 2
"""Eager decode steps run on a side stream before the capture (cuBLAS / allocator warm-up)."""

last_capture_seconds = 0.0
"""Seconds the latest CUDA-graph capture took (diagnostics for scripts/bench_generate.py)."""


def attention_implementation(model: torch.nn.Module) -> str:
    config = model.config
    return getattr(config, "_attn_implementation", None) or "eager"


class StaticDecoder:
    """Prefill and per-token decode of `n` rows over a static cache of `max_len` positions.

    Args:
        model: a transformers causal LM (or a peft wrapper) in eval mode, attention ``sdpa`` or ``eager``.
        n: rows (prompts x samples).
        max_len: prompt width + max_new_tokens (the cache length L).
        cuda_graphs: capture the decode step in a CUDA graph (CUDA devices only; ignored elsewhere).
        forward_kw: extra keyword arguments of every forward (e.g. ``logits_to_keep=1``).
        cache_kw: the forward's name of the cache argument.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        n: int,
        max_len: int,
        device: torch.device,
        cuda_graphs: bool = True,
        forward_kw: dict | None = None,
        cache_kw: str = "past_key_values",
    ) -> None:
        from transformers import StaticCache

        impl = attention_implementation(model)
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"generation.cache_implementation 'static' supports the 'sdpa' and 'eager' attention "
                f"implementations, not {impl!r}; use cache_implementation 'dynamic'"
            )
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.max_len = max_len
        self.forward_kw = dict(forward_kw or {})
        self.cache_kw = cache_kw
        self.use_graph = cuda_graphs and device.type == "cuda"
        dtype = next(model.parameters()).dtype
        # sdpa takes a bool mask (True = attend), as transformers builds it; eager adds a float bias
        self.bool_mask = impl == "sdpa"
        self.mask_dtype = torch.bool if self.bool_mask else dtype
        self.min_value = None if self.bool_mask else torch.finfo(dtype).min
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=device)  # (N, 1) token of the step
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=device)  # (N, 1) its position id
        self.mask = torch.zeros(n, 1, 1, max_len, dtype=self.mask_dtype, device=device)  # (N, 1, 1, L)
        self.steps = 0  # decode steps run so far
        self.stream: torch.cuda.Stream | None = None  # side stream of the warm-up steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None  # (N, V) output of the captured step
        self.capture_seconds = 0.0

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompts `(N, P)` through the model, filling cache positions 0..P-1; returns `(N, V)`
        logits of the last column (a copy)."""
        out = self.model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kw: self.cache},
            **self.forward_kw,
        )
        return out.logits[:, -1].clone()

    def _write_inputs(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> None:
        """Copy one step's inputs into the fixed buffers: tokens `(N,)`, positions `(N, 1)`, the 2D mask
        `(N, L)` of every cache column (1: a real token already written or written by this step)."""
        self.ids.copy_(tokens[:, None])
        self.positions.copy_(positions)
        m = mask[:, None, None, :]
        if self.bool_mask:
            self.mask.copy_(m.bool())
        else:
            self.mask.copy_(torch.where(m.bool(), 0.0, self.min_value))

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            use_cache=True,
            **{self.cache_kw: self.cache},
            **self.forward_kw,
        )
        return out.logits[:, -1]  # (N, V)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One decode step: feed `tokens` `(N,)` at `positions` `(N, 1)` with the full-width `mask`
        `(N, L)`; returns the `(N, V)` next-token logits (valid until the next call)."""
        if mask.shape[1] != self.max_len:
            raise ValueError(f"StaticDecoder.step: mask width {mask.shape[1]} != cache length {self.max_len}")
        self._write_inputs(tokens, positions, mask)
        self.steps += 1
        if not self.use_graph:
            return self._forward().clone()
        if self.graph is not None:
            self.graph.replay()
            return self.graph_logits
        if self.steps <= WARMUP_STEPS:  # real steps, run eagerly on a side stream before capture
            if self.stream is None:
                self.stream = torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                logits = self._forward().clone()
            torch.cuda.current_stream().wait_stream(self.stream)
            logits.record_stream(torch.cuda.current_stream())  # used (and freed) on the main stream
            return logits
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the cache is not advanced by the capture
            logits = self._forward()
        self.graph, self.graph_logits = graph, logits
        torch.cuda.synchronize()
        global last_capture_seconds
        self.capture_seconds = last_capture_seconds = time.perf_counter() - t0
        graph.replay()
        return self.graph_logits
