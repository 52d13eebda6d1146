"""Entry point of `agentctl`, the operator's CLI."""

import sys


def main() -> int:
    # Sub-commands (status, routes, ipam, policy, apply/get) arrive with their issues.
    print("agentctl: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
