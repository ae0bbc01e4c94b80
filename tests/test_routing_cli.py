"""`route` and `bench route` through a throwaway typer app (the lead registers them in cli/app.py)."""

from __future__ import annotations

import json

import typer
from llmswarm.cli.route import bench_route, route
from typer.testing import CliRunner

app = typer.Typer()
app.command("route")(route)
app.command("bench-route")(bench_route)


def test_route_json_dump_snapshot_and_plot(tmp_path):
    runner = CliRunner()
    snap, png = tmp_path / "s.json", tmp_path / "f.png"
    res = runner.invoke(app, ["route", "--simulate", "60x20", "--seed", "2", "--solver", "exact", "--json",
                              "--dump", str(snap), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert {"front", "chosen", "solve_time_s", "reason"} <= set(rec)
    assert all({"latency_s", "throughput", "chain"} <= set(p) for p in rec["front"])
    assert png.stat().st_size > 0
    again = runner.invoke(app, ["route", "--snapshot", str(snap), "--solver", "exact", "--json"])
    assert json.loads(again.stdout)["front"] == rec["front"]


def test_route_table_and_live_without_swarm_layer():
    runner = CliRunner()
    res = runner.invoke(app, ["route", "--simulate", "40x16", "--solver", "nsga2", "--time-budget", "0.3"])
    assert res.exit_code == 0 and "chosen" in res.stdout
    live = runner.invoke(app, ["route", "--model", "m"])
    assert live.exit_code != 0


def test_bench_route_json_small():
    res = CliRunner().invoke(app, ["bench-route", "--json", "--sizes", "30", "--blocks", "12",
                                   "--time-budget", "0.2"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["runs"][0]["dijkstra_matches_exact"] and 0 < rec["runs"][0]["hv_ratio"] <= 1.0 + 1e-9


def test_route_nsga2_plot_draws_exact_front(tmp_path):
    png = tmp_path / "front.png"
    res = CliRunner().invoke(app, ["route", "--simulate", "80x20", "--solver", "nsga2", "--time-budget", "0.2",
                                   "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert png.stat().st_size > 0


def test_bench_route_several_seeds_summary_and_no_local_search():
    res = CliRunner().invoke(app, ["bench-route", "--json", "--sizes", "30", "--blocks", "12", "--seeds", "0,1",
                                   "--time-budget", "0.1", "--no-local-search"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert [r["seed"] for r in rec["runs"]] == [0, 1] and rec["nsga2_local_search"] == "none"
    (s,) = rec["summary"]
    assert s["seeds"] == [0, 1] and s["worst_hv_ratio"] <= s["median_hv_ratio"] <= 1.0 + 1e-9
