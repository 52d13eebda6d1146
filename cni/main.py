"""Entry point of `podnet-cni`."""

import sys


def main() -> int:
    # Declared now so packaging and docs are stable; the issue that builds it replaces this.
    print("podnet-cni: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
