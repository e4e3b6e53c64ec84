"""CBAM: attention shapes and ranges, a shared channel MLP, a 7x7 spatial conv."""
import pytest
import torch

from retina_d2.modeling.cbam import CBAM, ChannelAttention, SpatialAttention


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def test_attention_shapes_and_ranges():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 13)
    channel = ChannelAttention(32, reduction=8)(x)
    spatial = SpatialAttention()(x)
    assert channel.shape == (2, 32, 1, 1)
    assert spatial.shape == (2, 1, 9, 13)
    for weights in (channel, spatial):
        assert bool(((weights > 0) & (weights < 1)).all())
    assert CBAM(32, reduction=8)(x).shape == x.shape


def test_channel_mlp_is_shared_between_average_and_max_paths():
    channels, reduction = 48, 16
    attention = ChannelAttention(channels, reduction)
    hidden = channels // reduction
    # One MLP (weights + biases of C -> C/r -> C); two unshared MLPs would double this.
    assert _num_params(attention) == channels * hidden + hidden + hidden * channels + channels
    x = torch.randn(1, channels, 5, 7)
    mlp = attention.mlp
    average, peak = x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    expected = torch.sigmoid(mlp(average) + mlp(peak))
    torch.testing.assert_close(attention(x), expected)


def test_hidden_width_never_drops_below_one():
    assert ChannelAttention(8, reduction=16).mlp[0].out_channels == 1


def test_spatial_attention_is_one_7x7_conv_on_mean_and_max():
    attention = SpatialAttention()
    conv = attention.conv
    assert conv.kernel_size == (7, 7) and conv.in_channels == 2 and conv.out_channels == 1
    assert _num_params(attention) == 2 * 7 * 7 + 1
    x = torch.randn(1, 6, 8, 8)
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
    torch.testing.assert_close(attention(x), torch.sigmoid(conv(pooled)))


def test_cbam_applies_channel_then_spatial_attention():
    torch.manual_seed(0)
    block = CBAM(16, reduction=4)
    x = torch.randn(2, 16, 6, 5)
    refined = x * block.channel_attention(x)
    torch.testing.assert_close(block(x), refined * block.spatial_attention(refined))


@pytest.mark.parametrize("make", [lambda: ChannelAttention(8, 0), lambda: SpatialAttention(6)])
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()
