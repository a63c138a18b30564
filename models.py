"""models.py: the detector network, from image pixels to raw per-level predictions.

Where this sits in the flow:

    data.py (batches, augmentation) -> models.py (this file) -> assign.py (targets, losses)
                                                              -> eval.py (decode, NMS, COCO AP)

A detector here is three pieces glued in a line, so each can be swapped:

    images [B, 3, H, W] 0..1
      -> backbone: a list of feature maps at strides 8, 16, 32 (and a `channels` list)
      -> neck:     mixes the levels (BiFPN for EfficientDet, PAFPN for YOLOX); the BiFPN
                   also adds coarser levels P6, P7 (and P8 for D7x) made from the last map
      -> head:     per level, a map of predictions: [B, A, 4 + C + O, H_l, W_l]
                   A anchors per location, 4 raw box offsets, C class logits, O = 1 objectness
                   logit for anchor-free priors (YOLOX) and O = 0 for anchors (EfficientDet).

The model returns raw numbers only. What they mean is fixed by the *priors*, which follow
build_model in this file together with the box encoding that they define:

    "efficientdet": 9 anchor boxes per location (3 scales x 3 aspect ratios), offsets
                    relative to the anchor's centre and size;
    "anchor_free":  one grid point per location (YOLOX), offsets in units of the stride.

Either head works with either prior mode: the head only needs to know A (anchors per
location) and O (objectness or not).

Reading order: building blocks -> backbones -> necks -> heads -> Detector -> presets and
build_model -> priors and box coding; then, once the model is whole, published weights (ImageNet
backbones, effdet EfficientDets, Megvii YOLOX, renamed to ours by tensor position and name) ->
`python models.py` (the preset table).

Layer sizes follow the published networks (effdet's tf_efficientdet_dN / Google automl and
Megvii YOLOX); `python models.py` prints their parameter counts, which equal the published
ones. Facts were learned from those projects; the code is written from scratch.
"""
import argparse
import functools
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ImageNet statistics: the Detector normalises inside forward so callers pass 0..1 pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What the Detector does to those 0..1 RGB pixels, (x - mean) / std, by the name in its config:
# "imagenet" for every model trained here, ImageNet backbones and effdet's weights; "0-255" (x
# times 255, nothing subtracted) for Megvii's YOLOX weights, trained on raw 0..255 pixels;
# "inception" (-1..1) for the AdvProp weights of effdet's tf_efficientdet_*_ap and timm's
# tf_efficientnet_*.ap_in1k (see named_settings).
PIXEL_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "0-255": ((0.0, 0.0, 0.0), (1 / 255,) * 3),
               "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}

# Initial class (and objectness) bias: sigmoid(bias) = 0.01, so at the start every prior
# says "background" with 99% confidence and the loss from the many negatives stays small
# (the focal loss paper's prior; YOLOX uses the same for its cls and obj branches).
PRIOR_PROB = 0.01
PRIOR_BIAS = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

def batch_norm(channels):
    """BatchNorm with the TF-style epsilon both EfficientDet and YOLOX use (1e-3).

    Momentum 0.03 is YOLOX's; TF EfficientDet uses 0.01 (1 - 0.99), but the short runs this
    project makes prefer running statistics that catch up quickly.
    """
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.03)


def pad_same(x, k, stride, value=0.0):
    """TensorFlow's "same" padding of x [B, C, H, W] for a k x k window at this stride: the
    output has ceil(H / stride) rows, and where the padding needed is odd the extra row goes at
    the bottom (column at the right). At stride 2 on an even side that is 0 above and 1 below
    for k = 3 (1 and 2 for k = 5), where k // 2 pads 1 (2) on both sides: the same output size,
    with every window one pixel further down and right. value: what the padding holds (-inf
    for a max-pool)."""
    h, w = x.shape[-2:]
    ph = max((-(-h // stride) - 1) * stride + k - h, 0)
    pw = max((-(-w // stride) - 1) * stride + k - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow's "same" padding (pad_same), for weights trained in TensorFlow
    (effdet's and timm's tf_* models; build_model's tf_padding). Only stride-2 convs need it: at
    stride 1 an odd k pads k // 2 on both sides in TensorFlow too."""

    def forward(self, x):
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), self.weight, self.bias, self.stride,
                        0, self.dilation, self.groups)


# ---------------------------------------------------------------------------------------
# BatchNorm + SiLU as one CUDA operation, for training on a GPU (bn_silu_kernels.cu)
# ---------------------------------------------------------------------------------------
# Why: BN and SiLU only move memory, and as two PyTorch operations they write the tensor between
# them, keep it for the backward pass and read it several times; bn_silu_kernels.cu's header
# counts the passes (13 per element down to 8). The numbers are BatchNorm2d's then SiLU's, up
# to rounding: in float32 to its last bits; in bf16 / fp16 PyTorch also rounds the tensor between
# the two (and its gradient) to 16 bits, where the fused path keeps float32. Used by ConvBnAct
# in training mode when use_fused_bn_silu turned it on (train.py --cuda_graphs --fused_bn_silu)
# and the tensor is one the kernels take (bn_silu_fits); every other case runs the two PyTorch
# modules.
# Measured on an H200 (yolox_s 640, batch 32, bf16, bench.py train): the step is the GPU's kernels,
# and with the reductions loading several rows at a time the fused step trains 7 to 18% more
# images a second than BatchNorm2d + SiLU in the same run (1,031-1,156 img/s against 962-983;
# 948 against 851 on a slower start of the machine).
# Off by default all the same: it needs cupy, pays only inside CUDA graphs (its four launches a
# layer cost the CPU more than the two modules' when run eagerly), and it is the newest part.
BN_SILU_KERNEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_silu_kernels.cu")
BN_SILU_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
BN_SILU_FINISH_LANES = 32  # the kernel file's FINISH_LANES: a finish block is 32 channels x this


@functools.lru_cache(maxsize=None)
def _bn_silu_kernels(device_index):
    """Compile bn_silu_kernels.cu with NVRTC once per device: ({kernel name: function},
    number of multiprocessors, which sizes the grids)."""
    import cupy  # only here: CPU machines never need cupy

    with open(BN_SILU_KERNEL_PATH) as f:
        source = f.read()
    names = ["bn_silu_finish_stats", "bn_silu_finish_grads"] + [
        f"bn_silu_{step}_{dtype}" for step in ("stats", "apply", "grad_sums", "grad_input")
        for dtype in BN_SILU_DTYPES.values()]
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=source)
        kernels = {name: module.get_function(name) for name in names}
    return kernels, torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows_stride(t):
    """The distance between consecutive pixels' channel vectors of a 4-d channels-last tensor
    t [N, C, H, W] whose pixels all sit at one stride (C when it is contiguous; more for a channel
    slice of a concatenation), or None if its memory is not laid out as such rows."""
    n, c, h, w = t.shape
    s = t.stride()
    if s[1] != 1 and c > 1:
        return None
    ld = s[3] if w > 1 else s[2] if h > 1 else s[0] if n > 1 else c
    if ld < c or (w > 1 and s[3] != ld) or (h > 1 and s[2] != w * ld) or (n > 1 and s[0] != h * w * ld):
        return None
    return ld


def bn_silu_fits(x, bn, act):
    """Whether SiLU(bn(x)) can run as bn_silu_cuda: a training-mode BatchNorm2d (not SyncBatchNorm,
    whose statistics span processes) with affine weights and momentum-updated float32 running
    statistics, an nn.SiLU, and x a CUDA float32 / bfloat16 / float16 tensor [N, C, H, W],
    contiguous channels-last and 16-byte aligned, with C a multiple of the kernels' vector width
    (16 bytes of channels) and at least 2 values per channel (BatchNorm2d's error below that stays
    its own)."""
    return (isinstance(act, nn.SiLU) and type(bn) is nn.BatchNorm2d and bn.training and bn.affine
            and bn.track_running_stats and bn.momentum is not None and bn.weight.dtype == torch.float32
            and bn.running_mean.dtype == torch.float32 and x.is_cuda and x.dtype in BN_SILU_DTYPES
            and x.dim() == 4 and x.shape[1] % (16 // x.element_size()) == 0
            and x.numel() // max(x.shape[1], 1) >= 2 and x.is_contiguous(memory_format=torch.channels_last)
            and x.data_ptr() % 16 == 0 and not torch.compiler.is_compiling())


def _bn_silu_grid(m, c, vec, sms):
    """The grid of the four passes over an [m, c] tensor (see the kernel file): block (bx, by),
    bx = channel vectors across (a power of two up to 32), by = 256 / bx rows; grid (gx, gy), gx
    covering the channels, gy row blocks enough for about 8 blocks per multiprocessor."""
    groups = c // vec
    bx = min(32, 1 << (groups - 1).bit_length())
    by = 256 // bx
    gx = -(-groups // bx)
    gy = max(1, min(-(-m // by), -(-8 * sms // gx)))
    return (gx, gy), (bx, by)


class _BnSiluFunction(torch.autograd.Function):
    """SiLU(BatchNorm2d(x)) in training mode through bn_silu_kernels.cu: the forward updates the
    running statistics in place, as BatchNorm2d does; the backward recomputes the BN output from
    x and the saved per-channel numbers, so only x is kept for it."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        import cupy
        import numpy as np

        c = x.shape[1]
        m = x.numel() // c
        kernels, sms = _bn_silu_kernels(x.device.index)
        dtype = BN_SILU_DTYPES[x.dtype]
        grid, block = _bn_silu_grid(m, c, 16 // x.element_size(), sms)
        f32 = dict(device=x.device, dtype=torch.float32)
        partial = torch.empty((2, grid[1], c), **f32)  # per row block: sum, sum of squares
        shift = torch.empty(c, **f32)
        coef = torch.empty((4, c), **f32)               # mean, 1/std, scale, shift
        y = torch.empty_like(x)                         # channels-last, as x
        finish_grid, finish_block = (-(-c // 32),), (32, BN_SILU_FINISH_LANES)
        ptr = lambda t: np.uint64(t.data_ptr())  # noqa: E731 (a pointer argument of a kernel)
        with cupy.cuda.Device(x.device.index), \
                cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream):
            kernels[f"bn_silu_stats_{dtype}"](grid, block, (ptr(x), ptr(partial), ptr(shift), np.int64(m),
                                                            np.int32(c)))
            kernels["bn_silu_finish_stats"](finish_grid, finish_block, (
                ptr(partial), ptr(shift), ptr(weight), ptr(bias), ptr(running_mean), ptr(running_var),
                ptr(coef), np.int32(grid[1]), np.int64(m), np.int32(c), np.float32(momentum), np.float32(eps)))
            kernels[f"bn_silu_apply_{dtype}"](grid, block, (ptr(x), ptr(coef), ptr(y), np.int64(m), np.int32(c)))
        ctx.save_for_backward(x, coef)
        return y

    @staticmethod
    def backward(ctx, gy):
        import cupy
        import numpy as np

        x, coef = ctx.saved_tensors
        c = x.shape[1]
        m = x.numel() // c
        vec = 16 // x.element_size()
        ld = _rows_stride(gy)
        if ld is None or ld % vec or gy.data_ptr() % 16:  # a layout the 16-byte loads cannot read
            gy = gy.clone(memory_format=torch.channels_last)  # a fresh (aligned) copy, even of a contiguous gy
            ld = c
        kernels, sms = _bn_silu_kernels(x.device.index)
        dtype = BN_SILU_DTYPES[x.dtype]
        grid, block = _bn_silu_grid(m, c, vec, sms)
        f32 = dict(device=x.device, dtype=torch.float32)
        partial = torch.empty((2, grid[1], c), **f32)   # per row block: sum of gz, of gz * xhat
        grad_w, grad_b = torch.empty(c, **f32), torch.empty(c, **f32)
        gcoef = torch.empty((2, c), **f32)
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        ptr = lambda t: np.uint64(t.data_ptr())  # noqa: E731
        with cupy.cuda.Device(x.device.index), \
                cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream):
            kernels[f"bn_silu_grad_sums_{dtype}"](grid, block, (ptr(x), ptr(gy), ptr(coef), ptr(partial),
                                                                np.int64(m), np.int32(c), np.int64(ld)))
            kernels["bn_silu_finish_grads"]((-(-c // 32),), (32, BN_SILU_FINISH_LANES), (
                ptr(partial), ptr(coef), ptr(grad_w), ptr(grad_b), ptr(gcoef), np.int32(grid[1]), np.int64(m),
                np.int32(c)))
            if gx is not None:
                kernels[f"bn_silu_grad_input_{dtype}"](grid, block, (
                    ptr(x), ptr(gy), ptr(coef), ptr(gcoef), ptr(gx), np.int64(m), np.int32(c), np.int64(ld)))
        return (gx, grad_w if ctx.needs_input_grad[1] else None, grad_b if ctx.needs_input_grad[2] else None,
                None, None, None, None)


def bn_silu_cuda(x, bn):
    """SiLU(bn(x)) for a training-mode BatchNorm2d bn, in one fused CUDA operation; x must pass
    bn_silu_fits. x: [N, C, H, W] channels-last -> the same shape, dtype and layout."""
    bn.num_batches_tracked.add_(1)  # as BatchNorm2d.forward counts batches
    return _BnSiluFunction.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps)


def use_fused_bn_silu(model, on=True):
    """Turn the fused BN + SiLU CUDA operation on (or off) in every ConvBnAct of model. It acts
    only in training mode on CUDA tensors it fits (bn_silu_fits): evaluation, the CPU and anything
    else keep BatchNorm2d then SiLU, so turning it on changes no CPU result. Needs cupy."""
    for module in model.modules():
        if isinstance(module, ConvBnAct):
            module.fused_bn_silu = on
    return model


class ConvBnAct(nn.Sequential):
    """conv (no bias: the BN's shift does that job) -> BN -> activation: act True SiLU, "relu"
    ReLU (ResNet), False none.

    Symmetric padding k // 2: a stride-2 conv maps H to ceil(H / 2), the same rule every
    stride-2 step in this file follows, so level sizes are ceil(H / stride). tf_same: a stride-2
    conv pads as TensorFlow does instead (Conv2dSame; the same sizes).
    """

    def __init__(self, c_in, c_out, k=1, stride=1, groups=1, act=True, tf_same=False):
        super().__init__()
        if tf_same and stride > 1:
            self.conv = Conv2dSame(c_in, c_out, k, stride, 0, groups=groups, bias=False)
        else:
            self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        self.bn = batch_norm(c_out)
        if act is True:
            self.act = nn.SiLU()
        elif act == "relu":
            self.act = nn.ReLU(inplace=True)

    fused_bn_silu = False  # use_fused_bn_silu sets it per module

    def forward(self, x):
        x = self.conv(x)
        act = getattr(self, "act", None)
        if self.fused_bn_silu and self.training and bn_silu_fits(x, self.bn, act):
            return bn_silu_cuda(x, self.bn)
        x = self.bn(x)
        return x if act is None else act(x)


class DepthwiseSeparable(nn.Sequential):
    """YOLOX's DWConv: depthwise k x k conv-BN-act, then pointwise 1 x 1 conv-BN-act."""

    def __init__(self, c_in, c_out, k=3, stride=1):
        super().__init__()
        self.dconv = ConvBnAct(c_in, c_in, k, stride, groups=c_in)
        self.pconv = ConvBnAct(c_in, c_out, 1)


def yolox_conv(c_in, c_out, k, stride, depthwise):
    """The 3 x 3 conv of a YOLOX stage: plain, or depthwise-separable for YOLOX-Nano."""
    return DepthwiseSeparable(c_in, c_out, k, stride) if depthwise else ConvBnAct(c_in, c_out, k, stride)


class SeparableConv(nn.Sequential):
    """EfficientDet's separable conv: depthwise 3 x 3 (no bias), pointwise 1 x 1 with bias.

    No BN or activation inside: the BiFPN puts the activation before it and a BN after it,
    and the heads keep one BN per pyramid level while sharing these weights across levels.
    """

    def __init__(self, c_in, c_out):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=True)


class SqueezeExcite(nn.Module):
    """Channel attention: global average -> 1x1 down -> SiLU -> 1x1 up -> sigmoid -> scale."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet's inverted residual block.

    1x1 expand (skipped when expand == 1) -> k x k depthwise (stride) -> SE -> 1x1 project,
    plus the input when the shape is unchanged. The SE width is 1/4 of the block's *input*
    channels, as in the official EfficientNet. With fused=True (EfficientNetV2's early
    stages) the expand and depthwise convs merge into one k x k conv, and there is no SE.
    Stochastic depth (drop-connect) is left out: it matters for long ImageNet-scale runs.
    tf_same: the strided conv pads as TensorFlow does (ConvBnAct).
    """

    def __init__(self, c_in, c_out, k, stride, expand, se_ratio, fused=False, tf_same=False):
        super().__init__()
        mid = c_in * expand
        layers = []
        if fused:
            layers.append(ConvBnAct(c_in, mid if expand != 1 else c_out, k, stride, tf_same=tf_same))
        else:
            if expand != 1:
                layers.append(ConvBnAct(c_in, mid, 1))
            layers.append(ConvBnAct(mid, mid, k, stride, groups=mid, tf_same=tf_same))
        if se_ratio:
            layers.append(SqueezeExcite(mid, max(1, int(c_in * se_ratio))))
        if not (fused and expand == 1):
            layers.append(ConvBnAct(mid, c_out, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class Bottleneck(nn.Module):
    """YOLOX bottleneck: 1x1 conv -> 3x3 conv, plus the input when `shortcut`."""

    def __init__(self, channels, shortcut, depthwise):
        super().__init__()
        self.conv1 = ConvBnAct(channels, channels, 1)
        self.conv2 = yolox_conv(channels, channels, 3, 1, depthwise)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class CSPLayer(nn.Module):
    """Cross-stage-partial layer: two 1x1 convs each project the input to c_out / 2 channels;
    one branch then goes through n bottlenecks, the other skips them, and a 1x1 conv merges the
    two. Cheaper than running all c_out channels through the bottlenecks."""

    def __init__(self, c_in, c_out, n, shortcut, depthwise):
        super().__init__()
        hidden = c_out // 2
        self.conv1 = ConvBnAct(c_in, hidden, 1)   # the path through the bottlenecks
        self.conv2 = ConvBnAct(c_in, hidden, 1)   # the path around them
        self.blocks = nn.Sequential(*[Bottleneck(hidden, shortcut, depthwise) for _ in range(n)])
        self.conv3 = ConvBnAct(2 * hidden, c_out, 1)

    def forward(self, x):
        return self.conv3(torch.cat([self.blocks(self.conv1(x)), self.conv2(x)], 1))


class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOX's SPPBottleneck): max-pools of 5, 9, 13 side by side
    widen the receptive field of the last stage at almost no cost.

    The three pools are computed as a cascade of 5x5 pools (the "SPPF" trick): a 5x5 max of
    a 5x5 max is a 9x9 max, and once more a 13x13 max, exactly, because max is associative
    and the padding is -inf. The output is the same as pooling with 5, 9 and 13 separately
    (tests/test_models.py checks it bit for bit), at 3 x 25 comparisons per pixel instead of
    25 + 81 + 169. (Its backward may route a gradient to another of two tied maxima, which is
    as valid.)
    """

    def __init__(self, c_in, c_out):
        super().__init__()
        hidden = c_in // 2
        self.conv1 = ConvBnAct(c_in, hidden, 1)
        self.conv2 = ConvBnAct(4 * hidden, c_out, 1)   # x and its three pools, concatenated

    def forward(self, x):
        x = self.conv1(x)
        p5 = F.max_pool2d(x, 5, 1, 2)
        p9 = F.max_pool2d(p5, 5, 1, 2)    # = max_pool2d(x, 9, 1, 4)
        p13 = F.max_pool2d(p9, 5, 1, 2)   # = max_pool2d(x, 13, 1, 6)
        return self.conv2(torch.cat([x, p5, p9, p13], 1))


# ---------------------------------------------------------------------------------------
# Backbones: each returns [map at stride 8, stride 16, stride 32] and has `channels`
# ---------------------------------------------------------------------------------------

class CSPDarknet(nn.Module):
    """YOLOX backbone: Focus stem, four CSP stages (stride 4, 8, 16, 32), SPP in the last.

    depth and width scale the number of bottlenecks and the channels (YOLOX-S: 0.33, 0.50).
    """

    def __init__(self, depth=0.33, width=0.50, depthwise=False):
        super().__init__()
        c = int(width * 64)               # YOLOX's base_channels
        n = max(round(depth * 3), 1)      # YOLOX's base_depth
        # Focus: halve H and W without dropping a pixel (space-to-depth: each 2x2 block becomes 12
        # channels); with the 3x3 conv after it, this is one 6x6 stride-2 conv in disguise.
        self.stem = ConvBnAct(12, c, 3)
        self.dark2 = nn.Sequential(yolox_conv(c, 2 * c, 3, 2, depthwise),
                                   CSPLayer(2 * c, 2 * c, n, True, depthwise))
        self.dark3 = nn.Sequential(yolox_conv(2 * c, 4 * c, 3, 2, depthwise),
                                   CSPLayer(4 * c, 4 * c, 3 * n, True, depthwise))
        self.dark4 = nn.Sequential(yolox_conv(4 * c, 8 * c, 3, 2, depthwise),
                                   CSPLayer(8 * c, 8 * c, 3 * n, True, depthwise))
        self.dark5 = nn.Sequential(yolox_conv(8 * c, 16 * c, 3, 2, depthwise),
                                   SPP(16 * c, 16 * c),
                                   CSPLayer(16 * c, 16 * c, n, False, depthwise))
        self.channels = [4 * c, 8 * c, 16 * c]

    def forward(self, x):
        # Focus, in the same channel order as YOLOX: (even row, even col), (odd row, even col),
        # (even row, odd col), (odd row, odd col).
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        x = self.dark2(self.stem(x))
        p3 = self.dark3(x)
        p4 = self.dark4(p3)
        p5 = self.dark5(p4)
        return [p3, p4, p5]


def round_channels(channels, multiplier, divisor=8):
    """EfficientNet's width rounding: scale, round to a multiple of 8, never drop below 90%."""
    scaled = channels * multiplier
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * scaled else new


# EfficientNet-B0 stages: (expand, kernel, stride, out channels, repeats). After the stride-2
# stem the 7 stages end at strides 2, 4, 8, 16, 16, 32, 32: the maps after stages[2], [4] and [6]
# (the 3rd, 5th and 7th) are the stride 8, 16, 32 features.
EFFICIENTNET_B0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
# (width multiplier, depth multiplier) of B0..B7.
EFFICIENTNET_SCALES = {"b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4),
                       "b4": (1.4, 1.8), "b5": (1.6, 2.2), "b6": (1.8, 2.6), "b7": (2.0, 3.1)}
# EfficientNetV2-B0: (fused, expand, kernel, stride, out channels, repeats, se ratio).
EFFICIENTNETV2_B0_STAGES = [(True, 1, 3, 1, 16, 1, 0), (True, 4, 3, 2, 32, 2, 0), (True, 4, 3, 2, 48, 2, 0),
                            (False, 4, 3, 2, 96, 3, 0.25), (False, 6, 3, 1, 112, 5, 0.25),
                            (False, 6, 3, 2, 192, 8, 0.25)]


class EfficientNet(nn.Module):
    """EfficientNet V1 (B0..B7, EfficientDet's backbones) or V2-B0, without the classifier
    and without the final 1x1 conv to 1280 channels (detection uses the stage outputs).
    tf_same: the stride-2 convs pad as TensorFlow does, for TensorFlow-trained weights."""

    def __init__(self, variant="b0", tf_same=False):
        super().__init__()
        if variant == "v2_b0":
            stages, width, depth = EFFICIENTNETV2_B0_STAGES, 1.0, 1.0
        else:
            width, depth = EFFICIENTNET_SCALES[variant]
            stages = [(False, e, k, s, c, r, 0.25) for e, k, s, c, r in EFFICIENTNET_B0_STAGES]
        c_in = round_channels(32, width)
        self.stem = ConvBnAct(3, c_in, 3, 2, tf_same=tf_same)
        self.stages = nn.ModuleList()
        stage_strides, stage_channels, total_stride = [], [], 2
        for fused, expand, k, stride, c_out, repeats, se in stages:
            c_out = round_channels(c_out, width)
            blocks = []
            for i in range(math.ceil(repeats * depth)):
                blocks.append(MBConv(c_in, c_out, k, stride if i == 0 else 1, expand, se, fused, tf_same))
                c_in = c_out
            self.stages.append(nn.Sequential(*blocks))
            total_stride *= stride
            stage_strides.append(total_stride)
            stage_channels.append(c_out)
        # The pyramid: the output of the last stage at stride 8, at 16 and at 32.
        self.out_stages = [max(i for i, s in enumerate(stage_strides) if s == t) for t in (8, 16, 32)]
        self.channels = [stage_channels[i] for i in self.out_stages]

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_stages:
                feats.append(x)
        return feats


class ResNetBottleneck(nn.Module):
    """ResNet-50 bottleneck (v1.5: the stride sits on the 3x3 conv), ReLU as in ResNet."""

    def __init__(self, c_in, width, stride):
        super().__init__()
        self.conv1 = ConvBnAct(c_in, width, 1, act="relu")
        self.conv2 = ConvBnAct(width, width, 3, stride, act="relu")
        self.conv3 = ConvBnAct(width, width * 4, 1, act=False)
        self.down = None
        if stride != 1 or c_in != width * 4:
            self.down = ConvBnAct(c_in, width * 4, 1, stride, act=False)

    def forward(self, x):
        shortcut = x if self.down is None else self.down(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + shortcut)


class ResNet50(nn.Module):
    """ResNet-50: 7x7 stem + max-pool, then 3, 4, 6, 3 bottlenecks; layers 2-4 give the pyramid."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvBnAct(3, 64, 7, 2, act="relu"), nn.MaxPool2d(3, 2, 1))
        layers, c_in = [], 64
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            layer = []
            for i in range(blocks):
                layer.append(ResNetBottleneck(c_in, width, stride if i == 0 else 1))
                c_in = width * 4
            layers.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.channels = [512, 1024, 2048]

    def forward(self, x):
        x = self.layer1(self.stem(x))
        p3 = self.layer2(x)
        p4 = self.layer3(p3)
        return [p3, p4, self.layer4(p4)]


class TimmBackbone(nn.Module):
    """Any timm model as a backbone (`--backbone timm:NAME`), through its features_only mode.

    timm is never a requirement; this is the door for "any pyramid backbone". Random init:
    loading pretrained weights is left to the caller (timm would download them).
    """

    def __init__(self, name):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ValueError(f"models.py: backbone 'timm:{name}' needs timm, which is not installed; "
                             "run `pip install timm` or pick a built-in backbone") from None
        try:
            self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(-3, -2, -1))
        except RuntimeError as error:    # timm's "Unknown model (...)"
            raise ValueError(f"models.py: backbone 'timm:{name}': {error}; see timm.list_models()") from None
        reductions = self.body.feature_info.reduction()
        if list(reductions) != [8, 16, 32]:
            raise ValueError(f"models.py: timm model '{name}' gives features at strides {reductions}, "
                             "but the necks need strides 8, 16, 32; pick another timm model")
        self.channels = list(self.body.feature_info.channels())

    def forward(self, x):
        return list(self.body(x))


BACKBONES = ["cspdarknet"] + [f"efficientnet_{v}" for v in EFFICIENTNET_SCALES] + ["efficientnetv2_b0", "resnet50"]


def build_backbone(name, yolox_depth=0.33, yolox_width=0.50, depthwise=False, tf_padding=False):
    """A backbone by name: one of BACKBONES or "timm:NAME". The YOLOX multipliers size CSPDarknet.
    tf_padding: TensorFlow's padding in an EfficientNet's stride-2 convs (the others have none)."""
    if name == "cspdarknet":
        return CSPDarknet(yolox_depth, yolox_width, depthwise)
    if name.startswith("efficientnet_") and name[len("efficientnet_"):] in EFFICIENTNET_SCALES:
        return EfficientNet(name[len("efficientnet_"):], tf_padding)
    if name == "efficientnetv2_b0":
        return EfficientNet("v2_b0", tf_padding)
    if name == "resnet50":
        return ResNet50()
    if name.startswith("timm:"):
        return TimmBackbone(name[len("timm:"):])
    raise ValueError(f"models.py: unknown backbone {name!r}; valid ones: {', '.join(BACKBONES)}, "
                     "or timm:NAME when timm is installed")


# ---------------------------------------------------------------------------------------
# Necks
# ---------------------------------------------------------------------------------------

def downsample(x, tf_same=False):
    """EfficientDet's 3x3 / stride-2 max-pool, padded k // 2 on both sides, or as TensorFlow
    pads (tf_same, pad_same with -inf); ceil(H / 2) rows either way."""
    if tf_same:
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)
    return F.max_pool2d(x, 3, 2, 1)


def resize_like(x, ref, tf_same=False):
    """Bring map x to ref's spatial size: nearest 2x upsampling going down the strides, a
    3x3 / stride-2 max-pool going up (EfficientDet's resampling); sizes follow ceil(H / 2)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    if x.shape[-2] <= ref.shape[-2] and x.shape[-1] <= ref.shape[-1]:
        return F.interpolate(x, size=ref.shape[-2:], mode="nearest")
    return downsample(x, tf_same)


class ChannelMatch(nn.Sequential):
    """1x1 conv (with bias, as in the official EfficientDet) + BN: a backbone map to the
    BiFPN width. No activation."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)
        self.bn = batch_norm(c_out)


class FusionNode(nn.Module):
    """One BiFPN node: resize its inputs to one level, fuse them, SiLU -> separable conv -> BN.

    Fast normalised fusion: out = sum(relu(w_i) * x_i) / (sum(relu(w_i)) + 1e-4), one learned
    scalar per input, so the net learns how much each level contributes. D6 / D7 use a plain
    sum instead (weighted=False), as published. tf_same: its max-pool pads as TensorFlow does.
    """

    def __init__(self, n_inputs, channels, in_channels, weighted, tf_same=False):
        super().__init__()
        self.tf_same = tf_same
        # A 1x1 conv + BN for each input whose width differs (backbone maps in the first cell).
        self.match = nn.ModuleList([ChannelMatch(c, channels) if c != channels else nn.Identity()
                                    for c in in_channels])
        self.weights = nn.Parameter(torch.ones(n_inputs)) if weighted else None
        self.conv = SeparableConv(channels, channels)
        self.bn = batch_norm(channels)

    def forward(self, inputs, ref):
        xs = [resize_like(m(x), ref, self.tf_same) for m, x in zip(self.match, inputs)]
        if self.weights is None:
            out = xs[0]
            for x in xs[1:]:
                out = out + x
        else:
            w = F.relu(self.weights)
            w = (w / (w.sum() + 1e-4)).unbind(0)   # normalise the scalars, not the maps
            out = xs[0] * w[0]
            for wi, x in zip(w[1:], xs[1:]):
                out = torch.addcmul(out, wi, x)    # out + wi * x in one pass over memory
        return self.bn(self.conv(F.silu(out)))


class BiFPNCell(nn.Module):
    """One BiFPN layer over levels P3..P_L (index 0..L-1 below).

    Top-down:  td_i  = node(P_i, up(td_{i+1}))          for i = L-2 .. 0 (td_{L-1} = P_{L-1})
    Bottom-up: out_i = node(P_i, td_i, down(out_{i-1})) for i = 1 .. L-2
               out_{L-1} = node(P_{L-1}, down(out_{L-2})); out_0 = td_0.
    A backbone map used by two nodes gets a separate 1x1 conv in each (as published).
    """

    def __init__(self, in_channels, channels, weighted, tf_same=False):
        super().__init__()
        n = len(in_channels)
        c = channels
        self.top_down = nn.ModuleList([FusionNode(2, c, [in_channels[i], c], weighted, tf_same)
                                       for i in range(n - 2, -1, -1)])
        self.bottom_up = nn.ModuleList([FusionNode(3 if i < n - 1 else 2, c,
                                                   [in_channels[i], c, c] if i < n - 1 else [in_channels[i], c],
                                                   weighted, tf_same) for i in range(1, n)])

    def forward(self, feats):
        n = len(feats)
        td = [None] * n
        td[n - 1] = feats[n - 1]
        for node, i in zip(self.top_down, range(n - 2, -1, -1)):
            td[i] = node([feats[i], td[i + 1]], feats[i])
        out = [td[0]]
        for node, i in zip(self.bottom_up, range(1, n)):
            inputs = [feats[i], td[i], out[-1]] if i < n - 1 else [feats[i], out[-1]]
            out.append(node(inputs, feats[i]))
        return out


class BiFPN(nn.Module):
    """EfficientDet neck: add coarser levels (P6 = max-pool(BN(1x1 conv(P5))), P7 = max-pool(P6), ...)
    then `repeats` BiFPN cells at `channels` width. Strides 8 .. 2**(2 + num_levels).
    tf_same: every max-pool pads as TensorFlow does."""

    def __init__(self, in_channels, channels, repeats, num_levels=5, weighted=True, tf_same=False):
        super().__init__()
        self.tf_same = tf_same
        # P5 -> BiFPN width (1x1 conv + BN): the map P6 is pooled from; P7 on are pooled without a conv
        self.extra = ChannelMatch(in_channels[-1], channels) if in_channels[-1] != channels else nn.Identity()
        self.num_extra = num_levels - len(in_channels)
        level_channels = list(in_channels) + [channels] * self.num_extra
        self.cells = nn.ModuleList()
        for _ in range(repeats):
            self.cells.append(BiFPNCell(level_channels, channels, weighted, tf_same))
            level_channels = [channels] * num_levels
        self.channels = [channels] * num_levels
        self.strides = tuple(2 ** (3 + i) for i in range(num_levels))

    def forward(self, feats):
        feats = list(feats)
        x = self.extra(feats[-1])
        for _ in range(self.num_extra):
            x = downsample(x, self.tf_same)
            feats.append(x)
        for cell in self.cells:
            feats = cell(feats)
        return feats


class PAFPN(nn.Module):
    """YOLOX neck: a top-down path (coarse -> fine, upsample + concat + CSP) then a bottom-up
    path (fine -> coarse, stride-2 conv, concat with the top-down path's 1x1-reduced map lat4 /
    lat5, as Megvii's YOLOX does, then CSP). Keeps the input widths and strides."""

    def __init__(self, in_channels, depth=0.33, depthwise=False):
        super().__init__()
        c3, c4, c5 = in_channels
        n = round(3 * depth)  # as Megvii's PAFPN (no floor of 1: every preset's depth >= 0.33 gives n >= 1)
        self.lateral = ConvBnAct(c5, c4, 1)
        self.td4 = CSPLayer(c4 + c4, c4, n, False, depthwise)
        self.reduce = ConvBnAct(c4, c3, 1)
        self.td3 = CSPLayer(c3 + c3, c3, n, False, depthwise)
        self.down3 = yolox_conv(c3, c3, 3, 2, depthwise)
        self.bu4 = CSPLayer(c3 + c3, c4, n, False, depthwise)
        self.down4 = yolox_conv(c4, c4, 3, 2, depthwise)
        self.bu5 = CSPLayer(c4 + c4, c5, n, False, depthwise)
        self.channels = list(in_channels)
        self.strides = (8, 16, 32)

    def forward(self, feats):
        p3, p4, p5 = feats
        lat5 = self.lateral(p5)
        t4 = self.td4(torch.cat([resize_like(lat5, p4), p4], 1))
        lat4 = self.reduce(t4)
        out3 = self.td3(torch.cat([resize_like(lat4, p3), p3], 1))
        out4 = self.bu4(torch.cat([self.down3(out3), lat4], 1))
        out5 = self.bu5(torch.cat([self.down4(out4), lat5], 1))
        return [out3, out4, out5]


# ---------------------------------------------------------------------------------------
# Heads: per level [B, A, 4 + C + O, H_l, W_l], channel order [box 4 | class C | obj O]
# ---------------------------------------------------------------------------------------

def anchors_last(x, num_anchors):
    """A head's map [B, A*k, H, W] -> view [B, H, W, A, k]: channel a * k + j is anchor a's j-th
    number. Always a view; with channels-last maps (the Detector's layout) it is also contiguous,
    so join_level's cat reads memory in order."""
    return x.permute(0, 2, 3, 1).unflatten(-1, (num_anchors, -1))


def join_level(parts):
    """[B, H, W, A, k_i] pieces -> one level output [B, A, sum k_i, H, W].

    The single copy (the cat) is made in (B, H, W, A, K) memory order and the result is a
    permuted view of it, so flatten_outputs afterwards is a free reshape.
    """
    return torch.cat(parts, -1).permute(0, 3, 4, 1, 2)


class EfficientDetHead(nn.Module):
    """EfficientDet class net and box net: `repeats` separable convs each, weights shared by
    all levels but one BN per level (level statistics differ), SiLU, then a separable conv
    predictor. With objectness, the box net predicts it too (4 + 1 per anchor)."""

    def __init__(self, channels, num_levels, repeats, num_anchors, num_classes, objectness):
        super().__init__()
        self.num_anchors, self.objectness = num_anchors, objectness
        self.cls_convs = nn.ModuleList([SeparableConv(channels, channels) for _ in range(repeats)])
        self.box_convs = nn.ModuleList([SeparableConv(channels, channels) for _ in range(repeats)])
        self.cls_bns = nn.ModuleList([nn.ModuleList([batch_norm(channels) for _ in range(repeats)])
                                      for _ in range(num_levels)])
        self.box_bns = nn.ModuleList([nn.ModuleList([batch_norm(channels) for _ in range(repeats)])
                                      for _ in range(num_levels)])
        self.cls_pred = SeparableConv(channels, num_anchors * num_classes)
        self.box_pred = SeparableConv(channels, num_anchors * (4 + int(objectness)))
        nn.init.constant_(self.cls_pred.pointwise.bias, PRIOR_BIAS)
        if objectness:
            # Objectness channels are the 5th of each anchor's (4 + 1) group.
            self.box_pred.pointwise.bias.data.view(num_anchors, 5)[:, 4] = PRIOR_BIAS

    @staticmethod
    def tower(x, convs, bns):
        for conv, bn in zip(convs, bns):
            x = F.silu(bn(conv(x)))
        return x

    def forward(self, feats):
        outs = []
        for level, x in enumerate(feats):
            cls = anchors_last(self.cls_pred(self.tower(x, self.cls_convs, self.cls_bns[level])), self.num_anchors)
            box = anchors_last(self.box_pred(self.tower(x, self.box_convs, self.box_bns[level])), self.num_anchors)
            # [box 4 | class C | obj O]: the box net's 5th number per anchor (if any) goes last.
            outs.append(join_level([box[..., :4], cls, box[..., 4:]] if self.objectness else [box, cls]))
        return outs


class YOLOXHeadLevel(nn.Module):
    """YOLOX decoupled head for one level: 1x1 stem, then two 3x3 convs for classes and two for
    the box, predictors cls / reg / obj (obj only with objectness)."""

    def __init__(self, c_in, hidden, num_anchors, num_classes, objectness, depthwise):
        super().__init__()
        self.stem = ConvBnAct(c_in, hidden, 1)
        self.cls_convs = nn.Sequential(yolox_conv(hidden, hidden, 3, 1, depthwise),
                                       yolox_conv(hidden, hidden, 3, 1, depthwise))
        self.reg_convs = nn.Sequential(yolox_conv(hidden, hidden, 3, 1, depthwise),
                                       yolox_conv(hidden, hidden, 3, 1, depthwise))
        self.cls_pred = nn.Conv2d(hidden, num_anchors * num_classes, 1)
        self.reg_pred = nn.Conv2d(hidden, num_anchors * 4, 1)
        self.obj_pred = nn.Conv2d(hidden, num_anchors, 1) if objectness else None
        nn.init.constant_(self.cls_pred.bias, PRIOR_BIAS)
        if objectness:
            nn.init.constant_(self.obj_pred.bias, PRIOR_BIAS)


class YOLOXHead(nn.Module):
    """YOLOX head: one YOLOXHeadLevel per level (not shared across levels)."""

    def __init__(self, in_channels, hidden, num_anchors, num_classes, objectness, depthwise):
        super().__init__()
        self.num_anchors = num_anchors
        self.levels = nn.ModuleList([YOLOXHeadLevel(c, hidden, num_anchors, num_classes, objectness, depthwise)
                                     for c in in_channels])

    def forward(self, feats):
        outs = []
        for head, x in zip(self.levels, feats):
            x = head.stem(x)
            r = head.reg_convs(x)    # box and objectness share this branch, classes have their own
            parts = [head.reg_pred(r), head.cls_pred(head.cls_convs(x))]
            if head.obj_pred is not None:
                parts.append(head.obj_pred(r))
            outs.append(join_level([anchors_last(p, self.num_anchors) for p in parts]))
        return outs


# ---------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------

class Detector(nn.Module):
    """backbone -> neck -> head. forward(images [B, 3, H, W] float RGB 0..1, normalised inside as
    config["pixel_norm"] says: PIXEL_NORMS) -> list over levels of
    [B, A, 4 + C + O, H_l, W_l] raw outputs, H_l = ceil(H / stride_l). See flatten_outputs
    and make_priors for how they line up with the priors. Each level is a permuted view of a
    (B, H, W, A, K)-ordered tensor: use .reshape / flatten_outputs on it, not .view."""

    def __init__(self, backbone, neck, head, anchors_mode, num_classes, config):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.strides = tuple(neck.strides)
        self.anchors_mode = anchors_mode
        self.num_classes = num_classes
        self.num_anchors = 9 if anchors_mode == "efficientdet" else 1  # ANCHOR_OCTAVES x ANCHOR_RATIOS
        self.has_objectness = anchors_mode == "anchor_free"
        self.config = config
        # make_priors' anchor size: ANCHOR_SCALE (4 strides; D7's preset 5), defined with the priors below
        self.anchor_scale = config.get("anchor_scale", ANCHOR_SCALE)
        mean, std = PIXEL_NORMS[config.get("pixel_norm", "imagenet")]  # older checkpoints: ImageNet's
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 32 or images.shape[3] % 32:
            raise ValueError(f"models.py: images must be [B, 3, H, W] with H and W multiples of 32, got "
                             f"{tuple(images.shape)}; letterbox / pad the input (data.letterbox)")
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.head(self.neck(self.backbone(x)))

    def priors(self, input_shape, device=None):
        """make_priors for this model's strides, prior mode and anchor size, at input (H, W):
        the one call that cannot forget D7's larger anchor_scale."""
        return make_priors(tuple(input_shape), self.strides, self.anchors_mode, device=device,
                           anchor_scale=self.anchor_scale)


def flatten_outputs(outputs):
    """Per-level raw outputs [B, A, K, H_l, W_l] -> [B, N, K], K = 4 + C + O, N = sum(H_l W_l A)
    ordered (level, y, x, anchor): the same order as make_priors."""
    flat = []
    for x in outputs:
        b, a, k, h, w = x.shape
        flat.append(x.permute(0, 3, 4, 1, 2).reshape(b, h * w * a, k))
    return torch.cat(flat, 1)


# ---------------------------------------------------------------------------------------
# Presets and build_model
# ---------------------------------------------------------------------------------------

# EfficientDet (automl's table): backbone, BiFPN width, BiFPN cells, head convs, input size,
# number of levels (P3..P7, D7x to P8), weighted fusion (D6 and up use a plain sum).
EFFICIENTDET_PRESETS = {
    "efficientdet_d0": ("efficientnet_b0", 64, 3, 3, 512, 5, True),
    "efficientdet_d1": ("efficientnet_b1", 88, 4, 3, 640, 5, True),
    "efficientdet_d2": ("efficientnet_b2", 112, 5, 3, 768, 5, True),
    "efficientdet_d3": ("efficientnet_b3", 160, 6, 4, 896, 5, True),
    "efficientdet_d4": ("efficientnet_b4", 224, 7, 4, 1024, 5, True),
    "efficientdet_d5": ("efficientnet_b5", 288, 7, 4, 1280, 5, True),
    "efficientdet_d6": ("efficientnet_b6", 384, 8, 5, 1280, 5, False),
    "efficientdet_d7": ("efficientnet_b6", 384, 8, 5, 1536, 5, False),   # D6 at a bigger input
    "efficientdet_d7x": ("efficientnet_b7", 384, 8, 5, 1536, 6, False),
}
# YOLOX (Megvii's exps): depth and width multipliers, depthwise convs, input size.
YOLOX_PRESETS = {
    "yolox_nano": (0.33, 0.25, True, 416),
    "yolox_tiny": (0.33, 0.375, False, 416),
    "yolox_s": (0.33, 0.50, False, 640),
    "yolox_m": (0.67, 0.75, False, 640),
    "yolox_l": (1.0, 1.0, False, 640),
    "yolox_x": (1.33, 1.25, False, 640),
}
PRESETS = list(EFFICIENTDET_PRESETS) + list(YOLOX_PRESETS)
ANCHORS_MODES = ("efficientdet", "anchor_free")


def parse_input_shape(text):
    """A command line's input size, "512", "512,640" or "512x640", -> (H, W) ints; ValueError
    naming the accepted forms otherwise (the caller adds its flag's name)."""
    try:
        sizes = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise ValueError(f"{text!r}: give one size like 512, or H,W like 512,640")
    return sizes[0], sizes[-1]


def largest_stride(det_header):
    """The stride of a preset's coarsest level: 32 for YOLOX (P5); 2 ** (2 + levels) for
    EfficientDet, 128 for P3-P7 and 256 for D7x's P8 (whatever the backbone: the BiFPN adds
    the levels past the backbone's last)."""
    if det_header in EFFICIENTDET_PRESETS:
        return 2 ** (2 + EFFICIENTDET_PRESETS[det_header][5])
    if det_header in YOLOX_PRESETS:
        return 32
    raise ValueError(f"models.py: unknown det_header {det_header!r}; valid ones: {', '.join(PRESETS)}")


def check_input_shape(input_shape, det_header):
    """Training and evaluation want each side divisible by the largest stride (32 for YOLOX,
    128 for EfficientDet's P7, 256 for D7x's P8). The network itself runs at any multiple of 32 (a level is
    ceil(H / stride) cells, and the neck resizes a map to its neighbour's exact size), but only
    with sides divisible by the largest stride is every level exactly half the one before, so
    that a coarse cell and the 2 x 2 finer cells it is upsampled to or pooled from share their
    centres, as the priors assume. ValueError otherwise."""
    stride = largest_stride(det_header)
    h, w = input_shape
    if h % stride or w % stride:
        side = h if h % stride else w  # the side that does not fit: its two nearest sizes that do
        below = stride * max(1, side // stride)
        near = f"{below} or {below + stride}" if side > stride else f"{stride}"
        raise ValueError(f"each side must be divisible by {stride}, the largest stride of {det_header} (e.g. {near})")


def preset_input_shape(det_header):
    """The published input size (H, W) of a preset."""
    if det_header in EFFICIENTDET_PRESETS:
        size = EFFICIENTDET_PRESETS[det_header][4]
    elif det_header in YOLOX_PRESETS:
        size = YOLOX_PRESETS[det_header][3]
    else:
        raise ValueError(f"models.py: unknown det_header {det_header!r}; valid ones: {', '.join(PRESETS)}")
    return (size, size)


def build_model(det_header, backbone=None, anchors_mode=None, num_classes=80, input_shape=None,
                anchor_scale=None, pixel_norm="imagenet", tf_padding=False):
    """Build a Detector from a preset name.

    det_header: one of PRESETS (sets the neck, the head and their sizes).
    backbone: None (the preset's own), one of BACKBONES, or "timm:NAME". CSPDarknet takes the
        YOLOX preset's multipliers (YOLOX-S's under an EfficientDet head).
    anchors_mode: "efficientdet" (9 anchors per location) or "anchor_free" (1 grid point, plus
        objectness); None = the preset's own (EfficientDet: anchors, YOLOX: anchor-free).
    input_shape: (H, W) the model will be fed (None = the preset's published size, as
        preset_input_shape); recorded in `config` for priors and data (see check_input_shape).
    anchor_scale: anchor size in strides at octave 0 (None = the preset's: 4, D7 5), for make_priors.
    pixel_norm: how forward normalises its 0..1 input, a PIXEL_NORMS name ("imagenet"; "0-255"
        for Megvii's YOLOX weights: megvii_yolox_state_dict).
    tf_padding: the EfficientNet backbone's and the BiFPN's stride-2 layers pad as TensorFlow does
        (pad_same), for TensorFlow-trained weights: effdet's tf_efficientdet_*, timm's tf_efficientnet_*.
    `config` holds these arguments: build_model(**model.config) rebuilds the same model.
    """
    if det_header not in PRESETS:
        raise ValueError(f"models.py: unknown det_header {det_header!r}; valid ones: {', '.join(PRESETS)}")
    is_effdet = det_header in EFFICIENTDET_PRESETS
    if anchors_mode is None:
        anchors_mode = "efficientdet" if is_effdet else "anchor_free"
    if anchors_mode not in ANCHORS_MODES:
        raise ValueError(f"models.py: unknown anchors_mode {anchors_mode!r}; valid ones: {', '.join(ANCHORS_MODES)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"models.py: num_classes must be a positive int, got {num_classes!r}")
    if pixel_norm not in PIXEL_NORMS:
        raise ValueError(f"models.py: unknown pixel_norm {pixel_norm!r}; valid ones: {', '.join(PIXEL_NORMS)}")
    if input_shape is None:
        input_shape = preset_input_shape(det_header)
    input_shape = tuple(int(v) for v in input_shape)
    num_anchors = 9 if anchors_mode == "efficientdet" else 1  # 3 scales x 3 ratios (make_priors)
    objectness = anchors_mode == "anchor_free"

    if is_effdet:
        default_backbone, width, cells, head_repeats, _, num_levels, weighted = EFFICIENTDET_PRESETS[det_header]
        depth, yolox_width, depthwise = 0.33, 0.50, False
    else:
        depth, yolox_width, depthwise, _ = YOLOX_PRESETS[det_header]
        default_backbone = "cspdarknet"
    backbone = default_backbone if backbone is None else backbone
    if tf_padding and not (is_effdet or backbone.startswith("efficientnet")):
        raise ValueError(f"models.py: tf_padding changes an EfficientNet backbone or a BiFPN, and {det_header} "
                         f"with backbone {backbone} has neither")
    body = build_backbone(backbone, depth, yolox_width, depthwise, tf_padding)

    if is_effdet:
        neck = BiFPN(body.channels, width, cells, num_levels, weighted, tf_padding)
        head = EfficientDetHead(width, num_levels, head_repeats, num_anchors, num_classes, objectness)
    else:
        neck = PAFPN(body.channels, depth, depthwise)
        # YOLOX's head width: 256 channels times the width multiplier (128 for yolox_s), at every level
        head = YOLOXHead(neck.channels, int(256 * yolox_width), num_anchors, num_classes, objectness, depthwise)
    config = dict(det_header=det_header, backbone=backbone, anchors_mode=anchors_mode,
                  num_classes=num_classes, input_shape=input_shape,
                  anchor_scale=float(PRESET_ANCHOR_SCALE.get(det_header, ANCHOR_SCALE) if anchor_scale is None
                                     else anchor_scale), pixel_norm=pixel_norm, tf_padding=bool(tf_padding))
    model = Detector(body, neck, head, anchors_mode, num_classes, config)
    # Channels-last (NHWC) weights and activations: oneDNN on CPU runs the depthwise convs
    # of EfficientNet / BiFPN and their backward about 2x faster in this layout (EfficientDet-D0
    # training step, batch 8 at 256: 2.8 s -> 1.3 s on one core), and CUDA tensor cores prefer it too.
    return model.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------
# Priors and the box encoding they define
# ---------------------------------------------------------------------------------------

@dataclass
class Priors:
    """One prior per output row of flatten_outputs, ordered (level, y, x, anchor).

    centers: float32 [N, 2] xy pixels, ((x + 0.5) * stride, (y + 0.5) * stride)
    strides: float32 [N] the level's stride
    boxes:   float32 [N, 4] xyxy pixels: the anchor box ("efficientdet") or the stride x stride
             cell ("anchor_free")
    """
    centers: torch.Tensor
    strides: torch.Tensor
    boxes: torch.Tensor

    def __len__(self):
        return self.centers.shape[0]


# An anchor at octave 0 is ANCHOR_SCALE strides wide (automl's anchor_scale): 4 for every
# preset except EfficientDet-D7, which automl gives 5. No parameter depends on it, only the priors.
ANCHOR_SCALE = 4.0
PRESET_ANCHOR_SCALE = {"efficientdet_d7": 5.0}
ANCHOR_OCTAVES = (0.0, 1.0 / 3.0, 2.0 / 3.0)          # scales 2 ** octave
ANCHOR_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))   # (w, h) factors


def make_priors(input_shape, strides, anchors_mode, device=None, anchor_scale=ANCHOR_SCALE):
    """Priors for an input of input_shape (H, W) and the model's strides.

    Level l has ceil(H / s) x ceil(W / s) locations (the model's map sizes). For
    "efficientdet", 9 anchors per location, in the order scale-major (2^0, 2^(1/3), 2^(2/3))
    then ratio ((1, 1), (1.4, 0.7), (0.7, 1.4)); anchor w = anchor_scale * stride * scale * ratio_w
    (pass model.anchor_scale: 4, or 5 for efficientdet_d7).
    """
    if anchors_mode not in ANCHORS_MODES:
        raise ValueError(f"models.py: unknown anchors_mode {anchors_mode!r}; valid ones: {', '.join(ANCHORS_MODES)}")
    h, w = int(input_shape[0]), int(input_shape[1])
    if anchors_mode == "efficientdet":
        sizes = torch.tensor([[anchor_scale * 2 ** o * rw, anchor_scale * 2 ** o * rh]
                              for o in ANCHOR_OCTAVES for rw, rh in ANCHOR_RATIOS], device=device)
    else:
        sizes = torch.ones(1, 2, device=device)     # the stride x stride cell
    centers, all_strides, boxes = [], [], []
    for s in strides:
        ny, nx = -(-h // s), -(-w // s)
        ys = (torch.arange(ny, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(nx, device=device, dtype=torch.float32) + 0.5) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")                  # [ny, nx]
        c = torch.stack([cx, cy], -1)[:, :, None, :].expand(ny, nx, len(sizes), 2)  # [ny, nx, A, 2]
        half = sizes * (s / 2.0)                                        # [A, 2]
        boxes.append(torch.cat([c - half, c + half], -1).reshape(-1, 4))
        centers.append(c.reshape(-1, 2))
        all_strides.append(torch.full((ny * nx * len(sizes),), float(s), device=device))
    return Priors(torch.cat(centers).float(), torch.cat(all_strides), torch.cat(boxes).float())


# exp() of a raw log-size is clamped so that an untrained or diverging net cannot overflow:
# at most 1000 / 16 (62.5) times the anchor (Detectron's bbox_xform_clip, log(1000/16) ~ 4.14).
# Anchor-free sizes are relative to the stride, which is 4x smaller than the anchors' base
# size (4 * stride), so their clamp is log(4 * 1000 / 16): both cap a box at 250 strides (for
# the base anchor, octave 0 and 1:1, with anchor_scale 4; D7's 5 caps its base anchor at 312.5
# strides; the largest of the 9 anchors caps at about 555).
MAX_LOG_SIZE = {"efficientdet": math.log(1000.0 / 16), "anchor_free": math.log(4 * 1000.0 / 16)}
MIN_SIZE = 1e-3   # px; keeps log() finite when encoding degenerate boxes


def _reference(priors, anchors_mode):
    """Centre [N, 2] and size [N, 2] that raw offsets are measured against."""
    if anchors_mode == "efficientdet":
        size = priors.boxes[:, 2:] - priors.boxes[:, :2]
        return (priors.boxes[:, :2] + priors.boxes[:, 2:]) / 2, size
    if anchors_mode == "anchor_free":
        return priors.centers, priors.strides[:, None].expand(-1, 2)
    raise ValueError(f"models.py: unknown anchors_mode {anchors_mode!r}; valid ones: {', '.join(ANCHORS_MODES)}")


def decode_boxes(raw, priors, anchors_mode):
    """Raw offsets [..., N, 4] (tx, ty, tw, th) -> boxes [..., N, 4] xyxy pixels.

    "efficientdet": cx = cx_a + tx * w_a, w = exp(tw) * w_a (and the same for y, h).
    "anchor_free":  cx = cx_p + tx * stride, w = exp(tw) * stride.
    The grid point is the cell's centre, (x + 0.5) * stride, as the anchors' are; YOLOX measures
    from the cell's corner, x * stride, so its tx is this tx + 0.5 (megvii_yolox_state_dict
    moves the box predictor's bias by it).
    """
    center, size = _reference(priors, anchors_mode)
    c = center + raw[..., :2] * size
    wh = torch.exp(raw[..., 2:].clamp(max=MAX_LOG_SIZE[anchors_mode])) * size
    return torch.cat([c - wh / 2, c + wh / 2], -1)


def encode_boxes(boxes_xyxy, priors, anchors_mode):
    """Boxes [..., N, 4] xyxy pixels -> raw targets [..., N, 4], the inverse of decode_boxes
    (for sizes under the clamp): t = ((cx - cx_p) / s_w, (cy - cy_p) / s_h, log(w / s_w), log(h / s_h))."""
    center, size = _reference(priors, anchors_mode)
    c = (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=MIN_SIZE)
    return torch.cat([(c - center) / size, torch.log(wh / size)], -1)


# ---------------------------------------------------------------------------------------
# Published weights: files from timm, torchvision, effdet and Megvii, renamed to ours
# ---------------------------------------------------------------------------------------

# COCO's 80 categories by id (1..90, ten ids unused since its 2014 release): the slots of an
# effdet checkpoint's class predictor, whose label k is category id k + 1.
COCO_CLASSES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella",
    31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard",
    37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork",
    49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange",
    56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair",
    63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv",
    73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def read_checkpoint(path, mmap=False):
    """torch.load of a checkpoint or a downloaded weights file, made safe: weights_only (tensors,
    numbers, strings and containers, so a file from elsewhere cannot run code while it loads),
    plus the argparse Namespace in which timm's and effdet's training checkpoints keep their
    flags. mmap: map the tensors instead of reading them, for a quick look; a file in torch's
    older, unmappable format (effdet's 2020 weights) is then read. Raises what torch.load raises
    for an unreadable file; train.py and eval.py turn that into their own one-line errors."""
    if mmap:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            pass  # unmappable: read it below (an unreadable file fails there again, and is said)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def unwrap_state_dict(state):
    """The weights inside a published or training file: effdet's and timm's training checkpoints
    keep them under "state_dict_ema" / "state_dict" (EMA first), DDP prefixes every name with
    "module.", and effdet's train / predict wrapper with "model." (beside its anchors.* buffers,
    which are made from the config, not learned)."""
    for key in ("state_dict_ema", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    for prefix in ("module.", "model."):
        if state and all(str(k).startswith(prefix) or str(k).startswith("anchors.") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if str(k).startswith(prefix)}
    return state


def named_settings(path):
    """(pixel_norm, tf_padding) that a published file's path, as given, says its weights need.
    effdet's and timm's files of one architecture hold the same tensors whoever trained them,
    so the name is all that tells them apart:
      - tf_efficientdet_* / tf_efficientnet_* (tf_efficientdet_d0_34-f153e0cf.pth, or timm's
        hub download .../models--timm--tf_efficientnet_b0.ns_jft_in1k/snapshots/.../pytorch_model.bin):
        trained in TensorFlow, with its padding, which build_model's tf_padding reproduces (their
        outputs are then equal; tests/test_models.py);
      - of those, the AdvProp ones (tf_efficientdet_d0_ap-d0cdbd0a.pth, tf_efficientnet_b0.ap_in1k):
        trained on pixels scaled to -1..1 (pixel_norm "inception"), not ImageNet's statistics.
    Anything else: ("imagenet", False). The path as given, not the absolute one: the name of the
    folder a command runs in says nothing about the file."""
    tf_padding = re.search(r"tf_efficient(det|net)", path) is not None
    advprop = tf_padding and re.search(r"_ap[-_.]|\.ap_in1k", path) is not None
    return ("inception" if advprop else "imagenet"), tf_padding


# VOC's names for six of COCO's categories; VOC's other 14 classes have COCO's names.
VOC_TO_COCO_NAMES = {"aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
                     "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv"}


def class_key(name):
    """A class name as classes are matched across datasets: spaces around it dropped, "_" read
    as a space, VOC's names read as COCO's. Case counts: Open Images' "Mouse" is the animal, not
    COCO's computer "mouse", and a capitalised name is more often another dataset's meaning."""
    name = str(name).strip().replace("_", " ")
    return VOC_TO_COCO_NAMES.get(name, name)


def same_classes(old_names, new_names):
    """For each of new_names, the position of the same class in old_names (class_key), None
    where it has none: which class slots of a trained model serve new data. None as a whole
    when two of new_names are one class (both would start from the same row, and which of
    them the trained model meant cannot be told)."""
    where = {}
    for i, name in enumerate(old_names):
        where.setdefault(class_key(name), i)
    slots = [where.get(class_key(name)) for name in new_names]
    found = [s for s in slots if s is not None]
    return None if len(set(found)) < len(found) else slots


def keep_class_slots(tensor, num_anchors, slots, fresh=None):
    """A class predictor's weight or bias [A * C, ...] (anchor-major: row a * C + c is anchor a's
    class c, as every head here and effdet's write them) -> [A * len(slots), ...]: each anchor's
    rows of these class slots, in this order. A slot None takes its rows from fresh, the new
    model's own tensor [A * len(slots), ...] (a class the trained model never saw starts as a
    new model's does)."""
    per_anchor = tensor.reshape(num_anchors, -1, *tensor.shape[1:])
    if fresh is None:
        return per_anchor[:, list(slots)].reshape(-1, *tensor.shape[1:])
    out = fresh.detach().clone().reshape(num_anchors, len(slots), *tensor.shape[1:])
    for c, slot in enumerate(slots):
        if slot is not None:
            out[:, c] = per_anchor[:, slot]
    return out.reshape(-1, *tensor.shape[1:])


def coco_category_ids(cat_ids, class_names=None, partial=False):
    """The COCO category id of each of a dataset's classes, or None when one is not among COCO's
    80, so that a COCO-trained model's class slots can be picked for the data.
    Classes are matched by name (class_key): COCO's names, or VOC's for the same category
    (VOC_TO_COCO_NAMES); so COCO's own json, a YOLO-format COCO subset (coco128: ids from 0) and
    VOC all match, whatever their ids. Only data that names no class (class_names None, or each
    name its id written out, as a json without names reads) is matched by id. ValueError when two
    classes are the same COCO category (each detection would be written twice).
    partial=True (fine-tuning, where a class COCO lacks can start fresh): a class named but not
    among COCO's gets None in its place, and None as a whole means none is COCO's. Data matched
    by id stays all or nothing: an id that is not COCO's says the data numbers its classes its
    own way, and then its other ids are not COCO's categories either."""
    cat_ids = list(cat_ids)
    names = [str(c) for c in cat_ids] if class_names is None else [str(n) for n in class_names]
    if len(names) != len(cat_ids):
        raise ValueError(f"{len(cat_ids)} category ids and {len(names)} class names")
    if all(n.strip() == str(c) for c, n in zip(cat_ids, names)):   # no names: by id
        return cat_ids if all(c in COCO_CLASSES for c in cat_ids) else None
    by_name = {name: c for c, name in COCO_CLASSES.items()}
    out = [by_name.get(class_key(n)) for n in names]
    if (None in out and not partial) or all(c is None for c in out):
        return None
    twins = [n for n, c in zip(names, out) if c is not None and out.count(c) > 1]
    if twins:
        raise ValueError(f"the classes {twins[:2]} are both COCO's {COCO_CLASSES[out[names.index(twins[0])]]!r}: "
                         f"give the data one class per COCO category")
    return out


def _paired(state_items):
    """A state dict's (name, tensor) pairs less BatchNorm's batch counters, which older files
    leave out and which carry no weight: the position match pairs the rest."""
    return [(k, v) for k, v in state_items if not str(k).endswith("num_batches_tracked")]


def load_backbone_weights(backbone, state):
    """Copy an ImageNet classifier's weights, a file you downloaded, into one of our backbones.

    state: the classifier's state dict (name -> tensor). Sources that line up with ours: timm's
    efficientnet_b0 ... b7 and tf_efficientnet_b0 ... b7 for efficientnet_b0 ... b7, timm's
    tf_efficientnetv2_b0 for efficientnetv2_b0, torchvision's resnet50 for resnet50
    (tests/test_models.py checks every tensor's shape against their key lists, and, where timm
    and torchvision are installed, that efficientnet_b0's and resnet50's features come out equal).
    The names differ (timm's blocks.1.0.conv_dw.weight is our stages.1.0.block.1.conv.weight),
    but the tensors come in the same order: the stem, then block by block the expand, depthwise,
    squeeze-excite and project convolutions, each BatchNorm's weight, bias, running mean and
    variance and batch count after its conv. So the match is by position, and every position is
    checked: the same shape, and the file's extra tensors only at its end (the classifier head:
    timm's conv_head / bn2 / classifier, torchvision's fc), which are left out.
    Two differences stay: BatchNorm's eps is 1e-3 here (YOLOX's and TensorFlow's) where timm's
    PyTorch-trained models and torchvision use 1e-5, which moves a channel with a small running
    variance by a few percent until fine-tuning adapts it. timm's tf_* weights (BatchNorm eps
    1e-3, as ours) were trained with TensorFlow's padding: build the backbone with tf_padding=True
    for them (see named_settings), and the features come out equal.
    Returns the number of tensors copied; raises ValueError naming the first one that does not fit.
    """
    copied = _backbone_tensors(backbone, state)
    missing, _ = backbone.load_state_dict(copied, strict=False)
    assert all(k.endswith("num_batches_tracked") for k in missing), missing  # the counters alone
    return len(copied)


def _backbone_tensors(backbone, state):
    """load_backbone_weights' match, without loading: {our name: the file's tensor} for every
    tensor of `backbone`, or a ValueError naming the first that does not fit."""
    own, theirs = _paired(backbone.state_dict().items()), _paired(state.items())
    if len(theirs) < len(own):
        raise ValueError(f"it has {len(theirs)} tensors, fewer than the backbone's {len(own)}: it is another "
                         f"architecture (or only part of one)")
    copied = {}
    for position, ((name, mine), (their_name, tensor)) in enumerate(zip(own, theirs)):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(mine.shape):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"tensor {position} does not fit: ours is {name} {tuple(mine.shape)}, the file's is "
                             f"{their_name} {shape}: it is another architecture")
        copied[name] = tensor.to(mine.dtype)
    # What is left must be a classifier head: anything else (a detector's neck, say) means the
    # file is more than a classifier, and the position match only happened to fit its start.
    rest = [k for k, _ in theirs[len(own):]]
    if len(rest) > 8 or any(not str(k).startswith(("conv_head.", "bn2.", "classifier.", "fc.")) for k in rest):
        raise ValueError(f"after the backbone's {len(own)} tensors it has {len(rest)} more ({rest[0]}, ...), not "
                         f"just a classifier head: it is not an ImageNet classifier of this backbone")
    return copied


def fitting_backbone(state):
    """The first of BACKBONES (after cspdarknet, which has no ImageNet file) whose tensors an
    ImageNet classifier's state dict fits, or None: for an error that says which one a file is.
    Built on the "meta" device (shapes only)."""
    for name in BACKBONES[1:]:
        with torch.device("meta"):
            candidate = build_backbone(name)
        try:
            _backbone_tensors(candidate, state)
        except ValueError:
            continue
        return name
    return None


def effdet_state_dict(state, model, cat_ids=None):
    """An effdet EfficientDet checkpoint (rwightman's effdet package: backbone.*, fpn.*,
    class_net.*, box_net.*) -> a state dict under this model's names, for load_state_dict or
    train.py's --pretrained. model: an EfficientDet preset built with anchors (the default).

    Checked against effdet's efficientdet_d0 (tests/test_models.py): with the converted weights
    both give the same class and box outputs at every level, to 1e-6, and the same anchors.
      - backbone and BiFPN: the same tensors in the same order, matched by position (as in
        load_backbone_weights). effdet's PyTorch models have no bias in a conv that a BatchNorm
        follows (redundant_bias=False); ours keeps TensorFlow's, which get 0: the same outputs.
      - head: by name. effdet keeps one BatchNorm per (repeat, level), ours per (level, repeat).
      - box predictor: effdet (automl) writes each anchor's 4 numbers as (ty, tx, th, tw); ours
        are (tx, ty, tw, th), so its output rows are swapped in pairs. Anchors are the same.
      - the class predictor has a slot per COCO category id 1..90 (label k is id k + 1, unused
        ids included). cat_ids (the COCO category id of each of a dataset's classes, as
        coco_category_ids gives them) keeps the slots of those ids, anchor by anchor, so the
        result fits a model of len(cat_ids) classes and scores COCO's 80 categories exactly as
        effdet does; None keeps all 90.
    Not the same: the backbone's BatchNorm eps (timm's 1e-5, ours 1e-3). effdet's tf_* models
    (tf_efficientdet_d0 ...) have the same tensors, trained with TensorFlow's padding: build the
    model with tf_padding=True (see named_settings) and they give the same outputs too.
    Raises ValueError naming the first tensor that does not fit. The model may be on the "meta"
    device (its shapes are all this reads); the result is on the CPU."""
    own = model.state_dict()
    out, theirs = {}, _paired((k, v) for k, v in state.items() if not k.startswith(("class_net.", "box_net.")))
    j = 0
    for name, mine in own.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros((), dtype=mine.dtype)  # a counter: no weight in it
            continue
        if name.startswith("head."):
            continue
        their_name, tensor = theirs[j] if j < len(theirs) else ("(none left)", None)
        if name.endswith(("pointwise.bias", "conv.bias")) and not their_name.endswith(("conv_pw.bias", "conv.bias")):
            out[name] = torch.zeros(mine.shape, dtype=mine.dtype)  # a redundant bias effdet leaves out
            continue
        if tensor is None or tuple(tensor.shape) != tuple(mine.shape):
            shape = None if tensor is None else tuple(tensor.shape)
            raise ValueError(f"ours is {name} {tuple(mine.shape)}, the file's is {their_name} {shape}: it is "
                             f"another EfficientDet size, or not an effdet checkpoint")
        out[name] = tensor
        j += 1
    for their_name, tensor in state.items():
        if not their_name.startswith(("class_net.", "box_net.")) or their_name.endswith("num_batches_tracked"):
            continue
        # class_net.conv_rep.R.*, class_net.bn_rep.R.L.bn.*, class_net.predict.* (and box_net.*)
        m = re.fullmatch(r"(class|box)_net\.(?:conv_rep\.(\d+)|bn_rep\.(\d+)\.(\d+)\.bn|(predict))\.(.+)", their_name)
        if m is None:
            raise ValueError(f"the file's {their_name} is no part of an EfficientDet head this converter knows")
        side = "cls" if m.group(1) == "class" else "box"
        rest = m.group(6).replace("conv_dw", "depthwise").replace("conv_pw", "pointwise")
        if m.group(2) is not None:
            name = f"head.{side}_convs.{m.group(2)}.{rest}"
        elif m.group(3) is not None:
            name = f"head.{side}_bns.{m.group(4)}.{m.group(3)}.{rest}"  # (repeat, level) -> (level, repeat)
        else:
            name = f"head.{side}_pred.{rest}"
        if name in ("head.box_pred.pointwise.weight", "head.box_pred.pointwise.bias"):
            swap = torch.arange(tensor.shape[0]).view(-1, 4)[:, [1, 0, 3, 2]].flatten()  # (ty, tx, th, tw) -> ours
            tensor = tensor[swap]
        out[name] = tensor
    if j < len(theirs):
        raise ValueError(f"the file has {len(theirs) - j} more backbone / BiFPN tensors than ours (from "
                         f"{theirs[j][0]} on): it is a larger EfficientDet")
    if cat_ids is not None:
        slots = out["head.cls_pred.pointwise.bias"].numel() // model.num_anchors
        if not all(isinstance(c, int) and 1 <= c <= slots for c in cat_ids):
            raise ValueError(f"its class predictor has {slots} slots, COCO's category ids 1..{slots}; the data's "
                             f"ids start {list(cat_ids)[:5]}")
        for key in ("head.cls_pred.pointwise.weight", "head.cls_pred.pointwise.bias"):
            out[key] = keep_class_slots(out[key], model.num_anchors, [c - 1 for c in cat_ids])
    for name, mine in own.items():
        if name not in out and name.startswith(("head.cls_convs.", "head.box_convs.")) and name.endswith(".bias"):
            out[name] = torch.zeros(mine.shape, dtype=mine.dtype)  # the head's redundant biases
    return out


# Megvii's YOLOX names for our modules: the PAFPN's layers (which Megvii keeps under
# "backbone.", beside the CSPDarknet under "backbone.backbone.") and the head's per-level lists.
MEGVII_NECK = {"lateral_conv0": "lateral", "C3_p4": "td4", "reduce_conv1": "reduce", "C3_p3": "td3",
               "bu_conv2": "down3", "C3_n3": "bu4", "bu_conv1": "down4", "C3_n4": "bu5"}
MEGVII_HEAD = {"stems": "stem", "cls_convs": "cls_convs", "reg_convs": "reg_convs", "cls_preds": "cls_pred",
               "reg_preds": "reg_pred", "obj_preds": "obj_pred"}


def megvii_yolox_name(name):
    """One tensor name of Megvii's YOLOX -> ours, or None for a name no YOLOX of theirs has.
    backbone.backbone.dark3.1.m.0.conv1.conv.weight -> backbone.dark3.1.blocks.0.conv1.conv.weight,
    backbone.C3_p4.conv1.bn.bias -> neck.td4.conv1.bn.bias, head.cls_preds.2.bias -> head.levels.2.cls_pred.bias."""
    parts = name.split(".")
    if parts[:3] == ["backbone", "backbone", "stem"] and parts[3:4] == ["conv"]:
        parts = ["backbone", "stem"] + parts[4:]               # Focus's conv is our stem
    elif parts[:2] == ["backbone", "backbone"]:
        parts = parts[1:]                                     # the CSPDarknet: the same layout
    elif parts[0] == "backbone" and len(parts) > 1 and parts[1] in MEGVII_NECK:
        parts = ["neck", MEGVII_NECK[parts[1]]] + parts[2:]
    elif parts[0] == "head" and len(parts) > 2 and parts[1] in MEGVII_HEAD and parts[2].isdigit():
        parts = ["head", "levels", parts[2], MEGVII_HEAD[parts[1]]] + parts[3:]
    else:
        return None
    # A CSP layer's bottlenecks are its "m" (SPP's "m", its pools, holds no tensor).
    return ".".join("blocks" if p == "m" else p for p in parts)


def megvii_yolox_state_dict(state, model, cat_ids=None):
    """A Megvii YOLOX checkpoint's weights (github.com/Megvii-BaseDetection/YOLOX, its
    yolox_nano ... yolox_x.pth: {"model": state dict, ...}; state is that "model" entry) -> a
    state dict under this model's names. model: the same YOLOX preset, anchor-free, built with
    pixel_norm "0-255": Megvii's weights since v0.1.1 take BGR pixels 0..255, unnormalised.

    Checked against Megvii's yolox package (tests/test_models.py): with the converted weights both
    give the same boxes and scores. The layers are theirs, renamed (megvii_yolox_name); three
    tensors change on the way:
      - the stem's input channels: their Focus stacks the same four pixel phases as ours, but
        each in BGR order, so its 12 input channels are reversed in threes to take RGB (for a
        model with pixel_norm "0-255");
      - the box predictor's x, y biases - 0.5: their box centre is (t + x) * stride from the
        cell's corner, ours (t + x + 0.5) * stride from its centre;
      - the class predictor: one slot per COCO category in id order (slot k is the k-th of
        sorted(COCO_CLASSES)). cat_ids (the COCO category id of each of a dataset's classes, as
        coco_category_ids gives them) keeps those ids' slots, so the result fits a model of
        len(cat_ids) classes; None keeps all 80.
    Megvii's older v0.1.0 weights ("legacy": RGB pixels normalised with ImageNet's mean and std)
    convert onto a model with pixel_norm "imagenet": the same, less the BGR flip. Their files do
    not say which they are; train.py and eval.py take the current ones.
    Raises ValueError naming the first tensor that does not fit. The model may be on the "meta"
    device (its shapes are all this reads); the result is on the CPU."""
    if model.config.get("pixel_norm") not in ("0-255", "imagenet"):
        raise ValueError(f"the model's pixel_norm is {model.config.get('pixel_norm')!r}; Megvii's weights take "
                         f"0..255 pixels (\"0-255\"), its legacy ones ImageNet's statistics (\"imagenet\")")
    own = model.state_dict()
    out, source = {}, {}
    for their_name, tensor in state.items():
        name = megvii_yolox_name(their_name)
        if name is None or name not in own:
            raise ValueError(f"the file's {their_name} is no tensor of this YOLOX (ours would be {name}): it is "
                             f"another YOLOX size, or not a Megvii YOLOX checkpoint")
        out[name], source[name] = tensor, their_name
    missing = [k for k in own if k not in out and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"the file has no {missing[0]} ({len(missing)} of our tensors missing): it is not a whole "
                         f"Megvii YOLOX")
    for name in own:
        out.setdefault(name, torch.zeros((), dtype=torch.long))   # batch counters older files leave out
    if model.config["pixel_norm"] == "0-255":  # BGR -> RGB, per pixel phase (legacy weights took RGB)
        stem = "backbone.stem.conv.weight"
        out[stem] = out[stem][:, torch.arange(12).view(4, 3).flip(1).flatten()]
    for level in range(len(model.strides)):
        bias = f"head.levels.{level}.reg_pred.bias"
        out[bias] = out[bias] - torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=out[bias].dtype)
    if cat_ids is not None:
        coco = sorted(COCO_CLASSES)
        slots = out["head.levels.0.cls_pred.bias"].numel()
        if slots != len(coco):
            raise ValueError(f"its class predictor has {slots} slots, not COCO's 80: it was trained on other "
                             f"data, and cannot score categories by their COCO id")
        if not all(c in COCO_CLASSES for c in cat_ids):
            raise ValueError(f"its class predictor has a slot per COCO category; the data's ids start "
                             f"{list(cat_ids)[:5]}, not all COCO's")
        for level in range(len(model.strides)):
            for key in (f"head.levels.{level}.cls_pred.weight", f"head.levels.{level}.cls_pred.bias"):
                out[key] = keep_class_slots(out[key], 1, [coco.index(c) for c in cat_ids])
    for name, mine in own.items():
        if tuple(out[name].shape) != tuple(mine.shape):
            raise ValueError(f"ours is {name} {tuple(mine.shape)}, the file's {source.get(name)} is "
                             f"{tuple(out[name].shape)}: it is another YOLOX size" +
                             (" or number of classes" if "cls_pred" in name else ""))
    return out


# The published detectors this file converts, by kind (eval.read_published_checkpoint tells
# them apart): a name for messages, the tensor whose size counts the class slots (per anchor),
# how many slots their COCO models have and how the slots stand for COCO's ids, the presets a
# file may be, its converter, and the input its weights take (PIXEL_NORMS).
PUBLISHED = {
    "effdet": dict(name="effdet EfficientDet", slots_key="class_net.predict.conv_pw.bias", anchors=9, slots=90,
                   ids="id k + 1 in slot k", presets=EFFICIENTDET_PRESETS, convert=effdet_state_dict,
                   pixel_norm="imagenet"),
    "megvii": dict(name="Megvii YOLOX", slots_key="head.cls_preds.0.bias", anchors=1, slots=80,
                   ids="COCO's 80 ids in order", presets=YOLOX_PRESETS, convert=megvii_yolox_state_dict,
                   pixel_norm="0-255"),
}


def published_kind(state):
    """Which of PUBLISHED a state dict (unwrap_state_dict's) is: "effdet" (class_net.*),
    "megvii" (head.stems.*), or None for any other (ours, an ImageNet classifier, ...)."""
    for kind, prefix in (("effdet", "class_net."), ("megvii", "head.stems.")):
        if any(str(k).startswith(prefix) for k in state):
            return kind
    return None


def published_preset(state, kind):
    """The preset that a published file's weights fit (kind: a key of PUBLISHED): the first whose
    model the converter takes, built on the "meta" device (shapes only, no memory), or None.
    effdet's d6 and d7 share every tensor (they differ in input size and anchors): d6 is
    returned for both."""
    spec = PUBLISHED[kind]
    if spec["slots_key"] not in state:
        return None
    for name in spec["presets"]:
        with torch.device("meta"):
            candidate = build_model(name, num_classes=state[spec["slots_key"]].numel() // spec["anchors"],
                                    pixel_norm=spec["pixel_norm"])
        try:
            spec["convert"](state, candidate)
        except ValueError:
            continue
        return name
    return None


# ---------------------------------------------------------------------------------------
# `python models.py`: the preset table
# ---------------------------------------------------------------------------------------

def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def preset_table(num_classes_effdet=90, num_classes_yolox=80):
    """Rows (name, params, (H, W), GFLOPs) for every preset at the published class counts.

    Built and run on the "meta" device: no memory and no arithmetic, so even D7 is instant;
    FlopCounterMode reads the FLOPs from the shapes (2 FLOPs per multiply-add).
    """
    from torch.utils.flop_counter import FlopCounterMode
    rows = []
    for name in PRESETS:
        classes = num_classes_effdet if name in EFFICIENTDET_PRESETS else num_classes_yolox
        shape = preset_input_shape(name)
        with torch.device("meta"):
            model = build_model(name, num_classes=classes, input_shape=shape).eval()
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(torch.zeros(1, 3, *shape))
        rows.append((name, count_parameters(model), shape, counter.get_total_flops() / 1e9))
    return rows


def format_table(rows):
    """Markdown table of preset_table's rows (FLOPs: torch.utils.flop_counter, 2 per multiply-add)."""
    lines = ["| preset | params | input | GFLOPs (batch 1) |", "| --- | ---: | --- | ---: |"]
    for name, params, shape, gflops in rows:
        lines.append(f"| {name} | {params:,} | {shape[0]}x{shape[1]} | {gflops:.2f} |")
    lines.append("")
    lines.append("Parameters with the published class counts (EfficientDet 90, YOLOX 80); GFLOPs from "
                 "torch.utils.flop_counter, 2 per multiply-add, batch 1 at the input size.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(preset_table()))
    sys.exit(0)
