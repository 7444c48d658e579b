import pytest
import torch

from beni_model.connectors import build_connector, parse_connector, pixel_shuffle


@pytest.mark.parametrize("spec, tokens", [("mlp2x_gelu", 16), ("pixelshuffle2_mlp", 4), ("perceiver_8x2_h4_kv2", 8), ("perceiver_5x1", 5)])
def test_connector_shapes_counts_and_gradients(spec, tokens):
    parsed = parse_connector(spec)
    connector = build_connector(parsed, vision_dim=24, text_dim=32)
    features = torch.randn(3, 16, 24, requires_grad=True)
    out = connector(features)
    assert out.shape == (3, tokens, 32) and parsed.num_tokens(16) == tokens
    out.square().mean().backward()
    assert features.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())


def test_pixel_shuffle_groups_neighbouring_patches():
    grid, dim = 4, 2
    # Patch (r, c) carries the values (r, c) so the grouping can be read back.
    features = torch.tensor([[[r, c] for r in range(grid) for c in range(grid)]], dtype=torch.float)
    shuffled = pixel_shuffle(features, 2)
    assert shuffled.shape == (1, 4, 8)
    # Token 1 is the top-right 2x2 block: rows 0-1, columns 2-3, row-major inside the block.
    assert shuffled[0, 1].view(4, dim).tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    with pytest.raises(ValueError, match="square patch grid divisible by 2"):
        pixel_shuffle(torch.randn(1, 15, dim), 2)


def test_perceiver_emits_fixed_tokens_whatever_the_resolution():
    connector = build_connector(parse_connector("perceiver_6x1_h4_kv1"), vision_dim=16, text_dim=32)
    assert connector(torch.randn(2, 16, 16)).shape == connector(torch.randn(2, 64, 16)).shape == (2, 6, 32)
