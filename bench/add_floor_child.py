"""The floor of a sidecar ADD: what any Python plugin that applies the rules with iptables-restore pays.

    python3 -IS bench/add_floor_child.py NETNS FLAVOUR V4_RULES_FILE [V6_RULES_FILE]

Started by bench/cni_add_latency.py exactly like the plugin (`python3 -IS`, under `nsenter` into the
node netns). It imports nothing but cni.kernel.spawn, reads the restore texts the plugin would send
(written beforehand by the bench) and runs the same commands the plugin runs on ADD, in parallel: one
`nsenter --net=NETNS iptables-FLAVOUR-restore --noflush` per family and, with IPv6, the
`ip -6 addr replace ::6/128 dev lo`. No config parsing, no pod lookup, no log, no result: the time left
is interpreter start-up plus those processes. Exits non-zero if a command fails.
"""

import os
import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from cni.kernel import spawn


def main(argv: list[str]) -> int:
    netns, flavour, *rule_files = argv
    nsenter = ["nsenter", f"--net={netns}", "--"]
    jobs: list[tuple[list[str], str | None]] = []
    for family, path in zip(("", "6"), rule_files, strict=False):
        with open(path, encoding="utf-8") as f:
            jobs.append(([*nsenter, f"ip{family}tables-{flavour}-restore", "--noflush", "--wait=10"], f.read()))
    if len(rule_files) > 1:
        jobs.append(([*nsenter, "ip", "-6", "addr", "replace", "::6/128", "dev", "lo"], None))
    failed = [r.stderr for r in spawn.run_many(jobs, 10.0) if r.returncode != 0]
    if failed:
        sys.stderr.write("".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # as the plugin does (cni.plugin.run_executable): no interpreter finalization
