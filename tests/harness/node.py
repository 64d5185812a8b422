"""Re-export of node_agent.lab.simnode (the lab and the tests share one implementation)."""

from node_agent.lab.simnode import *  # noqa: F403
