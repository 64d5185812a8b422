"""Pure statistics and table helpers of bench/redirect_overhead.py (no kernel, no processes).

Samples are integers in nanoseconds (time.perf_counter_ns deltas); figures are printed in microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

MODES = ("direct", "iptables", "ebpf")  # the modes of the iptables/eBPF verdict
DEFAULT_MODES = ("direct", "iptables", "nftables", "ebpf")  # what the bench runs unless told otherwise
# every mode the bench can run, in table order: the defaults and the reference modes (redirect_reference.py)
ALL_MODES = (*DEFAULT_MODES, "nft-tproxy-out", "nft-hooks")
MODE_LABELS = {
    "direct": "(a) no redirect, dial proxy",
    "iptables": "(b) iptables REDIRECT",
    "nftables": "(d) nftables REDIRECT",
    "ebpf": "(c) eBPF connect/getsockopt",
    "nft-tproxy-out": "(r1) ref: nft mark+tproxy, no NAT",
    "nft-hooks": "(r2) ref: nft hooks, dial proxy",
}
BASELINE = "direct"
# The figures compared; for each: lower is better (latency) or higher is better (rate).
FIGURES: tuple[tuple[str, bool], ...] = (
    ("p50", True),
    ("p90", True),
    ("p99", True),
    ("conn/s", False),
)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; NaN when empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def rate_per_second(count: int, elapsed_ns: int) -> float:
    """count events in elapsed_ns → events per second (NaN when nothing was timed)."""
    if count <= 0 or elapsed_ns <= 0:
        return math.nan
    return count * 1e9 / elapsed_ns


@dataclass
class ModeSamples:
    """Everything measured for one mode, pooled over the rounds."""

    rtt_ns: list[int] = field(default_factory=list)  # one request/response on an open connection
    cycle_ns: list[int] = field(default_factory=list)  # connect + request/response + close
    connections: int = 0
    connect_elapsed_ns: int = 0  # wall time of the connect loops (sum over rounds)
    round_rates: list[float] = field(default_factory=list)  # conn/s of each round
    round_p50_us: list[float] = field(default_factory=list)  # latency p50 of each round
    round_figures: list[dict[str, float]] = field(default_factory=list)  # FIGURES of each round

    def add_round(self, rtt_ns: Sequence[int], cycle_ns: Sequence[int], connections: int, elapsed_ns: int) -> None:
        self.rtt_ns.extend(rtt_ns)
        self.cycle_ns.extend(cycle_ns)
        self.connections += connections
        self.connect_elapsed_ns += elapsed_ns
        self.round_rates.append(rate_per_second(connections, elapsed_ns))
        self.round_p50_us.append(percentile(rtt_ns, 50) / 1000.0)
        self.round_figures.append(
            {
                "p50": percentile(rtt_ns, 50) / 1000.0,
                "p90": percentile(rtt_ns, 90) / 1000.0,
                "p99": percentile(rtt_ns, 99) / 1000.0,
                "conn/s": rate_per_second(connections, elapsed_ns),
            }
        )


@dataclass(frozen=True)
class Summary:
    mode: str
    requests: int
    connections: int
    p50_us: float
    p90_us: float
    p99_us: float
    conn_per_s: float
    cycle_p50_us: float
    round_p50_range_us: tuple[float, float] = (math.nan, math.nan)  # min, max of the per-round p50s
    round_rate_range: tuple[float, float] = (math.nan, math.nan)  # min, max of the per-round conn/s

    def figure(self, name: str) -> float:
        return {
            "p50": self.p50_us,
            "p90": self.p90_us,
            "p99": self.p99_us,
            "conn/s": self.conn_per_s,
        }[name]


def summarise(mode: str, s: ModeSamples) -> Summary:
    return Summary(
        mode=mode,
        requests=len(s.rtt_ns),
        connections=s.connections,
        p50_us=percentile(s.rtt_ns, 50) / 1000.0,
        p90_us=percentile(s.rtt_ns, 90) / 1000.0,
        p99_us=percentile(s.rtt_ns, 99) / 1000.0,
        conn_per_s=rate_per_second(s.connections, s.connect_elapsed_ns),
        cycle_p50_us=percentile(s.cycle_ns, 50) / 1000.0,
        round_p50_range_us=value_range(s.round_p50_us),
        round_rate_range=value_range(s.round_rates),
    )


def value_range(values: Sequence[float]) -> tuple[float, float]:
    """(min, max) ignoring NaN; (NaN, NaN) when nothing is left."""
    real = [v for v in values if not math.isnan(v)]
    return (min(real), max(real)) if real else (math.nan, math.nan)


def fmt_range(r: tuple[float, float], digits: int = 0) -> str:
    return "-" if math.isnan(r[0]) else f"{r[0]:.{digits}f}..{r[1]:.{digits}f}"


def overhead_ratio(value: float, baseline: float) -> float:
    """value / baseline (NaN when either is unknown or the baseline is 0)."""
    if math.isnan(value) or math.isnan(baseline) or baseline == 0:
        return math.nan
    return value / baseline


def cost_ratio(name: str, value: float, baseline: float, lower_is_better: bool) -> float:
    """The cost of a mode relative to the baseline, >1 meaning worse: latency ratio as is; for a rate the
    inverse (baseline / value), so 1.05 reads "5 % overhead" for every figure alike."""
    del name
    if lower_is_better:
        return overhead_ratio(value, baseline)
    return overhead_ratio(baseline, value)


def paired_costs(mode: ModeSamples, base: ModeSamples, name: str, lower_is_better: bool) -> list[float]:
    """Per round: the cost of mode relative to the baseline measured in the same round (drift between
    rounds cancels out). Rounds where either figure is missing are skipped."""
    out = []
    for m, b in zip(mode.round_figures, base.round_figures, strict=False):
        r = cost_ratio(name, m[name], b[name], lower_is_better)
        if not math.isnan(r):
            out.append(r)
    return out


def paired_wins(ebpf: ModeSamples, ipt: ModeSamples, name: str, lower_is_better: bool) -> tuple[int, int]:
    """(rounds where eBPF was at least as good as iptables on this figure, rounds compared)."""
    wins = total = 0
    for e, i in zip(ebpf.round_figures, ipt.round_figures, strict=False):
        v = ebpf_not_worse(e[name], i[name], lower_is_better)
        if v is not None:
            total += 1
            wins += int(v)
    return wins, total


def ebpf_not_worse(ebpf: float, iptables: float, lower_is_better: bool) -> bool | None:
    """Whether eBPF is at least as good as iptables on one figure (None when a figure is missing)."""
    if math.isnan(ebpf) or math.isnan(iptables):
        return None
    return ebpf <= iptables if lower_is_better else ebpf >= iptables


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def fmt_verdict(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def render_table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    if any(len(r) != len(header) for r in rows):
        raise ValueError("every row must have as many cells as the header")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


RESULT_HEADER = [
    "mode",
    "requests",
    "p50 µs",
    "p90 µs",
    "p99 µs",
    "conns",
    "conn/s",
    "cycle p50 µs",
    "p50 per round",
    "conn/s per round",
    "cost p50",
    "cost p90",
    "cost p99",
    "cost conn/s",
]


def result_rows(summaries: dict[str, Summary]) -> list[list[str]]:
    """One row per mode; cost columns are the ratios to the baseline (a) (>1 = slower)."""
    base = summaries.get(BASELINE)
    rows = []
    for mode in ALL_MODES:
        s = summaries.get(mode)
        if s is None:
            continue
        costs = []
        for name, lower in FIGURES:
            r = math.nan if base is None else cost_ratio(name, s.figure(name), base.figure(name), lower)
            costs.append(fmt(r, 3))
        rows.append(
            [
                MODE_LABELS[mode],
                str(s.requests),
                fmt(s.p50_us),
                fmt(s.p90_us),
                fmt(s.p99_us),
                str(s.connections),
                fmt(s.conn_per_s, 0),
                fmt(s.cycle_p50_us),
                fmt_range(s.round_p50_range_us),
                fmt_range(s.round_rate_range),
                *costs,
            ]
        )
    return rows


VERDICT_HEADER = [
    "figure",
    "iptables cost",
    "eBPF cost",
    "eBPF ≤ iptables?",
    "eBPF ≤ 5 % over (a)?",
    "paired iptables cost",
    "paired eBPF cost",
    "rounds eBPF ≤ iptables",
]


def verdict_rows(
    summaries: dict[str, Summary], samples: dict[str, ModeSamples] | None = None, target: float = 1.05
) -> list[list[str]]:
    """Per figure: the pooled cost of (b) and (c) relative to (a), whether eBPF is at least as good as
    iptables and within target of (a); with samples also the paired view: median over rounds of each
    round's cost (against the (a) of the same round) and in how many rounds eBPF was ≤ iptables."""
    base, ipt, ebpf = (summaries.get(m) for m in MODES)
    rows = []
    for name, lower in FIGURES:
        if base is None or ipt is None or ebpf is None:
            rows.append([name] + ["-"] * (len(VERDICT_HEADER) - 1))
            continue
        c_ipt = cost_ratio(name, ipt.figure(name), base.figure(name), lower)
        c_ebpf = cost_ratio(name, ebpf.figure(name), base.figure(name), lower)
        within = None if math.isnan(c_ebpf) else c_ebpf <= target
        paired = ["-", "-", "-"]
        if samples is not None and all(m in samples for m in MODES):
            sb, si, se = (samples[m] for m in MODES)
            wins, total = paired_wins(se, si, name, lower)
            paired = [
                fmt(median_or_nan(paired_costs(si, sb, name, lower)), 3),
                fmt(median_or_nan(paired_costs(se, sb, name, lower)), 3),
                f"{wins}/{total}",
            ]
        rows.append(
            [
                name,
                fmt(c_ipt, 3),
                fmt(c_ebpf, 3),
                fmt_verdict(ebpf_not_worse(ebpf.figure(name), ipt.figure(name), lower)),
                fmt_verdict(within),
                *paired,
            ]
        )
    return rows


NFT_VERDICT_HEADER = [
    "figure",
    "nftables cost",
    "nftables ≤ 5 % over (a)?",
    "nftables ≤ iptables?",
    "paired nftables cost",
    "rounds nftables ≤ iptables",
]


def nft_verdict_rows(
    summaries: dict[str, Summary], samples: dict[str, ModeSamples] | None = None, target: float = 1.05
) -> list[list[str]]:
    """Per figure: the pooled cost of (d) nftables relative to (a), whether it is within target of (a) and at
    least as good as (b) iptables; with samples the paired cost and in how many rounds it was ≤ iptables."""
    base, ipt, nft = (summaries.get(m) for m in ("direct", "iptables", "nftables"))
    rows = []
    for name, lower in FIGURES:
        if base is None or nft is None:
            rows.append([name] + ["-"] * (len(NFT_VERDICT_HEADER) - 1))
            continue
        c_nft = cost_ratio(name, nft.figure(name), base.figure(name), lower)
        vs_ipt = None if ipt is None else ebpf_not_worse(nft.figure(name), ipt.figure(name), lower)
        paired = ["-", "-"]
        if samples is not None and all(m in samples for m in ("direct", "iptables", "nftables")):
            wins, total = paired_wins(samples["nftables"], samples["iptables"], name, lower)
            paired = [fmt(median_or_nan(paired_costs(samples["nftables"], samples["direct"], name, lower)), 3),
                      f"{wins}/{total}"]  # fmt: skip
        within = None if math.isnan(c_nft) else c_nft <= target
        rows.append([name, fmt(c_nft, 3), fmt_verdict(within), fmt_verdict(vs_ipt), *paired])
    return rows


def median_or_nan(values: Sequence[float]) -> float:
    return percentile(values, 50)


def interleaved_schedule(rounds: int, modes: Sequence[str] = MODES, rotate: bool = False) -> list[tuple[int, str]]:
    """(round, mode) pairs in the order a,b,c,a,b,c,…; with rotate the start moves each round (round r
    begins at mode r mod len(modes): a,b,c,b,c,a,c,a,b,…) so no mode always follows the same one."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    if not modes:
        raise ValueError("at least one mode")
    out = []
    for r in range(rounds):
        k = r % len(modes) if rotate else 0
        for mode in (*modes[k:], *modes[:k]):
            out.append((r, mode))
    return out
