"""Run iptables-save / iptables-restore (and other commands) inside a network namespace.

`nsenter --net=PATH <argv>` (argv lists, no shell), started with `posix_spawn` (spawn.py); several at
once where the caller has several. Failures become `IptablesError` naming the step, with iptables' own
words. Stdlib only: imported by the CNI plugin.
"""

from __future__ import annotations

from cni.kernel import spawn
from cni.kernel.flavour import binary

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Protocol

    from cni.contract.kinds import Family
    from cni.kernel.flavour import Flavour

    class StepLog(Protocol):
        def log(self, level: str, step: str, msg: str, **extra: Any) -> None: ...


TIMEOUT = 30.0
_WAIT = "--wait=10"  # xtables lock (legacy); accepted and ignored by nft


class IptablesError(Exception):
    """An iptables step failed; `step` names it and `stderr` carries iptables' own words."""

    def __init__(self, step: str, message: str, stderr: str = "", *, missing: bool = False) -> None:
        self.step = step
        self.stderr = stderr.strip()
        self.missing = missing  # the command (or nsenter) is not on this host: nothing of ours could run
        text = f"{step}: {message}"
        if self.stderr:
            text += f": {self.stderr}"
        super().__init__(text)


# ---------------------------------------------------------------- running iptables in a netns


_NSENTER = "nsenter"
NOT_FOUND_EXIT = 127  # nsenter's exit when the command it was to run is not found
_NET = "--net="


def netns_argv(netns_path: str | None, argv: Sequence[str]) -> list[str]:
    if netns_path is None:
        return list(argv)
    return [_NSENTER, f"{_NET}{netns_path}", "--", *argv]


def split_netns_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The inverse of `netns_argv`: (netns path or None, the command itself). A runner that can start
    commands inside a netns without nsenter (the agent's) takes the wrapper off with this."""
    if len(argv) > 3 and argv[0] == _NSENTER and argv[1].startswith(_NET) and argv[2] == "--":
        return argv[1][len(_NET):], list(argv[3:])
    return None, list(argv)


def run(step: str, netns_path: str | None, argv: Sequence[str], stdin: str | None = None) -> str:
    full = netns_argv(netns_path, argv)
    try:
        (proc,) = spawn.run_many([(full, stdin)], TIMEOUT)
    except FileNotFoundError as exc:
        raise IptablesError(step, f"{full[0] if netns_path is None else 'nsenter'} not found", str(exc),
                            missing=True) from exc
    except OSError as exc:
        raise IptablesError(step, f"{full[0]} could not be started", str(exc)) from exc
    if proc.returncode is None:
        raise IptablesError(step, f"{argv[0]} timed out after {TIMEOUT:.0f}s")
    if proc.returncode != 0:
        raise IptablesError(step, f"{argv[0]} exited {proc.returncode}", proc.stderr,
                            missing=proc.returncode == NOT_FOUND_EXIT)
    return proc.stdout


def save_argv(flavour: Flavour, family: Family) -> list[str]:
    return [binary(flavour, family, "save")]


def save(netns_path: str | None, flavour: Flavour, family: Family) -> str:
    """The full iptables-save dump of one family (only existing tables; nothing gets created)."""
    return run(f"save-v{family}", netns_path, save_argv(flavour, family))


def save_families(netns_path: str | None, flavour: Flavour, families: Sequence[Family]) -> dict[Family, str]:
    """iptables-save of several families, run in parallel (the plugin's ADD latency matters)."""
    if len(families) < 2:
        return {f: save(netns_path, flavour, f) for f in families}
    argvs = [netns_argv(netns_path, save_argv(flavour, f)) for f in families]
    try:
        results = spawn.run_many([(argv, None) for argv in argvs], TIMEOUT)
    except OSError as exc:
        raise IptablesError(f"save-v{families[0]}", f"{argvs[0][0]} could not be started", str(exc),
                            missing=isinstance(exc, FileNotFoundError)) from exc
    return save_results(flavour, families, results)


def save_results(flavour: Flavour, families: Sequence[Family], procs: Sequence[spawn.Result]) -> dict[Family, str]:
    """The dumps of finished save processes (one per family, in order); IptablesError for the first failed."""
    out: dict[Family, str] = {}
    for f, proc in zip(families, procs, strict=True):
        if proc.returncode is None:
            raise IptablesError(f"save-v{f}", f"save timed out after {TIMEOUT:.0f}s")
        if proc.returncode != 0:
            raise IptablesError(f"save-v{f}", f"{binary(flavour, f, 'save')} exited {proc.returncode}", proc.stderr,
                                missing=proc.returncode == NOT_FOUND_EXIT)
        out[f] = proc.stdout
    return out


def restore_argv(flavour: Flavour, family: Family) -> list[str]:
    return [binary(flavour, family, "restore"), "--noflush", _WAIT]


def restore(netns_path: str | None, flavour: Flavour, family: Family, text: str, step: str) -> None:
    run(step, netns_path, restore_argv(flavour, family), stdin=text)


def restore_many(
    netns_path: str | None, flavour: Flavour, texts: dict[Family, str], step: str
) -> dict[Family, IptablesError | None]:
    """One restore per family, all running at once; each is its own transaction. Result per family."""
    results: dict[Family, IptablesError | None] = {}
    fams = list(texts)
    argvs = [netns_argv(netns_path, restore_argv(flavour, fam)) for fam in fams]
    try:
        procs = spawn.run_many([(argv, texts[fam]) for fam, argv in zip(fams, argvs, strict=True)], TIMEOUT)
    except OSError as exc:
        return {fam: IptablesError(f"{step}-v{fam}", f"{argvs[0][0]} could not be started", str(exc)) for fam in fams}
    for fam, proc in zip(fams, procs, strict=True):
        results[fam] = restore_result(flavour, fam, proc, step)
    return results


def restore_result(flavour: Flavour, fam: Family, proc: spawn.Result, step: str) -> IptablesError | None:
    if proc.returncode is None:
        return IptablesError(f"{step}-v{fam}", f"restore timed out after {TIMEOUT:.0f}s")
    if proc.returncode != 0:
        what = binary(flavour, fam, "restore")
        return IptablesError(f"{step}-v{fam}", f"{what} exited {proc.returncode}", proc.stderr)
    return None


def emit(log: StepLog | None, level: str, step: str, msg: str, **extra: Any) -> None:
    if log is not None:
        log.log(level, step, msg, **extra)
