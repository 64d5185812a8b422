"""The rules part of an eBPF apply: the pod's inbound capture on the rules backend (an ambient pod's also
its policy routing), written after its eBPF part. With a rules helper (`iptables.rules_helper`) the part is
handed to that child under the backend's lock and waited for after it, so the next pod's eBPF part goes in
meanwhile; the helper not ready, gone or stuck: written right here, as without one. Removed with the
eBPF part, or (a spec change) when the pod's inbound moves to the other rules backend."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future

from node_agent.backends.base import (
    AppliesInNetns,
    BackendError,
    PodRules,
    PodTarget,
    RedirectSpec,
    StepsAside,
    same_kind,
)
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.backends.iptables.rules_helper import HelperGone, RulesError, RulesHelper

log = logging.getLogger("headrace.backend.ebpf")

Pending = tuple[RulesHelper, IptablesBackend, "Future[bytes | None]"]


def start(rules: PodRules | None, helper: RulesHelper | None, target: PodTarget, spec: RedirectSpec,
          first: Callable[[], None] | None) -> Pending | None:
    """Under the backend's lock, the calling thread in the pod netns (`staying_in`): `first`, then the rules
    handed to the helper (what `finish` waits for) or written here (None; also with no rules backend: the
    spec's inbound is in eBPF). The helper takes a backend of its flavour. Raises BackendError."""
    if rules is None:
        return None
    if helper is not None and isinstance(rules, IptablesBackend) and rules.flavour == helper.flavour:
        if first is not None:
            first()  # before the rules go in, whoever writes them
            first = None
        try:
            return helper, rules, helper.submit(target, spec)
        except HelperGone:
            pass
    if isinstance(rules, AppliesInNetns):  # one netns entry for its reads and writes
        rules.apply_after(target, spec, first)
    else:
        rules.apply(target, spec)
    return None


def finish(pending: Pending, target: PodTarget, spec: RedirectSpec) -> None:
    """After the lock: the helper's write remembered by the agent's rules backend (its verified digest
    recorded); written here when the helper went away meanwhile. Raises BackendError."""
    helper, rules, fut = pending
    try:
        digest = helper.result(fut)
    except HelperGone as exc:
        log.info("pod rules written by the agent: %s", exc, extra={"pod": target.uid, "event": "rules_helper_gone"})
        rules.apply_after(target, spec, None)
        return
    except RulesError as exc:
        raise BackendError(str(exc)) from exc
    rules.adopt_written(target, spec, digest)


def remove(rules: PodRules | None, target: PodTarget, beside: PodRules | None) -> None:
    """The pod's inbound rules out with its eBPF part. `beside`: the backend the pod moved to (StepsAside):
    the policy routing stays, and so do rules of `beside`'s kind (it wrote its own over them)."""
    if rules is None or (beside is not None and same_kind(rules, beside)):
        return
    if beside is not None and isinstance(rules, StepsAside):
        rules.remove_beside(target, beside)
    else:
        rules.remove(target)


def remove_others(rules: PodRules | None, others: tuple[PodRules | None, ...], target: PodTarget) -> None:
    """After an apply whose inbound went on `rules`: what the other rules backends wrote for the pod
    before (its spec moved the inbound from one to the other) comes out."""
    for other in others:
        if other is not None and other is not rules and other.installed(target):
            other.remove(target)
