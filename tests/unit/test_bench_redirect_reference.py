"""The reference rule sets of bench/redirect_overhead.py (pure text; the bench runs them on the kernel)."""

from __future__ import annotations

import pytest

from bench.redirect_reference import DIALS_PROXY, MARK, REFERENCE_MODES, ruleset
from bench.redirect_stats import ALL_MODES, DEFAULT_MODES, MODE_LABELS


def test_the_hooks_reference_captures_nothing() -> None:
    text = ruleset("nft-hooks", 15001)
    assert "type route hook output priority mangle" in text and "type filter hook prerouting" in text
    assert "tproxy" not in text and "mark set" not in text and "redirect" not in text
    assert "nft-hooks" in DIALS_PROXY


def test_the_tproxy_reference_marks_outbound_and_hands_it_to_the_proxy_without_nat() -> None:
    text = ruleset("nft-tproxy-out", 15001)
    assert f"meta mark set {MARK:#x}" in text
    assert f'iifname "lo" meta mark {MARK:#x} tproxy ip to :15001 accept' in text
    assert "meta skuid 1337 return" in text  # the proxy's own connections leave as they are
    assert "ct " not in text and "redirect" not in text and "nat" not in text  # conntrack stays off
    assert "nft-tproxy-out" not in DIALS_PROXY


def test_every_mode_has_a_label_and_the_defaults_leave_the_references_out() -> None:
    assert set(ALL_MODES) == set(MODE_LABELS) and set(REFERENCE_MODES) <= set(ALL_MODES)
    assert not set(REFERENCE_MODES) & set(DEFAULT_MODES)


def test_an_unknown_reference_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reference mode"):
        ruleset("nft-nothing", 15001)
