"""Plugins: a third-party method registered by a module named in ``run.plugins`` or by an installed
package's ``itop_timm.plugins`` entry point reaches the recipe's config, its defaults included, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_plugin

import itop_timm
from itop_timm.plugins import load_plugins
from itop_timm.registry import METHODS
from itop_timm.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


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


def test_cli_lists_an_installed_plugins_method(tmp_path):
    write_entry_point_package(tmp_path, "itop_test_plugin_cli", "cli_plugin_method")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = subprocess.run(
        [sys.executable, "-m", "itop_timm.cli", "methods"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "cli_plugin_method" in out.stdout and "a test plugin's method" in out.stdout
