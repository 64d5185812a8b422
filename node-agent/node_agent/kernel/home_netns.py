"""The agent's own network namespace, for threads that must live there.

A new thread starts in the netns of the thread that made it; the agent's pod-netns work happens on
threads that enter a pod's netns, and a long-lived thread started from one of them would stay in that
pod netns (and keep it alive). `go_home()`, first thing in such a thread, moves it to the netns of the
process' main thread as it was when this module was loaded (the agent's main thread never enters a
pod's)."""

from __future__ import annotations

import os

from cni.kernel.netns import OWN_NETNS, setns

_HOME = os.open(OWN_NETNS, os.O_RDONLY | os.O_CLOEXEC)


def go_home() -> None:
    """Move the calling thread into the agent's own netns (OSError if the kernel refuses)."""
    setns(_HOME, "the agent's own netns")


def at_home() -> bool:
    """Whether the calling thread is in the agent's own netns (then `go_home` has nothing to do: a setns
    needs CAP_SYS_ADMIN even into the netns a thread is in)."""
    here, home = os.stat("/proc/thread-self/ns/net"), os.fstat(_HOME)
    return (here.st_dev, here.st_ino) == (home.st_dev, home.st_ino)
