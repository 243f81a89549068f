"""`python -m service [serve options]` == `tuneloop serve [options]`; `python -m service keys ...` too."""

from __future__ import annotations

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
