"""ADM's centre crop and the [-1, 1] tensor convention."""
import numpy as np
import torch
from PIL import Image

from tcae_ldm.data.transforms import center_crop_arr, to_tensor, to_uint8


def test_center_crop_and_tensor_convention():
    img = Image.fromarray(np.zeros((90, 200, 3), dtype=np.uint8))
    assert center_crop_arr(img, 32).size == (32, 32)
    x = to_tensor(np.full((4, 4, 3), 255, dtype=np.uint8))
    assert x.shape == (3, 4, 4) and x.max() == 1.0
    assert torch.equal(to_uint8(to_tensor(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))).permute(1, 2, 0),
                       torch.arange(48, dtype=torch.uint8).reshape(4, 4, 3))

