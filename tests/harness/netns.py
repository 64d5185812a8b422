"""Re-export of node_agent.lab.netns (the lab and the tests share one implementation)."""

from node_agent.lab.netns import *  # noqa: F403
