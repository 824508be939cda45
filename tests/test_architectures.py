"""ITOP dynamic sparse training across a broad list of timm architectures.

Per model: realised density, exact per-layer counts, inactive weights exactly 0 after every step,
optimizer state 0 on inactive weights, R_s non-decreasing and above the density after updates, and
the same seed giving the same masks.
"""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import train_steps

import itop_timm
from itop_timm.densities import active_counts, compute_layer_densities, sparse_parameter_shapes

# (timm name, create_model kwargs, input resolution, optimizer)
ARCHITECTURES = [
    ("resnet18", {}, 32, "sgd"),
    ("resnet26d", {}, 32, "sgd"),  # ResNet-D
    ("resnet10t", {}, 32, "sgd"),  # ResNet-T
    ("convnext_atto", {}, 32, "adamw"),
    ("efficientnet_b0", {}, 32, "sgd"),
    ("mobilenetv3_small_050", {}, 32, "sgd"),
    ("regnetx_002", {}, 32, "sgd"),
    ("densenet121", {}, 32, "sgd"),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32, "adamw"),
    ("deit_tiny_patch16_224", {"img_size": 32}, 32, "adamw"),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}, 64, "adamw"),
    ("pvt_v2_b0", {}, 32, "adamw"),  # another hierarchical ViT
    ("mixer_s16_224", {"img_size": 32}, 32, "adamw"),
    ("levit_128s", {"img_size": 64}, 64, "adamw"),
]


def make_optimizer(model, kind):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)


def create(name, kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def assert_masks_applied(sp, optimizer):
    for name, param in sp.model.named_parameters():
        if name not in sp.masks:
            continue
        inactive = ~sp.masks[name]
        assert not param[inactive].any(), f"{name}: inactive weights are not exactly zero"
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.shape == param.shape:
                assert not value[inactive].any(), (
                    f"{name}: optimizer state {key!r} nonzero on inactive weights"
                )


@pytest.mark.parametrize("name,kwargs,size,opt", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_itop_training_invariants(name, kwargs, size, opt):
    density = 0.1
    model = create(name, kwargs)
    optimizer = make_optimizer(model, opt)
    sp = itop_timm.sparsify(
        model, optimizer, method="rigl", density=density, update_interval=2, total_steps=100, seed=3
    )

    shapes = sparse_parameter_shapes(model)
    expected = active_counts(shapes, compute_layer_densities(shapes, density, "erk"))
    assert set(sp.masks) == set(shapes)
    assert all(m.dtype == torch.bool for m in sp.masks.values())
    counts = {n: int(m.sum()) for n, m in sp.masks.items()}
    assert counts == expected
    assert abs(sp.density - density) <= 1e-3
    assert sp.itop_rate == pytest.approx(sp.density)
    assert_masks_applied(sp, optimizer)
    initial = {n: m.clone() for n, m in sp.masks.items()}

    rates = [sp.itop_rate]

    def check(step):
        assert_masks_applied(sp, optimizer)
        assert {n: int(m.sum()) for n, m in sp.masks.items()} == expected  # density preserved per layer
        rates.append(sp.itop_rate)

    train_steps(model, optimizer, 6, input_size=(3, size, size), on_step=check)
    assert sp.step == 6 and sp.last_update["step"] == 6
    assert all(b >= a for a, b in zip(rates, rates[1:], strict=False)), rates
    assert sp.itop_rate > sp.density
    assert sp.last_update["replaced"] > 0

    # same seed -> same initial masks, independent of the weights' random init
    torch.manual_seed(123)
    other = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    sp2 = itop_timm.sparsify(
        other, make_optimizer(other, opt), method="rigl", density=density, total_steps=100, seed=3
    )
    assert all(torch.equal(initial[n], sp2.masks[n]) for n in initial)
