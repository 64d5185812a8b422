"""install-cni: chain headrace-cni into the node's CNI config and install the plugin's runtime.

Modules:
- `conflist`: pure functions on parsed JSON (primary config choice, .conf conversion, entry insert/remove).
- `settings`: the settings written into our conflist entry.
- `atomic`: atomic, idempotent file writes (temp file in the same dir + fsync + rename).
- `confdir`: apply `conflist` to a CNI config directory (install / uninstall / check).
- `hostpath`: follow symlinks as the host does, from a process that sees the host's / elsewhere.
- `runtime`: install a self-contained Python runtime + the `cni` package and the `headrace-cni` launcher.
- `watcher`: wait for changes in the config dir (inotify through ctypes, polling fallback).
- `service`: the install / repair loop the command (and the agent) run.
"""
