"""The eBPF compile, run as a child of the agent (loader._compile): bcc compiles bpf/redirect.c here and the
object goes to stdout in the cache file's format; a toolchain problem goes there as text, exit status 2.
bcc's own diagnostics (clang's errors) go to stderr, which is the agent's."""

from __future__ import annotations

import sys

from node_agent.backends.ebpf import loader


def main() -> int:
    try:
        obj = loader.compile_here()
    except loader.ToolchainError as e:
        sys.stdout.write(f"{e}\n")
        return 2
    sys.stdout.buffer.write(loader.encode(loader.CHILD_KEY, obj))
    return 0


if __name__ == "__main__":
    sys.exit(main())
