"""The old name of ``python -m agent.router`` (the router alone), kept only for bench/agent_footprint.py, which
runs ``python -m agent.node_runner --node ...``. New code runs ``python -m agent.router``."""

import sys

from agent.router.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m agent.node_runner"))
