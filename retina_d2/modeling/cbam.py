"""CBAM, the Convolutional Block Attention Module (Woo et al., ECCV 2018), as CBAM-DeepLab uses it.

A feature map is reweighted twice, channels first, then positions:

- channel attention: one MLP (1x1 convs C -> C / r -> C), *shared* by the global-average-pooled
  and the global-max-pooled descriptors; ``sigmoid(MLP(avg) + MLP(max))`` scales each channel;
- spatial attention: the channel-wise mean and max maps, stacked, go through one 7x7 conv;
  its sigmoid scales each position.
"""
import fvcore.nn.weight_init as weight_init
import torch
from torch import nn

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM"]


class ChannelAttention(nn.Module):
    """Per-channel weights in (0, 1) from a shared MLP on average- and max-pooled features."""

    def __init__(self, channels: int, reduction: int = 16):
        """
        Args:
            channels: C of the input.
            reduction: r; the hidden layer has ``max(1, C // r)`` units.
        """
        super().__init__()
        if reduction < 1:
            raise ValueError(f"CBAM reduction must be >= 1, got {reduction}")
        hidden = max(1, channels // reduction)
        # One module applied to both descriptors: the sharing the paper prescribes.
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        for layer in (self.mlp[0], self.mlp[2]):
            weight_init.c2_msra_fill(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W).

        Returns:
            (N, C, 1, 1) attention weights.
        """
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        peak = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """Per-position weights in (0, 1) from a conv on the channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = 7):
        """
        Args:
            kernel_size: odd size of the conv (7 in the paper); padding keeps the map's size.
        """
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"CBAM spatial kernel size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2)
        weight_init.c2_msra_fill(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W).

        Returns:
            (N, 1, H, W) attention weights.
        """
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel then spatial attention; the output has the input's shape."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        """
        Args:
            channels: C of the input.
            reduction: of the channel MLP.
            kernel_size: of the spatial attention's conv.
        """
        super().__init__()
        self.channel_attention = ChannelAttention(channels, reduction)
        self.spatial_attention = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_attention(x)
        return x * self.spatial_attention(x)
