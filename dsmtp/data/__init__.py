"""Corpus preparation, the sentencepiece tokenizer, memory-mapped token shards and the batch loader.

Import from the submodules (`dsmtp.data.tokenizer`, `.prepare`, `.shards`, `.loader`): this package
file stays empty so that tokenizing worker processes start without importing torch.
"""
