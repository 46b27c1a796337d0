"""Reliability soak (the same as `pagedserve bench soak`): hundreds of concurrent streaming
clients with random disconnects against a server, in rounds, for a bounded time; checks that
every request completed or got an error, KV usage returns to 0, RSS stays flat, /health is 200.

    python benchmarks/soak.py --duration 180 --clients 200            # starts its own server
    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --duration 60
"""

from __future__ import annotations

import argparse
import sys

from pagedserve.bench import soak

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    soak.add_args(parser)
    sys.exit(soak.main(parser.parse_args()))
