"""Same as `pagedserve bench throughput ...` (see `--help`)."""

import sys

from pagedserve.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "throughput", *sys.argv[1:]]))
