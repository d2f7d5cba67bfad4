#!/usr/bin/env python
"""Write a HuggingFace DeepSeek-V3 checkpoint from a dsmtp checkpoint (same as `dsmtp export-hf`).

    python tools/convert_to_hf.py runs/tiny hf/tiny --dtype bf16 --max-shard-size 5GB
"""

import sys

from dsmtp.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-hf", *sys.argv[1:]]))
