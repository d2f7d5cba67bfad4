"""Inference: KV-cached decoding, MTP self-speculative decoding, the generate CLI and the HTTP server."""
