"""The image towers without a reference model: grids, pixel-to-cell, normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reldistill_jax.models import vit


@pytest.mark.parametrize(
  "config, size, grid",
  [
    (vit.clip_config(64, 1, 16, 14, 32), (224, 416), (14, 26)),
    (vit.clip_config(64, 1, 14, 16, 32), (224, 420), (16, 30)),
    (vit.dinov2_config(48, 1, 4), (224, 420), (16, 30)),
    (vit.dinov2_config(48, 1, 4, num_registers=4), (448, 896), (32, 64)),
  ],
)
def test_dense_grid_shape(config, size, grid):
  assert vit.grid_size(size, config.patch_size) == grid
  images = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
  variables = jax.eval_shape(vit.ViT(config).init, jax.random.key(0), images)
  features, aux = jax.eval_shape(vit.ViT(config).apply, variables, images)
  assert features.shape == (2, *grid, config.out_dim)
  prefix = 1 + config.num_registers
  assert aux["tokens"].shape == (2, prefix + grid[0] * grid[1], config.width)


def test_pixel_to_cell_hand_cases():
  native, image, grid = (900, 1600), (224, 416), (14, 26)
  # Column: x' = (u + 0.5) * 416 / 1600 = (u + 0.5) * 0.26, cell = floor(x' / 16).
  # u = 61 -> 15.99 (cell 0), u = 62 -> 16.25 (cell 1), u = 800 -> 208.13 (cell 13).
  # Row: y' = (v + 0.5) * 224 / 900, cell = floor(y' / 16); v = 64 -> 16.05 (cell 1),
  # v = 63 -> 15.80 (cell 0), v = 450 -> 112.12 (cell 7), v = 899 -> 223.88 (cell 13).
  u = np.array([0, 61, 62, 800, 1599])
  v = np.array([0, 63, 64, 450, 899])
  row, col = vit.pixel_to_cell(u, v, native, image, grid)
  np.testing.assert_array_equal(col, [0, 0, 1, 13, 25])
  np.testing.assert_array_equal(row, [0, 0, 1, 7, 13])
  # Patch 14 at 224x420: x' = (u + 0.5) * 0.2625; u = 53 -> 14.04 (cell 1), 52 -> 13.78 (cell 0).
  _, col = vit.pixel_to_cell(np.array([52, 53, 1599]), np.zeros(3), native, (224, 420), (16, 30))
  np.testing.assert_array_equal(col, [0, 1, 29])
  with pytest.raises(ValueError, match="whole number"):
    vit.pixel_to_cell(u, v, native, (224, 410), grid)


def test_normalize_pixels():
  images = np.zeros((1, 2, 2, 3), np.uint8)
  images[0, 1] = 255
  for config, mean, std in [
    (vit.VARIANTS["clip_b16"], vit.CLIP_MEAN, vit.CLIP_STD),
    (vit.VARIANTS["dinov2_b14"], vit.IMAGENET_MEAN, vit.IMAGENET_STD),
  ]:
    out = np.asarray(vit.normalize_pixels(images, config))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], -np.array(mean) / np.array(std), rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, 1], (1 - np.array(mean)) / np.array(std), rtol=1e-6)
  assert vit.VARIANTS["clip_b16"].pixel_mean == (0.48145466, 0.4578275, 0.40821073)
  assert vit.VARIANTS["dinov2_s14"].pixel_std == (0.229, 0.224, 0.225)
