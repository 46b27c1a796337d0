"""Same as `pagedserve bench latency ...` (see `--help`)."""

import sys

from pagedserve.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "latency", *sys.argv[1:]]))
