"""RMDA / ProxSGD and their proximal operators (REFERENCE §2)."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import timm.optim
import torch
from torch import nn

import itop_timm  # noqa: F401 - registers rmda/proxsgd with timm
from itop_timm.structured import L1, RMDA, GroupLasso, ProxSGD, RMDAStages, group_sparsity


def candidates_of(tensors):
    return {id(t): t for t in tensors}


# --------------------------------------------------------------------------- prox closed forms
def test_group_lasso_prox_matches_closed_form_per_input_channel():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4, 3, 3))
    reg = GroupLasso.per_parameter([("w", w)], axis="in")
    cand = w.detach().clone()
    reg.prox_({id(w): cand}, {id(w): 0.4})
    for i in range(4):
        g = w.detach()[:, i]
        tau = 0.4 * math.sqrt(g.numel())
        expected = max(0.0, 1 - tau / float(g.norm())) * g
        assert torch.allclose(cand[:, i], expected, atol=1e-6)


def test_group_lasso_prox_per_filter_zeroes_small_groups_exactly():
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]))
    reg = GroupLasso.per_parameter([("w", w)], axis="out")
    cand = w.detach().clone()
    reg.prox_({id(w): cand}, {id(w): 1.0 / math.sqrt(2)})  # tau = 1 per group of 2
    assert torch.allclose(cand[0], torch.tensor([3.0, 4.0]) * (1 - 1 / 5))
    assert torch.equal(cand[1], torch.zeros(2)) and torch.equal(cand[2], torch.zeros(2))


def test_l1_prox_is_soft_threshold_and_skips_1d():
    w = nn.Parameter(torch.tensor([[1.5, -0.2], [-3.0, 0.5]]))
    b = nn.Parameter(torch.tensor([0.1, -0.1]))
    reg = L1([("w", w), ("b", b)])
    assert reg.parameters() == [w]
    cw, cb = w.detach().clone(), b.detach().clone()
    reg.prox_({id(w): cw, id(b): cb}, {id(w): 0.5, id(b): 0.5})
    assert torch.allclose(cw, torch.tensor([[1.0, 0.0], [-2.5, 0.0]]))
    assert torch.equal(cb, b.detach())


def test_group_sparsity_metric():
    w = nn.Parameter(torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))  # in-groups: 1 nonzero, 2 zero
    v = nn.Parameter(torch.zeros(4, 1))
    reg = GroupLasso.per_parameter([("w", w), ("v", v)], axis="in")
    m = group_sparsity(reg)
    assert m["groups"] == 4 and m["zero_groups"] == pytest.approx(3 / 4)
    assert m["zero_groups_weighted"] == pytest.approx((2 + 2 + 4) / (2 + 2 + 2 + 4))


# --------------------------------------------------------------------------- RMDA mechanics
def test_rmda_update_rule_by_hand():
    w = nn.Parameter(torch.tensor([[1.0, 2.0]]))
    opt = RMDA([w], lr=0.5, momentum=0.5, weight_lambda=0.0, regularizer="none")
    w0 = w.detach().clone()
    grads = [torch.tensor([[0.2, -0.4]]), torch.tensor([[0.1, 0.3]])]
    v, alpha, expected = torch.zeros(1, 2), 0.0, w0.clone()
    for t, g in enumerate(grads, start=1):
        w.grad = g.clone()
        opt.step()
        beta = math.sqrt(t)
        s = 0.5 * beta
        alpha += s
        v += s * g
        expected = 0.5 * expected + 0.5 * (w0 - v / beta)
        assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert opt.param_groups[0]["t"] == 2 and opt.param_groups[0]["alpha"] == pytest.approx(alpha)


def test_counters_are_per_parameter_group():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    opt = RMDA([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1, momentum=1.0, weight_lambda=0.0)
    for _ in range(3):
        a.grad = torch.ones(2, 2)
        b.grad = torch.ones(2, 2)
        opt.step()
    ga, gb = opt.param_groups
    assert ga["t"] == gb["t"] == 3
    assert ga["alpha"] == pytest.approx(0.1 * sum(math.sqrt(t) for t in (1, 2, 3)))
    assert gb["alpha"] == pytest.approx(0.01 * sum(math.sqrt(t) for t in (1, 2, 3)))


def test_stages_restart_and_raise_c():
    w = nn.Parameter(torch.ones(3, 3))
    opt = RMDA([w], lr=1.0, momentum=0.01, weight_lambda=0.0)
    stages = RMDAStages(opt, milestones=[2, 4], gamma=0.1)
    for step in range(1, 6):
        w.grad = torch.full((3, 3), 0.1)
        opt.step()
        started = stages.step()
        assert started == (step in (2, 4))
        if started:
            assert opt.param_groups[0]["t"] == 0 and opt.param_groups[0]["alpha"] == 0.0
            assert (
                torch.equal(opt.state[w]["initial_point"], w.detach()) and not opt.state[w]["grad_sum"].any()
            )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01) and opt.param_groups[0][
        "momentum"
    ] == pytest.approx(1.0)
    restored = RMDAStages(opt, milestones=[99])
    restored.load_state_dict(stages.state_dict())
    assert restored.steps == 5 and restored.milestones == [2, 4]


def test_rmda_reaches_a_stable_exact_zero_group_pattern_on_digits():
    """Convex group-LASSO logistic regression on scikit-learn's digits: manifold identification."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    opt = RMDA(model.parameters(), lr=0.5, momentum=0.01, weight_lambda=1e-2)  # groups: one per input pixel
    stages = RMDAStages(opt, milestones=[400, 700], gamma=0.1)  # c: 0.01 -> 0.1 -> 1
    patterns = []
    for _ in range(1000):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        stages.step()
        patterns.append(
            model.weight.detach().abs().sum(dim=0) == 0
        )  # pixel whose 10 weights are all exactly 0
    final = patterns[-1]
    assert 5 <= int(final.sum()) <= 59  # a nontrivial structure
    assert all(torch.equal(p, final) for p in patterns[-250:])  # identified: stable for the last 250 steps
    constant_pixels = X.std(dim=0) == 0
    assert bool(final[constant_pixels].all())  # pixels that never vary carry no weight
    with torch.no_grad():
        accuracy = float((model(X).argmax(1) == y).float().mean())
    assert accuracy > 0.85
    assert opt.group_sparsity()["zero_groups"] == pytest.approx(
        float(final.sum()) / 64
    )  # bias (1-D) unregularised


def test_proxsgd_baseline_zeroes_groups_too():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    opt = ProxSGD(model.parameters(), lr=0.5, momentum=0.9, weight_lambda=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    zero = model.weight.detach().abs().sum(dim=0) == 0
    assert 5 <= int(zero.sum()) <= 59
    assert opt.group_sparsity()["zero_groups"] == pytest.approx(float(zero.sum()) / 64)


# --------------------------------------------------------------------------- integration, bad input
def test_timm_registry_builds_rmda_and_proxsgd():
    model = timm.create_model("resnet10t", num_classes=10)
    opt = timm.optim.create_optimizer_v2(model, "rmda", lr=1.0, momentum=0.01, weight_lambda=1e-5)
    assert isinstance(opt, RMDA) and opt.param_groups[0]["weight_lambda"] == 1e-5
    assert opt.param_groups[0]["momentum"] == 0.01
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.param_groups[0]["t"] == 1
    conv_groups = sum(p.shape[1] for p in model.parameters() if p.ndim >= 2)
    assert opt.group_sparsity()["groups"] == conv_groups
    prox = timm.optim.create_optimizer_v2(
        model, "proxsgd", lr=0.1, momentum=0.9, weight_lambda=1e-5, regularizer="l1"
    )
    assert isinstance(prox, ProxSGD) and isinstance(prox.regularizer, L1)
    assert {"rmda", "proxsgd"} <= set(timm.optim.list_optimizers())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weight_lambda": -1e-5}, "weight_lambda must be >= 0"),
        ({"momentum": 0.0}, r"momentum \(the averaging weight c\) must be in \(0, 1\]"),
        ({"momentum": 1.5}, r"must be in \(0, 1\]"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"weight_decay": 1e-4}, "weight_decay must be 0"),
        ({"regularizer": "group_lasso_sideways"}, "unknown regularizer 'group_lasso_sideways'"),
    ],
)
def test_bad_rmda_arguments(kwargs, message):
    w = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match=message):
        RMDA([w], **({"lr": 0.1, "momentum": 0.1, "weight_lambda": 1e-4} | kwargs))


def test_state_dict_round_trip_keeps_counters():
    w = nn.Parameter(torch.randn(3, 3))
    opt = RMDA([w], lr=0.1, momentum=0.5, weight_lambda=1e-3)
    for _ in range(2):
        w.grad = torch.randn(3, 3)
        opt.step()
    w2 = nn.Parameter(w.detach().clone())
    opt2 = RMDA([w2], lr=0.1, momentum=0.5, weight_lambda=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from a file
    g = torch.randn(3, 3)
    w.grad, w2.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(w, w2) and opt2.param_groups[0]["t"] == 3
