"""The reference node proxy (`headrace proxy`): an asyncio L4 proxy in the ztunnel role.

Modules: agent_session (gRPC client, reconnects), workloads (listeners per workload), netns_worker (a
thread parked inside a pod netns that creates sockets there), sockets (socket options, original
destination), forward (byte pumping and the per-connection JSON line), logs (JSON logs on stderr).
"""
