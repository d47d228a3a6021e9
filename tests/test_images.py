"""Image files: uint8 conversion, PNG grids, npz, file modes."""

import numpy as np
import pytest
import torch

from agm_fast import images


def test_written_files_follow_the_umask(tmp_path):
    import os
    import stat
    umask = os.umask(0o022)
    os.umask(umask)
    images.save_grid(torch.zeros(1, 3, 4, 4), tmp_path / "g.png")
    images.save_npz(torch.zeros(1, 3, 4, 4), tmp_path / "s.npz")
    for name in ("g.png", "s.npz"):  # not mkstemp's 0600: others may read what a run wrote
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask


def test_save_grid_grey_and_bad_channels(tmp_path):
    from PIL import Image
    imgs = torch.linspace(-1, 1, 5 * 28 * 28).reshape(5, 1, 28, 28)
    images.save_grid(imgs, tmp_path / "grey.png")
    png = Image.open(tmp_path / "grey.png")
    assert png.mode == "L" and png.size == (3 * 30 + 2, 2 * 30 + 2)
    cell = np.asarray(png)[2:30, 2:30]
    np.testing.assert_array_equal(cell, images.to_uint8(imgs)[0, :, :, 0])
    with pytest.raises(ValueError, match="C = 1"):
        images.save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")
