"""Turn pytest-benchmark results into docs/benchmarks.md with tables and SVG charts.

    ./dev bench                       # writes bench/results/latest.json (raw, not committed)
    .venv/bin/python -m bench.report  # writes bench/results/summary.json, docs/benchmarks.md
                                      # and docs/img/bench-*.svg

Every figure in the report comes from the JSON file; nothing is typed in by hand. The
charts are plain SVG written here (no plotting library to install on a node image).

Throughput is never shown alone: every throughput table puts the offered rate, what
was dropped, the CPU time all CPUs spent (busy CPU-seconds per second of measurement)
and the rate per busy CPU-second beside the received rate, with ratios against the
baseline measured in the same run. A benchmark that compares the configurations of
``CONFIGS`` puts its measurements in ``extra_info["comparison"]`` (the record format
is in docs/benchmarks-method.md); any of the configurations may be absent, and the
report then says which ones were not measured. Malformed results stop the report
with one line naming the benchmark, the record and the field (exit code 2).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import statistics
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INPUT = os.path.join(ROOT, "bench", "results", "latest.json")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMG = os.path.join(ROOT, "docs", "img")

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948"]

#: The configurations of the side-by-side comparison, in table order: key -> label.
CONFIGS = {
    "cni": "(a) CNI alone",
    "xdp-pass": "(b) CNI + pass-only XDP",
    "nftables": "(c) CNI + nftables",
    "mcnp": "(d) mcnp",
}
#: The configuration compared with each of the others.
SUBJECT = "mcnp"
#: Units of a comparison record: rates (higher is better) and latencies (lower is).
RATE_UNITS = {"pps": "packets/s", "flows/s": "new flows/s", "Gbit/s": "Gbit/s"}
LATENCY_UNITS = {"ms": "ms"}
MISSING = "—"


class ReportError(ValueError):
    """Results the report cannot render truthfully (a missing or malformed field)."""


# --------------------------------------------------------------------------- charts


def bar_chart(title: str, categories: list[str], series: dict[str, list[float]], unit: str,
              target: float | None = None, width: int = 640, height: int = 300) -> str:
    """Grouped vertical bars: one group per category, one bar per series."""
    left, right, top, bottom = 60, 150, 30, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([v for vals in series.values() for v in vals if v is not None] + [target or 0]) or 1.0
    peak *= 1.1
    n_series = max(len(series), 1)
    group_w = plot_w / max(len(categories), 1)
    bar_w = group_w * 0.8 / n_series
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>']
    for i in range(5):
        v = peak * i / 4
        y = top + plot_h - plot_h * i / 4
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_short(v)}</text>')
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
    out.append(f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" text-anchor="middle">{html.escape(unit)}</text>')
    for gi, cat in enumerate(categories):
        gx = left + gi * group_w + group_w * 0.1
        for si, (name, vals) in enumerate(series.items()):
            v = vals[gi]
            if v is None:
                continue
            h = plot_h * v / peak
            x = gx + si * bar_w
            out.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w * 0.95:.1f}" height="{h:.1f}" fill="{PALETTE[si % len(PALETTE)]}"><title>{html.escape(name)}: {_short(v)}</title></rect>')
        out.append(f'<text x="{left + gi * group_w + group_w / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{html.escape(cat)}</text>')
    if target is not None:
        y = top + plot_h - plot_h * target / peak
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#c00" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{left + plot_w + 4}" y="{y + 4:.1f}" fill="#c00">target</text>')
    for si, name in enumerate(series):
        y = top + 10 + si * 16
        out.append(f'<rect x="{left + plot_w + 10}" y="{y + 10}" width="10" height="10" fill="{PALETTE[si % len(PALETTE)]}"/>')
        out.append(f'<text x="{left + plot_w + 24}" y="{y + 19}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _short(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


# --------------------------------------------------------------------------- tables


def _fmt(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return _short(value) if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, separators=(",", ":")))[:120]
    return html.escape(str(value))


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _module(bench: dict) -> str:
    return bench["fullname"].split("::")[0]


def timing(bench: dict) -> dict:
    """Mean and median with their spread, from pytest-benchmark's statistics."""
    st = bench.get("stats", {})
    return {"rounds": st.get("rounds"), "mean s": st.get("mean"), "median s": st.get("median"),
            "stddev s": st.get("stddev"), "IQR s": st.get("iqr"), "min s": st.get("min"), "max s": st.get("max")}


TIMING_COLUMNS = ["rounds", "mean s", "median s", "stddev s", "IQR s", "min s", "max s"]
#: The compiler figures shown before any other extra information.
COMPILER_KEYS = ("ratio", "baseline_seconds", "speedup", "full_compile_seconds", "full_compiles_during", "incremental",
                 "full", "bytes")


# --------------------------------------------------------------------------- throughput


def _number(raw: dict, key: str, where: str, required: bool = True, positive: bool = False) -> float | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0 or (positive and value == 0):
        raise ReportError(f"{where}: field {key!r} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def measurement(raw: dict, where: str, unit: str) -> dict:
    """One measured configuration, with what every throughput table shows beside the
    received rate: offered rate, dropped rate (offered − received when not given),
    busy CPUs (CPU-seconds of all CPUs per second of measurement) and the received
    rate per busy CPU-second. Latencies (``LATENCY_UNITS``) have no rate per CPU."""
    received = _number(raw, "received", where)
    offered = _number(raw, "offered", where, required=False)
    dropped = _number(raw, "dropped", where, required=False)
    cpu_s = _number(raw, "cpu_s", where, required=False)
    seconds = _number(raw, "seconds", where, required=cpu_s is not None, positive=True)
    if dropped is None and offered is not None and unit in RATE_UNITS:
        dropped = max(offered - received, 0.0)
    busy = cpu_s / seconds if cpu_s is not None else None
    return {"received": received, "offered": offered, "dropped": dropped,
            "dropped_pct": 100.0 * dropped / offered if dropped is not None and offered else None,
            "busy_cpus": busy,
            "per_cpu_s": received / busy if busy and unit in RATE_UNITS else None}


def throughput_columns(unit: str) -> list[str]:
    if unit in LATENCY_UNITS:
        return [f"round trip {unit}", "busy CPUs"]
    return [f"received {unit}", f"offered {unit}", f"dropped {unit}", "dropped %", "busy CPUs", f"{unit} per busy CPU-s"]


def throughput_cells(m: dict, unit: str) -> dict:
    """A measurement as the cells of ``throughput_columns(unit)``."""
    cells = dict(zip(throughput_columns(unit), (m["received"], m["busy_cpus"]) if unit in LATENCY_UNITS else
                     (m["received"], m["offered"], m["dropped"], m["dropped_pct"], m["busy_cpus"], m["per_cpu_s"])))
    return cells


def _mean_of(measurements: list[dict]) -> dict:
    """Field by field mean of measurements of one configuration (None stays None)."""
    out = {}
    for key in measurements[0]:
        vals = [m[key] for m in measurements if m[key] is not None]
        out[key] = statistics.fmean(vals) if len(vals) == len(measurements) else None
    return out


def _ratio(value: float | None, base: float | None, latency: bool = False) -> float | None:
    """``value`` against ``base``: a ratio for rates, a difference for latencies."""
    if value is None or base is None:
        return None
    if latency:
        return value - base
    return value / base if base > 0 else None


# --------------------------------------------------------------------------- comparison


def _config_letter(config: str) -> str:
    return CONFIGS[config].split(" ", 1)[0]  # "(a)"


def comparison_records(bench: dict) -> list[dict]:
    """The validated records of one comparison benchmark (docs/benchmarks-method.md)."""
    name = bench.get("name", "?")
    comp = bench["extra_info"]["comparison"]
    if not isinstance(comp, dict) or not isinstance(comp.get("records"), list):
        raise ReportError(f"{name}: extra_info.comparison must be an object with a list 'records'")
    out, units, seen = [], {}, set()
    for i, raw in enumerate(comp["records"]):
        where = f"{name}: comparison record {i}"
        if not isinstance(raw, dict):
            raise ReportError(f"{where}: must be an object, got {type(raw).__name__}")
        workload, config, unit = raw.get("workload"), raw.get("config"), raw.get("unit")
        if not isinstance(workload, str) or not workload:
            raise ReportError(f"{where}: field 'workload' must be a non-empty string, got {workload!r}")
        if config not in CONFIGS:
            raise ReportError(f"{where}: field 'config' must be one of {', '.join(CONFIGS)}, got {config!r}")
        if unit not in RATE_UNITS and unit not in LATENCY_UNITS:
            raise ReportError(f"{where}: field 'unit' must be one of {', '.join([*RATE_UNITS, *LATENCY_UNITS])}, got {unit!r}")
        rnd, policies = raw.get("round", 1), raw.get("policies")
        for key, value, low in (("policies", policies, 0), ("round", rnd, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ReportError(f"{where}: field {key!r} must be an integer ≥ {low}, got {value!r}")
        if units.setdefault(workload, unit) != unit:
            raise ReportError(f"{where}: workload {workload!r} measured in {units[workload]} and in {unit}")
        if (workload, policies, config, rnd) in seen:
            raise ReportError(f"{where}: a second record for {workload}, {policies} policies, {config}, round {rnd}")
        seen.add((workload, policies, config, rnd))
        out.append({"workload": workload, "config": config, "unit": unit, "policies": policies, "round": rnd,
                    **measurement(raw, where, unit)})
    return out


def paired(records: list[dict], key: str, base: str, latency: bool) -> float | None:
    """Median over rounds of ``SUBJECT`` against ``base`` in the same round (the
    configurations alternate, so each round's pair met the same load)."""
    by = {(r["config"], r["round"]): r[key] for r in records}
    vals = [_ratio(v, by.get((base, rnd)), latency) for (config, rnd), v in by.items() if config == SUBJECT]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _median_row(records: list[dict]) -> dict:
    out = {"rounds": len(records)}
    for key in ("received", "offered", "dropped", "dropped_pct", "busy_cpus", "per_cpu_s"):
        vals = [r[key] for r in records if r[key] is not None]
        out[key] = statistics.median(vals) if vals else None
    return out


def workload_section(workload: str, records: list[dict], charts: dict) -> list[str]:
    """One workload: every configuration at every policy count, then the ratios of
    (d) to each other configuration, then how (d) scales with the policy count."""
    unit = records[0]["unit"]
    latency = unit in LATENCY_UNITS
    policies = sorted({r["policies"] for r in records})
    present = [c for c in CONFIGS if any(r["config"] == c for r in records)]
    groups = {(p, c): [r for r in records if r["policies"] == p and r["config"] == c] for p in policies for c in present}
    rows = [{"policies": p, "configuration": CONFIGS[c], "rounds": len(g), **throughput_cells(_median_row(g), unit)}
            for (p, c), g in groups.items() if g]
    out = [f"### {workload} ({(LATENCY_UNITS | RATE_UNITS)[unit]})", ""]
    absent = [CONFIGS[c] for c in CONFIGS if c not in present]
    if absent:
        out += [f"Not measured in this run: {', '.join(absent)}.", ""]
    slug = re.sub(r"[^a-z0-9]+", "-", workload.lower()).strip("-")
    charts[f"bench-compare-{slug}.svg"] = bar_chart(
        f"{workload} ({unit}, median of rounds)", [f"{p:,} policies" for p in policies],
        {CONFIGS[c]: [(_median_row(groups[(p, c)])["received"] if groups[(p, c)] else None) for p in policies]
         for c in present}, unit)
    out += [f"![{workload}](img/bench-compare-{slug}.svg)", "", table(rows, ["policies", "configuration", "rounds"]
                                                                         + throughput_columns(unit)), ""]
    out += ratio_table(records, policies, latency, unit)
    return out + scaling(records, policies, latency, unit)


def ratio_table(records: list[dict], policies: list[int], latency: bool, unit: str) -> list[str]:
    bases = [c for c in CONFIGS if c != SUBJECT]
    d = _config_letter(SUBJECT)
    heads = {c: (f"{d} − {_config_letter(c)} {unit}" if latency else f"{d}/{_config_letter(c)}") for c in bases}
    measures = [("received", f"round trip {unit}" if latency else f"received {unit}")]
    if not latency:
        measures.append(("per_cpu_s", f"{unit} per busy CPU-s"))
    rows = []
    for p in policies:
        at = [r for r in records if r["policies"] == p]
        for key, label in measures:
            rows.append({"policies": p, "measure": label, **{heads[c]: paired(at, key, c, latency) for c in bases}})
    if not any(r["config"] == SUBJECT for r in records):
        return [f"No {CONFIGS[SUBJECT]} records: no ratios.", ""]
    how = (f"Round trip of {CONFIGS[SUBJECT]} minus each configuration's" if latency
           else f"Ratios of {CONFIGS[SUBJECT]} to each configuration")
    return [f"{how}, per round, median over rounds ({MISSING}: not measured at that policy count):", "",
            table(rows, ["policies", "measure"] + list(heads.values())), ""]


def scaling(records: list[dict], policies: list[int], latency: bool, unit: str) -> list[str]:
    """(d) at the most policies against (d) at the fewest, per round."""
    if len(policies) < 2:
        return []
    lo, hi = policies[0], policies[-1]
    mine = [r for r in records if r["config"] == SUBJECT]
    lows = {r["round"]: r for r in mine if r["policies"] == lo}
    pairs = [(r, lows[r["round"]]) for r in mine if r["policies"] == hi and r["round"] in lows]
    if not pairs:
        return []
    parts = []
    for key, label in (("received", "received"), ("per_cpu_s", "per busy CPU-s")):
        vals = [v for v in (_ratio(a[key], b[key], latency) for a, b in pairs) if v is not None]
        if vals:
            fig = f"{statistics.median(vals):+.3g} {unit}" if latency else f"{statistics.median(vals):.3g}×"
            parts.append(f"{label} {fig}")
    word = "minus" if latency else "÷"
    return [f"{CONFIGS[SUBJECT]} at {hi:,} policies {word} at {lo:,} (per round, median): {'; '.join(parts)}.", ""]


def comparison_section(benches: list[dict], charts: dict) -> list[str]:
    out = ["## Configurations side by side", "",
           "Each configuration measured in the same run, alternating, on the same CPUs: "
           + "; ".join(CONFIGS.values()) + ". Busy CPUs: CPU-seconds spent by all CPUs per second of "
           "measurement; dropped: offered but not received.", ""]
    for bench in benches:
        records = comparison_records(bench)
        workloads = list(dict.fromkeys(r["workload"] for r in records))
        out += [f"From `{bench['name']}`.", ""]
        for w in workloads:
            out += workload_section(w, [r for r in records if r["workload"] == w], charts)
    return out


# --------------------------------------------------------------------------- sections


MATCHER_TESTS = {"test_lookups[": "hot", "test_lookups_varied[": "varied", "test_lookups_cold[": "cold"}


def _pattern(bench: dict) -> str | None:
    for prefix, pattern in MATCHER_TESTS.items():
        if bench["name"].startswith(prefix):
            return bench["extra_info"].get("pattern", pattern)
    return None


def matcher_section(benches: list[dict], charts: dict) -> list[str]:
    """Hot, varied and cold batches side by side, per policy count and batch size."""
    rate: dict = {}
    reference: dict = {}
    for b in benches:
        pattern = _pattern(b)
        if pattern is not None:
            p = b["params"]
            rate[(pattern, p["policies"], p.get("batch", 256))] = b["extra_info"]["lookups_per_s"]
            reference.setdefault(p["policies"], b["extra_info"].get("reference_lookups_per_s"))
    if not rate:
        return []
    keys = sorted({(n, batch) for _, n, batch in rate})
    batches = sorted({batch for _, batch in keys})
    counts = sorted({n for n, _ in keys})
    series = {f"{n:,} policies {pattern}": [rate.get((pattern, n, b)) for b in batches]
              for pattern in ("hot", "varied") for n in counts if any((pattern, n, b) in rate for b in batches)}
    charts["bench-matcher.svg"] = bar_chart(
        "judge(): lookups per second (C kernel, one call per batch)", [f"batch {b}" for b in batches], series,
        "lookups/s", target=5e6)
    rows = []
    for n, batch in keys:
        hot, varied, cold = (rate.get((pat, n, batch)) for pat in ("hot", "varied", "cold"))
        rows.append({"policies": n, "batch": batch, "hot lookups/s": hot, "varied lookups/s": varied,
                     "varied ÷ hot": _ratio(varied, hot), "cold lookups/s": cold, "cold ÷ hot": _ratio(cold, hot),
                     "reference evaluator lookups/s": reference.get(n), "hot ÷ reference": _ratio(hot, reference.get(n))})
    out = ["## Matcher: lookups per second", "",
           "One core, in process: every lookup offered is judged, so there is no offered rate or drop to show. "
           "Hot: one batch judged again and again (its table cells stay in cache); varied: each call the next of "
           "many distinct batches drawn from the world's flows; cold: a distinct batch after every cache was "
           "flushed (bench/bench_match.py).", "", "![lookups per second](img/bench-matcher.svg)", ""]
    out.append(table(rows, list(rows[0])))
    for pattern in ("hot", "varied", "cold"):
        lo, hi = rate.get((pattern, 10, 256)), rate.get((pattern, 10000, 256))
        if lo and hi:
            out += ["", f"Rate at 10,000 policies ÷ rate at 10 ({pattern}, batch 256, separate runs): **{hi / lo:.2f}×** "
                        "(target ≥ 0.8×)."]
    for b in benches:
        info = b["extra_info"]
        if "ratio_10000_vs_10" in info:
            varied = info.get("ratio_10000_vs_10_varied")
            out += ["", f"The same ratio timed in alternation (`{b['name']}`, less exposed to load that comes and goes): "
                        f"**{info['ratio_10000_vs_10']:.2f}×** hot" + (f", **{varied:.2f}×** varied." if varied else ".")]
    return out + [""]


def generic_section(title: str, benches: list[dict], first: tuple = ()) -> list[str]:
    """Timing with its spread, then the extra information (``first`` keys first)."""
    keys = [k for k in first if any(k in b["extra_info"] for b in benches)]
    for b in benches:
        for k in b["extra_info"]:
            if k not in keys and not isinstance(b["extra_info"][k], (dict, list)):
                keys.append(k)
    rows = [{"benchmark": b["name"], **timing(b), **b["extra_info"]} for b in benches]
    return [f"## {title}", "", table(rows, ["benchmark"] + TIMING_COLUMNS + keys[:8]), ""]


def control_section(benches: list[dict], charts: dict) -> list[str]:
    rows = [b for b in benches if "p99_ms" in b["extra_info"]]
    if rows:
        charts["bench-control.svg"] = bar_chart(
            "Event → tables in force (ms)", [b["name"].removeprefix("test_").replace("_", " ") for b in rows],
            {"p50": [b["extra_info"]["p50_ms"] for b in rows], "p99": [b["extra_info"]["p99_ms"] for b in rows]}, "ms")
    out = generic_section("Control loop", benches)
    return out[:2] + (["![event to enforcement](img/bench-control.svg)", ""] if rows else []) + out[2:]


def render(data: dict, source: str) -> tuple[str, dict]:
    benches = data["benchmarks"]
    modules = defaultdict(list)
    for b in benches:
        modules[_module(b)].append(b)
    charts: dict[str, str] = {}
    mi = data.get("machine_info", {})
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/report.py` from pytest-benchmark results; do not edit by hand.",
        "",
        f"* results: `{os.path.relpath(source, ROOT)}`, taken {data.get('datetime', '?')}",
        f"* machine: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
        f"{mi.get('cpu', {}).get('count', '?')} CPUs, Python {mi.get('python_version', '?')}, {mi.get('system', '')} {mi.get('release', '')}",
        f"* commit: {data.get('commit_info', {}).get('id', '?')[:12]}",
        "* reproduce: `./dev bench` (as root: the node benchmarks build network namespaces), then "
        "`.venv/bin/python -m bench.report`",
        "",
        "These machines are shared and noisy: compare ratios taken in the same run, not absolute figures across runs.",
        "",
    ]
    compared = [b for b in benches if "comparison" in b.get("extra_info", {})]
    if compared:
        lines += comparison_section(compared, charts)
    for module, items in sorted(modules.items()):
        items = [b for b in items if "comparison" not in b.get("extra_info", {})]
        if not items:
            continue
        if module.endswith("bench_match.py"):
            lines += matcher_section(items, charts)
            rest = [b for b in items if _pattern(b) is None]
            if rest:
                lines += generic_section("Matcher: numpy fallback and policy-count independence", rest)
        elif module.endswith("bench_control.py"):
            lines += control_section(items, charts)
        elif module.endswith("bench_compile.py"):
            lines += generic_section("Compiler", items, COMPILER_KEYS)
        else:
            lines += generic_section(os.path.basename(module), items)
    return "\n".join(lines) + "\n", charts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=DEFAULT_INPUT)
    ap.add_argument("--out", default=DOC)
    args = ap.parse_args(argv)
    summary = os.path.join(os.path.dirname(os.path.abspath(args.results)), "summary.json")
    try:
        with open(args.results) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise ReportError("no 'benchmarks' list: not a pytest-benchmark result")
        text, charts = render(data, summary)
    except (OSError, ValueError) as e:  # ReportError and json.JSONDecodeError are ValueErrors
        print(f"report: {args.results}: {e}", file=sys.stderr)
        return 2
    # Raw per-round timings make the file tens of MB: keep the statistics and extra
    # information, which is all the report reads, in a summary small enough to commit.
    for bench in data["benchmarks"]:
        bench["stats"].pop("data", None)
    with open(summary, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.makedirs(IMG, exist_ok=True)
    for name, svg in charts.items():
        with open(os.path.join(IMG, name), "w") as f:
            f.write(svg)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(args.out, ROOT)} and {len(charts)} chart(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
