"""The local kernel lab: a simulated node (its own netns) whose pods are wired by the real CNI plugins.

Used by `headrace lab` / `make lab` and, through tests/harness, by the kernel tests.
"""
