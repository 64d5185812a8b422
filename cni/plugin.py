"""headrace-cni entry point (placeholder, replaced by the plugin implementation)."""

import sys


def main() -> int:
    return 0


if __name__ == "__main__":
    sys.exit(main())
