"""MoLE-Flow command line: argv -> AblationConfig -> run(config)."""

from __future__ import annotations

import sys

from moleflow.cli_main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
