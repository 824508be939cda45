"""Channel classes: channels of a group that can only be removed together, and channels never removable."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["channel_classes"]


def _unmerged_items(graph: Any, tp_group: Any) -> list[tuple[Any, list[Any]]]:
    """The (dependency, [(idx, root_idx), ...]) pairs torch-pruning's traversal visits for the whole group,
    before ``get_pruning_group`` merges them and keeps one root index per position."""
    from torch_pruning import _helpers

    root = tp_group[0].dep
    start = [_helpers._HybridIndex(idx=int(i), root_idx=int(i)) for i in tp_group[0].idxs]
    items = [(root, start)]
    stack = [(root.target, root.handler, start)]
    visited: set[Any] = set()
    seen: set[tuple[Any, Any, tuple[Any, ...]]] = set()
    while stack:
        node, fn, idxs = stack.pop()
        visited.add(node)
        for dep in node.dependencies:
            if not dep.is_triggered_by(fn):
                continue
            new = idxs
            for mapping in dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            if not new:
                continue
            key = (dep.target, dep.handler, tuple(new))
            if dep.target in visited and key in seen:
                continue
            seen.add(key)
            items.append((dep, new))
            stack.append((dep.target, dep.handler, new))
    return items


def channel_classes(graph: Any, tp_group: Any, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Union-find over channels that must be removed together: channels torch-pruning reaches at the same
    position of some layer (e.g. GhostNet's ``cat([x, depthwise(x)])``), and grouped convolutions' slots."""
    from torch_pruning import ops
    from torch_pruning.pruner import function as F

    parent = list(range(num))
    pinned = torch.zeros(num, dtype=torch.bool)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(roots: list[int]) -> None:
        for r in roots[1:]:
            a, b = find(roots[0]), find(r)
            parent[max(a, b)] = min(a, b)

    reached: dict[tuple[Any, Any, int], set[int]] = {}
    for dep, idxs in _unmerged_items(graph, tp_group):
        for h in idxs:
            if h.root_idx is not None and 0 <= int(h.root_idx) < num:
                reached.setdefault((dep.target, dep.handler, int(h.idx)), set()).add(int(h.root_idx))
    for roots in reached.values():
        if len(roots) > 1:
            union(sorted(roots))

    for item in tp_group:
        module, handler = item.dep.target.module, item.dep.handler
        pruner = getattr(handler, "__self__", None)
        if not isinstance(module, ops.TORCH_CONV) or module.groups == 1:
            continue
        if isinstance(pruner, F.DepthwiseConvPruner):
            continue
        is_out = handler == pruner.prune_out_channels
        per = (module.out_channels if is_out else module.in_channels) // module.groups
        present = {int(i): r for i, r in zip(item.idxs, item.root_idxs, strict=True)}
        for slot in {i % per for i in present}:
            roots = [present.get(slot + k * per) for k in range(module.groups)]
            known = [int(r) for r in roots if r is not None and 0 <= int(r) < num]
            if len(known) < len(roots):
                pinned[known] = True
                continue
            union(known)
    classes = torch.tensor([find(c) for c in range(num)], dtype=torch.long)
    return classes, torch.isin(classes, classes[pinned])
