"""`dsmtp <command> ...`: one entry point; each command lives in its own module with `main(argv)`."""

from __future__ import annotations

import importlib
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
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: dsmtp <command> [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
