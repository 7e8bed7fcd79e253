"""Fixed-shape decoding for `rollout.generate`: a static KV cache and, on CUDA, the decode step in a CUDA graph.

With transformers' dynamic cache every decode step grows the cache by concatenation and rebuilds the
attention mask (host-side shape logic, data-dependent checks): at batch 64 on a GPU the step is bound
by Python and kernel launches, not by the weights' memory traffic. Here:

- the cache is transformers' ``StaticCache`` (``StaticCache(config=..., max_cache_len=...)``, the
  same constructor in transformers 5.17 and 5.19), sized prompt + ``max_new_tokens`` (rounded up), allocated at
  the prefill and written in place; its write position is a device tensor advanced by the cache
  itself, so a step needs no host-side position;
- the decode step reads fixed buffers: the token ids ``(N, 1)``, the position ids ``(N, 1)`` and a
  ready 4D attention mask ``(N, 1, 1, L)`` (transformers passes a 4D mask through untouched, so its
  mask builder, which checks ``mask.all()`` on the host, never runs). Columns not written yet are
  masked, so the step attends to exactly the tokens the dynamic cache holds;
- ``cuda_graphs``: on a CUDA device the step (model forward, 16 layers = hundreds of kernels) is
  captured in a ``torch.cuda.CUDAGraph`` and replayed per token; the inputs are copied into the
  buffers before each replay. The first ``WARMUP_STEPS`` decode steps run eagerly on a side stream
  (the warm-up that capture needs, done with real tokens, so nothing is run twice or undone).

The decoder (cache, buffers, graph) is kept per model and set of options, and reused by the next
call of the same shape: rows ``N`` and cache length ``L``, rounded up to ``LENGTH_BUCKET`` so that
prompt batches of other widths share it (the extra columns stay masked). It is rebuilt when the shape
or any parameter's storage changes (weights updated in place, as by an optimiser, are seen by the
graph; weights replaced are not, hence the check), and freed with the model, or by `release(model)`.
Keeping it holds the cache's memory (2 x layers x N x kv_heads x L x head_dim elements) between
rollouts. With ``torch_compile`` every new shape compiles again (``dynamic=False``; dynamo's
recompile limit, 8 by default, then falls back to eager).
- ``torch_compile``: the decode step goes through ``torch.compile`` (inductor, static shapes), which
  fuses the many small kernels of a transformers layer (norms, rotary, casts); under CUDA graphs the
  compiled step is what is captured. Compiling takes ~20 s on an H100 for a 16-layer model, once per
  process and shape.

- ``decode_attention: grouped``: the decode steps use this module's attention
  (`grouped_decode_attention`, registered with transformers' ``AttentionInterface`` and switched on
  with ``set_attn_implementation`` for the decode loop only): two batched matmuls that read each KV
  head once. transformers' sdpa path repeats the KV heads of a grouped-query model (``repeat_kv``)
  whenever a mask is passed and then runs a generic masked kernel: at batch 64 that copy moves more
  bytes than the weights.

On one H100 (Llama h2048 / 16 layers / V32000, bf16, batch 64, 128 tokens, a greedy loop around
transformers 5.17 + torch 2.11): eager static steps 2.1k tokens/s, CUDA graph 13.0k, compiled +
CUDA graph 22.2k (torch.compile's own ``reduce-overhead``: 21.3k); the dynamic cache made 2.9k.

Sampling, EOS bookkeeping and the stop check stay in `generate`'s loop, shared with the dynamic path.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Iterator

import torch

WARMUP_STEPS = 2
"""Eager decode steps run on a side stream before the capture (cuBLAS / allocator warm-up)."""

LENGTH_BUCKET = 32
"""The cache length is rounded up to a multiple of this, so that batches of other prompt widths
reuse the kept decoder (and its captured graph)."""

last_capture_seconds = 0.0
"""Seconds the latest CUDA-graph capture took (diagnostics for scripts/bench_generate.py)."""

# model -> {options: its kept StaticDecoder}, the most recently used last
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_step(model, ids, mask, positions, cache, cache_kw: str, forward_kw: dict) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_kw: cache}, **forward_kw)  # fmt: skip
    return out.logits[:, -1]  # (N, V)


_compiled_decode_step = None


def compiled_decode_step():
    """`_decode_step` through ``torch.compile`` (one wrapper per process, so compiled code is shared)."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(_decode_step, dynamic=False)
    return _compiled_decode_step


GROUPED_ATTENTION = "lightning_rlhf_grouped_decode"
"""Name of `grouped_decode_attention` in transformers' ``AttentionInterface``."""


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention without repeating KV heads: query `(N, H, q, D)`, key / value `(N, KVH, L, D)`, a bool
    `attention_mask` `(N, 1, q, L)` (True: attend) or a float bias -> `(N, q, H, D)`.

    Query head `i` attends with KV head `i // (H / KVH)`, as transformers' ``repeat_kv`` lays them out.
    """
    unsupported = [k for k in ("softcap", "sliding_window", "s_aux") if kwargs.get(k) is not None]
    if unsupported:
        raise ValueError(
            f"generation.decode_attention 'grouped' does not implement {unsupported} of this model's attention; "
            "use decode_attention 'model'"
        )
    n, h, q, d = query.shape
    kvh, length = key.shape[1], key.shape[2]
    g = h // kvh
    scores = torch.matmul(query.reshape(n, kvh, g * q, d), key.transpose(-1, -2))  # (N, KVH, g*q, L)
    scores = scores * (scaling if scaling is not None else d**-0.5)
    if attention_mask is not None:
        m = attention_mask[:, :, :, -length:]  # (N, 1, q, L)
        if q > 1:  # rows of scores are (group member, query position)
            m = m[:, :, None].expand(n, m.shape[1], g, q, length).reshape(n, m.shape[1], g * q, length)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    probs = scores.softmax(-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # (N, KVH, g*q, D)
    return out.reshape(n, h, q, d).transpose(1, 2), None


@contextlib.contextmanager
def decode_attention(model: torch.nn.Module, grouped: bool) -> Iterator[None]:
    """Within the block, the model's attention is `grouped_decode_attention` (when `grouped`); its own
    implementation is set back after."""
    if not grouped:
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_ATTENTION, grouped_decode_attention)  # idempotent
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = hf.config._attn_implementation
    hf.set_attn_implementation(GROUPED_ATTENTION)
    try:
        yield
    finally:
        hf.set_attn_implementation(previous)


def attention_implementation(model: torch.nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def uses_graphs(device: torch.device, cuda_graphs: bool) -> bool:
    return cuda_graphs and device.type == "cuda"


def cache_length(needed: int) -> int:
    """Length L of the static cache for `needed` = prompt width + max_new_tokens positions: rounded up
    to a multiple of `LENGTH_BUCKET`, so that batches of other prompt widths reuse the decoder."""
    return math.ceil(needed / LENGTH_BUCKET) * LENGTH_BUCKET


def _storage_key(model: torch.nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def static_decoder(
    model: torch.nn.Module,
    n: int,
    max_len: int,
    device: torch.device,
    cuda_graphs: bool = True,
    forward_kw: dict | None = None,
    cache_kw: str = "past_key_values",
    torch_compile: bool = False,
    grouped_attention: bool = False,
) -> StaticDecoder:
    """The `StaticDecoder` of `model` for `n` rows and cache length `max_len`, reset: the one kept from
    the model's previous call with the same options (cache, buffers, captured graph) when the shape and
    the parameter storages are the same, else a new one (which replaces it). One decoder is kept per
    model and set of options."""
    forward_kw = dict(forward_kw or {})
    graphs = uses_graphs(device, cuda_graphs)
    options = (graphs, torch_compile, grouped_attention, tuple(sorted(forward_kw.items())), cache_kw)
    key = (n, max_len, str(device), _storage_key(model))
    kept_by_options = _DECODERS.setdefault(model, {})
    decoder = kept_by_options.pop(options, None)
    if decoder is not None and decoder.key == key:
        decoder.reset()
    else:
        del decoder  # free the old cache and graph before allocating the new ones
        decoder = StaticDecoder(model, n, max_len, device, cuda_graphs=graphs, forward_kw=forward_kw,
                                cache_kw=cache_kw, torch_compile=torch_compile, grouped_attention=grouped_attention)  # fmt: skip
        decoder.key = key
    kept_by_options[options] = decoder  # (re)inserted last: the most recently used
    return decoder


def kept(model: torch.nn.Module) -> StaticDecoder | None:
    """The decoder `model`'s latest static-cache call used (None: none kept)."""
    decoders = _DECODERS.get(model)
    return next(reversed(decoders.values())) if decoders else None


def release(model: torch.nn.Module | None = None) -> None:
    """Drop the kept decoders of `model` (all models: None), freeing their caches and graphs."""
    if model is None:
        _DECODERS.clear()
    else:
        _DECODERS.pop(model, None)


class StaticDecoder:
    """Prefill and per-token decode of `n` rows over a static cache of `max_len` positions.

    It holds no reference to the model (the model is passed to each call), so that keeping it per
    model does not keep the model alive.

    Args:
        model: a transformers causal LM (or a peft wrapper), attention ``sdpa`` or ``eager``.
        n: rows (prompts x samples).
        max_len: the cache length L (>= prompt width + max_new_tokens).
        device: the model's device.
        cuda_graphs: capture the decode step in a CUDA graph (CUDA devices only; ignored elsewhere).
        forward_kw: extra keyword arguments of every forward (e.g. ``logits_to_keep=1``).
        cache_kw: the forward's name of the cache argument.
        torch_compile: run the decode step through ``torch.compile`` (`compiled_decode_step`).
        grouped_attention: the decode steps run under `decode_attention` (always a bool mask).
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
        torch_compile: bool = False,
        grouped_attention: bool = False,
    ) -> None:
        from transformers import StaticCache

        impl = attention_implementation(model)
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"generation.cache_implementation 'static' supports the 'sdpa' and 'eager' attention "
                f"implementations, not {impl!r}; use cache_implementation 'dynamic'"
            )
        self.key: tuple | None = None  # what `static_decoder` reuses it for
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        if any(self.cache.is_sliding):  # their keys are a window, not the L columns of the mask
            raise ValueError(
                "generation.cache_implementation 'static' does not support models with sliding-window "
                "attention layers; use cache_implementation 'dynamic'"
            )
        self.max_len = max_len
        self.forward_kw = dict(forward_kw or {})
        self.cache_kw = cache_kw
        self.use_graph = uses_graphs(device, cuda_graphs)
        self.step_fn = compiled_decode_step() if torch_compile else _decode_step
        dtype = next(model.parameters()).dtype
        # sdpa takes a bool mask (True = attend), as transformers builds it; eager adds a float bias
        self.bool_mask = impl == "sdpa" or grouped_attention
        self.mask_dtype = torch.bool if self.bool_mask else dtype
        self.min_value = None if self.bool_mask else torch.finfo(dtype).min
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=device)  # (N, 1) token of the step
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=device)  # (N, 1) its position id
        self.mask = torch.zeros(n, 1, 1, max_len, dtype=self.mask_dtype, device=device)  # (N, 1, 1, L)
        self.steps = 0  # decode steps run since the last reset
        self.stream: torch.cuda.Stream | None = None  # side stream of the warm-up steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None  # (N, V) output of the captured step
        self.capture_seconds = 0.0

    def reset(self) -> None:
        """Empty the cache in place (same storages, so a captured graph stays valid)."""
        self.cache.reset()
        self.steps = 0

    def prefill(
        self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Run the prompts `(N, P)` through the model, filling cache positions 0..P-1; returns `(N, V)`
        logits of the last column (a copy)."""
        if self.steps:
            raise RuntimeError("StaticDecoder.prefill: the cache is not empty (call reset() first)")
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kw: self.cache},
            **self.forward_kw,
        )
        self.steps = 0
        return out.logits[:, -1].clone()

    def _write_inputs(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> None:
        """Copy one step's inputs into the fixed buffers: tokens `(N,)`, positions `(N, 1)`, the 2D mask
        `(N, L)` of every cache column (1: a real token already written or written by this step)."""
        self.ids.copy_(tokens[:, None])
        self.positions.copy_(positions)
        m = mask[:, None, None, :]
        if self.bool_mask:
            self.mask.copy_(m)  # long -> bool
        else:
            self.mask.copy_(torch.where(m.bool(), 0.0, self.min_value))

    def _forward(self, model: torch.nn.Module) -> torch.Tensor:
        return self.step_fn(model, self.ids, self.mask, self.positions, self.cache, self.cache_kw, self.forward_kw)

    def step(
        self, model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One decode step: feed `tokens` `(N,)` at `positions` `(N, 1)` with the full-width `mask`
        `(N, L)`; returns the `(N, V)` next-token logits (valid until the next call)."""
        if mask.shape[1] != self.max_len:
            raise ValueError(f"StaticDecoder.step: mask width {mask.shape[1]} != cache length {self.max_len}")
        self._write_inputs(tokens, positions, mask)
        self.steps += 1
        if not self.use_graph:
            return self._forward(model).clone()
        if self.graph is not None:
            self.graph.replay()
            return self.graph_logits
        if self.steps <= WARMUP_STEPS:  # real steps, run eagerly on a side stream before capture
            if self.stream is None:
                self.stream = torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                logits = self._forward(model).clone()
            torch.cuda.current_stream().wait_stream(self.stream)
            logits.record_stream(torch.cuda.current_stream())  # used (and freed) on the main stream
            return logits
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the cache is not advanced by the capture
            logits = self._forward(model)
        self.graph, self.graph_logits = graph, logits
        torch.cuda.synchronize()
        global last_capture_seconds
        self.capture_seconds = last_capture_seconds = time.perf_counter() - t0
        graph.replay()
        return self.graph_logits
