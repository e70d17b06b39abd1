"""The benchmark runs end to end at --quick sizes and writes its JSON and report (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert results["create"]["rps"] > 0
    assert results["create"]["ratio_to_echo"] is not None
    assert results["pipeline"]["per_second"] > 0
    assert results["update"]["per_second"] > 0
    # SQLite always; PostgreSQL too where a server answers (else a note says why not).
    assert "sqlite" in results["update"]["by_database"]
    for kind, entry in results["update"]["by_database"].items():
        assert entry["per_second"] > 0, (kind, entry)
        assert entry["running"] > 0, (kind, entry)
        assert entry["healthy"] == entry["updates"] == entry["running"], (kind, entry)
        assert entry["all_healthy"], (kind, entry)
    assert results["watch"]["streams"] > 0
    assert results["watch"]["p99_ms"] is not None
    assert results["watch"]["nats_p99_ms"] is not None
    assert set(results["scheduler"]["p99_ms_by_locations"]) == {"10", "100", "1000", "10000"}
    assert len(results["list"]["p99_ms_by_rows"]) >= 2
    assert {target["name"] for target in results["targets"]} == {
        "create",
        "pipeline",
        "update",
        "watch",
        "placement",
        "list",
    }

    text = report.read_text()
    assert "## Targets of issue 7" in text
    assert "## Image updates" in text
    assert report.with_suffix(".png").stat().st_size > 0
