"""Batched sampling with a KV cache, and the `Rollout` it returns.

Our own loop rather than `model.generate`: it records the fp32 log-prob of every sampled token under
exactly the distribution a training forward recomputes (`softmax(logits / temperature)`, no top-k /
top-p renormalisation), lays out `num_samples` rows per prompt consecutively for GRPO groups, and
returns explicit masks (pad may equal eos) instead of inferring them from pad ids.

Layout: prompts are left-padded internally so that every row's next token sits in the last column;
position ids count real tokens only (`mask.cumsum(-1) - 1`), so a prompt gets the same positions,
hence the same logits, whatever it is batched with.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from lightning_rlhf.core.prefix import share_prompt_groups
from lightning_rlhf.models.forward import default_position_ids, grouped_response_logprobs, sequence_logprobs
from lightning_rlhf.rollout import static_decode


@dataclass
class VLLMSpec:
    """Options of the colocated vLLM engine (``generation.vllm``)."""

    dtype: str = "auto"
    """Engine weights' dtype: ``auto`` (the policy's), ``float32``, ``bfloat16`` or ``float16``. Use
    ``float32`` for log-probs that match the trainer's to ~1e-5; bf16 is faster and differs by ~0.04
    nats per token (see TIS, ``tis_cap``)."""
    gpu_memory_utilization: float = 0.3
    """Share of the GPU memory vLLM may take (weights + KV cache); the rest stays with training."""
    max_model_len: int | None = None
    """Longest prompt + response the engine serves (None: the model's ``max_position_embeddings``)."""
    enforce_eager: bool = True
    """No CUDA graphs / compilation (faster start; set False on a GPU for long runs)."""
    kv_cache_space_gb: int = 1
    """KV-cache size on the CPU backend, whole GiB (``VLLM_CPU_KVCACHE_SPACE``)."""
    enable_sleep_mode: bool = False
    """GPU only: put the engine to sleep after each rollout (``llm.sleep(level=1)``: weights to host
    memory, KV cache freed) and wake it for the next, so that training gets the memory back. Ignored
    on the CPU (vLLM has no sleep mode there)."""
    sync_every: int = 1
    """Push the policy's weights into the engine after every N policy optimiser steps (1: the engine
    always samples from the current policy; N > 1: off-policy by up to N - 1 steps)."""
    enable_prefix_caching: bool = True
    """Share the KV cache of a prompt among its ``num_samples`` rows (reset after each sync)."""
    tensor_parallel_size: int = 1
    """Ranks per engine (multi-process runs): 1, one engine per rank sampling its own prompts; k > 1,
    one engine sharded over each k consecutive ranks (same node), fed the group's prompts."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"generation.vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"
            )
        if self.sync_every < 1:
            raise ValueError(f"generation.vllm.sync_every must be >= 1, got {self.sync_every}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"generation.vllm.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )


@dataclass
class GenerationSpec:
    """How responses are sampled during the rollout (``rollout.generate``)."""

    max_new_tokens: int = 64
    """Most tokens generated per response; a response that reaches it without EOS is 'truncated'."""
    temperature: float = 1.0
    """Sampling temperature (> 0). Log-probs of the training forward use the same temperature."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    num_samples: int = 1
    """Responses per prompt (rows of one prompt are consecutive; GRPO's group size)."""
    engine: Literal["hf", "vllm"] = "hf"
    """Who samples in the online stages: ``hf`` (this module's own KV-cache sampler, no extra
    dependency) or ``vllm`` (a ``vllm.LLM`` colocated in the training process, synced with the policy;
    needs the ``vllm`` extra). Evaluation always uses ``hf``."""
    vllm: VLLMSpec | None = None
    """Options of the ``vllm`` engine (None: the defaults)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights the ``hf`` engine samples with: ``auto`` (the policy itself) or a dtype: a persistent copy
    of the policy in that dtype (LoRA merged), used only for sampling and updated in place after each
    optimiser step (``rollout.sampler_copy``); the policy's own dtype means no copy. Like the vLLM
    engine's, the copy's log-probs are not the trainer's: the old log-probs are then recomputed by the
    trainer's forward and the mismatch is logged (``rollout/logprob_diff_*``, see ``tis_cap``). Not
    with FSDP2 or a quantized policy. The ``vllm`` engine's dtype is ``vllm.dtype``."""
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    """KV cache of the ``hf`` engine (as transformers' ``GenerationConfig.cache_implementation``):
    ``dynamic`` (grown per token; the default, fastest on the CPU) or ``static`` (preallocated for
    prompt + ``max_new_tokens``, fixed-shape decode steps; what ``cuda_graphs`` needs). Same tokens
    either way (log-probs equal to ~1e-6 in fp32)."""
    cuda_graphs: bool = True
    """With ``cache_implementation: static`` on a CUDA device, capture the decode step in a CUDA
    graph and replay it per token (the step is launch-bound otherwise); the graph is kept with the
    policy for the next rollouts of the same shape (``rollout.static_decode``). Ignored on other
    devices and under ``sync_stop`` (multi-rank rollouts run the static cache eagerly)."""
    torch_compile: bool = False
    """With ``cache_implementation: static``, run the decode step through ``torch.compile`` (fuses the
    layers' small kernels; with ``cuda_graphs`` the compiled step is captured). Compiling costs ~20 s
    once per process and shape on a GPU (about a minute for a tiny model on this CPU); on an H100 it
    took the 886M Llama's CUDA-graph decode from 13k to 22k tokens/s."""
    decode_attention: Literal["model", "grouped"] = "model"
    """Attention of the static cache's decode steps: ``model`` (the model's own, e.g. sdpa) or
    ``grouped`` (``rollout.static_decode.grouped_decode_attention``: two matmuls reading each KV head
    once; sdpa with a padding mask copies the KV heads of grouped-query models first). Same tokens in
    fp32; the prefill always uses the model's attention."""

    def __post_init__(self) -> None:
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"generation.engine must be 'hf' or 'vllm', got {self.engine!r}")
        if self.decode_attention not in ("model", "grouped"):
            raise ValueError(f"generation.decode_attention must be 'model' or 'grouped', got {self.decode_attention!r}")
        if self.cache_implementation not in ("dynamic", "static"):
            raise ValueError(
                f"generation.cache_implementation must be 'dynamic' or 'static', got {self.cache_implementation!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"generation.dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {self.dtype!r}"
            )
        if self.engine != "hf" and self.dtype != "auto":
            raise ValueError(
                f"generation.dtype is the hf engine's sampling dtype; with engine {self.engine!r} set "
                f"generation.vllm.dtype instead (got generation.dtype {self.dtype!r})"
            )
        if self.vllm is None:
            self.vllm = VLLMSpec()
        elif isinstance(self.vllm, dict):
            self.vllm = VLLMSpec(**self.vllm)


@dataclass
class Rollout:
    """Sampled responses of a prompt batch; rows = prompts x samples.

    Row `i` comes from prompt `prompt_index[i]`; the `num_samples` rows of one prompt are consecutive.
    All tensors share the device of the prompt batch.
    """

    prompt_ids: torch.Tensor  # (N, P) long, LEFT-padded, P = longest prompt
    prompt_mask: torch.Tensor  # (N, P) long, 1 for real prompt tokens
    response_ids: torch.Tensor  # (N, R) long, right-padded with pad_token_id, R = longest response
    response_mask: torch.Tensor  # (N, R) long, 1 for generated tokens incl. the EOS
    logprobs: (
        torch.Tensor
    )  # (N, R) fp32, log-prob of each sampled token under softmax(logits / T); 0 off mask
    finished: torch.Tensor  # (N,) bool, the row emitted EOS (False = cut at max_new_tokens)
    prompt_index: torch.Tensor  # (N,) long, row of the prompt batch each row was sampled from

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """`(N,)` long, number of generated tokens per row (incl. EOS)."""
        return self.response_mask.sum(-1)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of the training forward: `input_ids`, `attention_mask`, `position_ids`, each `(N, P+R)`.

        Prompt (left-padded) then response (right-padded); positions count real tokens, as during
        sampling, so the forward reproduces the sampling logits.
        """
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (N, P+R)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)  # (N, P+R)
        return input_ids, attention_mask, default_position_ids(attention_mask)

    def response_logprobs(
        self,
        model: torch.nn.Module,
        temperature: float = 1.0,
        return_entropy: bool = False,
        padding_free: bool = False,
        share_prompt: bool = False,
        pad_token_id: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropy) of the response tokens under `model`, with one forward.

        Returns `(N, R)` fp32 log-probs and `(N, R)` entropy (or None), 0 outside `response_mask`.
        Keeps gradients unless called under `torch.no_grad()` (reference / old-policy log-probs).
        The LM head runs on the response positions only. `padding_free`: the forward runs on packed
        rows without the prompts' and responses' padding (`sequence_logprobs`), same results.
        `share_prompt`: rows with the same prompt (found by content, any order) are scored in one row
        `[prompt, r_1, ..., r_G]` (`core.prefix.share_prompt_groups`, `pad_token_id` in its padding):
        each prompt computed once, same results; the separate rows when no two rows share a prompt
        or the model's attention takes no 4D mask.
        """
        out = None
        if share_prompt:
            shared = share_prompt_groups(
                self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask, pad_token_id
            )
            if shared is not None:
                out = grouped_response_logprobs(
                    model, shared, self.response_ids, temperature, return_entropy, padding_free=padding_free
                )
        if out is not None:
            logprobs, entropy = out
            off = self.response_mask == 0
            logprobs = logprobs.masked_fill(off, 0.0)
            return logprobs, None if entropy is None else entropy.masked_fill(off, 0.0)
        input_ids, attention_mask, position_ids = self.sequences()
        response_len = self.response_ids.shape[1]
        logprobs, entropy = sequence_logprobs(
            model,
            input_ids,
            attention_mask,
            position_ids,
            temperature=temperature,
            return_entropy=return_entropy,
            logits_to_keep=response_len,
            padding_free=padding_free,
        )  # (N, R): label t is response token t
        off = self.response_mask == 0
        logprobs = logprobs.masked_fill(off, 0.0)
        if entropy is not None:
            entropy = entropy.masked_fill(off, 0.0)
        return logprobs, entropy

    def select(self, idx: torch.Tensor | Sequence[int] | slice) -> Rollout:
        """Row subset (a mini-batch); `idx` is a slice, a list of ints, a long or a bool tensor."""
        if isinstance(idx, slice):
            return Rollout(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})
        idx = torch.as_tensor(idx, device=self.prompt_ids.device)
        return Rollout(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @classmethod
    def cat(cls, rollouts: Sequence[Rollout], pad_token_id: int) -> Rollout:
        """Rows of several rollouts one after the other, padded to a common width: prompts on the
        LEFT, responses on the right (`(N_i, P_i)` / `(N_i, R_i)` -> `(sum N_i, max P_i)` /
        `(sum N_i, max R_i)`). The padding is masked out and positions count real tokens, so each
        row's log-probs are unchanged. `prompt_index` is kept as is (it refers to each part's batch)."""
        if not rollouts:
            raise ValueError("Rollout.cat: no rollouts given")
        if len(rollouts) == 1:
            return rollouts[0]
        p = max(r.prompt_ids.shape[1] for r in rollouts)
        w = max(r.response_ids.shape[1] for r in rollouts)

        def left(x: torch.Tensor, value) -> torch.Tensor:  # (n, P_i) -> (n, p)
            return torch.nn.functional.pad(x, (p - x.shape[1], 0), value=value)

        def right(x: torch.Tensor, value) -> torch.Tensor:  # (n, R_i) -> (n, w)
            return torch.nn.functional.pad(x, (0, w - x.shape[1]), value=value)

        return cls(
            prompt_ids=torch.cat([left(r.prompt_ids, pad_token_id) for r in rollouts]),
            prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in rollouts]),
            response_ids=torch.cat([right(r.response_ids, pad_token_id) for r in rollouts]),
            response_mask=torch.cat([right(r.response_mask, 0) for r in rollouts]),
            logprobs=torch.cat([right(r.logprobs, 0.0) for r in rollouts]),
            finished=torch.cat([r.finished for r in rollouts]),
            prompt_index=torch.cat([r.prompt_index for r in rollouts]),
        )

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def decode_responses(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """The completions as text (tokens off `response_mask` dropped), one per row."""
        return [
            tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=skip_special_tokens)
            for ids, mask in zip(self.response_ids, self.response_mask, strict=True)
        ]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own previous mode.

    Restoring per module (rather than `model.train(was_training)`) keeps submodules that were
    deliberately in eval mode (frozen parts) as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def left_pad(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end: `(B, T)` -> `(B, P)` with P = longest row.

    Works for any padding layout (a stable sort of the mask keeps the order of real tokens).
    """
    mask = attention_mask.long()
    order = torch.sort(mask, dim=1, stable=True).indices  # pads first, real tokens after, in order
    ids = input_ids.gather(1, order)
    mask = mask.gather(1, order)
    width = int(mask.sum(-1).max())
    ids, mask = ids[:, ids.shape[1] - width :], mask[:, mask.shape[1] - width :]
    return ids.masked_fill(mask == 0, pad_token_id), mask


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf the logits outside the top-k and outside the top-p nucleus: `(N, V)` -> `(N, V)`.

    Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (always >= 1 token).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # (N, V), mass of the strictly more likely tokens
        remove = mass_before >= top_p  # the kept set already reaches top_p
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return logits


SAMPLE_BLOCK = 128
"""Vocabulary block of :func:`sample_categorical`'s two-level draw."""


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``(N, V)`` probabilities (>= 0, each row with positive mass; need not sum
    to 1) -> ``(N,)`` long.

    Inverse-CDF sampling with one uniform number per row: the token where the row's cumulative mass
    first exceeds ``u * total``. ``torch.multinomial`` draws an exponential per vocabulary entry
    instead, which on a CPU costs 20x the rest of the draw (4 ms for 8 x 32000 probabilities, one
    thread). The cumulative sums are fp64 (no drift over a large vocabulary), taken in two levels so
    that no ``(N, V)`` fp64 tensor is made: over blocks of ``SAMPLE_BLOCK`` tokens, then inside the
    chosen block. Tokens of zero probability (top-k/top-p) are never drawn.
    """
    n, vocab = probs.shape
    k = min(SAMPLE_BLOCK, vocab)
    pad = -vocab % k
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs.contiguous()).view(n, -1, k)  # zeros past V
    mass = blocks.sum(-1, dtype=torch.float64)  # (N, V/k)
    cdf = mass.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(n, 1, dtype=torch.float64, device=probs.device, generator=generator) * total
    # the first block whose cumulative mass exceeds u (it has mass); u == total (rounding): the last with mass
    b = torch.minimum(torch.searchsorted(cdf, u, right=True), (cdf < total).sum(-1, keepdim=True))
    rest = (u - (cdf.gather(1, b) - mass.gather(1, b))).clamp_(min=0)  # the part of u inside block b
    inner = blocks[torch.arange(n, device=probs.device), b.squeeze(1)].double().cumsum(-1)  # (N, k)
    j = torch.minimum(torch.searchsorted(inner, rest, right=True), (inner < inner[:, -1:]).sum(-1, keepdim=True))
    return (b * k + j).squeeze(-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step: `(N, V)` logits -> tokens `(N,)` long, their fp32 log-probs `(N,)`.

    The log-prob is taken under `softmax(logits / temperature)` before top-k/top-p (temperature 1 for
    greedy, temperature == 0), which is what a training forward at that temperature recomputes.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        logprobs = logits.log_softmax(-1)
    else:
        logits = logits / temperature
        # log_softmax, not logits - logsumexp: the recorded log-probs must be bit-identical to the
        # training forward's (evaluation's KL to itself is exactly 0)
        logprobs = logits.log_softmax(-1)
        probs = filter_logits(logits, top_k, top_p).softmax(-1)
        tokens = sample_categorical(probs, generator)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward_params(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(_hf_model(model).forward).parameters)


def _last_logits_and_cache(out) -> tuple[torch.Tensor, object]:
    """`(N, V)` logits of the last position (a copy, so the full logits can go) and the KV cache."""
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return out.logits[:, -1].clone(), cache


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    stop_check_every: int | None = None,
    sync_stop: bool = False,
    cache_implementation: str = "dynamic",
    cuda_graphs: bool = True,
    torch_compile: bool = False,
    decode_attention: str = "model",
) -> Rollout:
    """Sample `num_samples` responses per prompt with the model's KV cache.

    Args:
        model: a transformers causal LM (or a peft wrapper), any dtype; put in eval mode for the loop
            and each submodule restored to its previous mode after.
        input_ids: `(B, T)` prompt tokens, right-padded (any layout works; real tokens are those with
            `attention_mask == 1`, in order). Every prompt needs at least one token.
        attention_mask: `(B, T)`.
        max_new_tokens: most tokens generated per row.
        temperature: sampling temperature; 0 = greedy (log-probs then recorded at temperature 1).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        num_samples: rows per prompt, consecutive in the output.
        eos_token_id: one id or a list; a row stops after emitting one (the EOS is kept, masked 1).
        pad_token_id: filler for prompt left-padding and for response tokens after a row stops.
        generator: random generator on the model's device, for reproducible sampling.
        stop_check_every: ask the device whether every row has stopped only every k tokens (the
            loop's one host sync; None: 1 on the CPU, where it costs nothing, 8 on accelerators).
            Steps run after the last row stopped are dropped and the generator is rewound to its
            state after that row's step, so the result and the generator's next draws are the same
            for every k.
        sync_stop: under `torch.distributed`, stop only when every rank's rows have finished (a flag
            all-reduced at each stop check); a rank whose rows are done keeps running forwards on pad tokens,
            so every rank runs the same number of forwards (FSDP2's all-gathers are collectives; as
            transformers' `synced_gpus`). The rows are the same as without; the response may have more
            all-pad columns (mask 0) at the end.
        cache_implementation: ``dynamic`` (transformers' default cache, grown per token) or ``static``
            (a `StaticCache` of prompt width + `max_new_tokens` and fixed-shape decode steps,
            `rollout.static_decode`); same tokens, log-probs equal to float rounding.
        cuda_graphs: with the static cache on a CUDA device, replay the decode step from a CUDA graph
            captured once per shape and kept for the next call (not under `sync_stop` across ranks).
        torch_compile: with the static cache, run the decode step through ``torch.compile``.
        decode_attention: with the static cache, ``grouped`` runs the decode steps with
            `static_decode.grouped_decode_attention` instead of the model's attention.

    Returns:
        a `Rollout` with N = B * num_samples rows; its tensors are constants (no autograd graph).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if num_samples < 1:
        raise ValueError(f"generate: num_samples must be >= 1, got {num_samples}")
    if stop_check_every is not None and stop_check_every < 1:
        raise ValueError(f"generate: stop_check_every must be >= 1, got {stop_check_every}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in [0, 1], got {top_p}")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"generate: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be (B, T)"
        )
    if decode_attention not in ("model", "grouped"):
        raise ValueError(f"generate: decode_attention must be 'model' or 'grouped', got {decode_attention!r}")
    if cache_implementation not in ("dynamic", "static"):
        raise ValueError(
            f"generate: cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}"
        )
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"generate: prompts at batch rows {empty} have no tokens (attention_mask all 0)")

    device = input_ids.device
    check_every = stop_check_every or (1 if device.type == "cpu" else 8)
    eos = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device
    )
    prompt_ids, prompt_mask = left_pad(input_ids, attention_mask, pad_token_id)  # (B, P)
    prompt_index = torch.arange(input_ids.shape[0], device=device).repeat_interleave(num_samples)  # (N,)
    prompt_ids, prompt_mask = prompt_ids[prompt_index], prompt_mask[prompt_index]  # (N, P)
    n, p = prompt_ids.shape

    params = _forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.? renamed it
    prefill_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    synced = sync_stop and torch.distributed.is_available() and torch.distributed.is_initialized()
    static = cache_implementation == "static"
    graphs = static and static_decode.uses_graphs(device, cuda_graphs) and not synced
    grouped = static and decode_attention == "grouped"
    # Mask of the whole sequence, filled one column per step; the model sees the first p + t columns
    # (static cache: all of them, the columns not written yet are 0)
    width = static_decode.cache_length(p + max_new_tokens) if static else p + max_new_tokens
    mask = torch.zeros(n, width, dtype=torch.long, device=device)
    mask[:, :p] = prompt_mask
    tokens, logprobs, response_mask = [], [], []
    alive = torch.ones(n, dtype=torch.bool, device=device)  # (N,) still generating
    finished = torch.zeros(n, dtype=torch.bool, device=device)  # (N,) emitted EOS
    next_pos = prompt_mask.sum(-1, keepdim=True)  # (N, 1) position of the next token = real tokens so far
    # generator state after each step, to rewind the steps run after the last row stopped (k > 1)
    states = [] if check_every > 1 and generator is not None else None

    def all_finished(alive: torch.Tensor) -> bool:
        """Whether every row has stopped: the loop's single host sync (every `check_every` steps);
        with `sync_stop`, every row of every rank (a flag all-reduced, so all ranks stop together)."""
        any_alive = alive.any().to(torch.int32)
        if synced:
            torch.distributed.all_reduce(any_alive, op=torch.distributed.ReduceOp.MAX)
        return not bool(any_alive)

    with eval_mode(model):
        if static:
            decoder = static_decode.static_decoder(
                model, n, width, device, cuda_graphs=graphs, forward_kw=prefill_kw, cache_kw=cache_kw,
                torch_compile=torch_compile, grouped_attention=grouped,
            )
            logits, cache = decoder.prefill(model, prompt_ids, prompt_mask, default_position_ids(prompt_mask)), None
        else:
            decoder = None
            logits, cache = _last_logits_and_cache(
                model(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    position_ids=default_position_ids(prompt_mask),
                    use_cache=True,
                    **prefill_kw,
                )
            )
        # the decode steps' attention (grouped: switched for the loop; the prefill used the model's)
        with static_decode.decode_attention(model, grouped):
            for t in range(max_new_tokens):
                tok, lp = sample_next(logits, temperature, top_k, top_p, generator)  # (N,), (N,)
                tok = tok.masked_fill(~alive, pad_token_id)
                tokens.append(tok)
                logprobs.append(lp.masked_fill(~alive, 0.0))
                response_mask.append(alive)
                is_eos = torch.isin(tok, eos) & alive
                finished |= is_eos
                mask[:, p + t] = alive.long()  # the token just sampled is real for the rows that sampled it
                alive = alive & ~is_eos
                if states is not None:
                    states.append(generator.get_state())
                if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and all_finished(alive)):
                    break
                if decoder is not None:  # fixed shapes: the whole mask, unwritten columns still 0
                    logits = decoder.step(model, tok, next_pos, mask)
                else:
                    logits, cache = _last_logits_and_cache(
                        model(
                            input_ids=tok[:, None],
                            attention_mask=mask[:, : p + t + 1],
                            position_ids=next_pos,
                            use_cache=True,
                            **{cache_kw: cache},
                        )
                    )
                next_pos = next_pos + 1

    response_mask = torch.stack(response_mask, 1)  # (N, steps run)
    if check_every > 1:  # drop the steps after the one where the last row stopped (all-pad columns)
        steps = int(response_mask.any(0).nonzero().max()) + 1  # column 0 is always real
        tokens, logprobs, response_mask = tokens[:steps], logprobs[:steps], response_mask[:, :steps]
        if states is not None and len(states) > steps:
            generator.set_state(states[steps - 1])
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.stack(tokens, 1),  # (N, R)
        response_mask=response_mask.long(),  # (N, R)
        logprobs=torch.stack(logprobs, 1),  # (N, R) fp32
        finished=finished,
        prompt_index=prompt_index,
    )
