"""The checkpoint's model card (``README.md``): Hub front matter, metrics, training facts, how to load."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..validation import is_number

__all__ = ["model_card", "card_metadata", "plain_timm_instructions"]


def card_metadata(meta: Mapping[str, Any], repo_hint: str) -> dict[str, Any]:
    """The card's YAML front matter, following the Hub's model-card conventions (``datasets``,
    ``metrics``, ``model-index``), with nothing but what produced these weights."""
    card: dict[str, Any] = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "sparse", "itop_timm", f"itop_timm-{meta['method']}"],
    }
    dataset = meta.get("dataset")
    hub_dataset = dataset if isinstance(dataset, str) and dataset.count("/") == 1 else None
    if hub_dataset:
        card["datasets"] = [hub_dataset]
    accuracy = {k: v for k, v in (meta.get("metrics") or {}).items() if "top1" in k and is_number(v)}
    if accuracy:
        card["metrics"] = ["accuracy"]
    if accuracy and dataset:
        card["model-index"] = [
            {
                "name": repo_hint.split("/")[-1],
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": dataset, "type": hub_dataset or dataset},
                        "metrics": [
                            {"type": "accuracy", "name": name, "value": float(value)}
                            for name, value in accuracy.items()
                        ],
                    }
                ],
            }
        ]
    return card


def model_card(meta: Mapping[str, Any], repo_hint: str, compact: bool) -> str:
    """The card's Markdown for the checkpoint described by ``meta``; ``repo_hint`` is the repo id its
    load snippets name (``push_to_hub`` replaces the placeholder with the real one)."""
    import yaml

    arch = meta["architecture"]
    lines = [
        "---",
        yaml.safe_dump(card_metadata(meta, repo_hint), sort_keys=False).rstrip("\n"),
        "---",
        f"# {arch} — sparse ({meta['method']})",
        "",
    ]
    if meta["method"] == "dense":
        lines.append("Dense model saved with itop_timm.")
    else:
        lines += [
            f"Trained sparse with itop_timm (method `{meta['method']}`): "
            f"**density {meta['density']:.4f}** ({100 * (1 - meta['density']):.2f} % of conv/linear weights are zero)"
            + (
                f", In-Time Over-Parameterization rate **R_s = {meta['itop_rate']:.4f}**"
                if meta.get("itop_rate") is not None
                else ""
            )
            + (f" after {meta['step']} optimizer steps." if meta.get("step") is not None else "."),
        ]
    if meta.get("metrics"):
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in meta["metrics"].items()
        ]
    lines += ["", "## Training", ""]
    lines += [
        f"- data set: {meta.get('dataset') or 'not recorded'}",
        f"- method: `{meta['method']}`",
        f"- itop_timm {meta.get('itop_timm_version')}, timm {meta.get('timm_version')}",
    ]
    if meta.get("training_config"):
        lines += [
            "",
            "Recipe config:",
            "",
            "```yaml",
            yaml.safe_dump(dict(meta["training_config"]), sort_keys=False).rstrip("\n"),
            "```",
        ]
    if meta["tensors"]:
        lines += ["", "## Per-layer sparsity", "", "| tensor | shape | density | R_s |", "|---|---|---|---|"]
        for name, t in meta["tensors"].items():
            rs = f"{t['itop_rate']:.4f}" if t.get("itop_rate") is not None else "–"
            lines.append(f"| `{name}` | {tuple(t['shape'])} | {t['density']:.4f} | {rs} |")
    load_timm = plain_timm_instructions(meta, repo_hint, compact)
    lines += [
        "",
        "## How to load",
        "",
        load_timm,
        "",
        "With itop_timm (verifies masks, hashes and densities; gives the masks to continue sparse training):",
        "",
        "```python\nimport itop_timm\n"
        f'model, masks, meta = itop_timm.load_sparse("hf-hub:{repo_hint}")\n'
        "# continue training sparse from these masks:\n"
        "# sp = itop_timm.sparsify(model, optimizer, masks=masks, total_steps=...)\n```",
        "",
    ]
    return "\n".join(lines)


def plain_timm_instructions(meta: Mapping[str, Any], repo_hint: str, compact: bool) -> str:
    """The card's paragraph on loading with plain timm: the snippet when timm can load the folder as is;
    for compact storage (timm would pick ``model.compact.safetensors`` and fail with a size mismatch)
    the dense re-export that it can load; for a torch-pruning compacted model, that only itop_timm can."""
    if "structured" in meta:
        return (
            "Channels of this model were removed with torch-pruning (`itop-timm compact`): its layers are "
            f"smaller than timm's `{meta['architecture']}`, so plain timm cannot build it. Load it with "
            "itop_timm (below), which rebuilds the compacted architecture."
        )
    if compact:
        return (
            "This is a *compact* export (`model.compact.safetensors`: nonzero values + bit masks). Plain timm "
            "cannot load it: `timm.create_model(..., pretrained=True)` picks `model.compact.safetensors` "
            "and fails with a size mismatch. Load it with itop_timm (below), or write a dense copy "
            "(`model.safetensors`, exact zeros off-mask) that plain timm loads:\n\n"
            f"```bash\nitop-timm export hf-hub:{repo_hint} dense-copy   # or a local folder; no --compact\n```\n\n"
            "```python\nimport timm\n"
            'model = timm.create_model("local-dir:dense-copy", pretrained=True)\n```'
        )
    return (
        "Plain timm reads `model.safetensors` (dense tensors with exact zeros):\n\n"
        "```python\nimport timm\n"
        f'model = timm.create_model("hf-hub:{repo_hint}", pretrained=True)      # from the Hub\n'
        'model = timm.create_model("local-dir:path/to/folder", pretrained=True)  # from a local copy\n```'
    )
