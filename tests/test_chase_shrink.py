"""Chase's ``shrink``: removed channels leave the live model during training (issue 25), with the same
masks, losses and compacted model as the run that keeps them masked."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import train_steps
from test_structured_dst import SIZE, chase_sparsify, resnet, sgd
from torch import nn

import itop_timm
from itop_timm.cuts import slice_like
from itop_timm.structured import compact
from itop_timm.structured.shrink import LiveShrink


def run(
    shrink: bool,
    steps: int = 24,
    compute: str = "masked",
    dtype=torch.float32,
    defer: bool = False,
    **options,
):
    """A Chase run on the small test ResNet; returns the model, sparsifier, per-step losses and the cuts of
    every shrink (in order). ``defer``: shrink between steps (``defer_shrink``, as the recipe does)."""
    model = resnet().to(dtype)
    opt = sgd(model)
    sp = chase_sparsify(model, opt, {"shrink": shrink, **options}, compute=compute, defer_shrink=defer)
    cuts = []
    sp.register_update_hook(
        lambda s, stats: cuts.append(stats["cuts"]) if stats.get("event") == "shrink" else None
    )
    losses = []
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(4, *SIZE, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(dtype)), y)
        loss.backward()
        opt.step()
        if defer:
            pending = sp.shrink_pending
            assert (sp.shrink() is not None) == pending
            assert not sp.shrink_pending
        losses.append(loss.item())
    return model, sp, losses, cuts


def sliced(tensors: dict[str, torch.Tensor], all_cuts: list[dict]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for cuts in all_cuts:
        for name, param_cuts in cuts.items():
            if name in out:
                out[name] = slice_like(out[name], param_cuts)
    return out


@pytest.mark.parametrize(
    "ranking, defer",
    [("global", False), ("layer", False), ("layer", True)],
    ids=["global", "layer", "deferred"],
)
def test_shrink_trains_the_same_run_on_a_smaller_network(ranking, defer):
    # in float64, so that the smaller sums' different rounding (fp32: ~1e-7) cannot flip a near-tie of the
    # topology update and let the two runs drift apart; exact ties go to the lowest index in both.
    # deferred: sliced after the step's topology update instead of before it (what the recipe does)
    f64 = torch.float64
    full_model, full, full_losses, _ = run(False, ranking=ranking, dtype=f64)
    model, sp, losses, cuts = run(True, ranking=ranking, dtype=f64, defer=defer)

    assert len(cuts) >= 2  # several removals, each shrinking the live model
    assert sum(p.numel() for p in model.parameters()) < 0.8 * sum(p.numel() for p in full_model.parameters())
    assert all(torch.equal(sp.structure.alive[n], full.structure.alive[n]) for n in full.structure.alive)
    # the same masks and union, at the smaller shapes; the same density and R_s over the same N
    for name, mask in sliced(full.masks, cuts).items():
        assert torch.equal(sp.masks[name], mask), name
    for name, union in sliced(full.ever_active, cuts).items():
        assert torch.equal(sp.ever_active[name], union), name
    assert sp.num_sparse_weights == full.num_sparse_weights
    assert sp.density == full.density and sp.itop_rate == full.itop_rate
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full_losses), rtol=1e-10, atol=1e-12)
    # the same compacted model: compact removes what the shrink already did and nothing else differs
    model.eval()
    full_model.eval()
    small_full, _ = compact(full_model, torch.zeros(1, *SIZE, dtype=f64), masks=full.masks)
    small, _ = compact(model, torch.zeros(1, *SIZE, dtype=f64), masks=sp.masks)
    assert {n: p.shape for n, p in small.named_parameters()} == {
        n: p.shape for n, p in small_full.named_parameters()
    }
    x = torch.randn(3, *SIZE, dtype=f64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), small_full(x), rtol=1e-8, atol=1e-7)  # 24 steps of f64 drift


def test_in_fp32_a_shrunk_step_computes_what_the_masked_one_does():
    # fp32 trajectories part once rounding flips a near-tie of an update (how soon depends on the thread
    # count), so fp32 is checked step-wise: the same weights, shrunk or masked, give the same loss and
    # gradients up to rounding
    full_model, full, _, _ = run(False, steps=8)  # removals at steps 3 and 7
    shrunk = copy.deepcopy(full_model)
    live = LiveShrink(shrunk, full.structure.units, SIZE)
    cuts = live.cuts_for({name: ~alive for name, alive in full.structure.alive.items()})
    live.apply(cuts)
    x, y = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(5)), torch.arange(4)
    losses = []
    for model in (full_model, shrunk):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    grads = {n: p.grad for n, p in shrunk.named_parameters()}
    for name, p in full_model.named_parameters():
        torch.testing.assert_close(grads[name], slice_like(p.grad, cuts.get(name, [])), rtol=1e-4, atol=1e-6)


def test_the_optimizer_and_its_parameters_are_the_same_objects():
    model = resnet()
    opt = sgd(model)
    ids = [id(p) for group in opt.param_groups for p in group["params"]]
    chase_sparsify(model, opt, {"shrink": True})
    shapes = {n: p.shape for n, p in model.named_parameters()}
    train_steps(model, opt, 24, input_size=SIZE)
    assert [id(p) for group in opt.param_groups for p in group["params"]] == ids
    assert {n: p.shape for n, p in model.named_parameters()} != shapes
    for p in model.parameters():  # SGD momentum follows every parameter's new shape
        assert opt.state[p]["momentum_buffer"].shape == p.shape
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            assert module.weight.shape[:2] == (module.out_channels, module.in_channels // module.groups)
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_var.shape == (module.num_features,)


def test_a_shrunk_run_resumes_bit_exactly_from_its_state_dict():
    # removals at steps 3, 7, 11, 15 and 18: stopped at 10, two shrinks before and three after
    whole, sp_a, losses_a, _ = run(True)
    model = resnet()
    opt = sgd(model)
    sp = chase_sparsify(model, opt, {"shrink": True})
    train_steps(model, opt, 10, input_size=SIZE)
    state, model_state, opt_state = sp.state_dict(), model.state_dict(), opt.state_dict()

    fresh = resnet(seed=1)  # full size, other weights
    fresh_opt = sgd(fresh)
    sp_b = chase_sparsify(fresh, fresh_opt, {"shrink": True})
    sp_b.load_state_dict(state)  # first: brings the model to the saved (shrunk) shapes
    fresh.load_state_dict(model_state)
    fresh_opt.load_state_dict(opt_state)
    g = torch.Generator().manual_seed(0)  # the data the whole run saw after step 10
    for _ in range(10):
        torch.randn(4, *SIZE, generator=g), torch.randint(0, 10, (4,), generator=g)
    fresh.train()
    losses_b = []
    for _ in range(14):
        x, y = torch.randn(4, *SIZE, generator=g), torch.randint(0, 10, (4,), generator=g)
        fresh_opt.zero_grad()
        loss = nn.functional.cross_entropy(fresh(x), y)
        loss.backward()
        fresh_opt.step()
        losses_b.append(loss.item())

    assert losses_b == losses_a[10:]
    assert all(torch.equal(sp_a.masks[n], sp_b.masks[n]) for n in sp_a.masks)
    a, b = whole.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (sp_a.density, sp_a.itop_rate) == (sp_b.density, sp_b.itop_rate)


def test_a_shrunk_state_cannot_be_loaded_into_a_model_that_shrank_further():
    model = resnet()
    opt = sgd(model)
    sp = chase_sparsify(model, opt, {"shrink": True})
    train_steps(model, opt, 4, input_size=SIZE)  # one removal (step 3)
    early = sp.state_dict()
    train_steps(model, opt, 8, input_size=SIZE)  # another (step 7)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    with pytest.raises(ValueError, match="already lost channels .* cannot grow back"):
        sp.load_state_dict(early)
    assert all(torch.equal(sp.masks[n], masks[n]) for n in masks)  # nothing changed


def test_shrink_with_the_sparse_kernels():
    # after two shrinks the kernels compute the smaller layers: their forward and backward equal the dense
    # computation of the same model (a deep copy computes densely) up to fp32 rounding (whole runs are
    # compared in float64 above; the kernels are fp32 only)
    model, sp, losses, cuts = run(True, steps=8, compute="sparse")
    assert len(cuts) == 2 and sp._compute is not None and "sparse" in sp._compute.plan.values()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(5)), torch.arange(4)
    outputs = []
    for m in (model, reference):
        m.train()
        m.zero_grad()
        out = m(x)
        nn.functional.cross_entropy(out, y).backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in model.named_parameters():  # the kernels' weight gradients hold the active positions
        expected = grads[name] * sp.masks[name] if name in sp.masks else grads[name]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5)


def test_shrink_refuses_a_ddp_model_and_methods_without_it():
    model = resnet()
    opt = sgd(model)
    ddp = nn.parallel.DistributedDataParallel
    wrapped = ddp.__new__(ddp)  # a DDP wrapper without a process group: only its type matters here
    nn.Module.__init__(wrapped)
    wrapped.module = model
    with pytest.raises(ValueError, match="shrink with a DistributedDataParallel model"):
        chase_sparsify(wrapped, opt, {"shrink": True})
    with pytest.raises(ValueError, match="shrink"):  # SRigL removes no channel for good: no such option
        itop_timm.sparsify(
            model, opt, method="srigl", density=0.2, total_steps=24, method_options={"shrink": True}
        )
