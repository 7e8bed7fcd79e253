"""Helpers of the online-stage tests that compare two fits (``test_share_prompt_grpo``,
``test_padding_free_stages``): a reward with signal in every group, a third of the vocabulary as EOS
(ragged responses), ragged prompt files, and a fit of two rollout steps that records what it saw.

Imported as a top-level module: pytest puts this folder on ``sys.path`` for its test files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L

from lightning_rlhf.data import RLHFDataModule


def great(prompts, completions, **_):
    return [c.split().count("great") / max(1, len(c.split())) + 0.1 * len(c.split()) for c in completions]


GREAT = f"{__name__}.great"


class EarlyEos:
    """A third of the vocabulary ends a response: rows stop after different numbers of tokens."""

    def eos_token_ids(self):
        return sorted(set(super().eos_token_ids()) | set(range(0, len(self.tokenizer), 3)))


def ragged_prompts(write_jsonl, folder: Path, n: int) -> Path:
    """``n`` prompts of 2 to 11 words."""
    words = "the movie was great and the plot was fun but the end was slow".split()
    return write_jsonl(
        folder / "prompts.jsonl", [{"prompt": " ".join(words[i % 3 : 2 + 3 * (i % 4)])} for i in range(n)]
    )


def fit_two_rollouts(
    module, prompts: Path, batch_size: int, on_forward: Callable[[dict, dict], None]
) -> dict:
    """Fit two rollout steps. Returns each step's rollout (``rollouts``) and training statistics
    (``stats``), the final weights, and whatever ``on_forward(seen, kwargs)`` recorded of the policy's
    forwards."""
    seen: dict = {"rollouts": [], "stats": []}
    generate, optimise = module.generate, module.optimise

    def gen(batch):
        seen["rollouts"].append(generate(batch))
        return seen["rollouts"][-1]

    def opt(*a, **kw):
        seen["stats"].append(optimise(*a, **kw))
        return seen["stats"][-1]

    module.generate, module.optimise = gen, opt

    class Spy(L.Callback):
        def on_fit_start(self, trainer, module):
            module.policy.register_forward_pre_hook(lambda _m, _a, kw: on_forward(seen, kw), with_kwargs=True)

    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Spy()],
    )  # fmt: skip
    dm = RLHFDataModule(train_files=str(prompts), kind="prompt", batch_size=batch_size, shuffle=False)
    trainer.fit(module, datamodule=dm)
    seen["weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return seen
