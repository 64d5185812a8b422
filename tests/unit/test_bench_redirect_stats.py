"""Pure statistics of bench/redirect_overhead.py: percentiles, rates, cost ratios, verdicts, schedule."""

from __future__ import annotations

import math

import pytest

from bench.redirect_stats import (
    MODES,
    RESULT_HEADER,
    VERDICT_HEADER,
    ModeSamples,
    cost_ratio,
    ebpf_not_worse,
    interleaved_schedule,
    overhead_ratio,
    paired_costs,
    paired_wins,
    percentile,
    rate_per_second,
    render_table,
    result_rows,
    summarise,
    value_range,
    verdict_rows,
)


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [40, 10, 30, 20]  # order does not matter
    assert percentile(values, 0) == 10
    assert percentile(values, 100) == 40
    assert percentile(values, 50) == 25
    assert percentile(values, 90) == pytest.approx(37.0)
    assert percentile([7], 99) == 7


def test_percentile_empty_and_out_of_range() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1, 2], 101)
    with pytest.raises(ValueError):
        percentile([1, 2], -1)


def test_rate_per_second() -> None:
    assert rate_per_second(500, 250_000_000) == pytest.approx(2000.0)
    assert math.isnan(rate_per_second(0, 1000))
    assert math.isnan(rate_per_second(10, 0))


def test_cost_ratio_is_overhead_for_latency_and_rate_alike() -> None:
    # latency: 110 µs vs 100 µs baseline → 10 % overhead
    assert cost_ratio("p50", 110.0, 100.0, lower_is_better=True) == pytest.approx(1.1)
    # rate: 900/s vs 1000/s baseline → baseline/value = 1.111 (> 1 = worse)
    assert cost_ratio("conn/s", 900.0, 1000.0, lower_is_better=False) == pytest.approx(1000 / 900)
    assert math.isnan(overhead_ratio(1.0, 0.0))
    assert math.isnan(overhead_ratio(math.nan, 1.0))


def test_ebpf_not_worse_direction() -> None:
    assert ebpf_not_worse(90.0, 100.0, lower_is_better=True) is True
    assert ebpf_not_worse(100.0, 100.0, lower_is_better=True) is True
    assert ebpf_not_worse(110.0, 100.0, lower_is_better=True) is False
    assert ebpf_not_worse(1100.0, 1000.0, lower_is_better=False) is True
    assert ebpf_not_worse(900.0, 1000.0, lower_is_better=False) is False
    assert ebpf_not_worse(math.nan, 1.0, lower_is_better=True) is None


def samples_with(rtt_us: list[float], connections: int, elapsed_s: float) -> ModeSamples:
    s = ModeSamples()
    s.add_round([int(v * 1000) for v in rtt_us], [1000] * connections, connections, int(elapsed_s * 1e9))
    return s


def test_summarise_pools_rounds_in_microseconds() -> None:
    s = ModeSamples()
    s.add_round([100_000, 200_000], [300_000], 1, 1_000_000)  # 1 conn in 1 ms
    s.add_round([300_000, 400_000], [500_000], 3, 1_000_000)  # 3 conns in 1 ms
    out = summarise("direct", s)
    assert out.requests == 4 and out.connections == 4
    assert out.p50_us == pytest.approx(250.0)
    assert out.conn_per_s == pytest.approx(4 / 0.002)  # pooled: all connections / all connect time
    assert out.cycle_p50_us == pytest.approx(400.0)
    assert out.round_p50_range_us == pytest.approx((150.0, 350.0))
    assert out.round_rate_range == pytest.approx((1000.0, 3000.0))
    assert s.round_figures[1]["conn/s"] == pytest.approx(3000.0)


def test_value_range_skips_nan() -> None:
    assert value_range([3.0, math.nan, 1.0]) == (1.0, 3.0)
    assert all(math.isnan(v) for v in value_range([math.nan]))


def three_modes() -> dict[str, ModeSamples]:
    return {
        "direct": samples_with([100.0] * 10, 100, 0.1),  # 1000 conn/s
        "iptables": samples_with([120.0] * 10, 100, 0.125),  # 800 conn/s
        "ebpf": samples_with([102.0] * 10, 100, 0.102),
    }


def test_result_rows_and_costs() -> None:
    summaries = {m: summarise(m, s) for m, s in three_modes().items()}
    rows = result_rows(summaries)
    assert [r[0][:3] for r in rows] == ["(a)", "(b)", "(c)"]
    assert all(len(r) == len(RESULT_HEADER) for r in rows)
    cost = {h: i for i, h in enumerate(RESULT_HEADER)}
    assert rows[0][cost["cost p50"]] == "1.000"
    assert rows[1][cost["cost p50"]] == "1.200"
    assert rows[1][cost["cost conn/s"]] == "1.250"
    assert rows[2][cost["cost p50"]] == "1.020"


def test_verdict_rows_pooled_and_paired() -> None:
    samples = three_modes()
    summaries = {m: summarise(m, s) for m, s in samples.items()}
    rows = {r[0]: r for r in verdict_rows(summaries, samples)}
    col = {h: i for i, h in enumerate(VERDICT_HEADER)}
    p50 = rows["p50"]
    assert p50[col["iptables cost"]] == "1.200" and p50[col["eBPF cost"]] == "1.020"
    assert p50[col["eBPF ≤ iptables?"]] == "yes"
    assert p50[col["eBPF ≤ 5 % over (a)?"]] == "yes"
    assert p50[col["paired eBPF cost"]] == "1.020"
    assert p50[col["rounds eBPF ≤ iptables"]] == "1/1"
    assert rows["conn/s"][col["eBPF ≤ 5 % over (a)?"]] == "yes"  # 1000/980.4 = 1.02


def test_verdict_without_a_mode_prints_dashes() -> None:
    samples = three_modes()
    del samples["ebpf"]
    summaries = {m: summarise(m, s) for m, s in samples.items()}
    for row in verdict_rows(summaries, samples):
        assert row[1:] == ["-"] * (len(VERDICT_HEADER) - 1)


def test_paired_costs_cancel_drift_between_rounds() -> None:
    base, ebpf, ipt = ModeSamples(), ModeSamples(), ModeSamples()
    for level in (100, 200):  # the machine gets twice as slow in round 2: paired costs do not move
        base.add_round([level * 1000], [1], 10, 10_000_000)
        ebpf.add_round([level * 1010], [1], 10, 10_000_000)
        ipt.add_round([level * 1100], [1], 10, 11_000_000)
    assert paired_costs(ebpf, base, "p50", True) == pytest.approx([1.01, 1.01])
    assert paired_costs(ipt, base, "conn/s", False) == pytest.approx([1.1, 1.1])
    assert paired_wins(ebpf, ipt, "p50", True) == (2, 2)
    assert paired_wins(ipt, ebpf, "p50", True) == (0, 2)


def test_interleaved_schedule() -> None:
    assert interleaved_schedule(2) == [(0, m) for m in MODES] + [(1, m) for m in MODES]
    rotated = interleaved_schedule(3, ("a", "b", "c"), rotate=True)
    assert [m for _, m in rotated] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    with pytest.raises(ValueError):
        interleaved_schedule(0)
    with pytest.raises(ValueError):
        interleaved_schedule(1, ())


def test_render_table_pads_and_checks_width() -> None:
    text = render_table([["a", "12345"]], ["mode", "x"])
    assert text.splitlines() == ["| mode | x     |", "|------|-------|", "| a    | 12345 |"]
    with pytest.raises(ValueError):
        render_table([["only one"]], ["two", "cells"])
