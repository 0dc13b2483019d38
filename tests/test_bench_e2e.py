"""bench/e2e.py's pieces that can break silently: the config it writes from the example
(a new key or table shape there must still round-trip and validate) and its percentiles.
The benchmark itself is run by hand (bench/README.md)."""

from __future__ import annotations

import functools
import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

from gateway.district import generate_district

BENCH = Path(__file__).resolve().parent.parent / "bench" / "e2e.py"


@functools.cache
def _e2e() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_example_config_round_trips_through_the_benchmarks_toml_writer() -> None:
    e2e = _e2e()
    example = tomllib.loads(e2e.EXAMPLE.read_text(encoding="utf-8"))
    assert tomllib.loads(e2e.dump_toml(example)) == example


def test_the_generated_config_validates_and_points_at_the_run(tmp_path: Path) -> None:
    e2e = _e2e()
    registry = tmp_path / "registry"
    generate_district(registry)
    double = e2e.DoubleInfo("http://127.0.0.1:9", "AC" + "0" * 32, "token")
    path = e2e.write_config(tmp_path / "gw.toml", state=tmp_path / "state", registry=registry,
                            broker_port=1884, double=double, alert="file")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert data["mqtt"]["port"] == 1884
    assert data["sms"]["base_url"] == double.base_url
    assert data["alert"]["backend"] == "file"
    assert "serial" not in data


def test_percentiles_are_nearest_rank() -> None:
    p = _e2e().percentiles([float(i) for i in range(1, 1001)])
    assert (p["n"], p["p50"], p["p99"], p["p99.9"], p["max"]) == (1000, 501.0, 991.0, 1000.0,
                                                                  1000.0)
    assert _e2e().percentiles([]) == {"n": 0}


def test_the_table_puts_issue_13s_figures_beside_the_new_and_finds_the_sustained_rate() -> None:
    e2e = _e2e()

    def run(side: str, rate: float, p99: float, loss: bool = False) -> dict[str, object]:
        return {"run": f"{rate:g}/s", "side": side, "alert": "off", "rate_per_s": rate,
                "presses": 10, "alarms": 10, "first_sms": 10, "zero_loss": not loss,
                "latency_ms": {"p50": p99 / 2, "p99": p99, "p99.9": p99, "max": p99},
                "cpu_ms_per_alarm": 5.0, "rss_ready_mb": 160.0, "rss_peak_mb": 170.0,
                "stop_s": 1.5}

    results = [run("gateway", 10, 8), run("peer", 10, 3), run("gateway", 100, 80),
               run("peer", 100, 3), run("gateway", 1000, 30_000), run("peer", 1000, 900)]
    rows = {r["figure"]: r for r in e2e.table_rows(results, {}, "off")}
    best = rows["highest rate run with zero loss and p99 < 1 s"]
    assert (best["gateway"], best["peer"]) == (100, 1000)
    report = {"tables": {"off": list(rows.values())}, "machine": {
        "git_commit": "abc1234", "cpus": 2, "load_avg_before": [0.1], "load_avg_after": [1.0]}}
    table = e2e.markdown(report)
    assert "| before (issue 13) |" in table.splitlines()[0]
    line = next(x for x in table.splitlines() if x.startswith("| 100/s: publish -> 1st SMS p99"))
    assert "35-78 ms (alert on)" in line and "| 80 |" in line


def test_the_reload_run_splits_presses_published_during_the_reload_from_the_rest() -> None:
    e2e = _e2e()
    spec = e2e.RunSpec("reload at 100/s, city", 100.0, 4)
    published = {"D1": 10.0, "D2": 11.0, "D3": 12.0, "D4": 13.0}
    run = e2e.RunRecord(spec, "gateway", "off", 10.0, 14.0, published, {},
                        cpu_s=0.1, wall_s=4.0,
                        alarms={"AAAA-0001": "D1", "AAAA-0002": "D2", "AAAA-0003": "D3",
                                "AAAA-0004": "D4"},
                        extra={"reload": {"signalled_at": 10.5, "reloaded_at": 12.5,
                                          "reload_s": 2.0},
                               "rss_ready_mb": 1.0, "rss_peak_mb": 1.0, "stop_s": 0.1})
    # The first SMS of each alarm, its reference in the body, at the double.
    delays = {"D1": 0.010, "D2": 0.200, "D3": 0.300, "D4": 0.020}
    requests = [{"arrived_at": published[d] + delays[d], "body": f"[AAAA-000{d[1]}] SOS"}
                for d in published]
    result = e2e.analyse(run, requests)
    assert result["zero_loss"]
    assert result["latency_during_reload_ms"]["max"] == 300.0  # D2, D3
    assert result["latency_during_reload_ms"]["n"] == 2
    assert result["latency_outside_reload_ms"]["max"] == 20.0  # D1, D4
    rows = {r["figure"]: r for r in e2e.table_rows([result], {}, "off")}
    assert rows["reload at 100/s, city: SIGHUP -> registry.reloaded"]["gateway"] == 2.0
    assert rows["reload at 100/s, city: publish -> 1st SMS max, published during the "
                "reload"]["gateway"] == 300.0
