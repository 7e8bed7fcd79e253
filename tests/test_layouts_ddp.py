"""GRPO's row layouts under DDP and FSDP2 (2 processes, gloo): ``padding_free`` (each rank packs its own
micro-batches) and ``share_prompt`` (each rank shares the prompts of its own micro-batches' groups;
shuffled mini-batches: some micro-batches hold a group's rows, some do not, and the ranks differ). It is
one forward per micro-batch either way; under FSDP2 every forward is a collective, so a rank that ran a
different number would hang and the timeout fail the test. A GRPO run of two rollout steps (ragged
prompts and responses, KL to a reference, 2 iterations, micro-batches) with the option on ends with the
plain padded rows' weights (1e-5; seen: 8e-7 under DDP), and both ranks agree to the last bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


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

option, on, base, prompts, strategy = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4], sys.argv[5]
g = 3 if option == "share_prompt" else 2  # samples per prompt


class GRPO(GRPOModule):
    def eos_token_ids(self):  # a third of the vocabulary ends a response: ragged responses
        return sorted(set(super().eos_token_ids()) | set(range(0, len(self.tokenizer), 3)))


L.seed_everything(0)
m = GRPO(policy=base, reward_functions=["length_reward.length_reward"], num_generations=g, beta=0.1,
         num_iterations=2, mini_batch_size=2 * g, micro_batch_size=g, forward_batch_size=2 * g,
         generation={"max_new_tokens": 12}, log_samples_every_n_steps=0, **{option: on})
dm = RLHFDataModule(prompts, batch_size=4, max_prompt_length=32)
from lightning.pytorch.strategies import ModelParallelStrategy

strat = "ddp" if strategy == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
masks = []


class Spy(L.Callback):  # the rank of the attention masks of the policy's forwards: 4D on packed/shared rows
    def on_fit_start(self, trainer, module):
        module.policy.register_forward_pre_hook(lambda _m, _a, kw: masks.append(kw["attention_mask"].dim()),
                                                with_kwargs=True)


t = L.Trainer(accelerator="cpu", devices=2, strategy=strat, max_epochs=1, limit_train_batches=2, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()])
t.fit(m, dm)
full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in m.policy.state_dict().items()}
torch.save({k: v.detach().clone() for k, v in full.items()}, f"weights-{int(on)}-{t.global_rank}.pt")
torch.save(masks, f"masks-{int(on)}-{t.global_rank}.pt")
torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None  # as PyTorch asks: gloo can abort at exit
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("option", ["padding_free", "share_prompt"])
def test_grpo_with_packed_or_shared_rows_equals_the_padded_rows(tmp_path, option, strategy):
    from lightning_rlhf.demo.assets import base_model_dir

    (tmp_path / "run.py").write_text(SCRIPT)
    (tmp_path / "length_reward.py").write_text(REWARD)
    # long and short prompts alternate: two short rows fit beside each other in a long row's length, so
    # packing saves rows (with prompts of similar lengths it would always run the padded rows)
    texts = [
        "hi .",
        "write a long review of the phone , the lamp , the chair , the kettle and the bag please .",
    ]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": [{"role": "user", "content": texts[i % 2]}]}) + "\n" for i in range(16))
    )
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    for on in ("0", "1"):
        args = [sys.executable, "run.py", option, on, str(base_model_dir()),
                str(tmp_path / "prompts.jsonl"), strategy]  # fmt: skip
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, proc.stderr[-4000:]
    for r in (0, 1):  # packed/shared rows on both ranks with the option, never without
        assert 4 in torch.load(tmp_path / f"masks-1-{r}.pt")
        assert 4 not in torch.load(tmp_path / f"masks-0-{r}.pt")
    w = {(pf, r): torch.load(tmp_path / f"weights-{pf}-{r}.pt") for pf in (0, 1) for r in (0, 1)}
    for k in w[0, 0]:
        assert torch.equal(w[1, 0][k], w[1, 1][k]), k  # the ranks agree to the last bit
        torch.testing.assert_close(w[1, 0][k], w[0, 0][k], atol=1e-5, rtol=0, msg=k)  # option == padded
    from lightning_rlhf.models import load_causal_lm

    start = load_causal_lm(str(base_model_dir()), trainable=False).state_dict()
    assert any(not torch.equal(w[1, 0][k], start[k]) for k in start)  # training happened
