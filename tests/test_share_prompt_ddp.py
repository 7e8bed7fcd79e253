"""GRPO's share_prompt under DDP and FSDP2 (2 processes, gloo). Each rank shares the prompts of its own
micro-batches' groups (shuffled mini-batches: some micro-batches hold a group's rows, some do not, and
the ranks differ), one forward per micro-batch either way; under FSDP2 every forward is a collective,
so a rank that ran a different number would hang and the timeout fail the test. A GRPO run of two
rollout steps (ragged prompts and responses, KL to a reference, 2 iterations, micro-batches) ends
with the separate rows' weights (1e-5), and both ranks agree to the last bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[1]

# a reward with signal in every group: with zero advantages only the KL term (0 at the reference, so
# its gradient is float noise) would drive Adam, whose first steps turn noise into +-lr updates
REWARD = """
def length_reward(prompts, completions, **_):
    return [float(len(c.split())) for c in completions]
"""

SCRIPT = """
import sys, torch, lightning as L
from lightning_rlhf.stages import GRPOModule
from lightning_rlhf.data import RLHFDataModule

share_prompt, base, prompts, strategy = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4]


class GRPO(GRPOModule):
    def eos_token_ids(self):  # a third of the vocabulary ends a response: ragged responses
        return sorted(set(super().eos_token_ids()) | set(range(0, len(self.tokenizer), 3)))


L.seed_everything(0)
m = GRPO(policy=base, reward_functions=["length_reward.length_reward"], num_generations=3, beta=0.1,
         num_iterations=2, mini_batch_size=6, micro_batch_size=3, forward_batch_size=6,
         generation={"max_new_tokens": 12}, log_samples_every_n_steps=0, share_prompt=share_prompt)
dm = RLHFDataModule(prompts, batch_size=4, max_prompt_length=32)
from lightning.pytorch.strategies import ModelParallelStrategy

strat = "ddp" if strategy == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
masks = []


class Spy(L.Callback):  # the rank of the attention masks of the policy's forwards: 4D on shared rows
    def on_fit_start(self, trainer, module):
        module.policy.register_forward_pre_hook(lambda _m, _a, kw: masks.append(kw["attention_mask"].dim()),
                                                with_kwargs=True)


t = L.Trainer(accelerator="cpu", devices=2, strategy=strat, max_epochs=1, limit_train_batches=2, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()])
t.fit(m, dm)
full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in m.policy.state_dict().items()}
torch.save({k: v.detach().clone() for k, v in full.items()}, f"weights-{int(share_prompt)}-{t.global_rank}.pt")
torch.save(masks, f"masks-{int(share_prompt)}-{t.global_rank}.pt")
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_grpo_ddp_with_share_prompt_equals_separate_rows(tmp_path, strategy):
    from lightning_rlhf.demo.assets import base_model_dir

    (tmp_path / "run.py").write_text(SCRIPT)
    (tmp_path / "length_reward.py").write_text(REWARD)
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    for share_prompt in ("0", "1"):
        args = [sys.executable, "run.py", share_prompt, str(base_model_dir()),
                str(ROOT / "data/demo/reviews/prompts_eval.jsonl"), strategy]  # fmt: skip
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, proc.stderr[-4000:]
    for r in (0, 1):  # shared rows on both ranks with the option, never without
        assert 4 in torch.load(tmp_path / f"masks-1-{r}.pt")
        assert 4 not in torch.load(tmp_path / f"masks-0-{r}.pt")
    w = {(pf, r): torch.load(tmp_path / f"weights-{pf}-{r}.pt") for pf in (0, 1) for r in (0, 1)}
    for k in w[0, 0]:
        assert torch.equal(w[1, 0][k], w[1, 1][k]), k  # the ranks agree to the last bit
        torch.testing.assert_close(w[1, 0][k], w[0, 0][k], atol=1e-5, rtol=0, msg=k)  # shared == separate
    from lightning_rlhf.models import load_causal_lm

    start = load_causal_lm(str(base_model_dir()), trainable=False).state_dict()
    assert any(not torch.equal(w[1, 0][k], start[k]) for k in start)  # training happened
