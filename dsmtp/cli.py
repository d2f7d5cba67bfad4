"""`dsmtp <command> ...`: one entry point; each command lives in its own module with `main(argv)`.

Bad input ends here as one line and exit status 2: dsmtp reports it by raising a ValueError (ConfigError,
DataError, the converters' and loaders' errors) or an OSError (a missing or unwritable file) whose message
names the field or file and the fix. DSMTP_TRACEBACK=1 shows the traceback instead, for debugging.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "summary": ("dsmtp.model.params", "print parameter counts of a config"),
    "prepare": ("dsmtp.data.prepare", "build the corpus, tokenizer and token shards"),
    "train": ("dsmtp.train.trainer", "pretrain (single process or under torchrun)"),
    "plot": ("dsmtp.train.plot", "overlay several training runs' loss curves in one PNG"),
    "export-hf": ("dsmtp.convert.export_hf", "write a HuggingFace DeepSeek-V3 checkpoint"),
    "import-hf": ("dsmtp.convert.import_hf", "read a HuggingFace DeepSeek-V3 checkpoint"),
    "generate": ("dsmtp.serve.generate", "generate text, optionally with MTP speculative decoding"),
    "serve": ("dsmtp.serve.server", "OpenAI-compatible HTTP completion server"),
    "study": ("dsmtp.study.runner", "MTP study: train arms that differ only in the MTP objective, measure, report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: dsmtp <command> [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return module.main(argv[1:]) or 0
    except (ValueError, OSError) as e:
        if os.environ.get("DSMTP_TRACEBACK"):
            raise
        print(f"dsmtp {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
