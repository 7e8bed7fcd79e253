"""The sampler's outputs are those of the implementation before the speed-ups (same seed: same tokens,
masks, log-probs, and the same generator state after), for every stop-check interval.

``reference_generate`` / ``reference_sample_next`` are verbatim copies of ``rollout.generate`` /
``rollout.sample_next`` at commit a9ea865 (before ``stop_check_every``), but for the draw itself:
``torch.multinomial`` there, ``sample_categorical`` (one uniform number per row, 20x faster on a CPU)
in both since; the draw is tested on its own in ``test_sampling.py``.
"""

from collections.abc import Sequence

import pytest
import torch

from lightning_rlhf.models.forward import default_position_ids
from lightning_rlhf.rollout import Rollout, eval_mode, filter_logits, generate, left_pad
from lightning_rlhf.rollout.generate import _forward_params, _last_logits_and_cache, sample_categorical

PAD = 0


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, pad_token_id=PAD, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def ragged_prompts(lengths, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(12, 64, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def reference_sample_next(
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
        logprobs = logits.log_softmax(-1)
        probs = filter_logits(logits, top_k, top_p).softmax(-1)
        tokens = sample_categorical(probs, generator)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


@torch.no_grad()
def reference_generate(
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

    Returns:
        a `Rollout` with N = B * num_samples rows; its tensors are constants (no autograd graph).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if num_samples < 1:
        raise ValueError(f"generate: num_samples must be >= 1, got {num_samples}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in [0, 1], got {top_p}")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"generate: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be (B, T)"
        )
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"generate: prompts at batch rows {empty} have no tokens (attention_mask all 0)")

    device = input_ids.device
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

    # Mask of the whole sequence, filled one column per step; the model sees the first p + t columns.
    mask = torch.zeros(n, p + max_new_tokens, dtype=torch.long, device=device)
    mask[:, :p] = prompt_mask
    tokens, logprobs, response_mask = [], [], []
    alive = torch.ones(n, dtype=torch.bool, device=device)  # (N,) still generating
    finished = torch.zeros(n, dtype=torch.bool, device=device)  # (N,) emitted EOS
    next_pos = prompt_mask.sum(-1, keepdim=True)  # (N, 1) position of the next token = real tokens so far

    with eval_mode(model):
        logits, cache = _last_logits_and_cache(
            model(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                position_ids=default_position_ids(prompt_mask),
                use_cache=True,
                **prefill_kw,
            )
        )
        for t in range(max_new_tokens):
            tok, lp = reference_sample_next(logits, temperature, top_k, top_p, generator)  # (N,), (N,)
            tok = tok.masked_fill(~alive, pad_token_id)
            tokens.append(tok)
            logprobs.append(lp.masked_fill(~alive, 0.0))
            response_mask.append(alive)
            is_eos = torch.isin(tok, eos) & alive
            finished |= is_eos
            mask[:, p + t] = alive.long()  # the token just sampled is real for the rows that sampled it
            alive = alive & ~is_eos
            if t == max_new_tokens - 1 or not bool(alive.any()):
                break
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

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.stack(tokens, 1),  # (N, R)
        response_mask=torch.stack(response_mask, 1).long(),  # (N, R)
        logprobs=torch.stack(logprobs, 1),  # (N, R) fp32
        finished=finished,
        prompt_index=prompt_index,
    )


@pytest.mark.parametrize("check_every", [1, 3, 8])
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "seed"),
    [(1.0, 0, 1.0, 0), (0.7, 0, 1.0, 1), (1.3, 5, 1.0, 2), (1.0, 0, 0.8, 3), (0.0, 0, 1.0, 4)],
)
def test_same_outputs_and_generator_state_as_the_reference(check_every, temperature, top_k, top_p, seed):
    model = tiny_llama(seed=seed).eval()
    ids, mask = ragged_prompts((3, 7, 5, 2))
    # many EOS ids: rows stop at different steps, some never (cut at max_new_tokens)
    kw = dict(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=3,
              eos_token_id=list(range(3, 12)), pad_token_id=PAD)  # fmt: skip
    g_new, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    new = generate(model, ids, mask, generator=g_new, stop_check_every=check_every, **kw)
    ref = reference_generate(model, ids, mask, generator=g_ref, **kw)
    for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished", "prompt_index"):
        assert torch.equal(getattr(new, f), getattr(ref, f)), f
    assert torch.equal(new.logprobs, ref.logprobs)
    assert torch.equal(g_new.get_state(), g_ref.get_state())  # the next rollout draws the same numbers


def test_all_rows_stopping_early_is_trimmed_whatever_the_check_interval():
    model = tiny_llama(seed=5).eval()
    ids, mask = ragged_prompts((4, 4))
    eos = list(range(3, 64))  # nearly every token stops a row: all rows stop within a step or two
    kw = dict(max_new_tokens=16, temperature=1.0, eos_token_id=eos, pad_token_id=PAD)
    g_ref = torch.Generator().manual_seed(0)
    ref = reference_generate(model, ids, mask, generator=g_ref, **kw)
    assert ref.response_ids.shape[1] < 16  # the loop stops early: steps run past it must be undone
    for k in (1, 5, 16):
        g = torch.Generator().manual_seed(0)
        out = generate(model, ids, mask, generator=g, stop_check_every=k, **kw)
        assert torch.equal(out.response_ids, ref.response_ids), k
        assert torch.equal(out.response_mask, ref.response_mask), k
        assert torch.equal(g.get_state(), g_ref.get_state()), k  # rewound to after the last real step
