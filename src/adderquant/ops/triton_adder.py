"""Triton kernels of ``adder2d`` for CUDA tensors (float32): forward and AdderNet's backward.

Forward is an implicit GEMM without multiplications: each program owns a tile of output
positions (rows ``m = (n, oh, ow)``) by output channels of one group and walks
``K = C_in/groups * kh * kw``, gathering the input column and the weight row of each ``k`` and
accumulating ``|x - w|`` over the tile (padded positions load 0, so they add ``|w|``).
The input gradient is a gather over the output positions that read each input pixel; the
AdderNet weight gradient ``sum (x - w) * g`` is a convolution weight gradient minus
``w * sum g``, and the exact sign weight gradient reduces over output positions in slices
added atomically.

Non-finite numbers: the forward sums ``|x - w|`` term by term in float32, so it gives the
definition's NaN and infinities; the input gradient's clamp keeps NaN and the sign gradients
take ``sign(NaN) = 0`` as ``torch.sign`` does, like the CPU kernel. Unlike the CPU kernel, the
AdderNet weight gradient (``conv2d_weight(x, g) - w * sum g``) is not recomputed where it is
non-finite: where an infinite weight meets output gradients of both signs it gives +-inf
where the definition gives NaN, and float32 overflow of ``sum x g`` is not repaired.
"""

from __future__ import annotations

from functools import cache

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(
        "adder2d on CUDA tensors needs Triton; install it (`pip install triton`) or move the "
        "tensors to the CPU with .cpu()"
    ) from error

from adderquant.ops.geometry import adder_geometry as _geometry
from adderquant.ops.geometry import check_adder_shapes
from adderquant.ops.gradients import rescale_ as _rescale_

NUM_WARPS = 4
POSITIONS_PER_SLICE = 256  # output positions one program reduces in the sign weight gradient


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, y_ptr,
    x_batch_stride, y_batch_stride, rows,
    h, w, h_out, w_out, c_in_g, c_out_g,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``y[n, t, oh, ow] = -sum_{c,u,v} |x[n, c, oh*s+u*d-p, ow*s+v*d-p] - w[t, c, u, v]|``."""
    group = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_t = offs_t < c_out_g
    hw_out = h_out * w_out
    n = offs_m // hw_out
    pos = offs_m % hw_out
    ih0 = (pos // w_out) * stride_h - pad_h
    iw0 = (pos % w_out) * stride_w - pad_w
    x_rows = x_ptr + n.to(tl.int64) * x_batch_stride + group * c_in_g * h * w
    t = group * c_out_g + offs_t
    w_cols = w_ptr + t * (c_in_g * KH * KW)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, c_in_g):
        x_chan = x_rows + c * h * w
        for u in tl.static_range(KH):
            ih = ih0 + u * dil_h
            row_ok = mask_m & (ih >= 0) & (ih < h)
            for v in tl.static_range(KW):
                iw = iw0 + v * dil_w
                ok = row_ok & (iw >= 0) & (iw < w)
                xv = tl.load(x_chan + ih * w + iw, mask=ok, other=0.0)
                wv = tl.load(w_cols + (c * KH + u) * KW + v, mask=mask_t, other=0.0)
                acc += tl.abs(xv[:, None] - wv[None, :])

    y_off = n.to(tl.int64)[:, None] * y_batch_stride + t[None, :] * hw_out + pos[:, None]
    tl.store(y_ptr + y_off, -acc, mask=mask_m[:, None] & mask_t[None, :])


@triton.jit
def _grad_input_kernel(
    x_ptr, w_ptr, g_ptr, gx_ptr,
    x_batch_stride, g_batch_stride, pixels,
    h, w, h_out, w_out, c_in_g, c_out_g,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``gx[n, c, i, j] = sum_{t, u, v} f(w[t, c, u, v] - x[n, c, i, j]) * g[n, t, oh, ow]``.

    The sum runs over the output positions whose window reads pixel ``(i, j)`` at ``(u, v)``;
    ``f`` is ``clamp(., -1, 1)`` (AdderNet) or ``sign`` (``EXACT``).
    """
    group = tl.program_id(2)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < pixels
    mask_c = offs_c < c_in_g
    hw = h * w
    n = offs_p // hw
    pix = offs_p % hw
    i = pix // w
    j = pix % w
    c = group * c_in_g + offs_c
    x_off = n.to(tl.int64)[:, None] * x_batch_stride + c[None, :] * hw + pix[:, None]
    mask = mask_p[:, None] & mask_c[None, :]
    xt = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    g_rows = g_ptr + n.to(tl.int64) * g_batch_stride
    hw_out = h_out * w_out

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for u in tl.static_range(KH):
        th = i + pad_h - u * dil_h
        oh = th // stride_h
        ok_h = mask_p & (th >= 0) & (th % stride_h == 0) & (oh < h_out)
        for v in tl.static_range(KW):
            tw = j + pad_w - v * dil_w
            ow = tw // stride_w
            ok = ok_h & (tw >= 0) & (tw % stride_w == 0) & (ow < w_out)
            g_pos = g_rows + oh * w_out + ow
            for t_local in range(0, c_out_g):
                t = group * c_out_g + t_local
                gv = tl.load(g_pos + t * hw_out, mask=ok, other=0.0)
                wv = tl.load(w_ptr + ((t * c_in_g + offs_c) * KH + u) * KW + v,
                             mask=mask_c, other=0.0)
                d = wv[None, :] - xt
                if EXACT:  # torch.sign: 0 for NaN
                    f = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
                else:  # HardTanh keeping NaN (tl.minimum/maximum may drop it)
                    f = tl.where(d != d, d, tl.minimum(tl.maximum(d, -1.0), 1.0))
                acc += f * gv[:, None]

    tl.store(gx_ptr + x_off, acc, mask=mask)


@triton.jit
def _grad_weight_sign_kernel(
    x_ptr, w_ptr, g_ptr, gw_ptr,
    x_batch_stride, g_batch_stride, rows, slices, slice_len,
    h, w, h_out, w_out, c_in_g, c_out_g,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``gw[t, k] += sum_m sign(x_col[m, k] - w[t, k]) * g[m, t]`` over one slice of rows."""
    group = tl.program_id(2) // slices
    first = (tl.program_id(2) % slices) * slice_len
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_len = c_in_g * KH * KW
    mask_t = offs_t < c_out_g
    mask_k = offs_k < k_len
    c = offs_k // (KH * KW)
    u = (offs_k % (KH * KW)) // KW
    v = offs_k % KW
    t = group * c_out_g + offs_t
    gw_off = t[:, None] * k_len + offs_k[None, :]
    mask = mask_t[:, None] & mask_k[None, :]
    wt = tl.load(w_ptr + gw_off, mask=mask, other=0.0)
    x_chan = x_ptr + (group * c_in_g + c) * h * w
    hw_out = h_out * w_out

    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for step in range(0, slice_len):
        m = first + step
        n = (m // hw_out).to(tl.int64)
        pos = m % hw_out
        ih = (pos // w_out) * stride_h - pad_h + u * dil_h
        iw = (pos % w_out) * stride_w - pad_w + v * dil_w
        # "m < rows" as blocks: Triton's interpreter turns (block & scalar) masks into int32
        ok = mask_k & (offs_k * 0 + m < rows) & (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
        xv = tl.load(x_chan + n * x_batch_stride + ih * w + iw, mask=ok, other=0.0)
        gv = tl.load(g_ptr + n * g_batch_stride + t * hw_out + pos,
                     mask=mask_t & (offs_t * 0 + m < rows), other=0.0)
        d = xv[None, :] - wt
        acc += tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)) * gv[:, None]

    tl.atomic_add(gw_ptr + gw_off, acc, mask=mask)


def _pow2_block(size: int, smallest: int, largest: int) -> int:
    return min(max(triton.next_power_of_2(size), smallest), largest)


@cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tiles(rows: int, cols: int, groups: int, device: torch.device) -> tuple[int, int]:
    """Row and column block sizes: large tiles, shrunk until about four programs per SM (on
    the CPU, where Triton's interpreter runs the kernels, the large tiles stay)."""
    block_rows, block_cols = 128, _pow2_block(cols, 16, 64)
    if device.type != "cuda":
        return block_rows, block_cols
    target = 4 * _multiprocessors(device.index if device.index is not None else 0)

    def programs() -> int:
        return triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols) * groups

    while programs() < target and block_rows > 32:
        block_rows //= 2
    while programs() < target and block_cols > 16:
        block_cols //= 2
    return block_rows, block_cols


def _shape_args(geom) -> tuple[int, ...]:
    return (
        geom.h, geom.w, geom.h_out, geom.w_out, geom.c_in // geom.groups,
        geom.c_out // geom.groups, geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w,
        geom.dil_h, geom.dil_w,
    )


def forward(geom, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``-sum |x - w|`` per window; x and weight contiguous float32 on one CUDA device."""
    y = torch.empty(geom.n, geom.c_out, geom.h_out, geom.w_out, dtype=x.dtype, device=x.device)
    rows, c_out_g = geom.n * geom.h_out * geom.w_out, geom.c_out // geom.groups
    block_m, block_n = _tiles(rows, c_out_g, geom.groups, x.device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(c_out_g, block_n), geom.groups)
    _forward_kernel[grid](
        x, weight, y, x.stride(0), y.stride(0), rows, *_shape_args(geom),
        KH=geom.kh, KW=geom.kw, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
    )
    return y


def grad_input(
    geom, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, exact: bool
) -> torch.Tensor:
    """``sum clamp(w - x, -1, 1) * g`` (``sign(w - x) * g`` if exact) gathered onto x."""
    gx = torch.empty_like(x)
    pixels, c_in_g = geom.n * geom.h * geom.w, geom.c_in // geom.groups
    block_p, block_c = _tiles(pixels, c_in_g, geom.groups, x.device)
    grid = (triton.cdiv(pixels, block_p), triton.cdiv(c_in_g, block_c), geom.groups)
    _grad_input_kernel[grid](
        x, weight, grad_out, gx, x.stride(0), grad_out.stride(0), pixels, *_shape_args(geom),
        KH=geom.kh, KW=geom.kw, EXACT=exact, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=NUM_WARPS,
    )
    return gx


def grad_weight_sign(
    geom, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """The exact weight gradient ``sum sign(x - w) * g``."""
    gw = torch.zeros_like(weight)
    rows = geom.n * geom.h_out * geom.w_out
    c_out_g, k_len = geom.c_out // geom.groups, weight[0].numel()
    slices = min(triton.cdiv(rows, POSITIONS_PER_SLICE), max(1, 65535 // geom.groups))
    slice_len = triton.cdiv(rows, slices)
    block_t, block_k = _pow2_block(c_out_g, 16, 32), _pow2_block(k_len, 16, 64)
    grid = (triton.cdiv(c_out_g, block_t), triton.cdiv(k_len, block_k), geom.groups * slices)
    _grad_weight_sign_kernel[grid](
        x, weight, grad_out, gw, x.stride(0), grad_out.stride(0), rows, slices, slice_len,
        *_shape_args(geom), KH=geom.kh, KW=geom.kw, BLOCK_T=block_t, BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )
    return gw


def addernet_grad_weight(
    geom, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """``sum (x - w) * g = conv2d_weight(x, g) - w * sum g`` (cuDNN, per output channel)."""
    grad_w = torch.nn.grad.conv2d_weight(
        x, weight.shape, grad_out, (geom.stride_h, geom.stride_w), (geom.pad_h, geom.pad_w),
        (geom.dil_h, geom.dil_w), geom.groups,
    )
    grad_w -= weight * grad_out.sum((0, 2, 3)).view(-1, 1, 1, 1)
    return grad_w


class _TritonAdder2dFunction(torch.autograd.Function):
    """Triton forward and backward; see :func:`adder2d_cuda`."""

    @staticmethod
    def forward(ctx, x, weight, geom, eta, true_gradient):
        ctx.save_for_backward(x, weight)
        ctx.geom, ctx.eta, ctx.true_gradient = geom, eta, true_gradient
        if geom.n == 0:
            return x.new_empty(0, geom.c_out, geom.h_out, geom.w_out)
        return forward(geom, x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        geom = ctx.geom
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (
                grad_input(geom, x, weight, grad_out, ctx.true_gradient)
                if geom.n
                else torch.zeros_like(x)
            )
        if ctx.needs_input_grad[1]:
            if geom.n == 0:
                grad_w = torch.zeros_like(weight)
            elif ctx.true_gradient:
                grad_w = grad_weight_sign(geom, x, weight, grad_out)
            else:
                grad_w = addernet_grad_weight(geom, x, weight, grad_out)
                if ctx.eta is not None:
                    _rescale_(grad_w, ctx.eta)
        return grad_x, grad_w, None, None, None


def _check_cuda_inputs(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.device != x.device:
        raise ValueError(
            f"adder2d: x is on {x.device}, weight must be a tensor on the same device; move it "
            f"with .to(x.device)"
        )
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise TypeError(
            f"adder2d: the CUDA kernels take float32, got {x.dtype} and {weight.dtype}; convert "
            "with .float()"
        )
    check_adder_shapes(x, weight, bias, groups)


def adder2d_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    eta: float | None = 0.2,
    true_gradient: bool = False,
) -> torch.Tensor:
    """:func:`adderquant.ops.adder2d` for float32 CUDA tensors, with the same gradients.

    The AdderNet weight gradient goes through cuDNN's convolution weight gradient, so it
    follows ``torch.backends.cudnn.allow_tf32`` like ``F.conv2d`` does.
    """
    _check_cuda_inputs(x, weight, bias, groups)
    geom = _geometry(x, weight, stride, padding, dilation, groups)
    out = _TritonAdder2dFunction.apply(
        x.contiguous(), weight.contiguous(), geom, eta, true_gradient
    )
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
