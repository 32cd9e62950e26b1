"""The benchmarks run end to end as their documented commands, at a reduced size, and
write the numbers they print; the figures themselves are for docs/performance.md, not here."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(module: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout
    return json.loads(out.read_text())


def test_executor_benchmark_compares_the_three_ways(tmp_path):
    result = run_bench(
        "bench.executor", tmp_path / "executor.json",
        "--jobs", "1,8", "--repeats", "1", "--steps", "2", "--threads", "1",
    )  # fmt: skip
    eight = next(entry for entry in result["results"] if entry["jobs"] == 8)
    assert eight["calls_b"] == 1 and eight["batches_c"] == [1]
    assert eight["overhead_c_over_b"] > 0 and eight["speedup_a_over_c"] > 0
    assert 0 < eight["max_stall_s"] < 5
    assert len(result["goals"]) == 3 and set(result["goals"].values()) <= {"PASS", "FAIL"}


def test_mix_benchmark_replays_every_policy_at_every_load(tmp_path):
    result = run_bench("bench.mix", tmp_path / "mix.json", "--jobs", "200", "--windows", "200")
    assert [load["load"] for load in result["loads"]] == [0.3, 0.6, 0.9, 1.2, 1.5]
    policies = [row["policy"] for row in result["loads"][0]["results"]]
    assert policies[0] == "FIFO, MAX_BATCH_SIZE=1" and "ours + wait 200 ms" in policies
    for load in result["loads"]:
        fifo, ours = load["results"][0], load["results"][1]
        assert fifo["images_per_call"] == 1.0 and ours["images_per_call"] >= 1.0


def test_gpu_benchmark_runs_on_a_cpu_with_the_small_flag(tmp_path):
    result = run_bench(
        "bench.gpu", tmp_path / "gpu.json",
        "--small", "--device", "cpu", "--threads", "1", "--repeats", "1",
        "--batch-sizes", "1,2", "--dtypes", "float32", "--vae-batch-sizes", "1,2",
        "--jobs", "6", "--rounds", "1", "--variant", "CHANNELS_LAST=true",
    )  # fmt: skip
    assert round(result["flop_check"]["guided_step_tflop"], 4) == 1.6065
    assert {(r["variant"], r["batch"]) for r in result["unet"]} == {
        (v, b) for v in ("eager", "channels_last", "attention slicing") for b in (1, 2)
    }
    assert [(r["batch"], r["vae_decode_batch"]) for r in result["vae"]] == [(1, 1), (2, 2), (2, 1)]
    runs = result["executor"]["runs"]
    executors = ("MAX_BATCH_SIZE=8", "MAX_BATCH_SIZE=8, CHANNELS_LAST=true", "MAX_BATCH_SIZE=1")
    arrivals = ("burst", "30-step burst", "Poisson")
    assert list(runs) == [f"{e}, {a}" for e in executors for a in arrivals]
    for a in arrivals:  # every executor made the same images from the same jobs
        assert len({runs[f"{e}, {a}"]["images"] for e in executors}) == 1
    assert runs["MAX_BATCH_SIZE=1, burst"]["images_per_call"] == 1.0
    assert all(run["images_per_s"] > 0 and run["share_of_ceiling"] is None for run in runs.values())
    assert runs["MAX_BATCH_SIZE=8, 30-step burst"]["images_per_call"] >= 2  # they batch
    goals = result["executor"]["goals"]
    assert list(goals) == list(executors[:2]) and goals["MAX_BATCH_SIZE=8"]["burst_speedup"] > 0


def test_fairness_benchmark_compares_fifo_with_the_fair_former(tmp_path):
    result = run_bench(
        "bench.fairness", tmp_path / "fairness.json",
        "--jobs", "200", "--burst-jobs", "16", "--burst-draws", "5",
    )  # fmt: skip
    assert [row["former"] for row in result["flood"]] == ["FIFO (before)", "fair (ours)"]
    for row in result["flood"] + result["burst"]:
        assert 0 < row["batch_fill"] <= 1
    fifo, fair = result["flood"]
    assert fair["light_wait_p95_s"] < fifo["light_wait_p95_s"]  # a flood is where it shows
    assert len(result["goals"]) == 3 and set(result["goals"].values()) <= {"PASS", "FAIL"}


def test_queue_benchmark_times_every_operation_at_every_size(tmp_path):
    result = run_bench(
        "bench.queue", tmp_path / "queue.json",
        "--sizes", "100,300", "--rounds", "3", "--arrivals", "30",
    )  # fmt: skip
    assert [row["queued"] for row in result["results"]] == [100, 300]
    for row in result["results"]:
        assert all(row[op] > 0 for op in ("restart", "admission", "claim", "cancel", "position"))
    assert result["stall_ms"] > 0
    assert set(result["goals"].values()) <= {"PASS", "FAIL"} and len(result["goals"]) == 11


def test_png_benchmark_compares_our_level_with_pillows_default(tmp_path):
    result = run_bench("bench.png", tmp_path / "png.json", "--repeats", "1")
    cases = result["cases"]
    assert list(cases) == [
        "picture 512²", "picture 1024²", "grid of four 512² pictures", "noise 256²"
    ]  # fmt: skip
    for case in cases.values():
        assert case["level_ours"] == 1 and min(case["ms"].values()) > 0
    # A smooth picture compresses at both levels; noise at neither.
    picture = cases["picture 512²"]["bytes"]
    assert picture["default"] < picture["ours"] < 512 * 512 * 3
    assert cases["noise 256²"]["bytes"]["ours"] > 256 * 256 * 3


def test_scale_benchmark_runs_every_setup_on_a_local_ray_cluster(tmp_path):
    result = run_bench("bench.scale", tmp_path / "scale.json", "--jobs", "3", "--rounds", "1")
    setups = ["local", "ray, 1 worker", "ray, 2 workers", "bare, 1 actor", "bare, 2 actors"]
    assert list(result["images_per_second"]) == setups
    assert all(len(rates) == 1 and rates[0] > 0 for rates in result["images_per_second"].values())
    assert list(result["goals"]) == [
        "2 Ray workers / 1 >= 1.8x",
        "local / Ray with 1 worker <= 1.1",
    ]
    # The local executor computes in the bot's own process; Ray's workers in theirs.
    cores = result["cores_used"]
    assert cores["local"]["workers"] == 0 and cores["local"]["bot"] > 0.2
    assert cores["ray, 1 worker"]["workers"] > max(0.2, cores["ray, 1 worker"]["bot"])
    assert set(result["busy_share"]["ray, 2 workers"]) == {"ray-0", "ray-1"}
    assert result["scaling_per_round"] == [result["scaling"]]  # one round: its own ratio
