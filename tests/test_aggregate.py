import pytest
import torch

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec

SLIDING = PatchSpec(mode="sliding", size=16, stride=4, out_size=32)  # a 5x5 grid of patches


def test_mean_and_concat():
    feats = torch.randn(3, 25, 8)
    torch.testing.assert_close(Aggregation.parse("mean")(feats, SLIDING), feats.mean(1))
    torch.testing.assert_close(Aggregation.parse("concat")(feats, SLIDING), feats.reshape(3, 200))
    assert Aggregation.parse("concat").output_dim(8, SLIDING) == 200


def test_gridpool_3_2_on_5x5_is_table5_2x2_cells_by_hand():
    feats = torch.randn(2, 25, 4)
    agg = Aggregation.parse("gridpool")
    out = agg(feats, SLIDING)
    assert out.shape == (2, 4 * 2 * 2) == (2, agg.output_dim(4, SLIDING))
    grid = feats.reshape(2, 5, 5, 4)
    for cell, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        by_hand = grid[:, r : r + 3, c : c + 3].mean(dim=(1, 2))
        torch.testing.assert_close(out.reshape(2, 4, 4)[:, :, cell], by_hand)


@pytest.mark.parametrize("text,expected", [("gridpool:2:1", (2, 1)), ("gridpool(3,3)", (3, 3)), ("GridPool", (3, 2))])
def test_gridpool_parsing(text, expected):
    agg = Aggregation.parse(text)
    assert (agg.kernel, agg.stride) == expected


def test_gridpool_needs_a_patch_grid_and_fits_in_it():
    with pytest.raises(UserError, match="no patch grid"):
        Aggregation.parse("gridpool").check(PatchSpec(mode="random", n=16))
    with pytest.raises(UserError, match="larger than"):
        Aggregation.parse("gridpool:7:1").check(SLIDING)
    with pytest.raises(UserError, match="unknown aggregation"):
        Aggregation.parse("median")
