"""Tokens/s of `lightning_rlhf.rollout.generate` (own loop) vs transformers' `model.generate`.

Variants (all sample at temperature 1, no top-k/top-p, exactly `--new-tokens` tokens per row, no EOS,
from the same randomly initialised Llama and the same ragged prompt batch):

    hf              transformers' generate (dynamic cache)
    dynamic         ours, transformers' dynamic KV cache (the default)
    static          ours, static KV cache, eager decode steps
    static-graphs   ours, static KV cache, decode step replayed from a CUDA graph (CUDA only)
    static-graphs-compile  the same with the decode step through torch.compile (CUDA only)
    static-graphs-compile-grouped  and decode_attention="grouped" (KV heads read once; CUDA only)
    static-compile  ours, static KV cache, torch.compile, no graph (opt in with --variants)
    hf-static       transformers' generate with cache_implementation="static" (on CUDA transformers
                    then compiles the decode step itself: ~20 s first call)
    dynamic-autocast  ours under torch.autocast(bfloat16) over the --dtype weights (what precision
                    bf16-mixed does to the hf sampler: every weight re-cast at every decode step; opt in)
    dynamic-bf16copy / static-bf16copy  ours on a bf16 copy of the model (``generation.dtype:
                    bfloat16``, ``rollout.sampler_copy``), dynamic / static cache (opt in)

    # fp32 sampler vs the bf16 copy, side by side, one thread (the GRPO benchmark's h512 model):
    python scripts/bench_generate.py --threads 1 --hidden 512 --layers 8 --vocab 32000 --batch 8 \
        --new-tokens 32 --repeats 3 --variants dynamic,dynamic-autocast,dynamic-bf16copy,static,static-bf16copy

Each variant's first call (warm-up; includes CUDA-graph capture / compilation) is timed apart from
the steady state (median of `--repeats` calls, interleaved across variants). `capture_s` is the
CUDA-graph capture inside the first call; later calls of the same shape replay the kept graph.
Every variant runs in its own try/except (an error is printed and recorded, the rest go on); a total
time budget (`--budget-s`) skips what would not fit. On CUDA, a correctness check first compares the
tokens of dynamic / static / static-graphs / static-graphs-compile-grouped on a small fp32 model
(greedy and sampled, same seed).

    python scripts/bench_generate.py            # CPU: hidden 256, 4 layers, vocab 1000, batch 16
    PYTHONPATH=. python scripts/bench_generate.py --preset h100-886m --out bench_generate.json
    # = --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 32000 --batch 64 --new-tokens 128
    #   --repeats 3 --budget-s 170 (about 3 minutes on an H100, 4 compilations included)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.rollout import generate, left_pad, static_decode

PRESETS = {
    "h100-886m": dict(device="cuda", dtype="bfloat16", hidden=2048, layers=16, vocab=32000, batch=64,
                      new_tokens=128, repeats=3, budget_s=170.0),  # fmt: skip
}
ALL_VARIANTS = ("hf", "dynamic", "static-graphs", "static-graphs-compile-grouped", "static-graphs-compile", "static",
                "hf-static", "static-compile", "dynamic-autocast", "dynamic-bf16copy", "static-bf16copy")  # fmt: skip
OPT_IN = ("static-compile", "dynamic-autocast", "dynamic-bf16copy", "static-bf16copy")
CUDA_ONLY = ("static-graphs", "static-graphs-compile-grouped", "static-graphs-compile", "hf-static")
COMPILED = ("static-graphs-compile-grouped", "static-graphs-compile", "static-compile", "hf-static")


def log(msg: str) -> None:
    print(msg, flush=True)


def build_model(hidden: int, layers: int, vocab: int, device: str, dtype: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        intermediate_size=4 * hidden,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    with torch.device(device):  # initialised on the device: seconds, not minutes, for 886M parameters
        model = LlamaForCausalLM(config)
    return model.to(dtype=getattr(torch, dtype)).eval()


def prompts(batch: int, prompt_len: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(batch, prompt_len)` prompts of prompt_len/2..prompt_len tokens, as the data layer gives them."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    mask = (torch.arange(prompt_len)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def correctness_check(device: str, budget_left) -> dict:
    """dynamic vs static vs static-graphs on a small fp32 model: same tokens for the same seed?"""
    result = {}
    model = build_model(256, 4, 1000, device, "float32")
    ids, mask = prompts(16, 24, 1000, device)
    modes = {"dynamic": dict(cache_implementation="dynamic"),
             "static": dict(cache_implementation="static", cuda_graphs=False),
             "static-graphs": dict(cache_implementation="static", cuda_graphs=True),
             "static-graphs-compile-grouped": dict(cache_implementation="static", cuda_graphs=True, torch_compile=True,
                                                   decode_attention="grouped")}  # fmt: skip
    for name, kw in (("greedy", dict(temperature=0.0)), ("sampled", dict(temperature=0.8, top_k=50, top_p=0.95))):
        if budget_left() < 30:
            break
        outs = {}
        for mode, mkw in modes.items():
            g = torch.Generator(device=device).manual_seed(1)
            outs[mode] = generate(model, ids, mask, max_new_tokens=40, num_samples=2, eos_token_id=[1, 7, 8],
                                  pad_token_id=0, generator=g, **kw, **mkw)  # fmt: skip
        ref = outs["dynamic"]
        for mode in [m for m in modes if m != "dynamic"]:
            r = outs[mode]
            same_shape = r.response_ids.shape == ref.response_ids.shape
            equal = same_shape and torch.equal(r.response_ids, ref.response_ids) and torch.equal(
                r.response_mask, ref.response_mask)  # fmt: skip
            lp = float((r.logprobs - ref.logprobs).abs().max()) if same_shape else float("nan")
            # rows equal from the start: a float-rounding flip of a near tie changes a row from there on
            rows = [torch.equal(a[m.bool()], b[mb.bool()]) for a, m, b, mb in
                    zip(ref.response_ids, ref.response_mask, r.response_ids, r.response_mask, strict=True)]  # fmt: skip
            result[f"{name}/{mode}"] = {"tokens_equal": bool(equal), "max_abs_logprob_diff": lp,
                                        "rows_equal": f"{sum(rows)}/{len(rows)}"}  # fmt: skip
            log(f"check {name:7s} {mode:29s} vs dynamic: tokens equal {equal} (rows {sum(rows)}/{len(rows)}), "
                f"max |dlogprob| {lp:.2e}")  # fmt: skip
    del model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="set the model/batch options below at once")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; others are shorter")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, of {', '.join(ALL_VARIANTS)} (default: all but {', '.join(OPT_IN)} "
                             f"on CUDA; on the CPU also without {', '.join(CUDA_ONLY)})")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=210.0, help="total time budget; later variants are skipped")
    parser.add_argument("--no-check", action="store_true", help="skip the CUDA token-equality check")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.preset:
        explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
        for k, v in PRESETS[args.preset].items():
            if k not in explicit:  # options given on the command line win over the preset
                setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def budget_left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    cuda = args.device.startswith("cuda")
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in ALL_VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {ALL_VARIANTS}")
    else:
        variants = [v for v in ALL_VARIANTS if v not in OPT_IN and (cuda or v not in CUDA_ONLY)]
    report: dict = {"args": vars(args), "torch": torch.__version__, "variants": {}, "check": {}}
    try:
        import transformers

        report["transformers"] = transformers.__version__
        if cuda:
            report["gpu"] = torch.cuda.get_device_name()
    except Exception as e:  # noqa: BLE001 - diagnostics only
        log(f"(versions: {e!r})")
    log(f"torch {report['torch']}, transformers {report.get('transformers')}, device {report.get('gpu', args.device)}")

    def write() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)

    if cuda and not args.no_check:
        try:
            report["check"] = correctness_check(args.device, budget_left)
        except Exception as e:  # noqa: BLE001 - keep benchmarking
            traceback.print_exc()
            report["check"] = {"error": repr(e)}
            log(f"check FAILED: {e!r}")
        write()

    t0 = time.perf_counter()
    model = build_model(args.hidden, args.layers, args.vocab, args.device, args.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    report["params"] = n_params
    ids, mask = prompts(args.batch, args.prompt_len, args.vocab, args.device)
    left_ids, left_mask = left_pad(ids, mask, pad_token_id=0)  # transformers wants left padding
    log(
        f"model: {n_params / 1e6:.0f}M params, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{args.dtype} on {args.device} ({torch.get_num_threads()} threads); batch {args.batch}, prompts "
        f"{int(mask.sum(-1).min())}-{args.prompt_len} tokens, {args.new_tokens} new tokens; built in "
        f"{time.perf_counter() - t0:.1f}s"
    )

    copies: dict = {}

    def ours(sampler=None, autocast=False, **kw):
        def run() -> int:
            m = model
            if sampler is not None:  # the sampling copy, built once (its build is not timed after the warm-up)
                from lightning_rlhf.rollout.sampler_copy import SamplerCopy

                m = copies.setdefault(sampler, SamplerCopy(model, sampler)).model
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
                r = generate(m, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=-1, pad_token_id=0, **kw)
            return int(r.response_mask.sum())

        return run

    def hf(**kw):
        def run() -> int:
            with torch.no_grad():
                out = model.generate(input_ids=left_ids, attention_mask=left_mask, do_sample=True, temperature=1.0,
                                     top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, pad_token_id=0, **kw)  # fmt: skip
            return (out.shape[1] - left_ids.shape[1]) * out.shape[0]

        return run

    fns = {
        "hf": hf(),
        "dynamic": ours(cache_implementation="dynamic"),
        "static": ours(cache_implementation="static", cuda_graphs=False),
        "static-graphs": ours(cache_implementation="static", cuda_graphs=True),
        "static-graphs-compile": ours(cache_implementation="static", cuda_graphs=True, torch_compile=True),
        "static-compile": ours(cache_implementation="static", cuda_graphs=False, torch_compile=True),
        "static-graphs-compile-grouped": ours(cache_implementation="static", cuda_graphs=True, torch_compile=True,
                                              decode_attention="grouped"),  # fmt: skip
        "hf-static": hf(cache_implementation="static"),
        "dynamic-autocast": ours(autocast=True, cache_implementation="dynamic"),
        "dynamic-bf16copy": ours(sampler=torch.bfloat16, cache_implementation="dynamic"),
        "static-bf16copy": ours(sampler=torch.bfloat16, cache_implementation="static", cuda_graphs=False),
    }

    def once(name: str) -> tuple[float, int]:
        sync(args.device)
        static_decode.last_capture_seconds = 0.0
        t = time.perf_counter()
        n = fns[name]()
        sync(args.device)
        return time.perf_counter() - t, n

    active = []
    for name in variants:  # first call of each: warm-up, capture / compilation included
        need = 60 if name in COMPILED else 20
        if budget_left() < need:
            log(f"{name:29s}: skipped (time budget: {budget_left():.0f}s left)")
            report["variants"][name] = {"error": "skipped: time budget"}
            continue
        try:
            t, n = once(name)
            report["variants"][name] = {"first_call_s": t, "tokens": n, "capture_s": static_decode.last_capture_seconds}
            active.append(name)
            log(f"{name:29s}: first call {t:.2f}s ({n} tokens, {n / t:.0f} tokens/s incl. warm-up)")
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            traceback.print_exc()
            sys.stderr.flush()
            report["variants"][name] = {"error": repr(e)}
            log(f"{name:29s}: FAILED {e!r}")
        write()

    times: dict[str, list[float]] = {name: [] for name in active}
    for i in range(args.repeats):  # interleaved, so that load from other processes hits all alike
        if i > 0 and budget_left() < 15:
            log(f"stopping after {i} rounds (time budget)")
            break
        for name in list(active):
            try:
                t, _ = once(name)
                times[name].append(t)
                if static_decode.last_capture_seconds:  # captured again (should not: the decoder is kept)
                    report["variants"][name].setdefault("recaptures", []).append(static_decode.last_capture_seconds)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                report["variants"][name]["error"] = repr(e)
                active.remove(name)
                log(f"{name:29s}: FAILED in round {i}: {e!r}")
        for name in active:  # medians so far, written after every round (a run cut short keeps them)
            if times[name]:
                v = report["variants"][name]
                t = statistics.median(times[name])
                v.update(median_s=t, runs_s=times[name], tokens_per_s=v["tokens"] / t)
        log(f"round {i + 1}: " + ", ".join(
            f"{n} {report['variants'][n]['tokens_per_s']:.0f}" for n in active if times[n]) + " tokens/s")  # fmt: skip
        write()

    log(f"--- median of {args.repeats} calls (steady state; first calls include warm-up / capture / compile) ---")
    for name in active:
        if not times[name]:
            continue
        v, t = report["variants"][name], report["variants"][name]["median_s"]
        cap = f", of which graph capture {v['capture_s'] * 1000:.0f} ms" if v.get("capture_s") else ""
        log(f"{name:29s}: {v['tokens_per_s']:9.0f} tokens/s  ({t * 1000:.0f} ms/call, first call "
            f"{v['first_call_s'] * 1000:.0f} ms{cap})")  # fmt: skip
    speeds = {n: report["variants"][n].get("tokens_per_s") for n in active}
    for base in ("hf", "dynamic"):
        if speeds.get(base):
            ratios = {n: s / speeds[base] for n, s in speeds.items() if s and n != base}
            report[f"ratio_to_{base}"] = ratios
            log(f"ratio to {base:8s}: " + ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()))
    report["total_s"] = time.perf_counter() - start
    write()
    log(f"done in {report['total_s']:.0f}s" + (f"; wrote {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
