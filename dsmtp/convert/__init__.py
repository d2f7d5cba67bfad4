"""Conversion between dsmtp checkpoints and the HuggingFace DeepSeek-V3 format."""
