"""Sparse convolution and linear layers as autograd functions over the CPU kernels.

:func:`layer_index` lists a mask's active entries (by output and by input channel) once per mask change;
:func:`sparse_conv2d` and :func:`sparse_linear` compute a layer's output, input gradient and weight
gradient over those entries only. The weight stays the dense ``Parameter``: the kernels read the active
values from it and write its gradient at the active positions (zeros elsewhere), so optimizers,
checkpoints and everything else see the tensors they always saw. fp32, CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .build import load_kernels

__all__ = ["LayerIndex", "layer_index", "sparse_conv2d", "sparse_linear"]


@dataclass(frozen=True)
class LayerIndex:
    """A mask's active entries, listed two ways (see ``sparse_ops.cpp``): by output channel and tap
    (forward and weight gradient) and by input channel and tap (input gradient)."""

    out_ptr: torch.Tensor  # int64 [O * K * K + 1]
    out_flat: torch.Tensor  # int64: position in the dense (contiguous) weight
    out_ch: torch.Tensor  # int32: input channel
    in_ptr: torch.Tensor  # int64 [C * K * K + 1]
    in_flat: torch.Tensor  # int64
    in_o: torch.Tensor  # int32: output channel

    @property
    def nnz(self) -> int:
        return self.out_flat.numel()


def _runs(keys: torch.Tensor, count: int) -> torch.Tensor:
    """``ptr[count + 1]`` with ``ptr[j]:ptr[j + 1]`` the run of sorted ``keys`` equal to ``j``."""
    ptr = torch.zeros(count + 1, dtype=torch.int64)
    ptr[1:] = torch.bincount(keys, minlength=count).cumsum(0)
    return ptr


def layer_index(mask: torch.Tensor) -> LayerIndex:
    """The index of a conv (``[O, C, K, K]``) or linear (``[O, C]``) mask (any device; built on the CPU)."""
    mask = mask.detach().to("cpu", torch.bool)
    out_channels, in_channels = mask.shape[:2]
    k = mask.shape[-1] if mask.dim() == 4 else 1
    taps = k * k
    flat = mask.reshape(-1).nonzero().squeeze(1)
    row, within = flat // (in_channels * taps), flat % (in_channels * taps)
    ch, tap = within // taps, within % taps
    out_key = (row * taps + tap) * in_channels + ch
    out_order = torch.argsort(out_key)
    in_key = (ch * taps + tap) * out_channels + row
    in_order = torch.argsort(in_key)
    i32 = torch.int32
    return LayerIndex(
        out_ptr=_runs(row * taps + tap, out_channels * taps),
        out_flat=flat[out_order].contiguous(),
        out_ch=ch[out_order].to(i32),
        in_ptr=_runs(ch * taps + tap, in_channels * taps),
        in_flat=flat[in_order].contiguous(),
        in_o=row[in_order].to(i32),
    )


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _batch_last(t: torch.Tensor, linear: bool) -> torch.Tensor:
    """``[N, C, H, W]`` (or ``[..., C]`` for a linear layer) as a contiguous ``[C, H, W, N]`` (``[C, N]``)."""
    if linear:
        return t.reshape(-1, t.shape[-1]).t().contiguous()
    return t.permute(1, 2, 3, 0).contiguous()


def _batch_first(t: torch.Tensor, shape: torch.Size, linear: bool) -> torch.Tensor:
    """Inverse of :func:`_batch_last`, into a tensor of ``shape``."""
    if linear:
        return t.reshape(t.shape[0], -1).t().reshape(shape)
    return t.permute(3, 0, 1, 2).contiguous()


class _SparseLayer(torch.autograd.Function):
    """``y = layer(x)`` over the active weights. Inside, activations are batch-last (see
    ``sparse_ops.cpp``); ``geometry`` = (N, C, H, W, O, OH, OW, stride, padding, K)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        index: LayerIndex,
        geometry: tuple[int, ...],
        out_shape: tuple[int, ...],
    ) -> torch.Tensor:
        n, c, h, w, o, oh, ow, _, _, _ = geometry
        linear = x.dim() != 4
        xt = _batch_last(x, linear)
        weight = weight.contiguous()
        g = torch.tensor(geometry, dtype=torch.int64)
        yt = torch.empty((o, oh, ow, n), dtype=torch.float32)
        load_kernels().itop_sparse_forward(
            _ptr(g), _ptr(xt), _ptr(weight), _ptr(bias), _ptr(yt),
            _ptr(index.out_ptr), _ptr(index.out_flat), _ptr(index.out_ch), torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(xt, weight)
        ctx.index, ctx.geometry, ctx.has_bias, ctx.linear, ctx.x_shape = (
            index,
            g,
            bias is not None,
            linear,
            x.shape,
        )
        return _batch_first(yt, torch.Size(out_shape), linear)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xt, weight = ctx.saved_tensors
        index, g = ctx.index, ctx.geometry
        gyt = _batch_last(gy, ctx.linear)
        kernels, threads = load_kernels(), torch.get_num_threads()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gxt = torch.empty_like(xt)
            kernels.itop_sparse_input_grad(
                _ptr(g), _ptr(gyt), _ptr(weight), _ptr(gxt),
                _ptr(index.in_ptr), _ptr(index.in_flat), _ptr(index.in_o), threads,
            )  # fmt: skip
            gx = _batch_first(gxt, ctx.x_shape, ctx.linear)
        if ctx.needs_input_grad[1]:
            gw = torch.zeros_like(weight)
            kernels.itop_sparse_weight_grad(
                _ptr(g), _ptr(xt), _ptr(gyt), _ptr(gw),
                _ptr(index.out_ptr), _ptr(index.out_flat), _ptr(index.out_ch), threads,
            )  # fmt: skip
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gyt.reshape(gyt.shape[0], -1).sum(1)
        return gx, gw, gb, None, None, None


def sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: LayerIndex,
    stride: int,
    padding: int,
) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, stride, padding)`` for a square kernel, computed over the
    active weights listed in ``index`` (built from that mask)."""
    n, c, h, w = x.shape
    o, k = weight.shape[0], weight.shape[-1]
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    return _SparseLayer.apply(
        x, weight, bias, index, (n, c, h, w, o, oh, ow, stride, padding, k), (n, o, oh, ow)
    )


def sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: LayerIndex
) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` computed over the active weights listed in ``index``: a
    1×1 convolution over a 1×1 image whose batch is every leading position of ``x``."""
    features, o = x.shape[-1], weight.shape[0]
    n = x.numel() // features if features else 0
    return _SparseLayer.apply(
        x, weight, bias, index, (n, features, 1, 1, o, 1, 1, 1, 0, 1), (*x.shape[:-1], o)
    )
