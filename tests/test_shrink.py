"""Shrinking a live model: removed channels sliced out in place (itop_timm.structured.shrink)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import randomize_batchnorm
from torch import nn

from itop_timm.cuts import shrink_optimizer_state, slice_like
from itop_timm.densities import sparse_parameter_shapes
from itop_timm.structured.dependency import removable_units
from itop_timm.structured.shrink import LiveShrink

MODELS = {  # name: (input size, kwargs)
    "resnet18": (32, {}),
    "efficientnet_b0": (32, {}),
    "convnext_atto": (32, {}),
    "mixer_s16_224": (64, {"img_size": 64}),
}


def setup(name: str, seed: int = 0):
    size, kwargs = MODELS[name]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    g = torch.Generator().manual_seed(seed)
    randomize_batchnorm(model, g)
    with torch.no_grad():  # every block and the head matter to the output (timm starts some at ~0)
        for n, p in model.named_parameters():
            if n.endswith("gamma"):  # layer scale
                p.fill_(1.0)
        model.get_classifier().weight.normal_(0, 0.1, generator=g)
    sparse = set(sparse_parameter_shapes(model, None, ()))
    units, _ = removable_units(model, sparse, (3, size, size))
    assert units, name
    dead = {u.name: torch.rand(u.num_channels, generator=g) < 0.4 for u in units}
    for u in units:
        dead[u.name][0] = False  # every unit keeps a channel
    return model, units, dead, size


def masked_reference(model: nn.Module, units, dead) -> nn.Module:
    """The unshrunk model with every removed channel's sparse rows and reading columns zeroed (what Chase's
    masks do)."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for u in units:
            for table, dim in ((u.rows, 0), (u.cols, 1)):
                for name, index, channel in table:
                    params[name].index_fill_(dim, index[dead[u.name][channel]], 0.0)
    return ref


@pytest.mark.parametrize("name", list(MODELS))
def test_shrunk_model_computes_what_the_masked_one_does(name):
    model, units, dead, size = setup(name)
    ref = masked_reference(model, units, dead)
    model = copy.deepcopy(ref)
    identity = {n: id(p) for n, p in model.named_parameters()}
    before = sum(p.numel() for p in model.parameters())

    shrink = LiveShrink(model, units, (3, size, size))
    shrink.apply(shrink.cuts_for(dead))

    assert {n: id(p) for n, p in model.named_parameters()} == identity  # the same Parameter objects
    assert sum(p.numel() for p in model.parameters()) < before
    # in float64, so that summation order (fp32 noise, which BatchNorm's batch statistics of 1 x 1 maps
    # amplify) cannot hide a wrong slice
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    model.double()
    ref.double()
    for train in (False, True):  # running statistics and batch statistics alike
        model.train(train)
        ref.train(train)
        with torch.no_grad():
            expected, got = ref(x), model(x)
        scale = float(expected.abs().max())
        assert scale > 0.1  # a test of something
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * scale)
    for module in model.modules():  # the layers describe themselves as the smaller architecture
        if isinstance(module, nn.Conv2d):
            assert module.weight.shape[:2] == (module.out_channels, module.in_channels // module.groups)
        elif isinstance(module, nn.Linear):
            assert module.weight.shape == (module.out_features, module.in_features)
        elif isinstance(module, nn.BatchNorm2d):
            assert module.running_mean.shape == module.weight.shape == (module.num_features,)
    assert str(model)  # prints


@pytest.mark.parametrize("name", list(MODELS))
def test_the_architecture_record_rebuilds_the_shrunk_model(name):
    # what save_sparse stores and load_sparse replays with torch-pruning on a fresh timm model
    from itop_timm.checkpoint import ARCHITECTURE_ATTR
    from itop_timm.structured.compacted import rebuild_compacted

    model, units, dead, size = setup(name)
    shrink = LiveShrink(model, units, (3, size, size))
    shrink.apply(
        shrink.cuts_for(
            {
                u.name: d & (torch.arange(u.num_channels) % 2 == 0)
                for u, d in zip(units, dead.values(), strict=True)
            }
        )
    )
    shrink.apply(shrink.cuts_for(dead))  # two shrinks: one entry per unit, original coordinates
    record = getattr(model, ARCHITECTURE_ATTR)
    assert record["input_size"] == [3, size, size]
    assert len(record["history"]) == sum(bool(d.any()) for d in dead.values())
    kwargs = MODELS[name][1]
    fresh = rebuild_compacted(timm.create_model(name, pretrained=False, num_classes=10, **kwargs), record)
    assert {n: p.shape for n, p in fresh.state_dict().items()} == {
        n: p.shape for n, p in model.state_dict().items()
    }
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, size, size)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_shrinks_accumulate_in_original_coordinates():
    model, units, dead, size = setup("resnet18", seed=1)
    ref = masked_reference(model, units, dead)
    model = copy.deepcopy(ref)
    shrink = LiveShrink(model, units, (3, size, size))
    first = {u.name: dead[u.name] & (torch.arange(u.num_channels) % 2 == 0) for u in units}
    shrink.apply(shrink.cuts_for(first))
    assert torch.equal(shrink.channels_present(units[0]), ~first[units[0].name])
    shrink.apply(shrink.cuts_for(dead))  # the rest; channels already gone are not cut twice
    assert shrink.cuts_for(dead) == {}
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    model.double().eval()
    ref.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)
    u = units[0]
    name, index, channel = u.rows[0]
    alive_rows = index[~dead[u.name][channel]]
    assert torch.equal(shrink.present(name, 0), alive_rows.sort().values)
    assert torch.equal(shrink.channels_present(u), ~dead[u.name])


def test_gradients_and_optimizer_state_follow():
    model, units, dead, size = setup("resnet18", seed=2)
    model = masked_reference(model, units, dead)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, size, size)).sum().backward()
    opt.step()
    params = dict(model.named_parameters())
    old = {n: p.detach().clone() for n, p in params.items()}
    old_state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()}

    shrink = LiveShrink(model, units, (3, size, size))
    cuts = shrink.cuts_for(dead)
    shrink_optimizer_state(opt, params, cuts)
    shrink.apply(cuts)

    for n, p in params.items():
        expected = slice_like(old[n], cuts.get(n, []))
        assert torch.equal(p.detach(), expected), n
        assert p.grad is not None and p.grad.shape == p.shape, n
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], slice_like(old_state[n][key], cuts.get(n, []))), (n, key)
        assert torch.equal(opt.state[p]["step"], old_state[n]["step"])
    model(torch.randn(2, 3, size, size)).sum().backward()  # training goes on, at the new shapes
    opt.step()


def test_a_state_that_cannot_follow_is_named():
    model, units, dead, size = setup("resnet18", seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, size, size)).sum().backward()
    opt.step()  # momentum buffers everywhere
    params = dict(model.named_parameters())
    name = units[0].scored
    opt.state[params[name]]["factored"] = torch.zeros(params[name].shape[0])
    shrink = LiveShrink(model, units, (3, size, size))
    cuts = shrink.cuts_for(dead)
    momentum = {n: id(opt.state[p]["momentum_buffer"]) for n, p in params.items()}
    with pytest.raises(
        ValueError, match=rf"optimizer state 'factored' of {name} has shape .* SGD cannot follow"
    ):
        shrink_optimizer_state(opt, params, cuts)
    assert opt.state[params[name]]["factored"].shape == (params[name].shape[0],)  # nothing changed
    assert {n: id(opt.state[p]["momentum_buffer"]) for n, p in params.items()} == momentum


def test_unsliceable_layers_are_refused_before_anything_changes():
    model, units, _, size = setup("resnet18")
    unit = units[0]
    module_name = unit.slices[0].param_name.rpartition(".")[0]
    parent, _, child = module_name.rpartition(".")
    conv = model.get_submodule(module_name)
    swapped = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 3)
    model.get_submodule(parent).register_module(child, swapped)
    with pytest.raises(
        ValueError, match=rf"channels of {unit.name!r} cannot be sliced in place .*transposed"
    ):
        LiveShrink(model, units, (3, size, size))
