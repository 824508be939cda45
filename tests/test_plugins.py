"""Plugins: a third-party method registered by a module named in ``run.plugins`` or by an installed
package's ``itop_timm.plugins`` entry point reaches the recipe's config, its defaults included, the
recipe's command line and timm's optimizer names (the ``itop-timm`` commands: ``test_cli.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm.optim
import torch
from helpers import write_plugin

import itop_timm
from itop_timm import MethodInfo, register_method
from itop_timm.methods import magnitude_score, random_score
from itop_timm.plugins import load_plugins
from itop_timm.registry import METHODS
from itop_timm.timm_optimizers import parse_sparse_optimizer_name
from itop_timm.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train.py"


def write_entry_point_package(site: Path, module: str, method: str) -> None:
    """An installed distribution (a dist-info folder on sys.path) with an ``itop_timm.plugins`` entry point."""
    write_plugin(site, module, method)
    info = site / "itop_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: itop-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[itop_timm.plugins]\nfake = {module}\n")


@pytest.fixture
def unregister():
    names: list[str] = []
    yield names
    for name in names:
        METHODS.unregister(name)


def test_run_plugins_register_a_method_whose_defaults_reach_the_config(tmp_path, monkeypatch, unregister):
    write_plugin(tmp_path, "itop_test_plugin_a", "every7")
    monkeypatch.syspath_prepend(str(tmp_path))
    unregister.append("every7")
    assert "every7" not in itop_timm.list_methods()
    cfg = TrainConfig.from_dict(
        {"sparsity": {"method": "every7"}, "run": {"plugins": ["itop_test_plugin_a"]}}
    )
    resolved = cfg.sparsity.for_run(total_steps=100, seed=3)
    # unset keys: the method's defaults first, then the library's; the seed from train.seed
    assert (resolved.update_interval, resolved.prune_rate) == (7, 0.25)
    assert resolved.distribution == itop_timm.SPARSIFY_DEFAULTS["distribution"] and resolved.seed == 3
    # a value the user sets wins over the method's default
    cfg = TrainConfig.from_dict(
        {"sparsity": {"method": "every7", "update_interval": 9}, "run": {"plugins": ["itop_test_plugin_a"]}}
    )
    assert cfg.sparsity.for_run(total_steps=100, seed=0).update_interval == 9


def test_unknown_method_and_bad_plugin_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'nope'; allowed: .*rigl"):
        TrainConfig.from_dict({"sparsity": {"method": "nope"}})
    with pytest.raises(ValueError, match=r"run.plugins: cannot import plugin module 'no_such_plugin_xyz'"):
        TrainConfig.from_dict({"run": {"plugins": ["no_such_plugin_xyz"]}})
    with pytest.raises(ValueError, match=r"run.plugins\[0\] must be a string"):
        TrainConfig.from_dict({"run": {"plugins": [3]}})


def test_installed_entry_point_plugin_is_loaded(tmp_path, monkeypatch, unregister):
    write_entry_point_package(tmp_path, "itop_test_plugin_ep", "from_entry_point")
    monkeypatch.syspath_prepend(str(tmp_path))
    unregister.append("from_entry_point")
    assert "itop_test_plugin_ep" in load_plugins()
    assert "from_entry_point" in itop_timm.list_methods()
    load_plugins()  # loading again is a no-op, not a second registration
    cfg = TrainConfig.from_dict({"sparsity": {"method": "from_entry_point"}})
    assert cfg.sparsity.for_run(total_steps=10, seed=0).update_interval == 7


def test_the_recipe_entry_loads_installed_plugins(tmp_path):
    write_entry_point_package(tmp_path, "itop_test_plugin_recipe", "recipe_ep_method")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = subprocess.run(
        [sys.executable, str(RECIPE), "--print-config", "--sparsity.method", "recipe_ep_method"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "method: recipe_ep_method" in out.stdout


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_a_method_registered_after_import_gets_its_timm_optimizer_names(tmp_path, monkeypatch, unregister):
    # bug: the names were made once, on `import itop_timm`, before any plugin had registered its method
    write_plugin(tmp_path, "itop_test_plugin_late", "late7")
    monkeypatch.syspath_prepend(str(tmp_path))
    unregister.append("late7")
    assert not timm.optim.list_optimizers("late7_*")
    load_plugins(["itop_test_plugin_late"], installed=False)
    assert timm.optim.list_optimizers("late7_*") == [
        "late7_adamw",
        "late7_lamb",
        "late7_lion",
        "late7_momentum",
        "late7_sgd",
    ]
    assert timm.optim.get_optimizer_info("late7_adamw").has_betas
    optimizer = timm.optim.create_optimizer_v2(
        small_model(), "late7_sgd", lr=0.1, density=0.5, total_steps=10
    )
    assert optimizer.sparsifier.config.method == "late7" and optimizer.sparsifier.config.update_interval == 7
    unregister.append("late_direct")  # and a method registered in code, not by a plugin
    register_method(MethodInfo("late_direct", magnitude_score, random_score, "registered after import"))
    assert "late_direct_lamb" in timm.optim.list_optimizers()


def test_a_sparse_optimizer_name_takes_the_longest_registered_method(unregister):
    # bug: `noisy_rigl_sgd` was split at its first `_` and fell through to timm's SGD ("unexpected
    # keyword argument 'density'")
    unregister.append("noisy_rigl")
    register_method(MethodInfo("noisy_rigl", magnitude_score, random_score, "a method with a '_'"))
    assert parse_sparse_optimizer_name("noisy_rigl_sgd") == ("noisy_rigl", "sgd")
    optimizer = timm.optim.create_optimizer_v2(
        small_model(), "noisy_rigl_sgd", lr=0.1, density=0.5, total_steps=10
    )
    assert type(optimizer).__name__ == "SGD" and optimizer.sparsifier.config.method == "noisy_rigl"
    unregister.append("noisy")  # a shorter method that is also a prefix: the longer name wins
    register_method(MethodInfo("noisy", magnitude_score, random_score, "a prefix of noisy_rigl"))
    assert parse_sparse_optimizer_name("noisy_rigl_adamw") == ("noisy_rigl", "adamw")
    assert parse_sparse_optimizer_name("noisy_adamw") == ("noisy", "adamw")
    assert parse_sparse_optimizer_name("rigl_sgd") == ("rigl", "sgd")
    assert parse_sparse_optimizer_name("noisy_") is None and parse_sparse_optimizer_name("sgd") is None


@pytest.mark.parametrize(
    "which,score,got",
    [
        ("drop", lambda layer: layer.weight.abs().reshape(-1), r"shape \(256,\)"),
        ("grow", lambda layer: layer.weight.abs()[:, :1], r"shape \(16, 1\)"),
        ("grow", lambda layer: 0.5, "0.5"),
    ],
)
def test_a_score_of_the_wrong_shape_names_the_method_and_the_layer(which, score, got, unregister):
    """Issue 27 class 15: not a raw IndexError from deep inside the topology update."""
    from helpers import train_steps

    unregister.append("misshapen")
    scores = {"drop_score": magnitude_score, "grow_score": random_score, f"{which}_score": score}
    register_method(MethodInfo("misshapen", description="a plugin's buggy score", **scores))
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    itop_timm.sparsify(model, optimizer, method="misshapen", density=0.5, update_interval=1, total_steps=5)
    message = (
        rf"^method 'misshapen': its {which} score for layer '0.weight' must be a tensor shaped like "
        rf"the weight, \(16, 16\), got {got}$"
    )
    with pytest.raises(ValueError, match=message):
        train_steps(model, optimizer, 1, input_size=(16,), num_classes=4)
