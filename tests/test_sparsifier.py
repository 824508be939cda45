"""The Sparsifier: drop/grow mechanics per method, schedules, optimizers, resume, bad input."""

from __future__ import annotations

import io
import math

import pytest
import timm
import timm.optim
import torch
from helpers import train_steps
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import itop_timm
from itop_timm import MethodInfo, register_method, sparsify
from itop_timm.registry import METHODS
from itop_timm.schedules import create_schedule


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def sgd(model, lr=0.05):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------- mechanics of one update
class OneLayer(nn.Module):
    def __init__(self, out_f=20, in_f=30):
        super().__init__()
        self.fc = nn.Linear(in_f, out_f, bias=False)

    def forward(self, x):
        return self.fc(x)


def prepared_layer(method, density=0.3, seed=0):
    torch.manual_seed(seed)
    model = OneLayer()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay put, scores are predictable
    sp = sparsify(
        model,
        opt,
        method=method,
        density=density,
        update_interval=1000,
        prune_schedule="constant",
        prune_rate=0.5,
        seed=seed,
    )
    x = torch.randn(8, 30)
    model(x).pow(2).sum().backward()
    return model, opt, sp


def test_rigl_update_drops_smallest_magnitude_and_grows_largest_gradient():
    model, opt, sp = prepared_layer("rigl")
    w = model.fc.weight.detach().clone()
    g = model.fc.weight.grad.detach().clone()
    mask = sp.masks["fc.weight"].clone()
    active = int(mask.sum())
    k = math.ceil(0.5 * active)
    stats = sp.update_topology()
    new = sp.masks["fc.weight"]

    mag = torch.where(mask, w.abs(), torch.tensor(math.inf))
    expected_drop = set(torch.topk(mag.flatten(), k, largest=False).indices.tolist())
    after_drop = mask.flatten().clone()
    after_drop[list(expected_drop)] = False
    grow = torch.where(after_drop, torch.tensor(-math.inf), g.abs().flatten())
    expected_grow = set(torch.topk(grow, k).indices.tolist())
    expected = after_drop.clone()
    expected[list(expected_grow)] = True

    assert torch.equal(new.flatten(), expected)
    assert int(new.sum()) == active
    assert stats["dropped"] == k and stats["layers"]["fc.weight"]["grown"] == k
    # dropped-and-not-regrown weights are zero; regrown-after-drop keep their value (RigL)
    kept = mask.flatten() & expected
    assert torch.equal(model.fc.weight.flatten()[kept], w.flatten()[kept])
    assert not model.fc.weight.flatten()[~expected].any()


def test_set_grows_at_random_among_inactive_and_is_seeded():
    results = []
    for _ in range(2):
        model, opt, sp = prepared_layer("set", seed=5)
        before = sp.masks["fc.weight"].clone()
        sp.update_topology()
        results.append(sp.masks["fc.weight"].clone())
        assert int(results[-1].sum()) == int(before.sum())
    assert torch.equal(results[0], results[1])
    _, _, sp_other = prepared_layer("set", seed=6)
    sp_other.update_topology()
    assert not torch.equal(results[0], sp_other.masks["fc.weight"])


def test_unfired_grows_never_active_weights_first():
    model, opt, sp = prepared_layer("unfired", density=0.2)
    n = sp.num_sparse_weights
    active = int(sp.masks["fc.weight"].sum())
    union = [int(sp.ever_active["fc.weight"].sum())]
    for _ in range(3):
        k = math.ceil(0.5 * active)
        sp.update_topology()
        union.append(int(sp.ever_active["fc.weight"].sum()))
        assert union[-1] - union[-2] == min(k, n - union[-2])  # every grown weight is new while any remain
    assert sp.itop_rate == union[-1] / n


def test_snfs_grows_by_gradient_ema():
    torch.manual_seed(0)
    model = OneLayer()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    sp = sparsify(
        model, opt, method="snfs", density=0.3, update_interval=3, prune_schedule="constant", seed=0
    )
    xs = [torch.randn(8, 30) for _ in range(3)]
    ema = torch.zeros_like(model.fc.weight)
    for i, x in enumerate(xs):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        ema = ema + 0.1 * (model.fc.weight.grad - ema)
        if i < 2:
            opt.step()
    before = sp.masks["fc.weight"].clone()
    w = model.fc.weight.detach().clone()
    opt.step()  # third step: EMA update, then the topology update uses it
    assert torch.allclose(sp._state.grad_ema["fc.weight"], ema, atol=1e-6)
    k = math.ceil(0.5 * int(before.sum()))
    mag = torch.where(before, w.abs(), torch.tensor(math.inf)).flatten()
    after_drop = before.flatten().clone()
    after_drop[torch.topk(mag, k, largest=False).indices] = False
    grow = torch.where(after_drop, torch.tensor(-math.inf), ema.abs().flatten())
    after_drop[torch.topk(grow, k).indices] = True
    assert torch.equal(sp.masks["fc.weight"].flatten(), after_drop)


def test_static_never_changes_the_mask():
    model = tiny_cnn()
    opt = sgd(model)
    sp = sparsify(model, opt, method="static", density=0.2, update_interval=1)  # no total_steps needed
    before = {n: m.clone() for n, m in sp.masks.items()}
    train_steps(model, opt, 5, input_size=(3, 8, 8))
    assert all(torch.equal(before[n], sp.masks[n]) for n in before)
    assert sp.itop_rate == pytest.approx(sp.density)
    assert sp.last_update is None
    with pytest.raises(RuntimeError, match="static"):
        sp.update_topology()


# --------------------------------------------------------------- property: drop/grow counts
@settings(max_examples=40, deadline=None)
@given(
    out_f=st.integers(1, 24),
    in_f=st.integers(1, 24),
    density=st.floats(0.05, 1.0),
    rate=st.floats(0.01, 1.0),
    method=st.sampled_from(["set", "rigl", "unfired"]),
    seed=st.integers(0, 10_000),
)
def test_property_update_preserves_counts_and_replaces_at_most_k(out_f, in_f, density, rate, method, seed):
    torch.manual_seed(seed)
    model = OneLayer(out_f, in_f)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = sparsify(
        model, opt, method=method, density=density, prune_rate=rate, prune_schedule="constant", seed=seed
    )
    model(torch.randn(4, in_f)).sum().backward()
    before = sp.masks["fc.weight"].clone()
    union_before = sp.ever_active["fc.weight"].clone()
    active = int(before.sum())
    k = min(math.ceil(rate * active), active, before.numel() - active)
    stats = sp.update_topology()
    after = sp.masks["fc.weight"]
    assert int(after.sum()) == active
    replaced = int((before & ~after).sum())
    assert replaced <= k
    assert stats["layers"].get("fc.weight", {"replaced": 0})["replaced"] == replaced
    assert torch.equal(sp.ever_active["fc.weight"], union_before | after)
    assert not model.fc.weight[~after].any()


# --------------------------------------------------------------- schedules and when updates happen
def test_cosine_schedule_values():
    s = create_schedule("cosine", 0.5, 0.005, 1000)
    assert s(0) == pytest.approx(0.5)
    assert s(500) == pytest.approx(0.005 + 0.495 / 2)
    assert s(1000) == pytest.approx(0.005)
    assert s(5000) == pytest.approx(0.005)
    lin = create_schedule("linear", 0.5, 0.1, 100)
    assert lin(50) == pytest.approx(0.3)
    assert create_schedule("constant", 0.3)(10**9) == 0.3


def test_updates_every_interval_until_stop_step_and_not_at_the_end():
    model = tiny_cnn()
    opt = sgd(model)
    sp = sparsify(model, opt, method="set", density=0.3, update_interval=3, total_steps=12, stop_step=7)
    steps_with_update = []

    def record(step):
        if sp.last_update is not None and sp.last_update["step"] == step:
            steps_with_update.append(step)

    train_steps(model, opt, 12, input_size=(3, 8, 8), on_step=record)
    assert steps_with_update == [3, 6]
    model2 = tiny_cnn()
    sp2 = sparsify(model2, sgd(model2), method="set", density=0.3, update_interval=3, total_steps=12)
    assert [s for s in range(1, 20) if sp2.update_due(s)] == [3, 6, 9]  # none at/after total_steps


# --------------------------------------------------------------- optimizers
OPTIMIZERS = {
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-3, weight_decay=1e-2),
    "timm_lamb": lambda p: timm.optim.Lamb(p, lr=1e-3),
    "timm_lion": lambda p: timm.optim.Lion(p, lr=1e-4),
    "timm_adan": lambda p: timm.optim.Adan(p, lr=1e-3),
    "timm_nadamw": lambda p: timm.optim.NAdamW(p, lr=1e-3),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_every_param_shaped_state_is_masked(kind):
    model = tiny_cnn()
    opt = OPTIMIZERS[kind](model.parameters())
    sp = sparsify(model, opt, method="rigl", density=0.2, update_interval=2, total_steps=50)

    def check(step):
        for name, p in model.named_parameters():
            if name in sp.masks:
                off = ~sp.masks[name]
                assert not p[off].any()
                states = [v for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
                assert states, f"{kind} keeps no state shaped like {name}"
                assert all(not v[off].any() for v in states)

    train_steps(model, opt, 5, input_size=(3, 8, 8), on_step=check)
    assert sp.itop_rate > sp.density


@pytest.mark.parametrize("kind", ["sgd_nesterov", "adamw"])
def test_compiled_hook_gives_the_same_zeros_and_weights(kind):
    """compile_hook=True (a torch.compile-d where per layer) trains exactly like the foreach hook,
    and also keeps weights and every param-shaped state zero off-mask after every step."""
    runs = []
    for compiled in (False, True):
        model = tiny_cnn()
        opt = OPTIMIZERS[kind](model.parameters())
        sp = sparsify(
            model, opt, method="rigl", density=0.2, update_interval=2, total_steps=50, compile_hook=compiled
        )

        def check(step, model=model, opt=opt, sp=sp):
            for name, p in model.named_parameters():
                if name in sp.masks:
                    off = ~sp.masks[name]
                    states = [v for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
                    assert not p[off].any() and states and all(not v[off].any() for v in states)

        train_steps(model, opt, 5, input_size=(3, 8, 8), on_step=check)
        runs.append((snapshot(model), {n: m.clone() for n, m in sp.masks.items()}))
    (w_eager, m_eager), (w_compiled, m_compiled) = runs
    assert all(torch.equal(m_eager[n], m_compiled[n]) for n in m_eager)
    assert all(torch.equal(w_eager[n], w_compiled[n]) for n in w_eager)


@pytest.mark.parametrize(
    "kind", ["sgd_nesterov", "adamw", "adam_amsgrad", "rmsprop_centered", "nadam", "radam"]
)
def test_gradient_masking_trains_bit_for_bit_like_re_masking(kind):
    """For GRADIENT_MASKED_OPTIMIZERS the pre-step hook masks only the gradients; the same optimizer as
    a subclass (not on the list) is re-masked after every step. Both train to identical weights,
    optimizer state and masks, through topology updates (every 3rd step)."""
    opt_class = type(OPTIMIZERS[kind]([nn.Parameter(torch.zeros(1))]))
    assert opt_class in itop_timm.GRADIENT_MASKED_OPTIMIZERS
    runs = []
    for subclass in (False, True):
        model = tiny_cnn()
        opt = OPTIMIZERS[kind](model.parameters())
        if subclass:
            opt.__class__ = type("Subclassed", (opt_class,), {})
        sp = sparsify(model, opt, method="rigl", density=0.2, update_interval=3, total_steps=50)
        masked_steps = []
        sp.optimizer.register_step_post_hook(lambda *_, sp=sp, m=masked_steps: m.append(sp._grads_masked))
        train_steps(model, opt, 8, input_size=(3, 8, 8))
        assert masked_steps == ([False] * 8 if subclass else [True, True, False] * 2 + [True, True])
        state = {
            n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            for n, p in model.named_parameters()
        }
        runs.append((snapshot(model), state, {n: m.clone() for n, m in sp.masks.items()}))
    (w_a, s_a, m_a), (w_b, s_b, m_b) = runs
    assert all(torch.equal(m_a[n], m_b[n]) for n in m_a)
    assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)
    assert all(torch.equal(s_a[n][k], s_b[n][k]) for n in s_a for k in s_a[n])


def test_weights_moved_outside_the_masked_steps_are_masked_again():
    """Steps inside ``paused()`` and masks changed in place are followed by a full re-masking step."""
    model = tiny_cnn()
    opt = sgd(model)
    sp = sparsify(model, opt, method="set", density=0.2, update_interval=100, total_steps=500)
    conv = model[3].weight
    with sp.paused():  # an unmasked step: the inactive weights move
        train_steps(model, opt, 1, input_size=(3, 8, 8))
    assert conv[~sp.masks["3.weight"]].any()
    train_steps(model, opt, 1, input_size=(3, 8, 8), seed=1)
    assert not conv[~sp.masks["3.weight"]].any()
    assert not opt.state[conv]["momentum_buffer"][~sp.masks["3.weight"]].any()
    sp.masks["3.weight"][0] = False  # a user's in-place change
    train_steps(model, opt, 1, input_size=(3, 8, 8), seed=2)
    assert not conv[0].any() and not opt.state[conv]["momentum_buffer"][0].any()


def test_timm_registry_rigl_sgd_and_friends():
    model = timm.create_model("resnet10t", num_classes=10)
    opt = timm.optim.create_optimizer_v2(
        model, "rigl_sgd", lr=0.1, weight_decay=5e-4, density=0.05, total_steps=20, update_interval=2
    )
    assert (
        isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"] is True
    )  # timm's sgd defaults kept
    sp = opt.sparsifier
    assert sp.method.name == "rigl" and sp.config.density == 0.05
    # timm's weight-decay groups: BN and biases excluded from decay, sparse weights in the decay group
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 5e-4}
    train_steps(model, opt, 4, input_size=(3, 32, 32))
    assert sp.step == 4 and sp.itop_rate > sp.density
    for name in ["set_adamw", "rigl_adamw", "set_sgd", "unfired_lamb", "snfs_momentum"]:
        m = timm.create_model("resnet10t", num_classes=10)
        o = timm.optim.create_optimizer_v2(m, name, lr=1e-3, density=0.1, total_steps=10)
        assert o.sparsifier.method.name == name.split("_")[0]
    assert set(timm.optim.list_optimizers("rigl_*")) >= {"rigl_sgd", "rigl_adamw"}
    plain = timm.optim.create_optimizer_v2(timm.create_model("resnet10t"), "sgd", lr=0.1)
    assert not hasattr(plain, "sparsifier")
    lookahead = timm.optim.create_optimizer_v2(timm.create_model("resnet10t"), "lookahead_adamw", lr=0.1)
    assert type(lookahead).__name__ == "Lookahead"


def test_timm_registry_sparse_state_rides_in_optimizer_state_dict():
    model = timm.create_model("resnet10t", num_classes=10)
    opt = timm.optim.create_optimizer_v2(
        model, "set_sgd", lr=0.1, density=0.1, total_steps=20, update_interval=2
    )
    train_steps(model, opt, 4, input_size=(3, 32, 32))
    state = opt.state_dict()
    assert "itop_timm" in state
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": state}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model2 = timm.create_model("resnet10t", num_classes=10)
    # timm train.py order: model, optimizer (random masks, seed differs), then resume both from the checkpoint
    opt2 = timm.optim.create_optimizer_v2(
        model2, "set_sgd", lr=0.1, density=0.1, total_steps=20, update_interval=2, seed=99
    )
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    sp, sp2 = opt.sparsifier, opt2.sparsifier
    assert sp2.step == 4 and all(torch.equal(sp.masks[n], sp2.masks[n]) for n in sp.masks)
    train_steps(model, opt, 4, input_size=(3, 32, 32), seed=1)
    train_steps(model2, opt2, 4, input_size=(3, 32, 32), seed=1)
    assert all(torch.equal(sp.masks[n], sp2.masks[n]) for n in sp.masks)
    state, state2 = model.state_dict(), model2.state_dict()
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_timm_registry_bad_input():
    model = timm.create_model("resnet10t")
    with pytest.raises(ValueError, match="needs the model"):
        timm.optim.create_optimizer_v2(model.parameters(), "rigl_sgd", lr=0.1, density=0.1, total_steps=10)
    with pytest.raises(ValueError, match="not found"):
        timm.optim.create_optimizer_v2(model, "rigl_nosuchopt", lr=0.1, density=0.1, total_steps=10)
    with pytest.raises(ValueError, match="density"):
        timm.optim.create_optimizer_v2(model, "rigl_sgd", lr=0.1, density=1.5, total_steps=10)


# --------------------------------------------------------------- AMP, skipped steps
def test_steps_skipped_by_grad_scaler_are_not_counted():
    model = tiny_cnn()
    opt = sgd(model)
    sp = sparsify(model, opt, method="rigl", density=0.3, update_interval=1, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(2, 3, 8, 8)
    loss = model(x).sum()
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0, 0, 0] = math.inf
    scaler.step(opt)
    scaler.update()
    assert sp.step == 0 and sp.last_update is None
    opt.zero_grad()
    scaler.scale(model(x).sum()).backward()
    scaler.step(opt)
    assert sp.step == 1 and sp.last_update["step"] == 1


def test_topology_update_skipped_on_non_finite_gradients():
    model = tiny_cnn()
    opt = sgd(model)
    sp = sparsify(model, opt, method="rigl", density=0.3, update_interval=100, total_steps=1000)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    model[3].weight.grad[0, 0, 0, 0] = math.nan
    before = {n: m.clone() for n, m in sp.masks.items()}
    stats = sp.update_topology()
    assert stats["skipped"] == "non-finite gradients"
    assert all(torch.equal(before[n], sp.masks[n]) for n in before)


def test_bf16_autocast_training():
    model = tiny_cnn()
    opt = sgd(model)
    sp = sparsify(model, opt, method="rigl", density=0.3, update_interval=2, total_steps=10)
    for _ in range(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(2, 3, 8, 8)).float().sum()
        loss.backward()
        opt.step()
    assert sp.step == 4 and sp.itop_rate > sp.density
    assert all(not p[~sp.masks[n]].any() for n, p in model.named_parameters() if n in sp.masks)


# --------------------------------------------------------------- state dict / resume
def run(steps_before, steps_after, resume):
    model = tiny_cnn(seed=1)
    opt = sgd(model)
    sp = sparsify(model, opt, method="set", density=0.2, update_interval=3, total_steps=40, seed=7)
    train_steps(model, opt, steps_before, input_size=(3, 8, 8), seed=11)
    if resume:
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)  # plain tensors and containers only
        model = tiny_cnn(seed=2)
        opt = sgd(model)
        sp = sparsify(model, opt, method="set", density=0.2, update_interval=3, total_steps=40, seed=0)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sp.load_state_dict(state["sp"])
    train_steps(model, opt, steps_after, input_size=(3, 8, 8), seed=12)
    return model, sp


def test_resume_is_bit_for_bit():
    ref_model, ref_sp = run(10, 10, resume=False)
    model, sp = run(10, 10, resume=True)
    assert sp.step == ref_sp.step == 20
    assert all(torch.equal(ref_sp.masks[n], sp.masks[n]) for n in sp.masks)
    assert all(torch.equal(ref_sp.ever_active[n], sp.ever_active[n]) for n in sp.masks)
    ref_state, state = ref_model.state_dict(), model.state_dict()
    assert all(torch.equal(ref_state[k], state[k]) for k in state)
    assert sp.itop_rate == ref_sp.itop_rate


def test_load_state_dict_rejects_mismatch_without_changing_anything():
    model = tiny_cnn()
    opt = sgd(model)
    sp = sparsify(model, opt, method="set", density=0.2, total_steps=40)
    state = sp.state_dict()
    before = {n: m.clone() for n, m in sp.masks.items()}
    bad = dict(state, masks=dict(state["masks"]))
    bad["masks"]["0.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"masks\['0.weight'\] has shape \(3, 3\)"):
        sp.load_state_dict(bad)
    missing = dict(state, masks={k: v for k, v in state["masks"].items() if k != "7.weight"})
    with pytest.raises(ValueError, match=r"missing \['7.weight'\]"):
        sp.load_state_dict(missing)
    with pytest.raises(ValueError, match="not an itop_timm sparsifier state"):
        sp.load_state_dict({"masks": {}})
    assert all(torch.equal(before[n], sp.masks[n]) for n in before)


def test_start_from_given_masks():
    model = tiny_cnn()
    masks = {
        n: (torch.rand(p.shape) < 0.5)
        for n, p in model.named_parameters()
        if n in itop_timm.sparse_parameter_shapes(model)
    }
    sp = sparsify(
        model, sgd(model), method="rigl", masks={n: m.float() for n, m in masks.items()}, total_steps=10
    )
    assert all(torch.equal(sp.masks[n], masks[n]) for n in masks)
    bad = dict(masks)
    bad["3.weight"] = torch.ones(5, 5, dtype=torch.bool)
    before = snapshot(model2 := tiny_cnn())
    with pytest.raises(ValueError, match=r"masks\['3.weight'\] has shape \(5, 5\)"):
        sparsify(model2, sgd(model2), masks=bad, total_steps=10)
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())


# --------------------------------------------------------------- wrappers
def test_masks_follow_the_model_and_ddp_style_wrappers_are_unwrapped():
    model = tiny_cnn()
    opt = sgd(model)
    compiled_like = nn.Module()
    compiled_like._orig_mod = model  # what torch.compile's OptimizedModule exposes
    sp = sparsify(compiled_like, opt, method="set", density=0.3, total_steps=10)
    assert sp.model is model and "0.weight" in sp.masks


# --------------------------------------------------------------- bad input
BAD_ARGS = [
    ({"method": "rgil"}, r"unknown method 'rgil'; allowed: chase, rigl, set, snfs, srigl, static, unfired"),
    ({"distribution": "gaussian"}, r"unknown distribution 'gaussian'; allowed: er, erk, uniform"),
    ({"density": 0.0}, r"density must be in \(0, 1\]"),
    ({"density": 1.2}, r"density must be in \(0, 1\]"),
    ({"update_interval": 0}, r"update_interval must be an integer >= 1"),
    ({"update_interval": 1.5}, r"update_interval must be an integer >= 1"),
    ({"total_steps": None}, r"prune_schedule='cosine' decays over training: pass total_steps"),
    ({"prune_schedule": "exp"}, r"unknown prune-rate schedule 'exp'; allowed: constant, cosine, linear"),
    ({"prune_rate": 0.0}, r"prune_rate must be in \(0, 1\]"),
    ({"stop_step": -1}, r"stop_step must be a non-negative integer"),
]


@pytest.mark.parametrize(
    "kwargs,message", BAD_ARGS, ids=[next(iter(k)) + "=" + repr(next(iter(k.values()))) for k, _ in BAD_ARGS]
)
def test_bad_input_raises_before_touching_anything(kwargs, message):
    model = tiny_cnn()
    opt = sgd(model)
    before = snapshot(model)
    args = {"method": "rigl", "density": 0.1, "total_steps": 100} | kwargs
    with pytest.raises(ValueError, match=message):
        sparsify(model, opt, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(opt._optimizer_step_post_hooks) == 0


def test_no_sparsifiable_tensor_and_unoptimized_tensors():
    bn_only = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="no sparsifiable tensor"):
        sparsify(bn_only, torch.optim.SGD(bn_only.parameters(), lr=0.1), total_steps=10)
    model = tiny_cnn()
    opt = torch.optim.SGD(model[7].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not optimized by the optimizer"):
        sparsify(model, opt, total_steps=10)


# --------------------------------------------------------------- third-party method
def test_registered_third_party_method_end_to_end():
    calls = {"drop": 0, "grow": 0}

    def drop(layer):
        calls["drop"] += 1
        return (layer.weight * layer.grad_or_zeros()).abs()  # a Taylor-style saliency

    def grow(layer):
        calls["grow"] += 1
        return layer.grad_or_zeros().abs() + layer.uniform() * 1e-12

    info = register_method(
        MethodInfo(
            "taylor", drop, grow, "test method", defaults={"update_interval": 2, "prune_schedule": "constant"}
        )
    )
    try:
        assert "taylor" in itop_timm.list_methods()
        model = timm.create_model("resnet10t", num_classes=10)
        opt = sgd(model)
        sp = sparsify(model, opt, method="taylor", density=0.1)  # defaults: constant schedule, no total_steps
        assert sp.config.update_interval == 2 and sp.config.prune_schedule == "constant"
        train_steps(model, opt, 4, input_size=(3, 32, 32))
        sparse_layers = sum(
            1 for d in sp.layer_densities().values() if d < 1.0
        )  # ERK keeps tiny layers dense
        assert 0 < sparse_layers < len(sp.masks)
        assert calls["drop"] == calls["grow"] == 2 * sparse_layers
        assert sp.itop_rate > sp.density
        # the same method through timm's optimizer registry
        model2 = timm.create_model("resnet10t", num_classes=10)
        opt2 = timm.optim.create_optimizer_v2(model2, "taylor_adamw", lr=1e-3, density=0.1)
        assert opt2.sparsifier.method is info
        with pytest.raises(ValueError, match="already registered"):
            register_method(MethodInfo("taylor", drop, grow))
    finally:
        METHODS.unregister("taylor")


def test_given_masks_define_the_recorded_density():
    model = tiny_cnn()
    shapes = itop_timm.sparse_parameter_shapes(model)
    masks = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
    for m in masks.values():
        m.view(-1)[: m.numel() // 4] = True
    sp = sparsify(model, sgd(model), method="set", density=0.9, masks=masks, total_steps=10)
    assert sp.config.density == pytest.approx(sp.density) and sp.density == pytest.approx(0.25, abs=0.01)


def test_update_hooks_observe_every_topology_update_until_removed():
    model = tiny_cnn()
    opt = sgd(model)
    sp = sparsify(model, opt, method="set", density=0.3, update_interval=2, total_steps=40)
    seen: list[tuple[int, dict]] = []
    handle = sp.register_update_hook(lambda s, stats: seen.append((s.step, stats)))
    order: list[str] = []
    sp.register_update_hook(lambda s, stats: order.append("second"))
    train_steps(model, opt, 6, input_size=(3, 8, 8))
    assert [step for step, _ in seen] == [2, 4, 6]
    assert all(stats["step"] == step and "replaced" in stats for step, stats in seen)
    assert seen[-1][1] is sp.last_update and len(order) == 3
    handle.remove()
    train_steps(model, opt, 2, input_size=(3, 8, 8), seed=1)
    assert len(seen) == 3 and len(order) == 4  # the removed hook is silent, the other still called


# --------------------------------------------------------------- one source of truth for settings
def test_sparsify_takes_a_config_or_its_fields_and_nothing_else():
    config = itop_timm.SparsityConfig(method="set", density=0.3, total_steps=10, seed=4)
    a, b = tiny_cnn(), tiny_cnn()
    by_config = sparsify(a, sgd(a), config)
    by_fields = sparsify(b, sgd(b), method="set", density=0.3, total_steps=10, seed=4)
    assert all(torch.equal(by_config.masks[n], m) for n, m in by_fields.masks.items())
    assert by_config.config == by_fields.config
    c = tiny_cnn()
    before = snapshot(c)
    with pytest.raises(
        ValueError, match=r"give either config or settings, not both \(got config and \['seed'\]\)"
    ):
        sparsify(c, sgd(c), config, seed=1)
    with pytest.raises(ValueError, match=r"a method name is given as method='set'"):
        sparsify(c, sgd(c), "set", density=0.3, total_steps=10)
    with pytest.raises(ValueError, match=r"unknown sparsity setting\(s\) \['densty'\]"):
        sparsify(c, sgd(c), densty=0.3)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(c).items())


def test_library_defaults_are_written_only_on_the_config_fields():
    import inspect

    from itop_timm.densities import compute_layer_densities

    settings = {f.name for f in __import__("dataclasses").fields(itop_timm.SparsityConfig)}
    assert not settings & set(inspect.signature(sparsify).parameters)  # taken as **settings only
    assert (
        inspect.signature(compute_layer_densities).parameters["distribution"].default
        is inspect.Parameter.empty
    )
    assert inspect.signature(create_schedule).parameters["final"].default is None  # none of its own
    resolved = itop_timm.SparsityConfig.resolve(total_steps=10)
    assert (resolved.method, resolved.density) == ("rigl", 0.1)
    assert resolved.distribution == itop_timm.SPARSIFY_DEFAULTS["distribution"] == "erk"
    with pytest.raises(ValueError, match="decays over training: pass final_prune_rate"):
        create_schedule("cosine", 0.5, None, 100)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"update_interval": True}, r"update_interval must be an integer >= 1 \(optimizer steps\), got True"),
        ({"density": float("nan")}, r"density must be in \(0, 1\], got nan"),
        ({"seed": 1.5}, r"seed must be an integer in \[0, 4294967295\], got 1.5"),
        ({"final_prune_rate": -0.1}, r"final_prune_rate must be in \[0, 1\], got -0.1"),
        ({"include": [3]}, r"include must be fnmatch patterns \(strings\), got \[3\]"),
        ({"method_options": ["a"]}, r"method_options must be a mapping of option names, got \['a'\]"),
    ],
)
def test_every_setting_is_checked_by_its_declaration(settings, message):
    with pytest.raises(ValueError, match=message):
        itop_timm.SparsityConfig(**settings)


def test_range_describes_what_it_allows():
    from itop_timm.validation import Range

    assert Range(int, 1).describe() == "an integer >= 1"
    assert Range(int, 0).describe() == "a non-negative integer"
    assert Range(float, 0, 1, low_open=True).describe() == "in (0, 1]"
    assert Range(float, 0, low_open=True, optional=True).describe() == "> 0 or null"
    assert Range(float, 0, 1).check("x", 1) == 1.0 and isinstance(Range(float, 0, 1).check("x", 1), float)
    for bad in (True, float("nan"), "0.5", 2):
        assert not Range(float, 0, 1).contains(bad)


@settings(max_examples=40, deadline=None)
@given(seed=st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([-1, 2**32 - 1, 2**32, 2**64])))
def test_seeds_are_checked_with_the_other_settings(seed):
    """Issue 27 class 16: a seed no generator takes fails as a ValueError naming it and the range,
    before anything is touched; every seed in the range builds the masks."""
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if 0 <= seed < 2**32:
        assert sparsify(model, opt, method="set", density=0.5, total_steps=10, seed=seed).config.seed == seed
        return
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 4294967295\], got -?\d+$"):
        sparsify(model, opt, method="set", density=0.5, total_steps=10, seed=seed)
    assert len(opt._optimizer_step_post_hooks) == 0


# --------------------------------------------------------------- registration
def test_method_defaults_are_checked_when_the_method_is_registered():
    from itop_timm.methods.scores import magnitude_score

    with pytest.raises(
        ValueError, match=r"unknown default\(s\) \['update_intervall'\]; allowed: \[.*'update_interval'"
    ):
        MethodInfo("misspelt", magnitude_score, magnitude_score, defaults={"update_intervall": 5})
    with pytest.raises(ValueError, match=r"method 'zero': default update_interval must be an integer >= 1"):
        MethodInfo("zero", magnitude_score, magnitude_score, defaults={"update_interval": 0})
    assert "misspelt" not in METHODS and "zero" not in METHODS


def test_importing_the_package_exposes_its_documented_submodules():
    import subprocess
    import sys

    code = (
        "import itop_timm; itop_timm.averaging.PeriodicWeightAveraging; itop_timm.structured.RMDA; "
        "itop_timm.methods.chase.ChaseRule; itop_timm.structured.compact"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------- restrict: the narrow way to change masks
def test_restrict_takes_weights_away_and_tells_the_update_hooks():
    model = tiny_cnn()
    opt = sgd(model)
    sp = sparsify(model, opt, method="set", density=0.5, total_steps=10)
    name = next(iter(sp.masks))
    rows = torch.ones(sp.masks[name].shape[0], *[1] * (sp.masks[name].dim() - 1), dtype=torch.bool)
    rows[:2] = False
    seen = []
    sp.register_update_hook(lambda s, stats: seen.append(stats))
    union_before = {n: u.clone() for n, u in sp.ever_active.items()}
    active_before = int(sp.masks[name].sum())
    stats = sp.restrict({name: rows})
    assert not sp.masks[name][:2].any() and int(sp.masks[name].sum()) == active_before - stats["removed"]
    assert not dict(model.named_parameters())[name][:2].any()  # the weights went with the mask
    assert seen == [stats] and stats["event"] == "restrict" and stats["density"] == sp.density
    assert all(torch.equal(sp.ever_active[n], u) for n, u in union_before.items())
    masks_before = {n: m.clone() for n, m in sp.masks.items()}
    for bad, message in (
        ({"nope.weight": rows}, r"allowed \['nope.weight'\] name no parameter"),
        ({name: torch.full(rows.shape, 0.5)}, r"must be bool or hold only 0/1"),
        ({name: torch.ones(3, 3, 3, 3, 3, dtype=torch.bool)}, r"has shape"),
    ):
        with pytest.raises(ValueError, match=message):
            sp.restrict(bad)
    assert all(torch.equal(sp.masks[n], m) for n, m in masks_before.items()) and len(seen) == 1


# --------------------------------------------------------------- API misuse, layers without a gradient
def test_second_sparsify_on_the_same_optimizer_is_refused():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = itop_timm.sparsify(model, opt, density=0.2, total_steps=10)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    with pytest.raises(ValueError, match="already sparsified.*call its .remove"):
        itop_timm.sparsify(model, opt, density=0.5, total_steps=10)
    train_steps(model, opt, 2, input_size=(3, 32, 32))
    assert all(torch.equal(sp.masks[n], masks[n]) for n in masks)  # one hook, untouched masks
    assert sp.density == pytest.approx(0.2, abs=1e-3)
    sp.remove()  # the legitimate neighbour: replace the sparsifier after removing the first
    sp2 = itop_timm.sparsify(model, opt, density=0.5, total_steps=10)
    train_steps(model, opt, 2, input_size=(3, 32, 32))
    assert sp2.density == pytest.approx(0.5, abs=1e-3)
    params = dict(model.named_parameters())
    assert all(not params[n][~m].any() for n, m in sp2.masks.items())  # the second masks hold
    assert any(params[n][~masks[n]].any() for n in masks)  # and the removed first hook no longer masks
    other = torch.optim.SGD(model.parameters(), lr=0.05)  # a new optimizer (e.g. fine-tuning) is fine
    sp2.remove()
    itop_timm.sparsify(model, other, density=0.3, total_steps=10)


def grad_less_setup(method: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = itop_timm.sparsify(
        model,
        opt,
        method=method,
        density=0.5,
        distribution="uniform",
        update_interval=1000,
        total_steps=10**4,
    )
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model, sp


@pytest.mark.parametrize("method", ["rigl", "snfs"])
def test_gradient_grown_update_skips_layers_without_gradient(method, caplog):
    model, sp = grad_less_setup(method)
    model[0].weight.grad = None  # unused in the forward pass / frozen / zero_grad(set_to_none=True)
    before = {n: m.clone() for n, m in sp.masks.items()}
    update = sp.update_topology()
    assert update["no_grad_layers"] == ["0.weight"] and "0.weight" not in update["layers"]
    assert torch.equal(sp.masks["0.weight"], before["0.weight"])  # not pruned, not regrown by tie-breaking
    assert not torch.equal(sp.masks["2.weight"], before["2.weight"])  # the layer with a gradient is updated
    assert "have no gradient" in caplog.text


def test_random_grown_update_still_changes_layers_without_gradient():
    model, sp = grad_less_setup("set")  # SET grows at random: no gradient needed
    model[0].weight.grad = None
    before = sp.masks["0.weight"].clone()
    update = sp.update_topology()
    assert "no_grad_layers" not in update and not torch.equal(sp.masks["0.weight"], before)
