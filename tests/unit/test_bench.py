"""The benchmark runs end to end at --quick sizes and writes its JSON and report (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.procs import cpu_ms_each
from bench.report import evaluate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_benchmark_writes_json_and_report(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    report = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output), "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads(output.read_text())
    # SQLite always; PostgreSQL too where a server answers (else each stage has a note saying why not).
    stages = ("create", "pipeline", "update", "watch", "list", "telemetry")
    for stage in stages:
        assert "sqlite" in results[stage]["by_database"], stage
        if set(results[stage]["by_database"]) != set(results["databases"]):
            assert any("postgresql" in note for note in results[stage]["notes"]), (stage, results[stage]["notes"])

    for kind, entry in results["create"]["by_database"].items():
        for concurrency, level in entry["by_concurrency"].items():
            assert level["create"]["rps"] > 0, (kind, concurrency, level)
            assert level["echo"]["rps"] > 0, (kind, concurrency, level)
            assert level["ratio_to_echo"] > 0, (kind, concurrency, level)
        assert entry["p50_ratio_to_echo_at_1"] > 0, (kind, entry)
    for kind, entry in results["pipeline"]["by_database"].items():
        assert entry["per_second"] > 0, (kind, entry)
        assert entry["ratio_to_goal"] > 0, (kind, entry)
        assert entry["create_to_running_p99_ms"] > 0, (kind, entry)
        for provisioners, run in entry["by_provisioners"].items():
            cpu = run["cpu_ms_per_deployment"]
            assert cpu["api"] > 0, (kind, provisioners, cpu)
            assert cpu["total"] >= cpu["api"] + cpu["provisioners"], (kind, provisioners, cpu)
        offered = entry["offered"]
        assert offered["offered"] > 0, (kind, offered)
        assert offered["running"] > 0, (kind, offered)
        assert offered["create_to_running"]["p99_ms"] > 0, (kind, offered)
    for kind, entry in results["update"]["by_database"].items():
        assert entry["per_second"] > 0, (kind, entry)
        assert entry["running"] > 0, (kind, entry)
        assert entry["healthy"] == entry["updates"] == entry["running"], (kind, entry)
        assert entry["all_healthy"], (kind, entry)
        cpu = entry["cpu_ms_per_update"]
        assert cpu["api"] > 0, (kind, cpu)
        assert cpu["total"] >= cpu["api"] + cpu["provisioners"], (kind, cpu)
    for kind, entry in results["watch"]["by_database"].items():
        assert entry["streams"] > 0, (kind, entry)
        assert entry["p99_ms"] > 0, (kind, entry)
        assert entry["nats_p99_ms"] > 0, (kind, entry)
        assert entry["ratio_to_nats_p99"] > 0, (kind, entry)
    for kind, entry in results["list"]["by_database"].items():
        assert len(entry["p99_ms_by_rows"]) >= 2, (kind, entry)
        assert all(p99 > 0 for p99 in entry["p99_ms_by_rows"].values()), (kind, entry)
        assert entry["largest_rows"] > 0, (kind, entry)
        assert entry["ratio_to_goal"] > 0, (kind, entry)
    for kind, entry in results["telemetry"]["by_database"].items():
        assert entry["off"]["rps"] > 0, (kind, entry)
        assert entry["on"]["rps"] > 0, (kind, entry)
        assert entry["ratio_on_to_off"] > 0, (kind, entry)
        # Tracing was really on: the receiver got spans, and /metrics answered.
        assert entry["spans_exported"] > 0, (kind, entry)
        assert entry["scrapes"] > 0, (kind, entry)
    assert set(results["scheduler"]["p99_ms_by_locations"]) == {"10", "100", "1000", "10000"}
    assert {target["name"] for target in results["targets"]} == {
        "create",
        "pipeline",
        "update",
        "watch",
        "placement",
        "list",
        "telemetry",
    }

    text = report.read_text()
    assert "## Targets of issue 12" in text
    assert "## What holds each one back" in text
    assert "## Image updates" in text
    assert "## Telemetry overhead (issue 14)" in text
    assert "CPU time per deployment brought to `running`" in text
    assert "CPU time per update that got healthy" in text
    assert report.with_suffix(".png").stat().st_size > 0


def test_verdicts_are_written_from_the_figures() -> None:
    results = {
        "watch": {
            "by_database": {
                "sqlite": {"streams": 10_000, "p99_ms": 11.0, "nats_p99_ms": 1.5, "kib_per_stream": 35.6},
                "postgresql": {"streams": 100, "p99_ms": 5.0, "nats_p99_ms": 1.0, "kib_per_stream": 4.0},
            }
        },
        "scheduler": {"p99_ms_by_locations": {"10000": 0.4}, "by_locations": {"10000": {"explain_p99_ms": 0.3}}},
        "pipeline": {"by_database": {"sqlite": {"per_second": 250.0, "provisioners": 4}}},
    }
    targets = {target["name"]: target for target in evaluate(results)}
    watch = targets["watch"]
    assert watch["met"] is False
    # Only what missed on a database that measured it: sqlite's memory; postgresql opened too few
    # streams for its latency and memory to count.
    assert watch["held_back"] == [
        "memory per stream on sqlite: 35.6 KiB is 3.6x the goal of 10 KiB",
        "streams on postgresql: 100 streams is 100.0x below the goal of 10000 streams",
    ]
    assert targets["placement"]["met"] is True
    assert targets["placement"]["verdict"] == "met"
    # The rate is met, but p99 at an offered 100/s is not measured by the benchmark: not known.
    pipeline = targets["pipeline"]
    assert pipeline["met"] is None
    assert pipeline["unmeasured"] == ["p99 create→running at 100/s offered"]
    assert targets["create"]["verdict"] == "not measured in this run"


def test_the_offered_pipeline_is_judged_by_its_p99() -> None:
    def pipeline_with(offered: dict[str, object]) -> dict[str, object]:
        entry = {"per_second": 250.0, "provisioners": 4, "offered": {"provisioners": 4, **offered}}
        return {"pipeline": {"by_database": {"sqlite": entry}}}

    fast = {"offered_per_second": 100.0, "offered": 2000, "running": 2000, "complete": True}
    met = evaluate(pipeline_with({**fast, "create_to_running": {"p99_ms": 400.0}}))
    assert {t["name"]: t for t in met}["pipeline"]["met"] is True
    # Deployments still on their way when the run ended: the p99 is a lower bound, and it is said.
    slow = {**fast, "running": 900, "complete": False, "create_to_running": {"p99_ms": 80000.0}}
    missed = {t["name"]: t for t in evaluate(pipeline_with(slow))}["pipeline"]
    assert missed["met"] is False
    assert "≥ 80000.0 ms" in missed["measured"]
    assert missed["held_back"] == [
        "p99 create→running at 100/s offered on sqlite: 80000 ms is 80.0x the goal of 1000 ms"
    ]


def test_cpu_per_item_sums_numbered_processes_and_skips_late_ones() -> None:
    before = {"api": 1.0, "provisioner-0": 0.5, "provisioner-1": 0.25, "bench client": 2.0}
    after = {"api": 1.5, "provisioner-0": 0.75, "provisioner-1": 0.5, "bench client": 2.25, "updater": 9.0}

    assert cpu_ms_each(before, after, 100) == {
        "api": 5.0,
        "provisioners": 5.0,
        "bench client": 2.5,
        "total": 12.5,
    }
    assert cpu_ms_each(before, after, 0) == {}
