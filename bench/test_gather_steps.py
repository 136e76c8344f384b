"""bench.gather_steps counts what the two gather designs do; known answers at zero offsets and one far pixel."""

import pytest
import torch

from alignseg.ops.backend import triton_available
from bench import gather_steps

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")


def test_zero_offsets_same_size_both_designs_take_four_steps_a_tile():
    # Each bin holds its own pixel: 2x2 bin displacements of one step; the window is i - t in {-1, 0} per axis.
    H, W = 13, 11
    offsets2 = torch.zeros(1, 2, H, W)
    tiles = -(-H // gather_steps.TILE) * -(-W // gather_steps.TILE)
    assert gather_steps.binned_steps(offsets2, (H, W), 0) == 4 * tiles
    assert gather_steps.window_area(offsets2, (H, W), composite=False) == 4


def test_one_far_pixel_widens_the_window_but_not_the_bins():
    H, W = 13, 11
    offsets2 = torch.zeros(1, 2, H, W)
    offsets2[0, :, 6, 5] = torch.tensor([4.5, -5.25])  # x = 9.5, y = 0.75: taps 9, 10 and 0, 1
    # rows: i - t in {-1, 0} and 6 - 0, 6 - 1: [-1, 6]; columns: 5 - 9, 5 - 10 and {-1, 0}: [-5, 0]
    assert gather_steps.window_area(offsets2, (H, W), composite=False) == 8 * 6
    tiles = -(-H // gather_steps.TILE) * -(-W // gather_steps.TILE)
    # its bin (0, 9) holds two pixels now, (0, 9) and (6, 5): one more step for each of the four displacements
    # that bring that bin into the tile of cells (0..1, 9..10)
    assert gather_steps.binned_steps(offsets2, (H, W), 0) == 4 * tiles + 4
