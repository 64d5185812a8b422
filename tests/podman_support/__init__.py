"""Support for the podman runtime test: a locally built container root filesystem (no registry needed)
and a podman whose configuration, storage, state and network configs all live in one temporary directory.

See docs/podman.md for how the isolation works and what the test needs from the machine.
"""
