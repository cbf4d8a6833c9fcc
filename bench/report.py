"""Turn pytest-benchmark results into docs/benchmarks.md with tables and SVG charts.

    ./dev bench                       # writes bench/results/latest.json (raw, not committed)
    .venv/bin/python -m bench.report  # writes bench/results/summary.json, docs/benchmarks.md
                                      # and docs/img/bench-*.svg

Every figure in the report comes from the JSON file; nothing is typed in by hand. The
charts are plain SVG written here (no plotting library to install on a node image).
"""

from __future__ import annotations

import argparse
import html
import json
import os
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INPUT = os.path.join(ROOT, "bench", "results", "latest.json")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMG = os.path.join(ROOT, "docs", "img")

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948"]


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


# --------------------------------------------------------------------------- sections


def matcher_section(benches: list[dict], charts: dict) -> list[str]:
    rows = [b for b in benches if b["name"].startswith("test_lookups[")]
    if not rows:
        return []
    by = defaultdict(dict)
    for b in rows:
        p = b["params"]
        by[p["policies"]][p["batch"]] = b["extra_info"]["lookups_per_s"]
    batches = sorted({p for d in by.values() for p in d})
    charts["bench-matcher.svg"] = bar_chart(
        "judge(): lookups per second (C kernel, one call per batch)", [f"batch {b}" for b in batches],
        {f"{n:,} policies": [by[n].get(b) for b in batches] for n in sorted(by)}, "lookups/s", target=5e6)
    out = ["## Matcher: lookups per second", "", "![lookups per second](img/bench-matcher.svg)", ""]
    out.append(table([{"benchmark": b["name"], "policies": b["params"]["policies"], "batch": b["params"]["batch"],
                       "lookups/s": b["extra_info"]["lookups_per_s"],
                       "reference evaluator lookups/s": b["extra_info"].get("reference_lookups_per_s", ""),
                       "ratio": b["extra_info"]["ratio"]} for b in rows],
                     ["benchmark", "policies", "batch", "lookups/s", "reference evaluator lookups/s", "ratio"]))
    at = {n: by[n].get(256) for n in by}
    if at.get(10) and at.get(10000):
        out += ["", f"Rate at 10,000 policies ÷ rate at 10 (batch 256, separate runs): **{at[10000] / at[10]:.2f}×** (target ≥ 0.8×)."]
    interleaved = [b for b in benches if "ratio_10000_vs_10" in b["extra_info"]]
    for b in interleaved:
        out += ["", f"The same ratio timed in alternation (`{b['name']}`, less exposed to load that comes and goes): "
                    f"**{b['extra_info']['ratio_10000_vs_10']:.2f}×**."]
    return out + [""]


def generic_section(title: str, benches: list[dict]) -> list[str]:
    keys: list[str] = []
    for b in benches:
        for k in b["extra_info"]:
            if k not in keys and not isinstance(b["extra_info"][k], (dict, list)):
                keys.append(k)
    rows = [{"benchmark": b["name"], "median s": b["stats"]["median"], **b["extra_info"]} for b in benches]
    return [f"## {title}", "", table(rows, ["benchmark", "median s"] + keys[:8]), ""]


def control_section(benches: list[dict], charts: dict) -> list[str]:
    rows = [b for b in benches if "p99_ms" in b["extra_info"]]
    if rows:
        charts["bench-control.svg"] = bar_chart(
            "Event → tables in force (ms)", [b["name"].removeprefix("test_").replace("_", " ") for b in rows],
            {"p50": [b["extra_info"]["p50_ms"] for b in rows], "p99": [b["extra_info"]["p99_ms"] for b in rows]}, "ms")
    out = generic_section("Control loop", benches)
    return out[:2] + (["![event to enforcement](img/bench-control.svg)", ""] if rows else []) + out[2:]


def forward_section(benches: list[dict], charts: dict) -> list[str]:
    out = ["## Forwarding (64-byte UDP through one node)", ""]
    for b in benches:
        info = b["extra_info"]
        ratios = info.get("median_ratios") or {}
        if ratios:
            out += [table([{"measure": k, "value": v} for k, v in sorted(ratios.items())], ["measure", "value"]), ""]
        rounds = info.get("rounds") or []
        if not rounds:
            continue
        udp = rounds[-1].get("udp", {})
        names, rates = [], []
        for name, runs in udp.items():
            runs = runs if isinstance(runs, list) else [runs]
            names.append(name)
            rates.append(sum(r["mpps"] for r in runs) / len(runs))
        if names:
            charts["bench-forward.svg"] = bar_chart("64-byte UDP through one node (last round)", names, {"Mpps": rates}, "Mpps")
            out += ["![packet rate](img/bench-forward.svg)", ""]
        rows = []
        for i, r in enumerate(rounds):
            row = {"round": i + 1, "load average": r.get("load_average", "")}
            for name, runs in r.get("udp", {}).items():
                runs = runs if isinstance(runs, list) else [runs]
                row[f"{name} Mpps"] = sum(x["mpps"] for x in runs) / len(runs)
            for name, v in (r.get("rtt_ms") or {}).items():
                row[f"RTT {name} ms"] = sum(v) / len(v) if isinstance(v, list) else v
            for name, v in (r.get("tcp_gbps") or {}).items():
                row[f"TCP {name} Gbit/s"] = sum(v) / len(v) if isinstance(v, list) else v
            rows.append(row)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        out += [table(rows, columns), ""]
    return out


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
        "* reproduce: `./dev bench` (as root: the forwarding benchmark builds network namespaces), then "
        "`.venv/bin/python -m bench.report`",
        "",
        "These machines are shared and noisy: compare ratios taken in the same run, not absolute figures across runs.",
        "",
    ]
    for module, items in sorted(modules.items()):
        if module.endswith("bench_match.py"):
            lines += matcher_section(items, charts)
            rest = [b for b in items if not b["name"].startswith("test_lookups[")]
            if rest:
                lines += generic_section("Matcher: numpy fallback and policy-count independence", rest)
        elif module.endswith("bench_control.py"):
            lines += control_section(items, charts)
        elif module.endswith("bench_forward.py"):
            lines += forward_section(items, charts)
        elif module.endswith("bench_compile.py"):
            lines += generic_section("Compiler", items)
        else:
            lines += generic_section(os.path.basename(module), items)
    return "\n".join(lines) + "\n", charts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=DEFAULT_INPUT)
    ap.add_argument("--out", default=DOC)
    args = ap.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    # Raw per-round timings make the file tens of MB: keep the statistics and extra
    # information, which is all the report reads, in a summary small enough to commit.
    for bench in data["benchmarks"]:
        bench["stats"].pop("data", None)
    summary = os.path.join(os.path.dirname(os.path.abspath(args.results)), "summary.json")
    with open(summary, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    text, charts = render(data, summary)
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
