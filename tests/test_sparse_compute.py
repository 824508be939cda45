"""``compute="sparse" | "auto"``: the CPU kernels give the masked path's outputs and gradients, the
methods the same masks, resume stays bit-exact; bad input fails before anything changes."""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import itop_timm
from itop_timm.kernels import build
from itop_timm.kernels.compute import unsupported_reason
from itop_timm.kernels.ops import layer_index, sparse_conv2d, sparse_linear

TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32 reassociation


def close(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> None:
    torch.testing.assert_close(a, b, rtol=TOL["rtol"], atol=TOL["atol"] * max(scale, 1.0))


@pytest.mark.parametrize(
    "batch, channels, size, out, kernel, stride, padding, density",
    [
        (8, 16, 7, 32, 3, 1, 1, 0.1),
        (5, 3, 9, 8, 3, 2, 1, 0.3),
        (4, 8, 6, 8, 1, 2, 0, 0.5),
        (3, 2, 28, 4, 7, 2, 3, 0.5),  # a stem
        (130, 16, 4, 16, 3, 1, 1, 0.2),  # batch tiles of 128, then 1 x 2
        (83, 6, 5, 7, 5, 3, 2, 0.4),  # stride 3, tiles of 64 and 16 and 1
        (2, 4, 5, 6, 3, 1, 0, 1.0),  # every weight active, no padding
        (2, 4, 5, 6, 3, 1, 1, 0.0),  # nothing active: output = bias
        (4, 8, 1, 16, 3, 1, 1, 0.3),  # 1x1 image: only centre taps ever read the input
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_kernels_equal_the_masked_convolution(
    batch, channels, size, out, kernel, stride, padding, density, bias
):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g, requires_grad=True)
    mask = torch.rand(out, channels, kernel, kernel, generator=g) < density
    weight = (torch.randn(out, channels, kernel, kernel, generator=g) * mask).requires_grad_()
    b = torch.randn(out, generator=g, requires_grad=True) if bias else None
    y = F.conv2d(x, weight, b, stride, padding)
    gy = torch.randn(y.shape, generator=g)
    expected = [y, *torch.autograd.grad(y, [x, weight, *([b] if bias else [])], gy)]
    expected[2] = expected[2] * mask  # what the masked path trains with

    y2 = sparse_conv2d(x, weight, b, layer_index(mask), stride, padding)
    got = [y2, *torch.autograd.grad(y2, [x, weight, *([b] if bias else [])], gy)]
    for e, a in zip(expected, got, strict=True):
        close(a, e, scale=float(e.detach().abs().max()) if e.numel() else 1.0)
    assert not got[2][~mask].any()  # the weight gradient is exactly 0 off the mask


def test_linear_kernels_take_any_leading_shape():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 20, generator=g, requires_grad=True)  # (batch, tokens, features)
    mask = torch.rand(11, 20, generator=g) < 0.3
    weight = (torch.randn(11, 20, generator=g) * mask).requires_grad_()
    bias = torch.randn(11, generator=g, requires_grad=True)
    y = F.linear(x, weight, bias)
    gy = torch.randn(y.shape, generator=g)
    expected = [y, *torch.autograd.grad(y, [x, weight, bias], gy)]
    y2 = sparse_linear(x, weight, bias, layer_index(mask))
    got = [y2, *torch.autograd.grad(y2, [x, weight, bias], gy)]
    assert y2.shape == (3, 7, 11)
    close(got[0], expected[0])
    close(got[1], expected[1])
    close(got[2], expected[2] * mask)
    close(got[3], expected[3])


def test_kernels_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(70, 8, 6, 6, generator=g, requires_grad=True)
    mask = torch.rand(12, 8, 3, 3, generator=g) < 0.3
    weight = (torch.randn(12, 8, 3, 3, generator=g) * mask).requires_grad_()
    index = layer_index(mask)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = sparse_conv2d(x, weight, None, index, 2, 1)
            results.append([y, *torch.autograd.grad(y.square().sum(), [x, weight])])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# --- whole models -------------------------------------------------------------------------------------

MODELS = [
    ("resnet18", {}, 32),
    ("resnet10t", {}, 32),
    ("regnetx_002", {}, 32),
    ("efficientnet_b0", {}, 32),  # depthwise convolutions stay dense
    ("convnext_atto", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("mixer_s16_224", {"img_size": 32}, 32),
]


def unsupported_names(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and unsupported_reason(module) is not None
    ]


def sparse_model(name, kwargs, compute, method="set", **settings):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = itop_timm.sparsify(
        model, optimizer, method=method, density=0.2, update_interval=2, total_steps=50,
        exclude=unsupported_names(model), compute=compute, **settings,
    )  # fmt: skip
    return model, optimizer, sp


@pytest.mark.parametrize("name, kwargs, size", MODELS, ids=[m[0] for m in MODELS])
def test_every_architecture_gives_the_masked_outputs_and_gradients(name, kwargs, size):
    masked, _, sp_masked = sparse_model(name, kwargs, "masked")
    sparse, _, sp_sparse = sparse_model(name, kwargs, "sparse")
    assert sp_sparse._compute.layers, f"{name}: no layer computed by the kernels"
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(3))
    outputs = []
    for model in (masked, sparse):
        model.train()
        for module in model.modules():  # batch statistics of 4 samples would amplify fp32 rounding
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.eval()
        out = model(x)
        out.square().mean().backward()
        outputs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_m, grads_m), (out_s, grads_s) = outputs
    close(out_s, out_m, scale=float(out_m.detach().abs().max()))
    assert grads_m.keys() == grads_s.keys()
    for n in grads_m:
        expected = grads_m[n] * sp_masked.masks[n] if n in sp_masked.masks else grads_m[n]
        close(grads_s[n], expected, scale=float(expected.abs().max()))


def train(model, optimizer, steps, seed=5, size=16):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, size, size, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


@pytest.mark.parametrize("method", ["static", "set", "unfired", "rigl"])
def test_methods_give_the_same_masks_in_both_modes(method):
    """Same seed, same masks. (On a small network: with millions of weights, weights that differ by
    fp32 rounding between the two paths swap places at the drop threshold now and then, as they would
    between two BLAS libraries.)"""
    runs = {}
    for compute in ("masked", "sparse"):
        model = small_cnn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = itop_timm.sparsify(
            model, optimizer, method=method, density=0.3, update_interval=2, total_steps=50, compute=compute
        )
        runs[compute] = (model, optimizer, sp)
    losses = {c: train(model, opt, 8) for c, (model, opt, _) in runs.items()}
    sp_m, sp_s = runs["masked"][2], runs["sparse"][2]
    assert len(sp_s._compute.layers) == 4
    assert method == "static" or sp_s.last_update is not None
    for n in sp_m.masks:
        assert torch.equal(sp_m.masks[n], sp_s.masks[n]), n
        assert torch.equal(sp_m.ever_active[n], sp_s.ever_active[n]), n
    if method != "static":
        assert sp_s.itop_rate > 0.3  # the masks did move
    torch.testing.assert_close(
        torch.tensor(losses["sparse"]), torch.tensor(losses["masked"]), rtol=1e-4, atol=1e-5
    )


def test_rigl_update_steps_compute_densely():
    model, optimizer, sp = sparse_model("resnet10t", {}, "sparse", method="rigl")
    calls = []
    handle = sp._compute  # count kernel calls per step through the public dense-step decision
    real = handle._sparse
    handle._sparse = lambda *a: calls.append(sp.step) or real(*a)
    train(model, optimizer, 4)
    # updates after steps 2 and 4 read dense gradients: steps 2 and 4 (sp.step 1 and 3 during them) are dense
    assert sorted(set(calls)) == [0, 2]


def test_resume_is_bit_exact_in_sparse_mode():
    model, optimizer, sp = sparse_model("resnet10t", {}, "sparse", method="rigl")
    train(model, optimizer, 3, seed=7)
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(sp.state_dict()),
    )
    straight = train(model, optimizer, 4, seed=8)

    model2, optimizer2, sp2 = sparse_model("resnet10t", {}, "sparse", method="rigl")
    model2.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    sp2.load_state_dict(saved[2])
    resumed = train(model2, optimizer2, 4, seed=8)
    assert resumed == straight
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_auto_times_each_layer_once_logs_it_and_keeps_the_plan_in_the_state(caplog):
    model, optimizer, sp = sparse_model("resnet10t", {}, "auto")
    with caplog.at_level(logging.INFO, logger="itop_timm.kernels.compute"):
        train(model, optimizer, 2)
    plan = sp.state_dict()["compute_plan"]
    assert set(plan) == set(sp._compute.layers) and set(plan.values()) <= {"sparse", "dense"}
    assert sp.compute_plan["mode"] == "auto" and sp.compute_plan["plan"] == plan  # the public view
    timed = [r.getMessage() for r in caplog.records if "compute='auto'" in r.getMessage()]
    assert len(timed) == len(plan)  # one decision per layer, at its first training input

    model2, optimizer2, sp2 = sparse_model("resnet10t", {}, "auto")
    sp2.load_state_dict(sp.state_dict())
    with caplog.at_level(logging.INFO, logger="itop_timm.kernels.compute"):
        caplog.clear()
        train(model2, optimizer2, 1)
    assert not caplog.records  # the loaded plan is used: nothing re-timed
    assert sp2.state_dict()["compute_plan"] == plan


def test_evaluation_and_removal_use_the_dense_forward():
    model, optimizer, sp = sparse_model("resnet10t", {}, "sparse")
    conv = model.layer1[0].conv1
    assert "forward" in vars(conv)
    calls = []
    real = sp._compute._sparse
    sp._compute._sparse = lambda *a: calls.append(1) or real(*a)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert not calls
    sp.remove()
    assert "forward" not in vars(conv)


def test_a_deep_copy_of_the_model_computes_densely():
    """EMA copies hold averaged weights, non-zero off the live masks: they must not use the kernels."""
    model, optimizer, sp = sparse_model("resnet10t", {}, "sparse")
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.01)  # non-zero everywhere
    calls = []
    real = sp._compute._sparse
    sp._compute._sparse = lambda *a: calls.append(1) or real(*a)
    ema.train()
    ema(torch.randn(2, 3, 16, 16)).sum().backward()
    assert not calls


# --- bad input ----------------------------------------------------------------------------------------


def fresh(name="efficientnet_b0"):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_unknown_compute_value_is_refused_naming_the_allowed_ones():
    model, optimizer = fresh("resnet10t")
    masked = itop_timm.sparsify(model, optimizer, method="set", total_steps=10)
    assert masked.compute_plan is None
    masked.remove()
    with pytest.raises(ValueError, match=r"compute must be 'masked', 'sparse' or 'auto', got 'dense'"):
        itop_timm.sparsify(model, optimizer, method="set", total_steps=10, compute="dense")


def test_sparse_with_an_unsupported_layer_is_refused_naming_it_before_any_change():
    model, optimizer = fresh("efficientnet_b0")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"conv_dw\.weight \(grouped convolution"):
        itop_timm.sparsify(model, optimizer, method="set", total_steps=10, compute="sparse")
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values(), strict=True))
    assert not optimizer._optimizer_step_pre_hooks


def test_auto_keeps_unsupported_layers_dense_and_lists_them():
    model, optimizer = fresh("efficientnet_b0")
    sp = itop_timm.sparsify(model, optimizer, method="set", total_steps=10, compute="auto")
    unsupported = sp.compute_plan["unsupported"]
    assert (
        "blocks.1.0.conv_dw.weight" in unsupported and "grouped" in unsupported["blocks.1.0.conv_dw.weight"]
    )
    assert "conv_stem.weight" in sp._compute.layers


def test_sparse_with_a_gradient_ema_method_is_refused():
    model, optimizer = fresh("resnet10t")
    with pytest.raises(ValueError, match="snfs.*dense gradients at every step"):
        itop_timm.sparsify(model, optimizer, method="snfs", compute="sparse", total_steps=10)


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("ITOP_TIMM_KERNEL_CACHE", str(tmp_path / "kernels"))
    build.load_kernels.cache_clear()
    yield
    build.load_kernels.cache_clear()


def test_sparse_without_a_compiler_fails_naming_it(no_compiler):
    model, optimizer = fresh("resnet10t")
    with pytest.raises(build.KernelBuildError, match="no-such-compiler-xyz"):
        itop_timm.sparsify(model, optimizer, method="set", total_steps=10, compute="sparse")
    assert not any("forward" in vars(m) for m in model.modules())


def test_auto_without_a_compiler_falls_back_to_masked_with_one_warning(no_compiler, caplog):
    model, optimizer = fresh("resnet10t")
    with caplog.at_level(logging.WARNING):
        sp = itop_timm.sparsify(model, optimizer, method="set", total_steps=10, compute="auto")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no-such-compiler-xyz" in warnings[0].getMessage()
    assert not sp._compute.layers and not any("forward" in vars(m) for m in model.modules())
    assert sp.compute_plan == {"mode": "auto", "plan": {}, "unsupported": {}}  # no layer on the kernels


def test_a_bad_compute_plan_in_a_state_is_refused_before_anything_changes():
    model, optimizer, sp = sparse_model("resnet10t", {}, "auto")
    train(model, optimizer, 1)
    state = sp.state_dict()
    state["compute_plan"] = {**state["compute_plan"], "layer1.0.conv1.weight": "fast"}
    state["step"] = 99
    with pytest.raises(ValueError, match=r"compute plan: values must be 'sparse' or 'dense', got .*'fast'"):
        sp.load_state_dict(state)
    assert sp.step == 1  # nothing was applied
