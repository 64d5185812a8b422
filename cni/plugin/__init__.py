"""The CNI plugin `headrace-cni`: entry point, netconf and prevResult handling, pod source, log.

The launcher that install-cni lays on a node runs ``from cni.plugin import run_executable``.
"""

from cni.plugin.entry import main, run_executable

__all__ = ["main", "run_executable"]
