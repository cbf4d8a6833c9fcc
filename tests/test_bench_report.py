"""bench/report.py turns pytest-benchmark JSON into the benchmarks document: every
figure must come from the results, every throughput table must show CPU, offered rate
and drops beside the received rate, the side-by-side comparison must stand with any
configuration missing, and malformed results must stop the report, not be guessed at."""

import copy
import json
import xml.dom.minidom

import pytest

from bench import report


def result(name, module, params=None, extra=None, median=0.001):
    return {"name": name, "fullname": f"bench/{module}::{name}", "group": None, "params": params or {},
            "extra_info": extra or {}, "stats": {"median": median, "mean": median * 1.1, "stddev": median / 10,
                                                 "iqr": median / 5, "min": median / 2, "max": median * 3, "rounds": 7}}


DATA = {
    "datetime": "2026-01-01T00:00:00", "machine_info": {"python_version": "3.11", "cpu": {"count": 2}},
    "commit_info": {"id": "0123456789abcdef"},
    "benchmarks": [
        result(f"test_lookups[{p}-{b}]", "bench_match.py", {"policies": p, "batch": b},
               {"lookups_per_s": rate, "reference_lookups_per_s": 1000.0, "ratio": rate / 1000.0})
        for p, b, rate in [(10, 256, 8e6), (10000, 256, 6e6), (10, 64, 3e6), (10000, 64, 2.5e6)]
    ] + [
        result(f"test_lookups_varied[{p}-256]", "bench_match.py", {"policies": p, "batch": 256},
               {"pattern": "varied", "lookups_per_s": rate, "reference_lookups_per_s": 1000.0})
        for p, rate in [(10, 4e6), (10000, 2e6)]
    ] + [
        result("test_lookups_cold[10]", "bench_match.py", {"policies": 10},
               {"pattern": "cold", "lookups_per_s": 1e6, "reference_lookups_per_s": 1000.0}),
        result("test_local_pod_event", "bench_control.py", extra={"p50_ms": 12.5, "p99_ms": 48.0, "target_ms": 100.0}),
        result("test_cold_compile[1000]", "bench_compile.py", {"policies": 1000}, {"ratio": 68.9, "baseline_seconds": 0.013},
               median=0.9),
    ],
}


def rec(workload, config, policies, rnd, received, unit="pps", **more):
    return {"workload": workload, "config": config, "policies": policies, "round": rnd, "unit": unit,
            "received": received, **more}


def comparison(records):
    return {**DATA, "benchmarks": [result("test_side_by_side", "bench_compare.py", extra={"comparison": {"records": records}})]}


# Two rounds of one UDP flow at 10 and 10,000 policies, every configuration, and a round trip.
FULL = [
    rec("udp-1flow", "cni", 10, 1, 1.0e6, offered=1.0e6, cpu_s=2.0, seconds=2.0),
    rec("udp-1flow", "cni", 10, 2, 0.5e6, offered=0.5e6, cpu_s=2.0, seconds=2.0),
    rec("udp-1flow", "xdp-pass", 10, 1, 1.0e6, offered=1.0e6, cpu_s=2.0, seconds=2.0),
    rec("udp-1flow", "xdp-pass", 10, 2, 1.0e6, offered=1.0e6, cpu_s=2.0, seconds=2.0),
    rec("udp-1flow", "nftables", 10, 1, 0.6e6, offered=1.0e6, dropped=0.4e6, cpu_s=2.0, seconds=2.0),
    rec("udp-1flow", "nftables", 10, 2, 0.6e6, offered=1.0e6, dropped=0.4e6, cpu_s=2.0, seconds=2.0),
    rec("udp-1flow", "mcnp", 10, 1, 0.9e6, offered=1.2e6, cpu_s=3.6, seconds=2.0),
    rec("udp-1flow", "mcnp", 10, 2, 0.8e6, offered=1.2e6, cpu_s=3.6, seconds=2.0),
    rec("udp-1flow", "mcnp", 10000, 1, 0.72e6, offered=1.2e6, cpu_s=3.6, seconds=2.0),
    rec("udp-1flow", "mcnp", 10000, 2, 0.72e6, offered=1.2e6, cpu_s=3.6, seconds=2.0),
    rec("rtt-first-packet", "cni", 10, 1, 0.10, unit="ms"),
    rec("rtt-first-packet", "mcnp", 10, 1, 0.35, unit="ms"),
]


def test_report_tables_and_charts_come_from_the_results(tmp_path):
    text, charts = report.render(DATA, str(tmp_path / "r.json"))
    # hot, varied (÷ hot), cold (÷ hot), reference, hot ÷ reference
    assert "| 10 | 256 | 8M | 4M | 0.5 | 1M | 0.125 | 1k | 8k |" in text
    assert "| 10000 | 64 | 2.5M | — | — | — | — | 1k | 2.5k |" in text
    assert "(hot, batch 256, separate runs): **0.75×**" in text  # 6e6 / 8e6
    assert "(varied, batch 256, separate runs): **0.50×**" in text  # 2e6 / 4e6
    assert "test_local_pod_event" in text and "48" in text and "0123456789ab" in text
    # the compiler's timing with its spread, not the minimum alone
    assert "| test_cold_compile[1000] | 7 | 0.99 | 0.9 | 0.09 | 0.18 | 0.45 | 2.7 | 68.9 | 0.013 |" in text
    assert set(charts) == {"bench-matcher.svg", "bench-control.svg"}
    for svg in charts.values():
        xml.dom.minidom.parseString(svg)


def test_comparison_shows_cpu_offered_drops_and_paired_ratios(tmp_path):
    text, charts = report.render(comparison(FULL), str(tmp_path / "r.json"))
    udp = text.split("### udp-1flow")[1].split("### rtt-first-packet")[0]
    assert "Not measured" not in udp  # every configuration ran this workload
    # received, offered, dropped (given, or offered − received), dropped %, busy CPUs, per busy CPU-s (medians)
    assert "| 10 | (a) CNI alone | 2 | 750k | 750k | 0 | 0 | 1 | 750k |" in text
    assert "| 10 | (c) CNI + nftables | 2 | 600k | 1M | 400k | 40 | 1 | 600k |" in text
    assert "| 10 | (d) mcnp | 2 | 850k | 1.2M | 350k | 29.2 | 1.8 | 472k |" in text
    # per round, then the median: (0.9/1.0, 0.8/0.5) -> 1.25, not 0.85/0.75
    assert "| 10 | received pps | 1.25 | 0.85 | 1.42 |" in text
    assert "| 10 | pps per busy CPU-s | 0.694 | 0.472 | 0.787 |" in text
    # (d) alone at 10,000 policies: no pairs, every ratio missing
    assert "| 10000 | received pps | — | — | — |" in text
    assert "(d) mcnp at 10,000 policies ÷ at 10 (per round, median): received 0.85×; per busy CPU-s 0.85×." in text
    # a latency is compared by difference
    assert "| 10 | round trip ms | 0.25 | — | — |" in text
    assert "Not measured in this run: (b) CNI + pass-only XDP, (c) CNI + nftables." in text
    assert set(charts) == {"bench-compare-udp-1flow.svg", "bench-compare-rtt-first-packet.svg"}
    for svg in charts.values():
        xml.dom.minidom.parseString(svg)


def test_comparison_stands_with_configurations_absent(tmp_path):
    only_a_d = [r for r in FULL if r["config"] in ("cni", "mcnp") and r["workload"] == "udp-1flow"]
    text, _ = report.render(comparison(only_a_d), str(tmp_path / "r.json"))
    assert "Not measured in this run: (b) CNI + pass-only XDP, (c) CNI + nftables." in text
    assert "| 10 | received pps | 1.25 | — | — |" in text
    no_subject = [r for r in FULL if r["config"] == "nftables"]
    text, _ = report.render(comparison(no_subject), str(tmp_path / "r.json"))
    assert "No (d) mcnp records: no ratios." in text and "| 10 | (c) CNI + nftables | 2 |" in text


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(config="calico"), "comparison record 0: field 'config' must be one of cni, xdp-pass, nftables, mcnp"),
    (lambda r: r.update(received=-1), "comparison record 0: field 'received' must be a non-negative number, got -1"),
    (lambda r: r.pop("received"), "comparison record 0: field 'received' must be a non-negative number, got None"),
    (lambda r: r.pop("seconds"), "comparison record 0: field 'seconds' must be a positive number, got None"),
    (lambda r: r.update(seconds=0), "field 'seconds' must be a positive number, got 0"),
    (lambda r: r.update(policies="10"), "comparison record 0: field 'policies' must be an integer ≥ 0"),
    (lambda r: r.update(round=True), "field 'round' must be an integer ≥ 1, got True"),
    (lambda r: r.update(unit="Mpps"), "field 'unit' must be one of pps, flows/s, Gbit/s, ms"),
    (lambda r: r.update(workload=""), "field 'workload' must be a non-empty string"),
    (lambda r: r.update(round=2), "comparison record 1: a second record for udp-1flow, 10 policies, cni, round 2"),
    (lambda r: r.update(workload="rtt-first-packet"), "comparison record 10: workload 'rtt-first-packet' measured in pps and in ms"),
])
def test_malformed_comparison_fails_closed(tmp_path, change, message):
    records = copy.deepcopy(FULL)
    change(records[0])
    with pytest.raises(report.ReportError) as err:
        report.render(comparison(records), str(tmp_path / "r.json"))
    assert message in str(err.value) and str(err.value).startswith("test_side_by_side: ")


def test_main_refuses_malformed_results_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "IMG", str(tmp_path / "img"))
    bad = comparison([{**FULL[0], "config": "calico"}])
    for content in (json.dumps(bad), "{not json", json.dumps({"benchmarks": "none"})):
        src = tmp_path / "latest.json"
        src.write_text(content)
        assert report.main([str(src), "--out", str(tmp_path / "bench.md")]) == 2
        assert "report: " in capsys.readouterr().err
    assert not (tmp_path / "bench.md").exists() and not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "img").exists()


def test_main_writes_document_and_images(tmp_path, monkeypatch):
    src = tmp_path / "latest.json"
    src.write_text(json.dumps(comparison(FULL)))
    monkeypatch.setattr(report, "IMG", str(tmp_path / "img"))
    assert report.main([str(src), "--out", str(tmp_path / "bench.md")]) == 0
    assert (tmp_path / "bench.md").read_text().startswith("# Benchmarks")
    assert (tmp_path / "img" / "bench-compare-udp-1flow.svg").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"][0]["name"] == "test_side_by_side"
