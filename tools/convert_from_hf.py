#!/usr/bin/env python
"""Read a HuggingFace DeepSeek-V3 checkpoint into a dsmtp checkpoint (same as `dsmtp import-hf`).

    python tools/convert_from_hf.py hf/model ckpt/imported --config configs/small.yaml --set parallel.tp=2
"""

import sys

from dsmtp.cli import main

if __name__ == "__main__":
    sys.exit(main(["import-hf", *sys.argv[1:]]))
