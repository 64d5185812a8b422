"""Which rules the plugin writes itself for sidecar pods (`backend` in the conflist entry): iptables, or
nftables (`backend: nftables`, or `auto` on a host without an iptables binary), and the nftables calls.

Stdlib only; `cni.kernel.nft_tables` is imported only when nftables is used.
"""

from __future__ import annotations

from cni.contract import errors
from cni.contract.errors import CniError
from cni.kernel.executables import on_path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.contract.kinds import Family
    from cni.contract.sidecar_params import SidecarParams
    from cni.plugin.log import JsonLog
    from cni.plugin.netconf import NetConf

IPTABLES_BINARIES = ("iptables-nft-restore", "iptables-legacy-restore", "iptables-restore")


def uses_nftables(conf: NetConf) -> bool:
    if conf.backend == "nftables":
        return True
    return conf.backend == "auto" and not any(on_path(name) for name in IPTABLES_BINARIES)


def apply(netns: str, spec: SidecarParams, families: tuple[Family, ...], log: JsonLog) -> None:
    from cni.kernel import nft_tables
    from cni.kernel.iptables_run import IptablesError

    if not on_path(nft_tables.NFT):  # a new netns' table goes in without it, but CHECK, a retry and DEL need it
        raise CniError(errors.REDIRECT_FAILED, "applying the sidecar redirect (nftables) failed",
                       f"{nft_tables.NFT} not found on PATH")
    try:
        nft_tables.apply_sidecar(netns, spec, families, log=log)
    except (IptablesError, OSError, ValueError) as exc:
        raise CniError(errors.REDIRECT_FAILED, "applying the sidecar redirect (nftables) failed", str(exc)) from exc


def remove(netns: str, log: JsonLog) -> bool:
    """Whether nft ran (False: a tool is missing, logged)."""
    from cni.kernel import nft_tables
    from cni.kernel.iptables_run import IptablesError

    try:
        nft_tables.remove(netns, log=log)
    except IptablesError as exc:
        if not exc.missing:
            raise CniError(errors.REDIRECT_FAILED, "removing the redirect (nftables) failed", str(exc)) from exc
        return tool_missing_on_del(log, exc)
    except OSError as exc:
        raise CniError(errors.REDIRECT_FAILED, "removing the redirect (nftables) failed", str(exc)) from exc
    return True


def tool_missing_on_del(log: JsonLog, exc: Exception) -> bool:
    """A DEL on a host without the rules tools succeeds (False): no ADD could have written rules with them,
    and the runtime could never remove the pod otherwise."""
    log.warning("redirect", f"DEL: redirect not removed, a tool is missing: {exc}")
    return False


def check(netns: str, spec: SidecarParams, families: tuple[Family, ...]) -> list[str]:
    from cni.kernel import nft_tables

    try:
        return nft_tables.check_sidecar(netns, spec, families)
    except (OSError, ValueError) as exc:
        raise CniError(errors.CHECK_FAILED, "reading the pod's nftables table failed", str(exc)) from exc


def tool_problems(conf: NetConf) -> list[str]:
    """STATUS: the tools the plugin's own redirection needs and does not find."""
    problems: list[str] = []
    if uses_nftables(conf):
        if not on_path("nft") and conf.backend == "nftables":
            problems.append("nft is not installed (backend nftables)")
        elif not on_path("nft"):
            problems.append("iptables tools missing and nft is not installed: need iptables-nft-restore or nft")
    else:
        flavours = ("legacy", "nft") if conf.iptables == "auto" else (conf.iptables,)
        tools = [(f"iptables-{f}-restore", f"ip6tables-{f}-restore", f"iptables-{f}-save") for f in flavours]
        if not any(all(on_path(t) for t in group) for group in tools):
            problems.append(f"iptables tools missing: need {' or '.join(g[0] for g in tools)} (and -save, ip6tables)")
    if not on_path("nsenter"):
        problems.append("nsenter is not installed")
    return problems
