"""Periodic sampled weight averaging (PSWA / PWALKS), dense and sparse (REFERENCE §3)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import itop_timm
from itop_timm.averaging import PeriodicWeightAveraging, update_bn


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum_sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
}


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def train(model, optimizer, data):
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def expected_sampled_steps(period, prob, last_fraction, steps, seed):
    """Replay the averager's coin tosses: one draw per eligible step, from a generator seeded alike."""
    g = torch.Generator().manual_seed(seed)
    first = period - max(1, round(last_fraction * period)) + 1
    sampled = []
    for step in range(1, steps + 1):
        in_period = (step - 1) % period + 1
        if in_period >= first and float(torch.rand((), generator=g)) < prob:
            sampled.append(step)
    return sampled


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("prob,last", [(1.0, 1.0), (0.5, 1.0), (0.6, 0.5)])
def test_mean_is_the_mean_of_exactly_the_sampled_iterates(kind, prob, last):
    model = small_net()
    opt = OPTIMIZERS[kind](model.parameters())
    iterates = []
    opt.register_step_post_hook(
        lambda *_: iterates.append({n: p.detach().clone() for n, p in model.named_parameters()})
    )
    avg = PeriodicWeightAveraging(model, opt, period_steps=10, sample_prob=prob, last_fraction=last, seed=7)
    train(model, opt, batches(10))
    sampled = expected_sampled_steps(10, prob, last, 10, seed=7)
    assert avg.last_writeback == {"period": 1, "samples": len(sampled), "wrote_back": True}
    assert sampled and all(s > 10 - round(last * 10) for s in sampled)
    for name, p in model.named_parameters():
        manual = torch.stack([iterates[s - 1][name] for s in sampled]).mean(0)
        assert torch.allclose(p.detach(), manual, atol=1e-6), name
    assert avg.samples == 0 and avg.step_in_period == 0  # reset for the next period


def test_training_continues_from_the_mean_across_periods():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    avg = PeriodicWeightAveraging(model, opt, period_steps=4, seed=1)
    writebacks = []
    opt.register_step_post_hook(lambda *_: writebacks.append(avg.last_writeback_step))
    train(model, opt, batches(12))
    assert avg.periods == 3 and sorted(set(s for s in writebacks if s)) == [4, 8, 12]


def test_sparse_average_respects_masks_and_topology_updates():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = itop_timm.sparsify(
        model, opt, method="set", density=0.4, update_interval=3, prune_schedule="constant", seed=0
    )
    iterates, masks = [], []

    def record(*_):
        iterates.append({n: p.detach().clone() for n, p in model.named_parameters()})
        masks.append({n: m.clone() for n, m in sp.masks.items()})

    opt.register_step_post_hook(record)  # after the sparsifier's hook, before the averager's
    avg = PeriodicWeightAveraging(model, opt, period_steps=8, sparsifier=sp, seed=3)
    train(model, opt, batches(8))
    assert sp.last_update["step"] == 6  # topology updates at steps 3 and 6, inside the period
    assert avg.last_writeback["samples"] == 8
    for name, p in model.named_parameters():
        stack = torch.stack([it[name] for it in iterates])
        if name in sp.masks:
            active = torch.stack([m[name] for m in masks]).float()
            count = active.sum(0)
            manual = torch.where(count > 0, (stack * active).sum(0) / count.clamp_min(1), iterates[-1][name])
            manual = manual * masks[-1][name]  # current mask re-applied after write-back
            assert not p.detach()[~sp.masks[name]].any()
            changed = (torch.stack([m[name] for m in masks]) != masks[0][name]).any(0)
            assert changed.any()  # some weights were grown or dropped during the period
        else:
            manual = stack.mean(0)
        assert torch.allclose(p.detach(), manual, atol=1e-6), name


def test_resume_is_exact():
    def make():
        model = small_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = itop_timm.sparsify(
            model, opt, method="set", density=0.5, update_interval=4, total_steps=40, seed=2
        )
        avg = PeriodicWeightAveraging(model, opt, period_steps=6, sample_prob=0.5, sparsifier=sp, seed=4)
        return model, opt, sp, avg

    data = batches(15)
    model_a, opt_a, _, _ = make()
    train(model_a, opt_a, data)
    model_b, opt_b, sp_b, avg_b = make()
    train(model_b, opt_b, data[:9])  # stop mid-period
    saved = copy.deepcopy(
        {
            "model": model_b.state_dict(),
            "opt": opt_b.state_dict(),
            "sp": sp_b.state_dict(),
            "avg": avg_b.state_dict(),
        }
    )
    model_c, opt_c, sp_c, avg_c = make()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    sp_c.load_state_dict(saved["sp"])
    avg_c.load_state_dict(saved["avg"])
    train(model_c, opt_c, data[9:])
    assert all(
        torch.equal(a, c)
        for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sample_prob": 0.0}, r"sample_prob must be in \(0, 1\]"),
        ({"sample_prob": 1.5}, r"sample_prob must be in \(0, 1\]"),
        ({"last_fraction": 0.0}, r"last_fraction must be in \(0, 1\]"),
        ({"last_fraction": -0.5}, r"last_fraction must be in \(0, 1\]"),
        ({"period_steps": 0}, "period_steps must be an integer >= 1"),
        ({"period_steps": 2.5}, "period_steps must be an integer >= 1"),
    ],
)
def test_bad_input(kwargs, message):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        PeriodicWeightAveraging(model, opt, **({"period_steps": 5} | kwargs))
    assert len(opt._optimizer_step_post_hooks) == 0


def test_update_bn_recomputes_statistics_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 2))
    model.eval()
    data = [torch.randn(10, 4) * 3 + 1 for _ in range(4)]
    rng = torch.get_rng_state()
    used = update_bn(model, [(x, None) for x in data], steps=3)
    assert used == 3 and torch.equal(rng, torch.get_rng_state()) and not model.training
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in data[:3]])
    bn = model[1]
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    # cumulative average of the per-batch unbiased variances
    per_batch = torch.stack([model[0](x).detach().var(0, unbiased=True) for x in data[:3]]).mean(0)
    assert torch.allclose(bn.running_var, per_batch, atol=1e-5)
    assert bn.momentum == 0.1
    assert update_bn(small_net(), [(torch.randn(2, 6), None)]) == 0
