"""The on-device interpolation prior against numpy's np.interp."""

import numpy as np

from imputer import interpolation


def test_matches_numpy_interp_with_held_ends():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(3, 12, 4)).astype(np.float32)
  visible = rng.random((3, 12, 4)) < 0.4
  visible[0, :, 0] = False  # No visible value at all.
  visible[1, :, 1] = False
  visible[1, 5, 1] = True  # Exactly one visible value.
  out = np.asarray(interpolation.interpolate_visible(values, visible))
  time = np.arange(12)
  for b in range(3):
    for c in range(4):
      known = visible[b, :, c]
      expected = (np.interp(time, time[known], values[b, known, c]) if known.any()
                  else np.zeros(12))
      np.testing.assert_allclose(out[b, :, c], expected, rtol=1e-5, atol=1e-6)


def test_visible_values_pass_through_unchanged():
  values = np.arange(10, dtype=np.float32).reshape(1, 10, 1) ** 2
  visible = np.zeros((1, 10, 1), bool)
  visible[0, [1, 4, 8]] = True
  out = np.asarray(interpolation.interpolate_visible(values, visible))[0, :, 0]
  np.testing.assert_allclose(out[[1, 4, 8]], [1.0, 16.0, 64.0])
  np.testing.assert_allclose(out[2], 1.0 + (16.0 - 1.0) / 3.0, rtol=1e-6)
  np.testing.assert_allclose(out[0], 1.0)
  np.testing.assert_allclose(out[9], 64.0)
