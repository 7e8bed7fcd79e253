"""sequence_logprobs: against a per-example unpadded forward, padding layouts, temperature, entropy."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.models.forward import default_position_ids, sequence_logprobs


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0)
    return LlamaForCausalLM(config)


LENGTHS = (4, 9, 6)


def examples(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g) for n in LENGTHS]


def padded(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def reference(model, seq: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded single-example forward, plain log_softmax in fp64."""
    logits = model(input_ids=seq[None]).logits[0, :-1].double() / temperature
    logp = logits.log_softmax(-1)
    return logp.gather(-1, seq[1:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_unpadded_per_example_forward(side, temperature):
    model = tiny_llama().eval()
    seqs = examples()
    ids, mask = padded(seqs, side)
    with torch.no_grad():
        logprobs, entropy = sequence_logprobs(model, ids, mask, temperature=temperature, return_entropy=True)
        assert logprobs.shape == entropy.shape == (3, ids.shape[1] - 1)
        assert logprobs.dtype == entropy.dtype == torch.float32
        for i, s in enumerate(seqs):
            ref_lp, ref_ent = reference(model, s, temperature)
            real = mask[i, 1:].bool()  # label positions that are real tokens...
            if side == "left":  # ...whose prefix holds a real token too (the first real token has none)
                real &= mask[i, :-1].bool()
            torch.testing.assert_close(logprobs[i][real].double(), ref_lp, atol=1e-5, rtol=0)
            torch.testing.assert_close(entropy[i][real].double(), ref_ent, atol=1e-5, rtol=0)


def test_default_position_ids_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    assert default_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2]]


def test_logits_to_keep_gives_the_last_columns():
    model = tiny_llama().eval()
    ids, mask = padded(examples(), "left")
    with torch.no_grad():
        full, full_ent = sequence_logprobs(model, ids, mask, temperature=0.8, return_entropy=True)
        last, last_ent = sequence_logprobs(model, ids, mask, temperature=0.8, return_entropy=True, logits_to_keep=3)
    assert last.shape == (3, 3)
    torch.testing.assert_close(last, full[:, -3:], atol=1e-6, rtol=0)
    torch.testing.assert_close(last_ent, full_ent[:, -3:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        sequence_logprobs(model, ids, mask, logits_to_keep=ids.shape[1])


def test_gradients_flow_and_bf16_gives_fp32():
    model = tiny_llama()
    ids, mask = padded(examples(), "right")
    logprobs, _ = sequence_logprobs(model, ids, mask, temperature=0.9)
    (logprobs * mask[:, 1:]).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        lp16, ent16 = sequence_logprobs(model.to(torch.bfloat16), ids, mask, temperature=0.9, return_entropy=True)
    assert lp16.dtype == ent16.dtype == torch.float32
    torch.testing.assert_close(lp16 * mask[:, 1:], logprobs.detach() * mask[:, 1:], atol=0.1, rtol=0)
