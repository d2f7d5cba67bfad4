"""The DeepSeek-V3 architecture with Multi-Token Prediction, one concept per file."""

from dsmtp.model.model import IGNORE_INDEX, DeepSeekV3, ModelOutput
from dsmtp.model.moe import moe_layers, update_expert_bias

__all__ = ["DeepSeekV3", "ModelOutput", "IGNORE_INDEX", "moe_layers", "update_expert_bias"]
