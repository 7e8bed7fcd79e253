"""One LightningModule per stage."""

from .dpo import DPOModule
from .grpo import GRPOModule
from .online import GenerationSpec, OnlineRLModule
from .ppo import PPOModule
from .reward import RewardModule, score_texts
from .sft import SFTModule

__all__ = [
    "DPOModule",
    "GRPOModule",
    "GenerationSpec",
    "OnlineRLModule",
    "PPOModule",
    "RewardModule",
    "SFTModule",
    "score_texts",
]
