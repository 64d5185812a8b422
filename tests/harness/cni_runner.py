"""Re-export of node_agent.lab.cni_runner (the lab and the tests share one implementation)."""

from node_agent.lab.cni_runner import *  # noqa: F403
