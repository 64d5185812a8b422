"""Re-export of node_agent.lab.traffic (the lab and the tests share one implementation)."""

from node_agent.lab.traffic import *  # noqa: F403
