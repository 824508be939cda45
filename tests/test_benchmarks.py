"""The benchmark scripts' --quick modes run end to end (on tiny synthetic Fashion-MNIST IDX files, with
results redirected to a temporary folder). Timings are never asserted here."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_idx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    idx = tmp_path_factory.mktemp("fashion_idx")
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 600), ("t10k", 200)):
        write_idx(
            idx / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 255, (n, 28, 28), generator=g).numpy()
        )
        write_idx(idx / f"{prefix}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).numpy())
    results = tmp_path_factory.mktemp("bench_results")
    env = dict(
        os.environ,
        ITOP_TIMM_FASHION_MNIST_DIR=str(idx),
        ITOP_TIMM_BENCH_RESULTS=str(results),
        PYTHONPATH=str(ROOT),
    )
    return env, results


def run_script(name: str, env: dict, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow  # 67 s on the CI machine (the default suite passed 15 min); run with -m slow
def test_step_overhead_quick(bench_env):
    env, results = bench_env
    out = run_script("step_overhead.py", env, "--quick", "--models", "resnet18", "--memory")
    data = json.loads((results / "step_overhead_cpu_32px_quick.json").read_text())
    r = data["results"][0]
    assert r["model"] == "resnet18" and r["extra_state_bytes_per_sparse_param"] == 2.0
    assert r["step_ratio"] > 0 and r["update_in_dense_steps"] > 0 and r["peak_rss_sparse_MB"] > 0
    assert "sparse/dense" in out


@pytest.mark.slow
def test_throughput_quick(bench_env):
    env, results = bench_env
    out = run_script("throughput.py", env, "--quick")
    data = json.loads((results / "throughput_cpu_quick.json").read_text())
    (r,) = data["results"]
    assert r["model"] == "resnet18" and all(len(v) == 1 for v in r["rates"].values())
    assert r["bare_samples_per_s"] > 0 and r["recipe_dense_ratio"] > 0 and r["recipe_rigl_ratio"] > 0
    assert [o["img_size"] for o in data["overhead"]] == [28, 32]
    assert all(o["reference_ratio"] > 0 and o["control_ratio"] > 0 for o in data["overhead"])
    assert Path(data["plot"]).stat().st_size > 1000 and "hook overhead" in out


@pytest.mark.slow  # compiles a resnet18 (about a minute on 2 cores)
def test_bare_step_quick(bench_env):
    env, results = bench_env
    out = run_script("bare_step.py", env, "--quick")
    data = json.loads((results / "bare_step_cpu_quick.json").read_text())
    variants = ["eager", "eager_control", "channels_last", "bf16_autocast", "compile"]
    assert list(data["results"]) == variants and all(len(data["rates"][v]) == 1 for v in variants)
    assert data["results"]["eager"]["ratio_to_eager"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["step_s"] > 0 for r in data["results"].values())
    assert "compile" in out


def test_condense_quick(bench_env):
    env, results = bench_env
    out = run_script("condense.py", env, "--quick")
    rows = json.loads((results / "condense_quick.json").read_text())["rows"]
    assert [(r["layer"], r["batch"]) for r in rows] == [
        ("768->3072", 1),
        ("768->3072", 197),
        ("3072->768", 1),
        ("3072->768", 197),
    ]
    assert all(r["condensed_us"] > 0 and r["csr_us"] > 0 and r["aa_ratio"] > 0 for r in rows)
    assert "vs CSR" in out


@pytest.mark.slow  # 29 s on the CI machine; run with -m slow
def test_checkpoint_sizes_quick(bench_env):
    env, results = bench_env
    run_script("checkpoint_sizes.py", env, "--quick")
    row = json.loads((results / "checkpoint_sizes_quick.json").read_text())["results"][0]
    assert row["sparsity"] == 0.9 and row["compact_ratio"] <= 0.15 < row["compact_with_union_ratio"] + 0.15


@pytest.mark.slow  # 124 s on the CI machine, the longest test; run with -m slow
def test_accuracy_vs_density_quick(bench_env):
    env, results = bench_env
    run_script("accuracy_vs_density.py", env, "--quick")
    data = json.loads((results / "accuracy_vs_density_quick.json").read_text())
    assert {r["method"] for r in data["runs"]} == {"dense", "static", "rigl"}
    rigl = next(r for r in data["runs"] if r["method"] == "rigl")
    assert rigl["itop_rate"] > rigl["realised_density"]  # updates happened
    assert all(Path(p).stat().st_size > 1000 for p in data["plots"])

    # an interrupted sweep resumes: finished runs are read back, only the unfinished one is trained again
    unfinished = results / "runs" / "accuracy_vs_density_quick" / "rigl_d0.1_s0" / "summary.json"
    unfinished.unlink()
    # the plan's runs 1, 3, ... belong to shard 1/2 (static): the unfinished RigL run (run 2) is left alone
    log = run_script("accuracy_vs_density.py", env, "--quick", "--reuse-runs", "--shard", "1/2")
    assert log.count("reusing the finished run") == 1 and not unfinished.exists()
    sharded = json.loads((results / "accuracy_vs_density_quick.json").read_text())
    assert [r["method"] for r in sharded["runs"]] == ["dense", "static"] and sharded["complete"] is False
    log = run_script("accuracy_vs_density.py", env, "--quick", "--reuse-runs")
    again = json.loads((results / "accuracy_vs_density_quick.json").read_text())
    assert log.count("reusing the finished run") == len(data["runs"]) - 1
    assert "rigl_d0.1_s0" not in "".join(line for line in log.splitlines() if "reusing" in line)
    for before, after in zip(data["runs"], again["runs"], strict=True):
        assert (before["method"], before["density"], before["seed"]) == (
            after["method"],
            after["density"],
            after["seed"],
        )
        if before["method"] != "rigl":
            assert after == before
    assert unfinished.exists()

    # a protocol under way is tabulated from its finished runs alone, marked incomplete, nothing trained
    unfinished.unlink()
    log = run_script("accuracy_vs_density.py", env, "--quick", "--summarize")
    partial = json.loads((results / "accuracy_vs_density_quick.json").read_text())
    assert "reusing" not in log and not unfinished.exists()
    assert partial["complete"] is False and partial["runs_planned"] == len(data["runs"])
    assert [r["method"] for r in partial["runs"]] == ["dense", "static"]
    assert [(row["method"], row["seeds"]) for row in partial["table"]] == [("static", [0])]
    assert partial["table"][0]["gap_beyond_noise"] is None  # one seed a side: nothing can be said


def write_cifar_like_parquet(folder: Path) -> Path:
    """A tiny CIFAR-10 look-alike in the Hub layout the protocol reads: train.parquet and test.parquet with an
    ``img`` Image column and a ``label`` ClassLabel column (random 32 px RGB images, labels 0..9)."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])}
    )
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 600), ("test", 200)):
        images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        data = datasets.Dataset.from_dict(
            {"img": images, "label": [i % 10 for i in range(n)]}, features=features
        )
        data.to_parquet(str(folder / f"{split}.parquet"))
    return folder


@pytest.mark.slow  # ~2 min on the CI machine; run with -m slow
def test_accuracy_cifar10_quick(bench_env, tmp_path):
    env, results = bench_env
    env = dict(env, ITOP_TIMM_CIFAR10_DIR=str(write_cifar_like_parquet(tmp_path / "cifar10")))
    out = run_script("accuracy_vs_density.py", env, "--dataset", "cifar10", "--quick")
    data = json.loads((results / "accuracy_cifar10_quick.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["dense", "static", "rigl", "chase", "srigl"]
    chase_dir = results / "runs" / "accuracy_cifar10_quick" / "chase_d0.1_s0"
    config = (chase_dir / "bench_config.yaml").read_text()
    assert "dataset: parquet" in config and "channel_sparsity: 0.6" in config
    assert "ranking: layer" in config and "shrink: true" in config
    chase = next(r for r in data["runs"] if r["method"] == "chase")
    assert chase["latency_224px_vs_dense"] > 0  # the compacted model was timed against the dense one
    # ... the dense one of its architecture, not the run's model/ (already the shrunk net); kept with the run
    latency = json.loads((chase_dir / "bench_latency.json").read_text())
    assert latency["compacted_params"] < 0.7 * latency["dense_params"]  # S_c 0.6 removed channels
    assert latency["latency_vs_dense"] == chase["latency_224px_vs_dense"]
    assert all(r["wall_time_vs_dense"] > 0 for r in data["runs"])
    # compute: auto in every sparse run: the summary says which layers the CPU kernels computed
    assert all(0 <= r["kernel_layers"][0] <= r["kernel_layers"][1] > 0 for r in data["runs"][1:])
    assert "kernel_layers" not in data["runs"][0]  # dense
    assert [row["method"] for row in data["table"]] == ["static", "rigl", "chase", "srigl"]
    assert all(Path(p).stat().st_size > 1000 for p in data["plots"]) and len(data["plots"]) == 3
    assert "time/dense" in out


@pytest.mark.slow
def test_scaling_quick(bench_env):
    env, results = bench_env
    run_script("scaling.py", env, "--quick")
    data = json.loads((results / "scaling_quick.json").read_text())
    assert (
        data["results"]["2"]["ranks_agreed_at_every_update"] and data["results"]["2"]["topology_updates"] > 0
    )


@pytest.mark.slow
def test_averaging_quick(bench_env):
    env, results = bench_env
    run_script("averaging.py", env, "--quick")
    data = json.loads((results / "averaging_quick.json").read_text())
    assert len(data["table"]) == 4 and all(len(r["per_epoch_top1"]) == 2 for r in data["runs"])


@pytest.mark.slow
def test_structured_quick(bench_env):
    env, results = bench_env
    run_script("structured.py", env, "--quick")
    data = json.loads((results / "structured_quick.json").read_text())
    assert [r["model"] for r in data["table"]] == [
        "dense",
        "rmda_l0.01",
        "chase_sc0.5",
        "chase_sc0.5_layer_shrink",
        "srigl",
    ]
    chase = next(r for r in data["rows"] if r["model"] == "chase_sc0.5")
    assert chase["channels_removed"] > 0 and chase["params_ratio"] < 1 and chase["same_after_compaction"]
    shrunk = next(r for r in data["rows"] if r["model"] == "chase_sc0.5_layer_shrink")
    assert shrunk["same_after_compaction"] and shrunk["params_ratio"] < 1 and shrunk["channels_removed"] > 0
    assert (
        0 < shrunk["train_macs_ratio"] < 1 and shrunk["macs_per_step"][-1][1] < shrunk["macs_per_step"][0][1]
    )
    assert Path(data["macs_plot"]).stat().st_size > 1000
    assert all(r["speedup_224px_b64"] > 0 for r in data["rows"]) and Path(data["plot"]).stat().st_size > 1000


@pytest.mark.slow
def test_fsdp_quick(bench_env):
    env, results = bench_env
    out = run_script("fsdp.py", env, "--quick")
    data = json.loads((results / "fsdp_quick.json").read_text())
    ddp, sharded = data["results"]["ddp_sparse"], data["results"]["fsdp_sparse"]
    assert len(ddp) == len(sharded) == 2  # both ranks reported
    assert all(s["state_mib"] < d["state_mib"] for s, d in zip(sharded, ddp, strict=True))  # sharded state
    assert sharded[0]["itop_rate"] > 0 and sharded[0]["update_s"] > 0
    assert "sparsifier step overhead under FSDP" in out


def _bench_module(name: str = "_common"):
    """A module of benchmarks/ (the scripts import each other by plain name)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_welch_gap_against_hand_computed_values():
    welch_gap = _bench_module().welch_gap
    # equal variances 1, n = 3 a side: s.e. = sqrt(2/3), df = 4 exactly, Student's 0.975 quantile 2.776
    far = welch_gap([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert far["gap"] == -3.0 and abs(far["se"] - (2 / 3) ** 0.5) < 1e-12 and abs(far["df"] - 4.0) < 1e-12
    assert abs(far["t"] + 3.0 / (2 / 3) ** 0.5) < 1e-12 and far["beyond_noise"] is True  # |t| 3.67 > 2.776
    near = welch_gap([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])  # |t| 2.45 < 2.776
    assert near["beyond_noise"] is False
    single = welch_gap([80.0], [81.0, 82.0])
    assert single["gap"] == -1.5 and single["beyond_noise"] is None and single["t"] is None


def test_paired_gap_against_hand_computed_values():
    paired_gap = _bench_module().paired_gap
    # differences 1, 2, 3 (seed 3 has no partner): mean 2, std 1, s.e. 1/sqrt(3), t 3.46 < 4.303 at 2 df
    near = paired_gap({0: 2.0, 1: 4.0, 2: 6.0, 3: 9.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert near["seeds"] == 3 and near["gap"] == 2.0 and near["df"] == 2
    assert near["se"] == pytest.approx(3**-0.5) and near["t"] == pytest.approx(2 * 3**0.5)
    assert near["beyond_noise"] is False
    # the same means, each seed shifted alike: Welch sees the seeds' spread, the pairing cancels it
    far = paired_gap({0: 11.0, 1: 21.0, 2: 31.5}, {0: 10.0, 1: 20.0, 2: 30.0})  # differences 1, 1, 1.5
    assert far["t"] == pytest.approx((7 / 6) / ((1 / 12) ** 0.5 / 3**0.5)) and far["beyond_noise"] is True
    assert _bench_module().welch_gap([11.0, 21.0, 31.5], [10.0, 20.0, 30.0])["beyond_noise"] is False
    alone = paired_gap({0: 80.0, 1: 81.0}, {1: 79.0, 2: 78.0})
    assert alone == {"seeds": 1, "gap": 2.0, "se": None, "t": None, "df": None, "beyond_noise": None}


def test_shards_method_pairs_and_the_exact_spearman_p():
    avd = _bench_module("accuracy_vs_density")
    parser = argparse.ArgumentParser()
    assert avd.parse_shard(parser, None) is None and avd.parse_shard(parser, "1/2") == (1, 2)
    for bad in ("2/2", "1", "a/2", "-1/2", "1/0"):
        with pytest.raises(SystemExit):
            avd.parse_shard(parser, bad)

    rho, p = avd.spearman_by_rank([1.0, 2.0, 3.0, 4.0])
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / 24)  # only the identity ordering
    rho, p = avd.spearman_by_rank([4.0, 3.0, 2.0, 1.0])
    assert rho == pytest.approx(-1.0) and p == 1.0
    assert avd.spearman_by_rank([1.0, 3.0, 2.0])[0] == pytest.approx(0.5)  # 1 - 6*2/(3*8)
    assert avd.spearman_by_rank([1.0, 1.0, 2.0])[0] == pytest.approx(3**0.5 / 2)  # ties: mean ranks

    def run(method, top1, rs, seed):
        return {"method": method, "density": 0.05, "seed": seed, "test_top1": top1, "itop_rate": rs}

    runs = [run("static", 78 + 0.1 * s, 0.05, s) for s in range(3)]
    runs += [run("rigl", 80 + 0.1 * s, 0.4, s) for s in range(3)]
    runs += [run("unfired", 80.05 + 0.1 * s, 0.9, s) for s in range(3)]
    pairs = avd.method_pairs(runs, ["unfired", "static", "rigl", "set"], [0.05, 0.1])
    tests, (order,) = pairs[:3], pairs[3:]
    assert [(t["higher_rs"], t["lower_rs"]) for t in tests] == [
        ("rigl", "static"),
        ("unfired", "static"),
        ("unfired", "rigl"),
    ]
    assert tests[0]["gap"] == pytest.approx(2.0) and tests[0]["beyond_noise"] is True
    assert tests[2]["gap"] == pytest.approx(0.05) and tests[2]["beyond_noise"] is False
    # each seed 0.05 apart: paired by seed, that constant difference is beyond noise
    assert tests[2]["paired"]["seeds"] == 3 and tests[2]["paired"]["gap"] == pytest.approx(0.05)
    assert tests[2]["paired"]["beyond_noise"] is True
    assert order["rs_order"] == ["static", "rigl", "unfired"] and order["spearman_rho"] == pytest.approx(1.0)
    assert order["spearman_p_one_sided"] == pytest.approx(1 / 6)


def test_the_cifar10_table_renders_pairs_kernels_latency_and_cpus(tmp_path, monkeypatch):
    """report.py's §9 block from a results file shaped as accuracy_vs_density.py writes it."""
    avd, report = _bench_module("accuracy_vs_density"), _bench_module("report")

    def run(method, density, seed, top1, rs, **extra):
        return {"method": method, "density": density, "seed": seed, "test_top1": top1, "itop_rate": rs,
                "wall_time_s": 1000.0 if method == "dense" else 700.0 + seed, "itop_history": [], **extra}  # fmt: skip

    runs = [run("dense", 1.0, s, 82.5 + 0.1 * s, 1.0) for s in range(3)]
    runs += [run("static", 0.05, s, 78.9 + 0.1 * s, 0.05, kernel_layers=[14 + s % 2, 22]) for s in range(3)]
    runs += [
        run("rigl", 0.05, s, 79.9 + 0.1 * s, 0.3, kernel_layers=[16, 22], cpus=["AMD EPYC"]) for s in range(3)
    ]
    runs += [run("chase", 0.1, 0, 79.9, 0.46, latency_224px_vs_dense=0.73)]
    methods, densities = ["static", "rigl", "chase"], [0.1, 0.05]
    data = {
        "machine": {"cpu": "AMD EPYC", "cores": 2, "torch": "2.x", "torch_threads": 1, "timm": "1.x"},
        "settings": {"dataset": "cifar10", "train_samples": 0, "epochs": None, "update_interval": None, "seeds": [0, 1, 2]},
        "command": "uv run python benchmarks/accuracy_vs_density.py --dataset cifar10 --reuse-runs",
        "runs": runs,
        "runs_planned": 10,
        "complete": True,
    }  # fmt: skip
    data["dense_top1"], data["table"] = avd.summarise(runs, methods, densities)
    data["pairs"] = avd.method_pairs(runs, ["static", "rigl"], densities)
    (tmp_path / "accuracy_cifar10.json").write_text(json.dumps(data))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.accuracy_cifar10()

    assert "Dense: **82.60 ± 0.10** (R_s 1, 3 seeds)" in text
    assert "| Static | 0.05 | 3 | 79.00 ± 0.10 |" in text and "(kernels in 14–15 of 22 layers)" in text
    assert "| RigL | 0.05 | 3 | 80.00 ± 0.10 | -2.60 ± 0.08 | **yes**" in text
    assert "| 0.70 ± 0.00 (kernels in 16 of 22 layers) |" in text  # (700 + seed) / 1000
    assert "0.70 (compacted 224 px latency 0.73× dense) |" in text
    assert (
        "| 0.05 | RigL − Static | 3 / 3 | +1.00 ± 0.08 | **yes** (t = +12.2, 4.0 df) | +1.00 ± 0.00: **yes**"
        in text
    )
    assert "| paired by seed: difference ± s.e., beyond noise? (paired t, 5 %) |" in text
    assert "density 0.05: R_s order Static < RigL; " not in text  # two methods: no Spearman line
    assert "*Runs trained on: AMD EPYC (3 runs); 7 earlier runs without a record.*" in text
    assert "(1 thread)" in text


def test_finished_run_is_found_from_a_moved_folder_and_only_for_its_own_config(tmp_path):
    common = _bench_module()
    out = tmp_path / "a" / "rigl_d0.1_s0"
    cfg = common.fashion_mnist_config(out, epochs=1, train_samples=None, seed=0, method="rigl", density=0.1)
    out.mkdir(parents=True)
    (out / "bench_config.yaml").write_text(common._config_text(cfg, 1))
    (out / "summary.json").write_text(json.dumps({"test_top1_last": 50.0}))
    (out / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1}) + "\n")
    assert common.finished_run(cfg) == {"test_top1_last": 50.0, "metrics": [{"event": "train", "step": 1}]}

    moved = tmp_path / "b" / "rigl_d0.1_s0"  # a clone at another path: the committed runs still count
    moved.parent.mkdir()
    out.rename(moved)
    cfg_moved = common.fashion_mnist_config(
        moved, epochs=1, train_samples=None, seed=0, method="rigl", density=0.1
    )
    assert common.finished_run(cfg_moved)["test_top1_last"] == 50.0
    other_seed = common.fashion_mnist_config(
        moved, epochs=1, train_samples=None, seed=1, method="rigl", density=0.1
    )
    assert common.finished_run(other_seed) is None
    assert common.finished_run(cfg_moved, processes=2) is None
    (moved / "summary.json").unlink()  # unfinished
    assert common.finished_run(cfg_moved) is None


@pytest.mark.slow  # two recipe launches, ~45 s on 2 cores; run with -m slow
def test_an_interrupted_run_continues_from_its_latest_checkpoint(bench_env, tmp_path, monkeypatch):
    """--reuse-runs continues a run that a session's end cut short (from its latest checkpoint, through
    the recipe's --run.resume) and ends as the uninterrupted run does; each launch is recorded."""
    env, _ = bench_env
    monkeypatch.setenv("ITOP_TIMM_FASHION_MNIST_DIR", env["ITOP_TIMM_FASHION_MNIST_DIR"])
    common = _bench_module()
    out = tmp_path / "rigl_d0.1_s0"
    cfg = common.fashion_mnist_config(
        out,
        epochs=2,
        train_samples=64,
        seed=0,
        method="rigl",
        density=0.1,
        update_interval=2,
        batch_size=16,
        eval_samples=32,
    )
    cfg["model"]["name"] = "resnet10t"
    cfg["run"] |= {"checkpoint_interval": 3, "keep_checkpoints": 10}
    whole = common.run_recipe(cfg, reuse=True)
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints][:2] == ["step_00000003", "step_00000006"]

    # the session ended after step 3's checkpoint: no summary, later checkpoints never written
    (out / "summary.json").unlink()
    for later in checkpoints[1:]:
        shutil.rmtree(later)
    continued = common.run_recipe(cfg, reuse=True)
    for key in ("test_top1_last", "test_loss_last", "total_steps", "itop_rate", "density"):
        assert continued[key] == whole[key], key
    steps = [r["step"] for r in continued["metrics"] if r.get("event") == "train"]
    assert steps == sorted(set(steps)) and steps == [
        r["step"] for r in whole["metrics"] if r.get("event") == "train"
    ]
    first, second = continued["launches"][-2:]
    assert first["resumed_from"] is None and second["resumed_from"] == "step_00000003"
    assert second["cpu"] == common.machine()["cpu"]

    # a config change is a new run: it starts over instead of continuing the old one's checkpoint
    (out / "summary.json").unlink()
    cfg["train"]["seed"] = 1
    assert common._interrupted_run_checkpoint(cfg, 1) is None


@pytest.mark.slow  # three tiny recipe runs plus the step and layer timings: about a minute
def test_sparse_compute_quick(bench_env):
    env, results = bench_env
    out = run_script("sparse_compute.py", env, "--quick")
    data = json.loads((results / "sparse_compute_quick.json").read_text())
    assert {r["shape"] for r in data["steps"]} == {"demo", "64px", "224px"}
    assert all(r["speedup_auto"] > 0 and r["speedup_masked_control"] > 0 for r in data["steps"])
    assert data["layers"] and all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in data["layers"])
    demo = data["demo"]
    assert set(demo) == {"dense", "rigl_masked", "rigl_auto"}
    assert (
        demo["rigl_auto"]["density"] == pytest.approx(0.1, abs=1e-3)
        and demo["rigl_auto"]["wall_time_vs_dense"] > 0
    )
    assert (results / "sparse_compute_quick.png").stat().st_size > 1000
    assert "wrote" in out
