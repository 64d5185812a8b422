"""The plugin's own redirection of sidecar pods (no agent involved): apply, remove and check the rules with
the iptables tools (`cni.kernel.tables`) or nftables (`rules_backend`, `nft -f`).

Runs when no agent takes the ADD (none running, an old one, or one that declined the pod), for every DEL
of a sidecar pod (rules the agent applied at ADD included: the same backend wrote them), and for CHECK.
Stdlib only; the iptables modules are imported only when a sidecar pod needs them.
"""

from __future__ import annotations

from cni.contract import errors
from cni.contract.errors import CniError
from cni.plugin import rules_backend

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Mapping

    from cni.contract.kinds import Family
    from cni.contract.sidecar_params import SidecarParams
    from cni.plugin.log import JsonLog
    from cni.plugin.netconf import NetConf


def apply_sidecar_redirect(
    netns: str, spec: SidecarParams, families: tuple[Family, ...], conf: NetConf, log: JsonLog
) -> None:
    if rules_backend.uses_nftables(conf):
        return rules_backend.apply(netns, spec, families, log)
    setting = conf.iptables
    try:
        from cni.kernel import flavour
        from cni.kernel import tables as netns_tables
        from cni.kernel.iptables_run import IptablesError
    except ImportError as exc:
        raise CniError(errors.REDIRECT_FAILED, "iptables support is not available", str(exc)) from exc
    try:
        # optimistic: an ADD normally meets a fresh netns; one restore per family then, no save first (a
        # family whose chains exist already, e.g. put there by an agent that did not answer, is replaced)
        netns_tables.apply_sidecar(netns, spec, families, flavour.resolve(setting), log=log, optimistic=True,
                                   fresh_here=True)
    except (IptablesError, OSError, ValueError) as exc:
        raise CniError(errors.REDIRECT_FAILED, "applying the sidecar redirect failed", str(exc)) from exc


def remove_redirect(netns: str, conf: NetConf, log: JsonLog) -> bool:
    """Whether the tools ran (False: one is missing, logged; a DEL goes on)."""
    if rules_backend.uses_nftables(conf):
        return rules_backend.remove(netns, log)
    setting = conf.iptables
    try:
        from cni.kernel import flavour
        from cni.kernel import tables as netns_tables
        from cni.kernel.iptables_run import IptablesError
    except ImportError as exc:
        raise CniError(errors.REDIRECT_FAILED, "iptables support is not available", str(exc)) from exc
    try:
        netns_tables.remove_all(netns, flavour.resolve(setting), log=log)
    except IptablesError as exc:
        if not exc.missing:
            raise CniError(errors.REDIRECT_FAILED, "removing the redirect failed", str(exc)) from exc
        return rules_backend.tool_missing_on_del(log, exc)
    except (OSError, ValueError) as exc:
        raise CniError(errors.REDIRECT_FAILED, "removing the redirect failed", str(exc)) from exc
    return True


def check_sidecar_redirect(netns: str, spec: SidecarParams, families: tuple[Family, ...], conf: NetConf) -> list[str]:
    if rules_backend.uses_nftables(conf):
        return rules_backend.check(netns, spec, families)
    setting = conf.iptables
    try:
        from cni.kernel import flavour
        from cni.kernel import tables as netns_tables
        from cni.kernel.iptables_run import IptablesError
    except ImportError as exc:
        raise CniError(errors.REDIRECT_FAILED, "iptables support is not available", str(exc)) from exc
    try:
        return netns_tables.check_sidecar(netns, spec, families, flavour.resolve(setting))
    except (IptablesError, OSError, ValueError) as exc:
        raise CniError(errors.CHECK_FAILED, "reading the pod's redirect rules failed", str(exc)) from exc


def sidecar_spec(annotations: Mapping[str, str]) -> SidecarParams:
    """Validate the pod's traffic annotations (imported here: only sidecar pods pay for it)."""
    from cni.contract.annotations import sidecar_params

    return sidecar_params(annotations)
