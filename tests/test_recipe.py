"""The training recipe end to end: tiny real runs, 2 processes under accelerate launch, kill-and-resume,
bf16, gradient accumulation, and bad input caught before anything is written."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_image_folder, write_idx, write_plugin
from hypothesis import given, settings
from hypothesis import strategies as st

import itop_timm
from itop_timm.checkpoint import load_sparse
from itop_timm.registry import METHODS
from itop_timm.serialization import CheckpointError
from itop_timm.training import load_config, run
from itop_timm.training.config import TrainConfig
from itop_timm.training.data import read_idx
from itop_timm.training.resources import resolve_num_threads

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train.py"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # (conftest.py)


def tiny_config(data_dir: str, output: Path, **sections) -> dict:
    cfg = {
        "model": {"name": "test_resnet", "in_chans": 1, "img_size": 16},
        "data": {
            "dataset": "disk",
            "data_dir": data_dir,
            "val_fraction": 0.25,
            "batch_size": 8,
            "eval_batch_size": 16,
            "num_workers": 0,
            "crop_padding": 2,
        },
        "optim": {"opt": "sgd", "lr": 0.05},
        "train": {"epochs": 2, "seed": 0},
        "sparsity": {"method": "rigl", "density": 0.3, "update_interval": 2},
        "run": {"output_dir": str(output), "log_interval": 1, "checkpoint_interval": 4, "progress": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def run_config(cfg: dict) -> dict:
    return run(TrainConfig.from_dict(cfg))


def records(output: Path, event: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if event is None or r.get("event") == event]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


# --------------------------------------------------------------------------- end to end
def test_tiny_run_end_to_end(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = run_config(tiny_config(tiny_data, out))
    # 48 train images / batch 8 = 6 optimizer steps per epoch
    assert summary["total_steps"] == 12
    for key in (
        "test_top1_last",
        "test_top5_last",
        "test_top1_best",
        "best_val_top1",
        "itop_rate",
        "density",
        "wall_time_s",
        "steps_per_s",
    ):
        assert key in summary
    assert summary["density"] == pytest.approx(0.3, abs=1e-3)
    assert summary["itop_rate"] > summary["density"]
    # a small data set takes the in-memory path; run.num_threads: auto is logged in the summary
    assert summary["data_path"] == "in_memory" and summary["num_workers"] == 0
    assert summary["num_threads"] == resolve_num_threads("auto").threads == torch.get_num_threads()
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 13))  # one JSON line per log step
    assert all({"loss", "lr", "density", "itop_rate", "samples_per_s"} <= set(r) for r in train)
    updates = records(out, "topology_update")
    assert [r["step"] for r in updates] == [2, 4, 6, 8, 10]  # none at the last step
    assert len(records(out, "eval")) == 2 and records(out, "summary")
    for png in ("itop_rate.png", "layer_density.png", "learning_curves.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["total_steps"] == 12
    model, masks, meta = load_sparse(out / "model")
    assert meta["method"] == "rigl" and meta["step"] == 12 and meta["dataset"] == "disk"
    assert meta["density"] == pytest.approx(summary["density"]) and meta["itop_rate"] == pytest.approx(
        summary["itop_rate"]
    )
    published = json.loads((out / "model" / "config.json").read_text())
    assert published["label_names"] == ["c0", "c1", "c2", "c3"]
    assert "tag" not in published["pretrained_cfg"] and "license" not in published["pretrained_cfg"]
    recipe = meta["training_config"]  # what produced the weights, without local paths
    assert recipe["sparsity"]["density"] == 0.3 and recipe["model"]["name"] == "test_resnet"
    assert "run" not in recipe and "data_dir" not in recipe["data"]
    assert yaml.safe_load((out / "config.yaml").read_text())["sparsity"]["density"] == 0.3


def test_a_plugin_methods_defaults_reach_the_recipe(tiny_data, tmp_path, monkeypatch):
    write_plugin(tmp_path, "itop_recipe_plugin", "every7")  # defaults: update_interval 7, prune_rate 0.25
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_data,
        out,
        sparsity={"method": "every7", "update_interval": None},  # unset: the method's default
        run={"plugins": ["itop_recipe_plugin"]},
    )
    try:
        run_config(cfg)
    finally:
        METHODS.unregister("every7")
    assert [r["step"] for r in records(out, "topology_update")] == [7]  # 12 steps, ΔT = 7
    _, _, meta = load_sparse(out / "model")
    assert meta["method"] == "every7"
    assert meta["sparsity_config"]["update_interval"] == 7 and meta["sparsity_config"]["prune_rate"] == 0.25


def test_dense_and_static_runs(tiny_data, tmp_path):
    dense = run_config(
        tiny_config(tiny_data, tmp_path / "dense", sparsity={"method": "dense"}, train={"epochs": 1})
    )
    assert "itop_rate" not in dense
    model, masks, meta = load_sparse(tmp_path / "dense" / "model")
    assert masks == {} and meta["method"] == "dense"
    static = run_config(  # and timm's PIL transforms when the in-memory path is switched off
        tiny_config(
            tiny_data,
            tmp_path / "static",
            sparsity={"method": "static"},
            train={"epochs": 1},
            data={"in_memory": False},
        )
    )
    assert static["itop_rate"] == pytest.approx(static["density"])
    assert dense["data_path"] == "in_memory" and static["data_path"] == "pil"


def test_fashion_mnist_idx_source(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    rng = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(
            idx / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 255, (n, 28, 28), generator=rng).numpy()
        )
        write_idx(idx / f"{prefix}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).numpy())
    cfg = tiny_config(
        "", tmp_path / "run", data={"dataset": "fashion_mnist", "data_dir": str(idx), "batch_size": 10}
    )
    cfg["model"]["img_size"] = 28
    summary = run_config(cfg)
    assert summary["total_steps"] == 2 * (36 // 10)
    with pytest.raises(ValueError, match="IDX header says"):
        (idx / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
        read_idx(idx / "bad")


def test_imagefolder_source_rgb(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    cfg = tiny_config(
        str(folder), tmp_path / "run", data={"dataset": "imagefolder", "val_fraction": 0.0, "batch_size": 6}
    )
    cfg["model"]["in_chans"] = 3
    cfg["data"]["val_split"] = None
    summary = run_config(cfg)
    assert summary["total_steps"] == 2 * 3 and summary["best_val_top1"] is None


# --------------------------------------------------------------------------- console
def test_console_prints_one_line_per_epoch_and_logs_each_steps_lr(tiny_data, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="itop_timm.training.loop"):
        summary = run_config(tiny_config(tiny_data, out))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    evals = records(out, "eval")
    last = lines[-1]
    assert f"val top-1 {evals[-1]['top1']:.2f}%" in last and "train loss " in last and "time " in last
    assert f"density {summary['density']:.4f}" in last and f"R_s {summary['itop_rate']:.4f}" in last
    # the lr each step trained with: multistep 0.05, x0.1 at 50% and 75% of the 12 steps, where timm's
    # scheduler, stepped after update t, decays once t + 1 reaches the milestone (6, 9): from steps 6, 9
    lrs = [r["lr"] for r in records(out, "train")]
    assert lrs == pytest.approx([0.05] * 5 + [0.005] * 3 + [0.0005] * 4)


def test_console_lines_go_above_the_progress_bar_and_only_from_rank_0(monkeypatch):
    from tqdm import tqdm

    from itop_timm.training.reporting import ConsoleHandler, MainProcessOnly

    stream = io.StringIO()
    handler = ConsoleHandler(stream)
    handler.addFilter(MainProcessOnly())
    logger = logging.getLogger("itop_timm.test_console")
    logger.addHandler(handler)
    try:
        with tqdm(total=4, file=stream, desc="epoch 1/2", mininterval=0) as bar:
            bar.update(1)
            logger.warning("a line")
            monkeypatch.setenv("RANK", "1")
            logger.warning("a warning of rank 1")
            logger.info("an info line of rank 1")
            monkeypatch.setenv("RANK", "0")
            logger.warning("another line")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    for line in ("a line", "a warning of rank 1", "another line"):
        assert f"\r{line}\n\repoch 1/2:" in text  # on a line of its own, the bar redrawn below it
    assert "an info line of rank 1" not in text


def test_launch_warnings_name_the_missing_multi_gpu_and_bf16_on_the_cpu():
    from itop_timm.training.reporting import launch_warnings, requested_processes

    launch = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "train.py"]
    assert requested_processes(launch) == 2
    assert (
        requested_processes(["python", "-m", "accelerate.commands.launch", "--num-processes=3", "t.py"]) == 3
    )
    assert requested_processes(["python", "train.py", "--num_processes", "2"]) is None  # not accelerate
    (warning,) = launch_warnings(1, "cuda", "no", launcher=launch)
    assert "asked for 2 processes but this run has 1" in warning and "--multi_gpu" in warning
    assert launch_warnings(2, "cpu", "no", launcher=[*launch[:3], "--multi_gpu", *launch[3:]]) == []
    (warning,) = launch_warnings(1, "cpu", "bf16", launcher=[])
    assert "bf16" in warning and "slower than fp32" in warning and "mixed_precision: no" in warning


# --------------------------------------------------------------------------- accelerate
def test_two_processes_under_accelerate_launch_hold_identical_masks(tiny_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "run", train={"epochs": 2})))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
    ]
    cmd += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(RECIPE),
        "--config",
        str(config),
    ]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    # 48 images, 8 per process and step, 2 processes: 3 steps per epoch
    assert summary["total_steps"] == 6
    updates = records(tmp_path / "run", "topology_update")
    assert updates and all(
        r["ranks"] == 2 and "mask_fingerprint" in r for r in updates
    )  # checked equal on both ranks
    assert len({r["mask_fingerprint"] for r in updates}) == len(updates)  # and they did change
    # the console: every informational line once, from rank 0 (the sparsifier is built on both ranks)
    for line in ("epoch 1/2  train loss", "epoch 2/2  train loss", "sparsify: method=rigl"):
        assert result.stderr.count(line) == 1, result.stderr[-3000:]


# 3: the checkpoint at step 8 falls between two log lines (the harder case, in the default suite);
# 1 (every step logged) is -m slow: 77 s on the CI machine.
# compute sparse: the CPU kernels (issue 24) resume bit-exactly too.
@pytest.mark.parametrize(
    "log_interval, compute", [pytest.param(1, "masked", marks=pytest.mark.slow), (3, "masked"), (3, "sparse")]
)
def test_kill_and_resume_matches_uninterrupted_run(tiny_data, tmp_path, log_interval, compute):
    cfg = tiny_config(
        tiny_data,
        tmp_path / "whole",
        train={"epochs": 3},
        sparsity={"method": "set", "compute": compute},
        run={"log_interval": log_interval},
    )
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(cfg))
    cfg["run"]["output_dir"] = str(tmp_path / "killed")
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(cfg))

    def launch(script, config, *extra, kill_at=None):
        env = subprocess_env() | ({"KILL_AT_STEP": str(kill_at)} if kill_at else {})
        return subprocess.run(
            [sys.executable, str(script), "--config", str(config), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    whole = launch(RECIPE, tmp_path / "whole.yaml")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = launch(ROOT / "tests" / "kill_at_step.py", tmp_path / "killed.yaml", kill_at=10)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000008"]  # the kill came two steps after the last one
    resumed = launch(RECIPE, tmp_path / "killed.yaml", "--run.resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    model_a, masks_a, meta_a = load_sparse(tmp_path / "whole" / "model")
    model_b, masks_b, meta_b = load_sparse(tmp_path / "killed" / "model")
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    assert all(torch.equal(meta_a["ever_active"][n], meta_b["ever_active"][n]) for n in masks_a)
    assert meta_a["itop_rate"] == meta_b["itop_rate"] and meta_a["step"] == meta_b["step"] == 18
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert meta_a["sha256"] == meta_b["sha256"]
    loss_a = [(r["step"], r["loss"]) for r in records(tmp_path / "whole", "train")]
    loss_b = [(r["step"], r["loss"]) for r in records(tmp_path / "killed", "train")]
    assert loss_a == loss_b  # the log was cut back to the checkpoint and continued identically
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    if compute == "sparse":  # every sparse layer computed by the kernels, the plan restored on resume
        assert summary["compute"] == {"mode": "sparse", "sparse_layers": sorted(masks_a), "dense_layers": []}
    else:
        assert "compute" not in summary
    assert [step for step, _ in loss_a] == [s for s in range(1, 19) if s % log_interval == 0 or s == 18]


@pytest.mark.parametrize("damage", ["missing", "corrupted"])
def test_resume_without_a_loadable_rng_state_fails_loudly(tiny_data, tmp_path, damage):
    out = tmp_path / "run"
    run_config(tiny_config(tiny_data, out, train={"epochs": 1}))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    rng = checkpoint / "random_states_0.pkl"
    if damage == "missing":
        rng.unlink()
    else:
        rng.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"random number generator state .*would\s+not reproduce"):
        run_config(tiny_config(tiny_data, out, train={"epochs": 1}, run={"resume": "latest"}))


def test_bf16_autocast_on_cpu(tiny_data, tmp_path):
    # 32 px, not the usual 16: at 16 px test_resnet's layer4 runs a 3x3 stride-2 convolution on a 1x1
    # map, and torch 2.15's CPU bf16 backward for that shape leaves some weight-gradient entries
    # unwritten (NaN in about 1 run in 5, on this project's dev machine and CI; see README, "Known
    # issues"). At 32 px that layer sees a 2x2 map, which the same kernel computes correctly.
    cfg = tiny_config(tiny_data, tmp_path / "run", train={"mixed_precision": "bf16", "epochs": 1})
    summary = run_config({**cfg, "model": {**cfg["model"], "img_size": 32}})
    assert summary["total_steps"] == 6 and summary["itop_rate"] > summary["density"]
    model, masks, _ = load_sparse(tmp_path / "run" / "model")
    params = dict(model.named_parameters())
    assert all(not params[n][~m].any() for n, m in masks.items())


def test_gradient_accumulation_counts_real_optimizer_steps(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = run_config(tiny_config(tiny_data, out, train={"gradient_accumulation_steps": 2, "epochs": 2}))
    assert summary["total_steps"] == 2 * 3  # 6 batches per epoch, 2 per optimizer step
    updates = records(out, "topology_update")
    assert [r["sparsifier_step"] for r in updates] == [2, 4]  # ΔT counted in optimizer steps
    assert [r["step"] for r in records(out, "train")] == list(range(1, 7))
    _, _, meta = load_sparse(out / "model")
    assert meta["step"] == 6


# --------------------------------------------------------------------------- output folder
OTHER_NAMES = ["notes.txt", "config.yaml", ".itop_timm.lock", "model.bak", "metrics.jsonl.old"]


@settings(max_examples=40, deadline=None)
@given(
    present=st.dictionaries(
        st.sampled_from(
            ["metrics.jsonl", "summary.json", "model", "compacted", "best.safetensors", "plots"] + OTHER_NAMES
        ),
        st.sampled_from(["file", "empty file", "folder", "link"]),
    ),
    checkpoints=st.sampled_from(["none", "empty folder", "a checkpoint"]),
)
def test_previous_results_are_named_and_overwrite_removes_only_them(present, checkpoints):
    """Issue 27 class 2: what a fresh run would truncate or replace is named (a fresh run is refused);
    run.overwrite removes exactly that, never the user's other files."""
    import tempfile

    from itop_timm.training.output_folder import RESULT_NAMES, previous_results, remove_previous_results

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        out.mkdir()
        (Path(folder) / "target").mkdir()
        for name, kind in present.items():
            path = out / name
            if kind == "folder":
                path.mkdir()
            elif kind == "link":
                path.symlink_to(Path(folder) / "target")
            else:
                path.write_text("" if kind == "empty file" else "x")
        if checkpoints != "none":
            (out / "checkpoints" / "step_00000004").mkdir(parents=True)
        if checkpoints == "empty folder":
            (out / "checkpoints" / "step_00000004").rmdir()
        results = [
            n
            for n in RESULT_NAMES
            if n in present and not (n == "metrics.jsonl" and present[n] == "empty file")
        ]
        assert previous_results(out) == ["checkpoints"] * (checkpoints == "a checkpoint") + results
        remove_previous_results(out)
        assert previous_results(out) == []
        kept = {n for n in present if n not in RESULT_NAMES}
        assert {p.name for p in out.iterdir()} == kept
        assert (Path(folder) / "target").is_dir()  # a link is removed, not followed


def test_the_output_folder_is_locked_for_the_runs_lifetime(tiny_data, tmp_path):
    """Issue 27 class 3: a second run into a live run's folder is refused before it writes anything;
    a killed run's lock is not stale (the kernel drops a flock with its process)."""
    from itop_timm.training.output_folder import OutputBusyError, OutputLock

    out = tmp_path / "run"
    out.mkdir()
    lock = OutputLock(out)
    with pytest.raises(
        OutputBusyError, match=rf"is being written by another run \(pid {os.getpid()} on host "
    ):
        OutputLock(out)
    with pytest.raises(ValueError, match=rf"'{out}' is being written by another run \(pid {os.getpid()}"):
        run_config(tiny_config(tiny_data, out))
    assert sorted(p.name for p in out.iterdir()) == [".itop_timm.lock"]  # nothing else written
    lock.release()
    OutputLock(out).release()  # free again
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from itop_timm.training.output_folder import OutputLock; "
            f"OutputLock({str(out)!r}); print('locked', flush=True); time.sleep(60)",
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(OutputBusyError, match=f"pid {holder.pid} on host"):
            OutputLock(out)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait()
    OutputLock(out).release()  # the lock file stayed, the lock did not


# --------------------------------------------------------------------------- metrics log
METRICS = [{"event": "train", "step": step, "loss": 1.0 / step} for step in range(1, 6)]


@settings(max_examples=40, deadline=None)
@given(
    cut=st.integers(0, len(json.dumps(METRICS[-1])) - 1),
    junk=st.sampled_from(["", "\x00" * 7, "\ufffd"]),
    resume_step=st.integers(0, 5),
)
def test_resume_drops_and_reports_a_torn_last_metrics_record(cut, junk, resume_step):
    """Issue 27 class 13: a kill (or a full disk) mid-append leaves a torn last line; resuming keeps
    the whole records up to its step, warns about the torn one and appends after them."""
    import tempfile

    from itop_timm.training.reporting import MetricsLog, read_metrics

    torn = json.dumps(METRICS[-1])[:cut] + junk
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "metrics.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in METRICS[:-1]) + torn)
        warnings = []
        handler = logging.Handler()
        handler.emit = warnings.append
        logger = logging.getLogger("itop_timm.training.reporting")
        logger.addHandler(handler)
        try:
            log = MetricsLog(path, True, resume_step)
        finally:
            logger.removeHandler(handler)
        expected = f"{path}: dropped its torn last record (the run was stopped while writing it): "
        assert [w.getMessage() for w in warnings] == ([expected + repr(torn)] if torn else [])
        assert log.records() == [r for r in METRICS[:-1] if r["step"] <= resume_step]
        log.write({"event": "train", "step": resume_step + 1})
        assert read_metrics(path) == ([(json.dumps(r), r) for r in log.records()], None)


def test_a_broken_metrics_record_before_the_last_is_named_not_dropped(tmp_path):
    from itop_timm.training.reporting import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl' line 2 is not a JSON record: '{\"step\": 2, \"lo'"):
        MetricsLog(path, True, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'  # left for the user


# --------------------------------------------------------------------------- bad input
def assert_untouched(path: Path) -> None:
    assert not path.exists(), f"{path} was created by a run that should have failed first"


def test_unknown_model_suggests_timm_names(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg["model"]["name"] = "resnet181"
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet181'; did you mean \[.*'resnet18'"):
        run_config(cfg)
    assert_untouched(tmp_path / "run")


def test_sparse_compute_refuses_layers_its_kernels_cannot_compute_before_any_work(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", sparsity={"method": "set", "compute": "sparse"})
    cfg["model"]["name"] = "test_efficientnet"  # depthwise convolutions
    with pytest.raises(ValueError, match=r"compute='sparse'.*conv_dw\.weight \(grouped convolution"):
        run_config(cfg)
    assert_untouched(tmp_path / "run")
    cfg["train"]["mixed_precision"] = "bf16"
    with pytest.raises(ValueError, match="compute=sparse computes in fp32"):
        run_config(cfg)
    assert_untouched(tmp_path / "run")


def test_unknown_dataset_and_missing_path(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", data={"dataset": "no-such-org/no_such_dataset_xyz"})
    with pytest.raises(ValueError, match="unknown data set 'no-such-org/no_such_dataset_xyz'"):
        run_config(cfg)
    cfg = tiny_config(str(tmp_path / "missing"), tmp_path / "run", data={"dataset": "imagefolder"})
    with pytest.raises(ValueError, match="needs data.data_dir to be an existing folder"):
        run_config(cfg)
    cfg = tiny_config(tiny_data, tmp_path / "run", data={"test_split": "validation"})
    with pytest.raises(
        ValueError,
        match=r"data.test_split='validation' is not in data set 'disk'; available splits: \['train', 'test'\]",
    ):
        run_config(cfg)
    cfg = tiny_config(tiny_data, tmp_path / "run", sparsity={"method": "rgil"})
    with pytest.raises(ValueError, match="unknown method 'rgil'"):
        run_config(cfg)
    cfg = tiny_config(tiny_data, tmp_path / "run", train={"mixed_precision": "fp16"}, run={"cpu": True})
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        run_config(cfg)
    assert_untouched(tmp_path / "run")


def test_an_empty_evaluation_split_is_refused_not_reported_as_measured(tiny_data, tmp_path, monkeypatch):
    """Issue 27 class 7: no top-1 of 0.0 over "1 sample" in the summary and the model card."""
    for key in ("max_eval_samples", "max_train_samples"):
        cfg = tiny_config(tiny_data, tmp_path / "run", data={key: 0})
        with pytest.raises(ValueError, match=rf"^data.{key} must be an integer >= 1 or null, got 0$"):
            run_config(cfg)
    import datasets

    from itop_timm.training import data

    source = datasets.load_from_disk(tiny_data)  # a source with an empty split (a Hub data set may have one)
    empty = datasets.DatasetDict({"train": source["train"], "test": source["test"].select([])})
    monkeypatch.setattr(data, "_load_source", lambda cfg: empty)
    with pytest.raises(
        ValueError,
        match=r"the test split 'test' of data set 'disk' is empty; set data.test_split null to train "
        r"without a final test",
    ):
        run_config(tiny_config(tiny_data, tmp_path / "run"))
    with pytest.raises(ValueError, match=r"the val split 'test' of data set 'disk' is empty; set data.val"):
        run_config(tiny_config(tiny_data, tmp_path / "run", data={"val_split": "test", "test_split": None}))
    assert_untouched(tmp_path / "run")


def saved_with_label(source_dir: str, target: Path, split: str, row: int, label: int) -> str:
    """A copy of the saved data set at ``source_dir`` whose ``split`` has ``label`` at ``row``."""
    import datasets

    source = datasets.load_from_disk(source_dir)
    part = source[split]
    labels = list(part["label"])
    labels[row] = label
    feature = part.features["label"]
    source[split] = part.remove_columns("label").add_column("label", labels, feature=feature)
    source.save_to_disk(str(target))
    return str(target)


@pytest.mark.parametrize(
    "split, label, data, match",
    [
        (
            "test",
            -1,
            {},
            r"^the test split 'test' of data set 'disk' has 1 label\(s\) outside the model's classes in column "
            r"'label', the first -1 \(row 5\); allowed: integers in \[0, 4\): an unlabeled split cannot be "
            r"trained on or measured; set data.test_split null to train without a final test$",
        ),
        (
            "test",
            4,
            {},
            r"^the test split 'test' .* the first 4 \(row 5\); allowed: integers in \[0, 4\)$",
        ),
        (
            "train",
            4,
            {"val_fraction": 0.0},
            r"^the train split 'train' .* the first 4 \(row 5\); allowed: integers in \[0, 4\)$",
        ),
    ],
)
def test_labels_outside_the_classes_are_refused_before_any_work(
    tiny_data, tmp_path, split, label, data, match
):
    """Issue 27 class 12: an unlabeled (-1) or out-of-range label, named in preflight, not an
    IndexError after training."""
    bad = saved_with_label(tiny_data, tmp_path / "bad", split, 5, label)
    with pytest.raises(ValueError, match=match):
        run_config(tiny_config(bad, tmp_path / "run", data=data))
    assert_untouched(tmp_path / "run")


def test_more_model_classes_than_the_data_set_names_allow_their_labels(tiny_data, tmp_path):
    from itop_timm.training.data import check_labels, load_splits

    cfg = TrainConfig.from_dict(
        tiny_config(saved_with_label(tiny_data, tmp_path / "bad", "test", 5, 4), tmp_path)
    )
    splits = load_splits(cfg.data, seed=0)
    check_labels(splits, 5, cfg.data)  # model.num_classes 5: label 4 is a class of the model
    with pytest.raises(ValueError, match=r"the first 4 \(row 5\); allowed: integers in \[0, 4\)$"):
        check_labels(splits, 4, cfg.data)


def test_a_failing_test_evaluation_still_writes_the_trained_model_first(tiny_data, tmp_path, monkeypatch):
    """Issue 27 class 12: whatever fails in the test evaluation, the trained model is written first."""
    from itop_timm.training import loop

    def failing_evaluate(model, loader, accelerator):
        raise IndexError("Target -1 is out of bounds.")

    monkeypatch.setattr(loop, "evaluate", failing_evaluate)  # only the test evaluation (no val split)
    out = tmp_path / "run"
    with pytest.raises(IndexError, match="Target -1 is out of bounds"):
        run_config(
            tiny_config(
                tiny_data, out, data={"val_fraction": 0.0, "max_train_samples": 16}, train={"epochs": 1}
            )
        )
    model, masks, meta = load_sparse(out / "model")
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4) and masks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_error"] == "IndexError: 'Target -1 is out of bounds.'"
    assert "test_top1_last" not in summary and summary["total_steps"] == 2
    assert records(out, "summary")[-1]["test_error"] == summary["test_error"]


def test_unloadable_data_and_unwritable_output_are_named_before_any_work(tiny_data, tmp_path):
    """Issue 27 class 14: OSErrors from the data source and the output folder, as clear errors first."""
    import re

    not_saved = tmp_path / "not_saved"
    not_saved.mkdir()
    (not_saved / "notes.txt").write_text("not a data set")
    with pytest.raises(
        ValueError,
        match=r"data.dataset='disk': data.data_dir '.*not_saved' is not a data set saved with save_to_disk \(",
    ):
        run_config(tiny_config(str(not_saved), tmp_path / "run"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ValueError, match=r"data.dataset='imagefolder': data.data_dir '.*empty' is not a folder of images \("
    ):
        run_config(tiny_config(str(empty), tmp_path / "run", data={"dataset": "imagefolder"}))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for output, message in (
        (a_file, f"run.output_dir '{a_file}' cannot be a folder (it is a file)"),
        (a_file / "run", f"run.output_dir '{a_file / 'run'}' cannot be a folder: '{a_file}' is not a folder"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            run_config(tiny_config(tiny_data, output))
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "read_only"
        locked.mkdir(mode=0o555)
        with pytest.raises(
            ValueError, match=r"run.output_dir '.*read_only/run' is not writable by this user \(its parent"
        ):
            run_config(tiny_config(tiny_data, locked / "run"))
    assert_untouched(tmp_path / "run")


def test_bad_config_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown config key 'optim.learning_rate'.*valid keys: .*optim\.lr"
    ):
        load_config(None, ["--optim.learning_rate", "0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sparsity": {"densty": 0.1}}))
    with pytest.raises(
        ValueError,
        match=r"unknown key\(s\) \['sparsity.densty'\] \(sparsity.densty: did you mean sparsity.density\?\)",
    ):
        load_config(bad)
    with pytest.raises(ValueError, match="train.epochs must be an integer"):
        load_config(None, ["--train.epochs", "two"])
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--sparsity.densty", "0.1"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "unknown config key 'sparsity.densty'" in result.stderr


def alias_bomb(depth: int, width: int) -> str:
    """YAML of ``depth`` anchors, each a list of ``width`` aliases of the one before: ``width**depth``
    values from a few hundred bytes."""
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "{" + ", ".join(lines) + "}"


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 12), width=st.integers(1, 12), key=st.sampled_from(["sparsity", "model"]))
def test_yaml_aliases_are_bounded_and_errors_never_print_unbounded_values(depth, width, key):
    """Issue 27 class 10: a 452-byte alias bomb took 27 s and 2.5 GB and printed a 580 MB message."""
    option = {"sparsity": "--sparsity.method_options", "model": "--model.kwargs"}[key]
    text = alias_bomb(depth, width)
    sizes = [1 + width]  # values under anchor i, itself included
    for _ in range(1, depth):
        sizes.append(1 + width * sizes[-1])
    expanded = 1 + depth + sum(sizes)  # the mapping, its keys and every anchor's values
    try:
        load_config(None, ["--sparsity.method", "chase", option, text])
    except ValueError as err:
        assert len(str(err)) < 400, str(err)[:1000]
        if expanded > 100_000:
            assert "expands to more than 100000 values" in str(err)
    else:
        assert expanded <= 100_000


@pytest.mark.parametrize(
    "text", ["&a [*a]", "&a {k: *a}", "[" * 3000 + "]" * 3000], ids=["cycle", "mapping-cycle", "deep"]
)
def test_yaml_that_contains_itself_or_nests_too_deeply_is_refused(tmp_path, text):
    with pytest.raises(ValueError, match=r"^--model.kwargs: YAML (nested too deeply|that expands to more)"):
        load_config(None, ["--model.kwargs", text])
    config = tmp_path / "bomb.yaml"
    config.write_text(f"model:\n  kwargs: {alias_bomb(9, 9)}\n")
    with pytest.raises(ValueError, match=r"config file .*bomb.yaml'?: YAML that expands to more than"):
        load_config(config)


@pytest.mark.parametrize("key", ["train.seed", "sparsity.seed"])
def test_seeds_are_checked_with_the_config(key):
    """Issue 27 class 16: a seed a generator cannot take is refused when the config is read."""
    for bad in ("4294967296", "-1", "18446744073709551616"):
        with pytest.raises(ValueError, match=rf"seed must be an integer in \[0, 4294967295\], got {bad}$"):
            load_config(None, [f"--{key}", bad])
    assert load_config(None, [f"--{key}", str(2**32 - 1)]).to_dict()[key.split(".")[0]]["seed"] == 2**32 - 1


def test_the_largest_seed_seeds_the_per_sample_augmentation():
    import numpy as np
    from torchvision import transforms

    from itop_timm.training.loaders import ImageClassificationDataset

    rows = [{"image": np.arange(16, dtype=np.uint8).reshape(4, 4), "label": 1}]
    crop = transforms.Compose([transforms.RandomCrop(2), transforms.ToTensor()])
    data = ImageClassificationDataset(rows, "image", "label", crop, "L", seed=2**32 - 1)
    data.set_epoch(7)
    first, label = data[0]
    assert label == 1 and first.shape == (1, 2, 2) and torch.equal(data[0][0], first)


def test_mapping_options_take_sub_keys_merged_into_the_file(tmp_path):
    config = tmp_path / "chase.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sparsity": {
                    "method": "chase",
                    "method_options": {"channel_sparsity": 0.5, "removal_interval": 2},
                },
                "model": {"kwargs": {"drop_rate": 0.1}},
            }
        )
    )
    cfg = load_config(
        config, ["--sparsity.method_options.channel_sparsity", "0.3", "--model.kwargs.drop_path_rate=0.05"]
    )
    assert cfg.sparsity.method_options == {"channel_sparsity": 0.3, "removal_interval": 2}
    assert cfg.model.kwargs == {"drop_rate": 0.1, "drop_path_rate": 0.05}
    # the whole mapping still replaces the file's; later overrides win, sub-keys merge into earlier ones
    cfg = load_config(
        config, ["--model.kwargs.a.b", "1", "--model.kwargs", "{c: 2}", "--model.kwargs.a.d", "3"]
    )
    assert cfg.model.kwargs == {"c": 2, "a": {"d": 3}}
    assert load_config(
        None, ["--sparsity.method", "srigl", "--sparsity.method_options.gamma_sal", "0.3"]
    ).sparsity.method_options == {"gamma_sal": 0.3}  # into the default (no mapping yet)
    with pytest.raises(ValueError, match=r"--sparsity.density.x: sparsity.density is FLOAT, not a mapping"):
        load_config(config, ["--sparsity.density.x", "1"])
    with pytest.raises(ValueError, match=r"unknown config key 'sparsity.method_optionz.a' \(did you mean"):
        load_config(config, ["--sparsity.method_optionz.a", "1"])
    with pytest.raises(ValueError, match=r"method 'chase' does not take option\(s\) \['nope'\]"):
        load_config(config, ["--sparsity.method_options.nope", "1"])
    with pytest.raises(ValueError, match="model.kwargs.drop_rate is 0.1, not a mapping"):
        load_config(config, ["--model.kwargs.drop_rate.x", "1"])


@pytest.mark.parametrize(
    "text,message",
    [
        ("!!python/object/apply:os.system ['touch {marker}']\n", "not valid YAML"),
        ("model: !!python/name:os.system\n", "not valid YAML"),
        ("- model\n- data\n", "expected a mapping of sections .* got a list"),
        ("model: {name: [resnet18\n", "not valid YAML"),
        ("just text\n", "expected a mapping of sections .* got a str"),
    ],
)
def test_bad_yaml_config_gives_a_clean_error(tmp_path, text, message):
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("{marker}", str(marker)))
    with pytest.raises(ValueError, match=message):
        load_config(bad)
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--config", str(bad)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert str(bad) in result.stderr and not marker.exists()  # the payload never runs
    with pytest.raises(ValueError, match="--optim.lr: not valid YAML"):
        load_config(None, ["--optim.lr", "!!python/object/apply:os.system ['true']"])
    good = tmp_path / "good.yaml"  # the neighbour: an empty file and a plain mapping load
    good.write_text("")
    assert load_config(good).optim.lr == 0.1
    good.write_text("optim: {lr: 0.05}\n")
    assert load_config(good).optim.lr == 0.05


def test_resume_with_a_different_config_is_refused_and_nothing_is_overwritten(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_config(tiny_config(tiny_data, out, train={"epochs": 1}))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    different = tiny_config(
        tiny_data, out, train={"epochs": 1}, sparsity={"density": 0.2}, run={"resume": "latest"}
    )
    with pytest.raises(ValueError, match=r"different config:\n  sparsity.density: 0.3 -> 0.2"):
        run_config(different)
    fresh = tiny_config(tiny_data, out, train={"epochs": 1})
    with pytest.raises(ValueError, match="already holds the results of another run"):
        run_config(fresh)
    with pytest.raises(ValueError, match="no checkpoint in"):
        run_config(tiny_config(tiny_data, tmp_path / "other", run={"resume": "latest"}))
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after
    # issue 27 class 2: without its checkpoints, the finished run's results are still refused
    shutil.rmtree(out / "checkpoints")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError,
        match=r"already holds the results of another run \(metrics.jsonl, summary.json, model, best.safetensors, plots\): "
        r"pass "
        r"--run.output_dir to start elsewhere, or --run.overwrite true to replace them",
    ):
        run_config(fresh)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_help_lists_config_keys():
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--help"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0
    assert "--sparsity.density" in result.stdout and "accelerate launch" in result.stdout
    assert itop_timm.__version__


def test_every_shipped_config_is_valid():
    configs = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    assert len(configs) >= 8
    for path in configs:
        cfg = load_config(path)
        assert cfg.model.name and cfg.run.output_dir.startswith("runs/")


def test_weight_averaging_in_the_recipe(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_data,
        out,
        averaging={"enabled": True, "period_epochs": 1.0, "last_fraction": 0.5, "bn_update_batches": 2},
    )
    run_config(cfg)
    events = records(out, "averaging")
    assert [e["step"] for e in events] == [6, 12] and all(
        e["samples"] == 3 and e["bn_batches"] == 2 for e in events
    )
    bad = tiny_config(tiny_data, tmp_path / "bad", averaging={"enabled": True, "sample_prob": 0.0})
    with pytest.raises(ValueError, match=r"averaging.sample_prob must be in \(0, 1\]"):
        run_config(bad)


def test_rmda_in_the_recipe_logs_structured_sparsity_and_compacts(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_data,
        out,
        optim={
            "opt": "rmda",
            "lr": 0.5,
            "momentum": 1.0,  # c = 1: the iterate is the (exactly sparse) prox point
            "weight_decay": 0.0,
            "kwargs": {"weight_lambda": 0.05, "regularizer": "coupled"},
        },
        sparsity={"method": "dense"},
        sched={"milestones": [0.75]},
    )
    run_config(cfg)
    train = records(out, "train")
    assert all({"zero_groups", "zero_groups_weighted", "groups"} <= set(r) for r in train)
    assert train[-1]["zero_groups"] > 0  # a strong lambda zeroes whole coupled channel groups
    assert [r["lr"] for r in train][7:10] == [
        pytest.approx(0.5),
        pytest.approx(0.5),
        pytest.approx(0.05),
    ]  # the stage-2 lr after the milestone, step 9: steps 8 and 9 trained with 0.5, step 10 with 0.05
    # the zeroed groups come out for real
    from itop_timm import cli

    assert cli.main(["compact", str(out / "model"), str(tmp_path / "small")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_after"] < report["params_before"]
    big, _, _ = load_sparse(out / "model")
    small, _, meta = load_sparse(tmp_path / "small")
    assert "structured" in meta
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(big(x), small(x), atol=1e-5)
    bad = tiny_config(tiny_data, tmp_path / "bad", optim={"opt": "rmda", "weight_decay": 5e-4})
    with pytest.raises(ValueError, match="takes no weight decay"):
        run_config(bad)


def test_tensorboard_tracker_writes_events(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_config(tiny_config(tiny_data, out, train={"epochs": 1}, run={"tensorboard": True}))
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_model_arguments_and_sparse_patterns_are_checked_first(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", model={"kwargs": {"no_such_argument": 3}})
    with pytest.raises(ValueError, match="timm cannot build 'test_resnet'"):
        run_config(cfg)
    cfg = tiny_config(tiny_data, tmp_path / "run", sparsity={"include": ["nothing.*"]})
    with pytest.raises(
        ValueError, match=r"no sparse tensor in test_resnet matches sparsity.include=\['nothing.\*'\]"
    ):
        run_config(cfg)
    assert_untouched(tmp_path / "run")


# ------------------------------------------------------------------- structured DST (chase)
def test_recipe_trains_chase_from_cli_options_and_writes_the_compacted_model(
    tiny_data, tmp_path, monkeypatch
):
    import itop_timm.methods.chase as chase
    from itop_timm.training.config import parse_overrides

    traces = []
    real = chase.removable_units
    monkeypatch.setattr(chase, "removable_units", lambda *a, **k: traces.append(1) or real(*a, **k))

    overrides = parse_overrides(
        [
            "--sparsity.method",
            "chase",
            "--sparsity.method_options",
            "{channel_sparsity: 0.5, removal_interval: 2}",
        ]
    )
    cfg = tiny_config(tiny_data, tmp_path / "run", sparsity=overrides["sparsity"])
    summary = run_config(cfg)
    assert len(traces) == 1  # preflight's architecture check traced the model; the run reused it
    removals = records(tmp_path / "run", "restrict")  # channel removals reach the update hooks
    assert removals and all(r["removed"] > 0 for r in removals)
    assert summary["compacted"]["channels_removed_total"] > 0 and summary["compacted"]["params_ratio"] < 1
    assert summary["compacted"]["max_abs_output_change"] < 1e-4
    sparse, _, meta = load_sparse(tmp_path / "run" / "model")
    compacted, _, _ = load_sparse(tmp_path / "run" / "compacted")
    assert meta["sparsity_config"]["method_options"]["channel_sparsity"] == 0.5
    assert sum(p.numel() for p in compacted.parameters()) < sum(p.numel() for p in sparse.parameters())
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(sparse.eval()(x), compacted.eval()(x), atol=1e-4)


def test_recipe_refuses_chase_without_a_topology_update_after_its_removals_before_writing(
    tiny_data, tmp_path
):
    """Issue 27 class 6: removed channels' weights are regrown by a later update, so a run needs one."""
    cfg = tiny_config(tiny_data, tmp_path / "run", sparsity={"method": "chase", "update_interval": 12})
    with pytest.raises(
        ValueError,
        match=r"chase: channel removal needs a later topology update .* \(update_interval=12, total_steps=12, "
        r"stop_step=None\)",
    ):
        run_config(cfg)  # 48 training samples, batch 8, 2 epochs: 12 steps, no update before the end
    assert_untouched(tmp_path / "run")


def test_recipe_refuses_chase_on_a_model_without_removable_channels_before_writing(tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_data, tmp_path / "run", model={"name": "regnetx_002"}, sparsity={"method": "chase"}
    )
    with pytest.raises(
        ValueError, match=r"chase: RegNet has no removable channel group .*grouped convolution"
    ):
        run_config(cfg)
    assert not (tmp_path / "run").exists()
