"""The eBPF compile, run as a child of the agent (loader._compile): bcc compiles bpf/redirect.c here and the
object goes to stdout in the cache file's format; a toolchain problem goes there as text, exit status 2.
Whatever bcc, clang or LLVM print (on stdout or stderr) goes to stderr, which is the agent's."""

from __future__ import annotations

import os
import sys

from node_agent.backends.ebpf import loader


def main() -> int:
    with os.fdopen(os.dup(1), "wb") as out:
        os.dup2(2, 1)  # nothing but the answer on the agent's pipe
        try:
            obj = loader.compile_here()
        except loader.ToolchainError as e:
            out.write(f"{e}\n".encode())
            return 2
        out.write(loader.encode(loader.CHILD_KEY, obj))
    return 0


if __name__ == "__main__":
    sys.exit(main())
