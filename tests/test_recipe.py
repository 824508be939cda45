"""The training recipe end to end: tiny real runs, 2 processes under accelerate launch, kill-and-resume,
bf16, gradient accumulation, and bad input caught before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_disk_dataset, make_image_folder, write_idx, write_plugin

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


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    return make_disk_dataset(tmp_path_factory.mktemp("data"), n_train=64, n_test=32)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


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


# 3: the checkpoint at step 8 falls between two log lines (the harder case, in the default suite);
# 1 (every step logged) is -m slow: 77 s on the CI machine.
@pytest.mark.parametrize("log_interval", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_kill_and_resume_matches_uninterrupted_run(tiny_data, tmp_path, log_interval):
    cfg = tiny_config(
        tiny_data,
        tmp_path / "whole",
        train={"epochs": 3},
        sparsity={"method": "set"},
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


# --------------------------------------------------------------------------- bad input
def assert_untouched(path: Path) -> None:
    assert not path.exists(), f"{path} was created by a run that should have failed first"


def test_unknown_model_suggests_timm_names(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg["model"]["name"] = "resnet181"
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet181'; did you mean \[.*'resnet18'"):
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
    with pytest.raises(ValueError, match="already holds checkpoints of another run"):
        run_config(fresh)
    with pytest.raises(ValueError, match="no checkpoint in"):
        run_config(tiny_config(tiny_data, tmp_path / "other", run={"resume": "latest"}))
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


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
        pytest.approx(0.05),
        pytest.approx(0.05),
    ]  # stage 2 at step 9
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


def test_recipe_refuses_chase_on_a_model_without_removable_channels_before_writing(tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_data, tmp_path / "run", model={"name": "regnetx_002"}, sparsity={"method": "chase"}
    )
    with pytest.raises(
        ValueError, match=r"chase: RegNet has no removable channel group .*grouped convolution"
    ):
        run_config(cfg)
    assert not (tmp_path / "run").exists()
