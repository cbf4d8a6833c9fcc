"""bench/report.py turns pytest-benchmark JSON into the benchmarks document: every
figure must come from the results, and the charts must be valid SVG."""

import json
import xml.dom.minidom

from bench import report


def result(name, module, params=None, extra=None, median=0.001):
    return {"name": name, "fullname": f"bench/{module}::{name}", "group": None, "params": params or {},
            "extra_info": extra or {}, "stats": {"median": median}}


DATA = {
    "datetime": "2026-01-01T00:00:00", "machine_info": {"python_version": "3.11", "cpu": {"count": 2}},
    "commit_info": {"id": "0123456789abcdef"},
    "benchmarks": [
        result(f"test_lookups[{p}-{b}]", "bench_match.py", {"policies": p, "batch": b},
               {"lookups_per_s": rate, "reference_lookups_per_s": 1000.0, "ratio": rate / 1000.0})
        for p, b, rate in [(10, 256, 8e6), (10000, 256, 6e6), (10, 64, 3e6), (10000, 64, 2.5e6)]
    ] + [result("test_local_pod_event", "bench_control.py", extra={"p50_ms": 12.5, "p99_ms": 48.0, "target_ms": 100.0})],
}


def test_report_tables_and_charts_come_from_the_results(tmp_path):
    text, charts = report.render(DATA, str(tmp_path / "r.json"))
    assert "| test_lookups[10-256] | 10 | 256 | 8M | 1k | 8k |" in text
    assert "**0.75×**" in text  # 6e6 / 8e6 at batch 256
    assert "test_local_pod_event" in text and "48" in text and "0123456789ab" in text
    assert set(charts) == {"bench-matcher.svg", "bench-control.svg"}
    for svg in charts.values():
        xml.dom.minidom.parseString(svg)


def test_main_writes_document_and_images(tmp_path, monkeypatch):
    src = tmp_path / "latest.json"
    src.write_text(json.dumps(DATA))
    monkeypatch.setattr(report, "IMG", str(tmp_path / "img"))
    assert report.main([str(src), "--out", str(tmp_path / "bench.md")]) == 0
    assert (tmp_path / "bench.md").read_text().startswith("# Benchmarks")
    assert (tmp_path / "img" / "bench-matcher.svg").exists()
