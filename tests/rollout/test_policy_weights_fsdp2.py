"""`policy_weights` under FSDP2: two real gloo processes gather each parameter with
`DTensor.full_tensor()` and get exactly the unsharded model's weights (plain and LoRA-merged)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import torch.multiprocessing as mp

    def tiny(lora):
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                          pad_token_id=0, eos_token_id=2, bos_token_id=None)
        model = LlamaForCausalLM(cfg)
        if lora:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.5)
        return model

    def run(rank, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        from torch.distributed.device_mesh import init_device_mesh
        from lightning_rlhf.models.distributed import is_sharded, shard_fsdp2
        from lightning_rlhf.rollout.vllm_engine import policy_weights
        for lora in (False, True):
            expected = {n: w.clone() for n, w in policy_weights(tiny(lora))}
            model = shard_fsdp2(tiny(lora), init_device_mesh("cpu", (2,)))
            assert is_sharded(model)
            got = dict(policy_weights(model))  # a collective per parameter: both ranks iterate
            assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())
            for n, w in got.items():
                assert type(w).__name__ == "Tensor", (n, type(w))
                torch.testing.assert_close(w, expected[n], rtol=0, atol=1e-6, msg=n)
        dist.barrier()  # both ranks past their last gather before either tears gloo down (it can abort at exit)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(int(sys.argv[1]),), nprocs=2, join=True)
        print("OK")
    """
)


def test_policy_weights_gathers_fsdp2_shards_per_parameter(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, str(script), str(port)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
