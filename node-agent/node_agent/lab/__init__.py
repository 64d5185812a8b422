"""The local kernel lab: a simulated node (its own netns) whose pods are wired by the real CNI plugins,
bare kubelet-style pods, Kubernetes-shaped objects, and the agent and reference proxy run as processes.

Used by `headrace lab` / `make lab`, by the benchmarks (bench/), and by the kernel tests (directly, through
tests/harness and tests/kernel/agent_kit.py). Only `node_agent.commands.lab` imports it in product code.
"""
