"""Redirection backends: iptables and eBPF, behind one interface (base.RedirectBackend)."""
