"""`python -m transformer_kernels info | check | bench` (the commands live in tools/cli.py)."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
