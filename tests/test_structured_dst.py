"""Channel-level dynamic sparse training: structure rules (Chase, SRigL), method_options, the rule-aware
topology update, compaction of Chase's removed channels and SRigL's condensed linear layers."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from helpers import train_steps
from torch import nn

import itop_timm
from itop_timm.structured import CondensedLinear, compact, condense
from itop_timm.structured.dependency import removable_units
from itop_timm.topology import LayerPlan, next_layer_mask

SIZE = (1, 16, 16)


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


CHASE = {
    "channel_sparsity": 0.5,
    "removal_interval": 4,
    "removal_end_fraction": 0.75,
    "input_size": list(SIZE),
}


def chase_sparsify(model: nn.Module, opt: torch.optim.Optimizer, options: dict, **kwargs):
    return itop_timm.sparsify(
        model,
        opt,
        method="chase",
        density=0.2,
        update_interval=2,
        total_steps=24,
        method_options={**CHASE, **options},
        **kwargs,
    )


def resumed_run(start, restart, steps: int, resume_at: int | None):
    """Train ``steps`` steps from ``start(model, opt)``; with ``resume_at``, stop there and continue in a
    fresh model whose sparsifier ``restart(model, opt)`` builds and the saved state restores."""
    model = resnet()
    opt = sgd(model)
    sp = start(model, opt)
    if resume_at is None:
        train_steps(model, opt, steps, input_size=SIZE)
        return model, sp
    train_steps(model, opt, resume_at, input_size=SIZE)
    state, model_state, opt_state = sp.state_dict(), model.state_dict(), opt.state_dict()
    fresh = resnet(seed=1)
    fresh_opt = sgd(fresh)
    sp2 = restart(fresh, fresh_opt)
    fresh.load_state_dict(model_state)
    fresh_opt.load_state_dict(opt_state)
    sp2.load_state_dict(state)
    g = torch.Generator().manual_seed(0)  # the data the uninterrupted run saw after resume_at
    for _ in range(resume_at):
        torch.randn(4, *SIZE, generator=g), torch.randint(0, 10, (4,), generator=g)
    fresh.train()
    for _ in range(steps - resume_at):
        x, y = torch.randn(4, *SIZE, generator=g), torch.randint(0, 10, (4,), generator=g)
        fresh_opt.zero_grad()
        nn.functional.cross_entropy(fresh(x), y).backward()
        fresh_opt.step()
    return fresh, sp2


def chase_run(steps: int = 24, resume_at: int | None = None, **options):
    def start(model, opt):
        return chase_sparsify(model, opt, options)

    return resumed_run(start, start, steps, resume_at)


# ---------------------------------------------------------------------------------- the update
def test_a_plan_keeps_weights_inside_allowed_and_reaches_its_count():
    torch.manual_seed(0)
    mask = torch.rand(8, 10) < 0.3
    allowed = torch.ones(8, 1, dtype=torch.bool)
    allowed[:3] = False
    weight, grad = torch.randn(8, 10), torch.randn(8, 10)
    result = next_layer_mask(
        mask, 0.3, lambda m: weight.abs(), lambda m: grad.abs(), LayerPlan(allowed=allowed, count=20)
    )
    new, dropped, grown = result
    assert not new[:3].any() and int(new.sum()) == 20
    assert int(mask.sum()) - dropped == int(new.sum()) - grown  # both: the weights kept


def test_a_row_plan_gives_every_allowed_row_exactly_k():
    torch.manual_seed(1)
    mask = torch.rand(6, 12) < 0.5
    alive = torch.tensor([True, True, False, True, True, True]).view(6, 1)
    new, _, _ = next_layer_mask(
        mask, 0.4, lambda m: torch.rand(6, 12), lambda m: torch.rand(6, 12), LayerPlan(allowed=alive, row_k=3)
    )
    assert new.sum(1).tolist() == [3, 3, 0, 3, 3, 3]


# --------------------------------------------------------------------------------------- Chase
def test_chase_removes_channels_on_its_schedule_and_keeps_the_budget():
    model, sp = chase_run()
    rule = sp.structure
    total = sum(u.num_channels for u in rule.units)
    alive = sum(int(a.sum()) for a in rule.alive.values())
    assert alive == math.ceil(total * (1 - 0.5))  # S_c reached at T_c = 18 (floors are lower here)
    assert abs(sp.density - 0.2) < 0.01  # the lost weights were regrown elsewhere
    for unit in rule.units:  # no weight in a removed channel's rows or in the columns reading it
        dead = ~rule.alive[unit.name]
        for param, index, channel in unit.rows:
            assert not sp.masks[param][index[dead[channel]]].any()
        for param, index, channel in unit.cols:
            assert not sp.masks[param][:, index[dead[channel]]].any()
    assert sp.last_update["structure"] == {"channels_alive": alive, "channels_removable": total}


def test_chase_layer_ranking_removes_the_same_fraction_from_every_group():
    _, sp = chase_run(ranking="layer")
    for unit in sp.structure.units:
        assert int(sp.structure.alive[unit.name].sum()) == math.ceil(unit.num_channels * 0.5), unit.name


def test_chase_schedule_is_cubic():
    _, sp = chase_run(steps=0)
    rule = sp.structure
    assert sorted(rule._removal_steps) == [3, 7, 11, 15, 18]  # j*4 - ΔT/2 up to T_c = 0.75*24, and T_c
    assert rule.removed_fraction(18) == pytest.approx(0.5)
    assert rule.removed_fraction(9) == pytest.approx(0.5 * (1 - 0.5**3))


def test_chase_model_compacts_to_the_same_outputs():
    model, sp = chase_run()
    model.eval()
    x = torch.randn(3, *SIZE)
    ref = model(x)
    removed = sum(int((~a).sum()) for a in sp.structure.alive.values())
    _, report = compact(model, torch.zeros(1, *SIZE), masks=sp.masks)
    assert report["channels_removed_total"] >= removed and report["params_ratio"] < 0.9
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_chase_resumes_exactly_from_its_state_dict():
    whole, sp_a = chase_run()
    resumed, sp_b = chase_run(resume_at=10)
    assert all(torch.equal(sp_a.structure.alive[n], sp_b.structure.alive[n]) for n in sp_a.structure.alive)
    assert all(torch.equal(sp_a.masks[n], sp_b.masks[n]) for n in sp_a.masks)


def test_chase_channel_removal_reaches_update_hooks_through_restrict():
    model = resnet()
    opt = sgd(model)
    sp = chase_sparsify(model, opt, {})
    seen = []
    sp.register_update_hook(lambda s, stats: seen.append(stats))
    train_steps(model, opt, 24, input_size=SIZE)
    removals = [stats for stats in seen if stats.get("event") == "restrict"]
    assert removals, "channel removals must notify the update hooks"
    assert all(
        r["removed"] > 0 and r["structure"]["channels_alive"] < r["structure"]["channels_removable"]
        for r in removals
    )
    assert {r["step"] for r in removals} <= {3, 7, 11, 15, 18}  # j·4 − ΔT/2 and T_c = 18
    last = max(removals, key=lambda r: r["step"])
    assert last["structure"]["channels_alive"] == seen[-1]["structure"]["channels_alive"]


@pytest.mark.parametrize(
    "schedule, last_update",
    [
        ({"update_interval": 2, "stop_step": 9}, 8),  # T_c = 0.75 · 24 = 18 capped at the update at 8
        ({"update_interval": 12}, 12),  # ΔT half the run: one update, at 12
    ],
)
def test_chase_removal_ends_by_the_last_update_and_the_run_ends_at_its_density(schedule, last_update):
    model = resnet()
    opt = sgd(model)
    sp = itop_timm.sparsify(
        model, opt, method="chase", density=0.2, total_steps=24, method_options=CHASE, **schedule
    )
    budget = sum(int(m.sum()) for m in sp.masks.values())
    seen = []
    sp.register_update_hook(lambda s, stats: seen.append((stats["step"], stats.get("event", "update"))))
    train_steps(model, opt, 24, input_size=SIZE)
    removals = [step for step, event in seen if event == "restrict"]
    updates = [step for step, event in seen if event == "update"]
    assert max(updates) == last_update and max(removals) == last_update
    assert seen[-2:] == [
        (last_update, "restrict"),
        (last_update, "update"),
    ]  # the last removal, then regrowth
    rule = sp.structure
    total = sum(u.num_channels for u in rule.units)
    assert sum(int(a.sum()) for a in rule.alive.values()) == math.ceil(total * (1 - 0.5))  # S_c reached
    assert sum(int(m.sum()) for m in sp.masks.values()) == budget  # the weights lost were all regrown


def test_chase_refuses_a_run_without_a_topology_update_to_regrow_the_removed_weights():
    model = resnet()
    opt = sgd(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"chase: channel removal needs a later topology update .* \(update_interval=24, total_steps=24, "
        r"stop_step=None\); allowed: an update_interval below total_steps",
    ):
        itop_timm.sparsify(
            model, opt, method="chase", density=0.2, update_interval=24, total_steps=24, method_options=CHASE
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    static = {**CHASE, "channel_sparsity": 0.0}  # nothing to regrow: allowed
    itop_timm.sparsify(
        model, opt, method="chase", density=0.2, update_interval=24, total_steps=24, method_options=static
    )


def test_chase_rule_is_built_and_the_model_traced_once_per_config(monkeypatch):
    import itop_timm.methods.chase as chase

    traces = []
    real = chase.removable_units
    monkeypatch.setattr(chase, "removable_units", lambda *a, **k: traces.append(1) or real(*a, **k))
    config = itop_timm.SparsityConfig(
        method="chase", density=0.2, update_interval=2, total_steps=24, method_options=CHASE
    ).resolved()
    assert config.structure_rule() is config.structure_rule()
    first, second = resnet(), resnet()
    sp1 = itop_timm.sparsify(first, sgd(first), config)
    sp2 = itop_timm.sparsify(second, sgd(second), config)
    assert len(traces) == 1
    assert sp1.structure is not sp2.structure and sp1.structure.alive is not sp2.structure.alive
    train_steps(first, sp1.optimizer, 8, input_size=SIZE)  # the first run's removals stay its own
    assert sum(int(a.sum()) for a in sp2.structure.alive.values()) > sum(
        int(a.sum()) for a in sp1.structure.alive.values()
    )


@pytest.mark.parametrize("method,options", [("chase", CHASE), ("srigl", {"gamma_sal": 0.3})])
def test_structured_run_started_from_given_masks_resumes_exactly(method, options):
    g = torch.Generator().manual_seed(5)
    shapes = itop_timm.sparse_parameter_shapes(resnet())
    given = {name: torch.rand(shape, generator=g) < 0.3 for name, shape in shapes.items()}
    settings = {"method": method, "update_interval": 2, "total_steps": 24, "method_options": options}

    def start(model, opt):
        return itop_timm.sparsify(model, opt, masks=given, **settings)

    def restart(model, opt):  # as a resumed recipe run: the config's density, then the saved state
        return itop_timm.sparsify(model, opt, density=0.2, **settings)

    model_a, sp_a = resumed_run(start, restart, 24, None)
    model_b, sp_b = resumed_run(start, restart, 24, 10)
    for name, mask in sp_a.masks.items():
        assert torch.equal(sp_b.masks[name], mask), name
    assert sp_b.density == sp_a.density
    for key, value in model_a.state_dict().items():
        assert torch.equal(model_b.state_dict()[key], value), key


def test_chase_units_cover_common_architectures():
    for name, expected in (
        ("test_resnet", 5),
        ("test_convnext", 9),
        ("test_efficientnet", 10),
        ("test_vit", 6),
    ):
        model = timm.create_model(name, num_classes=10)
        shapes = itop_timm.sparse_parameter_shapes(model)
        units, skipped = removable_units(
            model, set(shapes), (3, *((32, 32) if name != "test_vit" else (160, 160)))
        )
        assert len(units) == expected, (name, skipped)
        assert all("stem" in why or "producer" in why or "exact" in why for why in skipped.values())


@pytest.mark.parametrize(
    "options, match",
    [
        ({"channel_sparsity": 1.0}, r"channel_sparsity must be in \[0, 1\), got 1.0"),
        ({"channel_sparsity": -0.1}, r"channel_sparsity must be in \[0, 1\)"),
        ({"min_channel_ratio": "a"}, r"min_channel_ratio must be in \[0, 1\], got 'a'"),
        ({"removal_interval": 0}, r"removal_interval must be an integer >= 1"),
        ({"ranking": "random"}, r"ranking must be 'global' or 'layer', got 'random'"),
        ({"gamma_sal": 0.3}, r"does not take option\(s\) \['gamma_sal'\]; allowed: \['channel_sparsity'"),
    ],
)
def test_chase_bad_options_are_refused_before_the_model_is_touched(options, match):
    model = resnet()
    opt = sgd(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        itop_timm.sparsify(model, opt, method="chase", density=0.2, total_steps=24, method_options=options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt._optimizer_step_post_hooks


def test_chase_refuses_an_architecture_without_removable_channels():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.Flatten(), nn.LayerNorm(8 * 14 * 14), nn.Linear(8 * 14 * 14, 10)
    )
    with pytest.raises(
        ValueError, match=r"chase: Sequential has no removable channel group .*0: removal is not exact"
    ):
        itop_timm.sparsify(
            model,
            sgd(model),
            method="chase",
            density=0.5,
            total_steps=10,
            method_options={"input_size": list(SIZE)},
        )


def test_unstructured_methods_take_no_method_options():
    model = resnet()
    with pytest.raises(
        ValueError, match=r"method 'rigl' takes no method_options, got \['channel_sparsity'\]"
    ):
        itop_timm.sparsify(
            model, sgd(model), method="rigl", total_steps=10, method_options={"channel_sparsity": 0.3}
        )


# --------------------------------------------------------------------------------------- SRigL
def test_srigl_keeps_constant_fan_in_and_never_ablates_the_classifier():
    model = resnet()
    opt = sgd(model)
    sp = itop_timm.sparsify(
        model,
        opt,
        method="srigl",
        density=0.2,
        update_interval=2,
        total_steps=20,
        method_options={"gamma_sal": 1.0},
    )
    train_steps(model, opt, 14, input_size=SIZE)
    assert sp.last_update["step"] == 14 and sp.last_update["structure"]["ablated_rows"] > 0
    for name, mask in sp.masks.items():
        per_row = mask.reshape(mask.shape[0], -1).sum(1)
        assert per_row[per_row > 0].unique().numel() == 1, name  # every alive row holds the same k
    assert bool((sp.masks["fc.weight"].sum(1) > 0).all())
    assert not sp.update_due(16)  # t_end_fraction 0.75: no update after step 15


@pytest.mark.parametrize("gamma", [0, 1.5, True])
def test_srigl_gamma_sal_outside_its_range_is_refused(gamma):
    model = resnet()
    with pytest.raises(ValueError, match=r"srigl: gamma_sal must be in \(0, 1\]"):
        itop_timm.sparsify(
            model, sgd(model), method="srigl", total_steps=10, method_options={"gamma_sal": gamma}
        )


def test_condensed_vit_gives_the_masked_models_outputs():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=32, in_chans=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = itop_timm.sparsify(
        model,
        opt,
        method="srigl",
        density=0.1,
        update_interval=2,
        total_steps=12,
        method_options={"gamma_sal": 0.95},
    )
    train_steps(model, opt, 12, input_size=(1, 32, 32))
    model.eval()
    x = torch.randn(2, 1, 32, 32)
    ref = model(x)
    _, report = condense(model, sp.masks)
    assert "blocks.0.mlp.fc1" in report["condensed"] and isinstance(model.blocks[0].mlp.fc1, CondensedLinear)
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_condense_refuses_rows_of_different_fan_in():
    layer = nn.Linear(6, 4)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, :2] = mask[1, :3] = True
    with pytest.raises(ValueError, match=r"blocks.1.fc: rows hold \[2, 3\] weights"):
        CondensedLinear.from_linear(layer, mask, "blocks.1.fc")
    _, report = condense(nn.Sequential(layer), {"0.weight": mask})
    assert report["condensed"] == [] and "rows hold" in report["skipped"]["0"]
