"""The one error type of the data step."""


class DataError(ValueError):
    """Bad data input (source dir, data dir, tokenizer, loader state); the message names the fix."""
