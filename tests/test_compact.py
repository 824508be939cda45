"""Compaction of zeroed channels (torch-pruning): exactness, masks, checkpoints, groups, importance."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch_pruning as tp
from helpers import checkpoint_metadata, forge_metadata, randomize_batchnorm, write_folder
from torch import nn

from itop_timm.checkpoint import SparseState, load_sparse, save_sparse
from itop_timm.structured import compact, compact_checkpoint, rebuild_compacted
from itop_timm.structured.compact import HISTORY_ATTR
from itop_timm.structured.dependency import ChannelGroup, coupled_channel_groups
from itop_timm.structured.importance import MaskImportance

# (timm name, input size, extra create_model kwargs)
MODELS = {
    "resnet18": (32, {}),
    "convnext_atto": (32, {}),
    "mobilenetv3_small_050": (32, {}),  # depthwise convs, squeeze-excite with hard-sigmoid gates
    "regnetx_002": (32, {}),  # grouped convs
    "vit_tiny_patch16_224": (32, {"img_size": 32}),
}


def make_model(name: str) -> tuple[nn.Module, int]:
    """A random timm model in eval mode with non-trivial BatchNorm statistics and affine parameters."""
    size, kwargs = MODELS[name]
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    return model, size


def zero_role(model: nn.Module, group: ChannelGroup, channels: list[int], role: str) -> None:
    """Zero every ``role`` slice ("producer" / "consumer") of ``channels`` in ``group``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for s in group.slices:
            if s.role != role:
                continue
            sel = s.index[torch.isin(s.channel, torch.tensor(channels))]
            params[s.param_name].index_fill_(s.dim, sel, 0.0)


def expected_shapes(
    model: nn.Module, groups: list[ChannelGroup], removed: dict[str, set[int]]
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes after removing ``removed[group.name]`` channels, from the groups' slices."""
    gone: dict[tuple[str, int], set[int]] = {}
    for g in groups:
        chans = removed.get(g.name, set())
        for s in g.slices:
            for pos, ch in zip(s.index.tolist(), s.channel.tolist(), strict=True):
                if ch in chans:
                    gone.setdefault((s.param_name, s.dim), set()).add(pos)
    shapes = {}
    for name, p in model.named_parameters():
        shape = list(p.shape)
        for d in range(p.ndim):
            shape[d] -= len(gone.get((name, d), ()))
        shapes[name] = tuple(shape)
    return shapes


def has_grouped_conv(model: nn.Module, group: ChannelGroup) -> bool:
    modules = dict(model.named_modules())
    for s in group.slices:
        m = modules.get(s.param_name.rsplit(".", 1)[0])
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels:
            return True
    return False


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", list(MODELS))
def test_compact_removes_zero_channels_exactly(name):
    model, size = make_model(name)
    groups = coupled_channel_groups(model, torch.zeros(1, 3, size, size))
    candidates = [g for g in groups if g.exact and g.num_channels >= 8 and not has_grouped_conv(model, g)]
    assert candidates, "no exact group to compact"
    chosen = candidates[:: max(1, len(candidates) // 4)][:4]
    rng = torch.Generator().manual_seed(2)
    removed: dict[str, set[int]] = {}
    for g in chosen:
        chans = torch.randperm(g.num_channels, generator=rng)[:4].tolist()
        zero_role(model, g, chans[:2], "producer")  # identically zero channels
        zero_role(model, g, chans[2:], "consumer")  # channels nobody reads
        removed[g.name] = set(chans)
    if name == "regnetx_002":  # a grouped-conv group: only whole classes (the same slot in every group) go
        g = next(g for g in groups if g.name == "s1.b1.conv1.conv")
        zero_role(model, g, [1, 9, 17, 5, 13, 21], "producer")  # slots 1 and 5 of the 3 groups of 8
        zero_role(model, g, [3], "producer")  # slot 3 only in the first group: must stay
        removed[g.name] = {1, 9, 17, 5, 13, 21}
    expected = expected_shapes(model, groups, removed)
    n_before = sum(p.numel() for p in model.parameters())
    expected_drop = n_before - sum(torch.Size(s).numel() for s in expected.values())
    assert expected_drop > 0

    x = torch.randn(4, 3, size, size, generator=rng)
    with torch.no_grad():
        y_before = model(x)
    out, report = compact(model, torch.randn(1, 3, size, size))

    assert out is model
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == expected
    assert n_before - sum(p.numel() for p in model.parameters()) == expected_drop
    assert report["params_before"] - report["params_after"] > 0
    assert report["macs_after"] < report["macs_before"]
    assert report["channels_removed_total"] == sum(len(c) for c in removed.values())
    assert report["groups"] == len(groups)
    assert report["groups_non_exact"] == sum(not g.exact for g in groups)
    with torch.no_grad():
        y_after = model(x)
    assert (y_after - y_before).abs().max().item() <= 1e-5
    assert not model.training
    history = getattr(model, HISTORY_ATTR)
    assert history["input_size"] == [3, size, size] and len(history["history"]) == report["groups_removable"]
    if name == "regnetx_002":
        conv2 = model.s1.b1.conv2.conv
        assert (conv2.in_channels, conv2.groups, conv2.weight.shape[1]) == (18, 3, 6)


def test_vit_compacts_only_mlp_hidden_channels():
    model, size = make_model("vit_tiny_patch16_224")
    groups = coupled_channel_groups(model, torch.zeros(1, 3, size, size))
    for g in groups:
        producers = {s.param_name for s in g.slices if s.role == "producer"}
        if any(n.endswith("mlp.fc1.weight") for n in producers):
            assert g.exact, g.name
        else:
            assert not g.exact, (g.name, sorted(producers)[:3])


def test_zeroing_a_whole_group_keeps_one_channel():
    model, size = make_model("resnet18")
    groups = coupled_channel_groups(model, torch.zeros(1, 3, size, size))
    g = next(g for g in groups if g.name == "layer1.0.conv1")
    zero_role(model, g, list(range(g.num_channels)), "producer")
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        y_before = model(x)
    _, report = compact(model, torch.zeros(1, 3, size, size))
    assert model.layer1[0].conv1.out_channels == 1
    assert tuple(model.layer1[0].conv2.weight.shape[:2]) == (64, 1)
    assert report["channels_removed"]["layer1.0.conv1"] == {"out": g.num_channels - 1, "in": 0}
    with torch.no_grad():
        assert (model(x) - y_before).abs().max().item() <= 1e-5


def test_tol_counts_small_weights_as_zero():
    model, size = make_model("resnet18")
    g = next(
        g for g in coupled_channel_groups(model, torch.zeros(1, 3, size, size)) if g.name == "layer2.0.conv1"
    )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for s in g.slices:  # channels 0, 1: consumer weights tiny but nonzero
            if s.role == "consumer":
                sel = s.index[s.channel < 2]
                params[s.param_name].index_fill_(s.dim, sel, 1e-7)
    model.train()
    _, exact = compact(copy.deepcopy(model), torch.zeros(1, 3, size, size))
    _, loose = compact(model, torch.zeros(1, 3, size, size), tol=1e-6)
    assert exact["channels_removed_total"] == 0
    assert loose["channels_removed"]["layer2.0.conv1"]["out"] == 2
    assert model.layer2[0].conv1.out_channels == 126
    assert model.training and all(m.training for m in model.modules())  # the mode is restored
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- masks
def random_masks(model: nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if p.ndim > 1}


def test_masks_follow_the_compaction():
    model, size = make_model("resnet18")
    masks = random_masks(model, 0.6, seed=3)
    dead = [1, 5, 9]
    masks["layer1.0.conv1.weight"][dead] = False  # whole filters masked ...
    with torch.no_grad():
        model.layer1[0].bn1.weight[dead] = 0.0  # ... and their BatchNorm gamma and beta zero
        model.layer1[0].bn1.bias[dead] = 0.0
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        y_before = model(x)

    _, report = compact(model, torch.zeros(1, 3, size, size), masks=masks)

    new_masks = report["masks"]
    params = dict(model.named_parameters())
    assert set(new_masks) == set(masks)
    keep = [c for c in range(64) if c not in dead]
    for name, mask in new_masks.items():
        p = params[name]
        assert mask.dtype == torch.bool and mask.shape == p.shape, name
        assert bool((p[~mask] == 0).all()), name
    assert torch.equal(new_masks["layer1.0.conv1.weight"], masks["layer1.0.conv1.weight"][keep])
    assert torch.equal(new_masks["layer1.0.conv2.weight"], masks["layer1.0.conv2.weight"][:, keep])
    assert torch.equal(params["layer1.0.conv1.weight"], old["layer1.0.conv1.weight"][keep])
    assert torch.equal(params["layer1.0.conv2.weight"], old["layer1.0.conv2.weight"][:, keep])
    for name in set(masks) - {"layer1.0.conv1.weight", "layer1.0.conv2.weight"}:
        assert torch.equal(new_masks[name], masks[name]), name
        assert torch.equal(params[name], old[name]), name
    with torch.no_grad():
        assert (model(x) - y_before).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- checkpoints
def test_save_and_load_rebuild_the_compact_architecture(tmp_path):
    model, size = make_model("resnet18")
    masks = random_masks(model, 0.7, seed=4)
    masks["layer2.0.conv2.weight"][:, [3, 4]] = False  # inputs 3, 4 of layer2.0.conv2 unread
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    _, first = compact(model, torch.zeros(1, 3, size, size), masks=masks)
    # a second round (e.g. after more training): the history is appended
    g = next(
        g for g in coupled_channel_groups(model, torch.zeros(1, 3, size, size)) if g.name == "layer3.0.conv1"
    )
    zero_role(model, g, [0, 7], "consumer")
    masks2 = first["masks"]
    masks2["layer3.0.conv2.weight"][:, [0, 7]] = False
    _, second = compact(model, torch.zeros(1, 3, size, size), masks=masks2)
    assert first["channels_removed_total"] == 2 and second["channels_removed_total"] == 2
    assert len(getattr(model, HISTORY_ATTR)["history"]) == 2

    folder = save_sparse(model, SparseState(second["masks"]), tmp_path / "ckpt", model_name="resnet18")
    loaded, loaded_masks, meta = load_sparse(folder)

    assert meta["structured"]["input_size"] == [3, size, size]
    assert {n: p.shape for n, p in loaded.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }
    assert loaded.layer2[0].conv1.out_channels == 126 and loaded.layer3[0].conv1.out_channels == 254
    for name, mask in second["masks"].items():
        assert torch.equal(loaded_masks[name], mask), name
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_trace_memory_is_estimated_on_the_meta_device():
    from itop_timm.structured.dependency import trace_memory_bytes

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    small = trace_memory_bytes(model, torch.zeros(1, 3, 64, 64))
    # the input size of issue 27's forged checkpoint: ~15 GB to trace, nothing allocated to estimate it
    huge = trace_memory_bytes(model, torch.empty(1, 3, 8192, 8192, device="meta"))
    assert small is not None and huge is not None
    assert 0.5 * 2**20 < small < 16 * 2**20  # 64 px: about 2 MiB of activations
    assert huge == pytest.approx(small * (8192 / 64) ** 2, rel=0.05)  # activations scale with the pixels
    assert huge > 15 * 2**30


def test_a_forged_input_size_is_refused_before_the_trace_allocates(tmp_path, monkeypatch):
    from itop_timm.checkpoint import CheckpointError
    from itop_timm.structured.dependency import tracing

    model, size = make_model("resnet18")
    masks = random_masks(model, 0.7, seed=4)
    masks["layer2.0.conv2.weight"][:, [3, 4]] = False
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    _, report = compact(model, torch.zeros(1, 3, size, size), masks=masks)
    saved = save_sparse(model, SparseState(report["masks"]), tmp_path / "saved", model_name="resnet18")
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    meta = checkpoint_metadata(files)
    meta["structured"]["input_size"] = [3, 1024, 1024]  # within the element bound: 0.4 GiB to trace
    folder = write_folder(tmp_path / "ckpt", forge_metadata(files, json.dumps(meta)))
    monkeypatch.setattr(tracing, "MAX_TRACE_BYTES", 64 * 2**20)  # a limit this forged size exceeds
    traced = []
    monkeypatch.setattr(
        "torch_pruning.DependencyGraph.build_dependency", lambda *a, **k: traced.append(a) or None
    )

    with pytest.raises(CheckpointError, match=r"ckpt.*would keep 0\.4\d GiB of activations, more than"):
        load_sparse(folder)
    assert not traced  # refused on the estimate, before torch-pruning ran anything


def test_compact_checkpoint_round_trip(tmp_path):
    model, size = make_model("mobilenetv3_small_050")
    masks = random_masks(model, 0.8, seed=5)
    g = next(
        g
        for g in coupled_channel_groups(model, torch.zeros(1, 3, size, size))
        if g.exact and g.num_channels >= 16
    )
    for s in g.slices:  # channels 2, 3 masked in every consumer
        if s.role == "consumer":
            index = [slice(None)] * masks[s.param_name].ndim
            index[s.dim] = s.index[(s.channel >= 2) & (s.channel < 4)]
            masks[s.param_name][tuple(index)] = False
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    src = save_sparse(model, SparseState(masks), tmp_path / "src", model_name="mobilenetv3_small_050")

    report = compact_checkpoint(src, tmp_path / "dst", input_size=(3, size, size))

    assert "masks" not in report and report["channels_removed_total"] == 2
    x = torch.randn(4, 3, size, size)
    reference, ref_masks, _ = load_sparse(src)  # the same compaction, in memory
    with torch.no_grad():
        y_original = reference(x)
    _, ref_report = compact(reference, torch.zeros(1, 3, size, size), masks=ref_masks)
    loaded, loaded_masks, meta = load_sparse(tmp_path / "dst")
    assert meta["extra"]["compaction"]["channels_removed_total"] == 2
    assert meta["extra"]["compaction"]["params_after"] == report["params_after"] < report["params_before"]
    assert {n: p.shape for n, p in loaded.named_parameters()} == {
        n: p.shape for n, p in reference.named_parameters()
    }
    for name, mask in ref_report["masks"].items():
        assert torch.equal(loaded_masks[name], mask), name
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
        assert (loaded(x) - y_original).abs().max().item() <= 1e-5


def test_compact_checkpoint_of_a_dense_checkpoint(tmp_path):
    # e.g. RMDA: no masks, whole channels driven to zero by the group-LASSO prox
    model, size = make_model("resnet18")
    g = next(
        g for g in coupled_channel_groups(model, torch.zeros(1, 3, size, size)) if g.name == "layer3.0.conv1"
    )
    zero_role(model, g, [4, 5, 6], "producer")
    src = save_sparse(model, None, tmp_path / "src", model_name="resnet18")

    report = compact_checkpoint(src, tmp_path / "dst", input_size=(3, size, size))

    loaded, masks, meta = load_sparse(tmp_path / "dst")
    assert report["channels_removed"]["layer3.0.conv1"] == {"out": 3, "in": 0}
    assert masks == {} and loaded.layer3[0].conv1.out_channels == 253
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "regnetx_002", "vit_tiny_patch16_224"])
def test_group_slices_are_consistent(name):
    model, size = make_model(name)
    model.train()
    groups = coupled_channel_groups(model, torch.zeros(1, 3, size, size))
    assert model.training and all(m.training for m in model.modules())
    params = dict(model.named_parameters())
    classifier = {f"{n}.weight" for n, m in model.named_modules() if m is model.get_classifier()}
    assert groups
    for g in groups:
        numel = torch.zeros(g.num_channels, dtype=torch.long)
        produced = torch.zeros(g.num_channels, dtype=torch.bool)
        for s in g.slices:
            p = params[s.param_name]
            assert s.role in ("producer", "consumer")
            assert 0 <= s.dim < p.ndim and s.index.shape == s.channel.shape and s.index.numel() > 0
            assert int(s.index.min()) >= 0 and int(s.index.max()) < p.shape[s.dim], (g.name, s.param_name)
            assert int(s.channel.min()) >= 0 and int(s.channel.max()) < g.num_channels
            assert s.index.unique().numel() == s.index.numel(), "a position listed twice"
            assert not (s.role == "producer" and s.param_name in classifier), "classifier outputs pruned"
            numel.index_add_(0, s.channel, torch.full_like(s.channel, p.numel() // p.shape[s.dim]))
            if s.role == "producer":
                produced[s.channel] = True
        assert bool(produced.all()), g.name
        assert torch.equal(g.numel, numel), g.name
    if name == "convnext_atto":
        stem = next(g for g in groups if any(s.param_name == "stem.1.weight" for s in g.slices))
        assert not stem.exact  # the residual stream runs through LayerNorms
        assert any(g.exact for g in groups)  # the MLP hidden channels
    if name == "resnet18":
        assert all(g.exact for g in groups)


def test_grouped_conv_input_slice_lists_positions_once():
    model, size = make_model("regnetx_002")
    g = next(
        g
        for g in coupled_channel_groups(model, torch.zeros(1, 3, size, size))
        if g.name == "s1.b1.conv1.conv"
    )
    (s,) = [s for s in g.slices if s.param_name == "s1.b1.conv2.conv.weight"]
    assert s.role == "consumer" and s.dim == 1
    assert s.index.tolist() == list(range(8)) and s.channel.tolist() == list(range(8))


# ----------------------------------------------------------------------------- importance
@pytest.mark.parametrize("mode", ["density", "norm"])
def test_mask_importance_prunes_masked_filters_first(mode):
    model, size = make_model("resnet18")
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.ndim > 1}
    dead = [3, 7, 11, 40]
    masks["layer1.0.conv1.weight"][dead] = False  # the weights themselves stay nonzero
    imp = MaskImportance(masks, mode=mode)
    scores = imp(
        tp.DependencyGraph()
        .build_dependency(model, torch.zeros(1, 3, size, size))
        .get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, list(range(64)))
    )
    assert scores.shape == (64,)
    assert float(scores[dead].max()) < float(scores[[c for c in range(64) if c not in dead]].min())

    pruner = tp.pruner.MetaPruner(
        model,
        torch.zeros(1, 3, size, size),
        importance=imp,
        pruning_ratio=0.1,
        ignored_layers=[model.get_classifier()],
    )
    pruner.step()
    (entry,) = [e for e in pruner.pruning_history() if e[0] == "layer1.0.conv1"]
    assert entry[1] is True and set(dead) <= set(entry[2]) and len(entry[2]) == 64 - int(64 * 0.9)
    assert model.layer1[0].conv1.out_channels == 64 - len(entry[2])


def test_mask_importance_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        MaskImportance({}, mode="l1")
    with pytest.raises(ValueError, match="bool"):
        MaskImportance({"w": torch.ones(3)})


# ----------------------------------------------------------------------------- bad input
class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.b(self.a(x).detach()).mean((2, 3)))


class _NoTensorOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return {"logits": [self.a(x).sum().item()]}


def test_bad_input_raises_before_modifying():
    model, size = make_model("resnet18")
    state = copy.deepcopy(model.state_dict())
    x = torch.zeros(1, 3, size, size)
    with pytest.raises(ValueError, match=r"does not run through resnet18 \(layer 'conv1'"):
        compact(model, torch.randn(1, 7, size, size))
    with pytest.raises(ValueError, match="tol"):
        compact(model, x, tol=-1)
    with pytest.raises(ValueError, match="name no parameter"):
        compact(model, x, masks={"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        compact(model, x, masks={"conv1.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be bool or hold only 0/1"):
        compact(model, x, masks={"conv1.weight": torch.full_like(model.conv1.weight, 0.5)})
    with pytest.raises(ValueError, match="example_inputs"):
        compact(model, [x])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, HISTORY_ATTR)

    with pytest.raises(ValueError, match="_NoTensorOutput"):
        coupled_channel_groups(_NoTensorOutput(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"cannot compact _Detached: layers \['a'\]"):
        compact(_Detached(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="input_size"):
        rebuild_compacted(make_model("resnet18")[0], {"history": [], "input_size": [3, -1]})
    with pytest.raises(ValueError, match="replay"):
        rebuild_compacted(
            make_model("resnet18")[0], {"history": [["nope", True, [0]]], "input_size": [3, 32, 32]}
        )
