"""Small 3D backbones for the crop classifier (MONAI nets are used directly by ``class_path``).

Every backbone maps float32 (B, C, X, Y, Z) to a feature vector (B, F) through a final
``nn.Linear``; :class:`~stage2_classify.module.CropClassifier` reads F from that layer and adds the
vertebra embedding and the fracture head on top. The input channel count is linked from the data
config to ``in_channels``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN3d(nn.Module):
    """A plain 3D CNN (conv-BN-ReLU ×2 per stage, max-pool between stages), for CPU runs.

    Args:
        in_channels: input channels.
        out_channels: feature size F of the final linear layer.
        widths: channels per stage; each stage after the first halves every spatial size.
        dropout: dropout before the final linear layer.
        stem_stride: stride of the very first convolution (2 cuts the cost of the
            first stage; its 3×3×3 kernels still see every voxel, so a one-voxel crack survives).
        pool_mask_channel: index of the target-vertebra mask among the input channels; when set,
            the pooling runs only over the feature voxels that the mask (max-pooled to the
            feature grid, i.e. dilated by about one feature cell) touches, so a fractured
            neighbour that shares the crop does not vote. None pools over the whole crop.

    Pooling is average ⊕ max, so a thin crack that lights up a few voxels is not averaged away.
    """

    def __init__(self, in_channels: int, out_channels: int = 64,
                 widths: Sequence[int] = (16, 32, 64), dropout: float = 0.1,
                 stem_stride: int = 1, pool_mask_channel: int | None = None) -> None:
        super().__init__()
        if pool_mask_channel is not None and not 0 <= pool_mask_channel < in_channels:
            raise ValueError(f"pool_mask_channel {pool_mask_channel} is not one of the "
                             f"{in_channels} input channels")
        self.pool_mask_channel = pool_mask_channel
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool3d(2, ceil_mode=True))
            stride = stem_stride if i == 0 else 1
            layers += [nn.Conv3d(c, w, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(w),
                       nn.ReLU(inplace=True), nn.Conv3d(w, w, 3, padding=1, bias=False),
                       nn.BatchNorm3d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * c, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) float32 → (B, F) features."""
        f = self.features(x)
        if self.pool_mask_channel is None:
            pooled = torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1)
        else:
            pooled = masked_pool(f, x[:, self.pool_mask_channel:self.pool_mask_channel + 1])
        return self.fc(self.dropout(pooled))


def masked_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average ⊕ max of ``features`` (B, F, x, y, z) over the cells that ``mask`` (B, 1, X, Y, Z),
    values in [0, 1] on the input grid, touches; a sample whose mask is empty pools everywhere.

    Returns (B, 2F).
    """
    # plain ints: a constant output size when traced for ONNX export (cspine/onnx_models.py)
    size = tuple(int(n) for n in features.shape[2:])
    m = F.adaptive_max_pool3d(mask.float(), size) > 0.5                     # (B, 1, x, y, z)
    empty = ~m.flatten(1).any(dim=1)
    m = m | empty.view(-1, 1, 1, 1, 1)
    w = m.to(features.dtype)
    mean = (features * w).sum(dim=(2, 3, 4)) / w.sum(dim=(2, 3, 4)).clamp_min(1.0)
    big = torch.finfo(features.dtype).min
    mx = features.masked_fill(~m, big).amax(dim=(2, 3, 4))
    return torch.cat([mean, mx], dim=1)


class ResNet3d(nn.Module):
    """MONAI's 3D ResNet with the ``in_channels``/``out_channels`` names the config links use.

    Args:
        in_channels: input channels.
        out_channels: feature size F.
        depth: 10, 18 or 34 (basic blocks).
        widths: channels of the four stages.
    """

    LAYERS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}

    def __init__(self, in_channels: int, out_channels: int = 64, depth: int = 10,
                 widths: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        if depth not in self.LAYERS:
            raise ValueError(f"ResNet3d depth must be one of {sorted(self.LAYERS)}, got {depth}")
        self.net = ResNet("basic", self.LAYERS[depth], list(widths), spatial_dims=3,
                          n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=1,
                          num_classes=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def feature_dim(net: nn.Module) -> int:
    """Output size F of a backbone: ``out_features`` of its last ``nn.Linear``."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no nn.Linear layer; stage 2 needs a backbone "
                         f"that ends in a linear feature layer (set its out_channels/num_classes)")
    return int(linears[-1].out_features)
