"""The CNI plugin `headrace-cni`: entry point, netconf and prevResult handling, pod source, log.

The launcher that install-cni lays on a node runs ``from cni.plugin.launch import run_executable``; this
package imports nothing else on its own (an ADD the agent answers loads no more of the plugin).
"""

from cni.plugin.launch import run_executable

__all__ = ["run_executable"]
