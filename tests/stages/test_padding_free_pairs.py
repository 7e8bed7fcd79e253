"""padding_free for preference pairs: several ``[prompt, chosen, rejected]`` rows packed into one give
the shared rows' DPO log-probs (and gradients) and reward-model scores, and the same short runs."""

from __future__ import annotations

import pytest
import torch
from test_share_prompt import ATOL, batch_of, dpo, perturb, rm

from lightning_rlhf.core.prefix import attention_allowed, share_prompt
from lightning_rlhf.models.forward import packed_forward
from lightning_rlhf.stages import DPOModule, RewardModule

RECORDS = [  # two long pairs and two short ones (that share a packed row), all parts ragged
    ("review the lamp please . it is new .", "i love this lamp . it works well . it is bright .", "bad . it broke ."),
    ("hi .", "good .", "bad ."),
    ("review the phone .", "the phone is great . i use it every day .", "the phone is bad . it broke ."),
    ("review the bag .", "nice .", "poor bag ."),
]


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory, write_jsonl):
    def msg(role, text):
        return [{"role": role, "content": text}]

    recs = [{"prompt": msg("user", p), "chosen": msg("assistant", c), "rejected": msg("assistant", r)}
            for p, c, r in RECORDS]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", recs)


def assert_packs(model, batch, max_tokens=None) -> None:
    """The batch's shared rows do pack (two short pairs share a row): the packed path is taken."""
    shared = share_prompt(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    real = shared.segment != 3
    allowed = attention_allowed(shared.segment)
    out = packed_forward(model, shared.input_ids, real, shared.position_ids, allowed=allowed, max_tokens=max_tokens)
    assert out is not None and out[0].input_ids.shape[0] < shared.input_ids.shape[0]
    if max_tokens is not None and max_tokens >= int(real.sum()):
        assert out[0].input_ids.shape[0] == 1


@pytest.mark.parametrize(("attn", "packed_length"), [("sdpa", None), ("eager", None), ("sdpa", 1000)])
def test_dpo_packed_pairs_equal_shared_rows(tiny_model_dir, pref_file, attn, packed_length):
    """packed_length None: the longest shared row (the two short pairs share a row); 1000: all four pairs
    in one packed row."""
    packed, rows = dpo(tiny_model_dir, True, attn=attn), dpo(tiny_model_dir, True, attn=attn)
    packed.padding_free, packed.packed_length = True, packed_length
    perturb(packed.policy)
    rows.policy.load_state_dict(packed.policy.state_dict())
    batch = batch_of(packed.tokenizer, pref_file)
    assert_packs(packed.policy, batch, packed_length)
    p_sums, p_counts = packed.completion_logps(packed.policy, batch)
    r_sums, r_counts = rows.completion_logps(rows.policy, batch)
    assert torch.equal(p_counts, r_counts)
    torch.testing.assert_close(p_sums, r_sums, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed.reference_logps(batch), rows.reference_logps(batch), atol=ATOL, rtol=0)
    p_sums.sum().backward()
    r_sums.sum().backward()
    for (name, p), q in zip(packed.policy.named_parameters(), rows.policy.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_short_dpo_run_with_packed_pairs_gives_the_same_losses(tiny_model_dir, pref_file):
    packed, rows = dpo(tiny_model_dir, True), dpo(tiny_model_dir, True)
    packed.padding_free = True
    batch = batch_of(packed.tokenizer, pref_file)
    losses = {}
    for name, m in (("packed", packed), ("rows", rows)):
        opt = torch.optim.AdamW(m.policy.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss, _ = m._loss(batch, "train")
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["packed"][-1] < losses["packed"][0] - 0.05  # it trains
    assert losses["packed"] == pytest.approx(losses["rows"], abs=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reward_packed_pairs_scores_and_short_run_equal_shared_rows(rm_dir, pref_file, attn):
    packed, rows = rm(rm_dir, True, attn), rm(rm_dir, True, attn)
    packed.padding_free = True
    perturb(packed.model)
    rows.model.load_state_dict(packed.model.state_dict())
    batch = batch_of(packed.tokenizer, pref_file)
    assert_packs(packed.model, batch)
    for s, a in zip(packed(batch), rows(batch), strict=True):
        torch.testing.assert_close(s, a, atol=ATOL, rtol=0)
    losses = {}
    for name, m in (("packed", packed), ("rows", rows)):
        opt = torch.optim.AdamW(m.model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss, _, _ = m._step(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["packed"][-1] < losses["packed"][0]  # it trains
    assert losses["packed"] == pytest.approx(losses["rows"], abs=1e-5)


@pytest.mark.parametrize("stage", [DPOModule, RewardModule])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"share_prompt": False, "padding_free": True}, "padding_free packs the shared-prompt rows"),
        ({"packed_length": 512}, "packed_length sizes the packed rows: it needs padding_free"),
        ({"padding_free": True, "packed_length": 0}, "packed_length must be >= 1"),
    ],
)
def test_pair_packing_options_that_would_be_ignored_are_refused(tiny_model_dir, stage, options, message):
    with pytest.raises(ValueError, match=f"{stage.__name__}: {message}"):
        stage(str(tiny_model_dir), **options)
