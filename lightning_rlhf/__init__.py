"""lightning-rlhf: RLHF and preference tuning as PyTorch Lightning modules."""
__version__ = "0.1.0"
