"""dsmtp: pretraining DeepSeek-V3-style MoE models with Multi-Token Prediction."""

import warnings

# megatron-core announces its fallbacks on every import when Transformer Engine/Apex are absent.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine is not installed.*")

__version__ = "0.1.0"
