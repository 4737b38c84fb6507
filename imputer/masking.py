"""Training and evaluation masks, drawn on device inside the jitted step.

A mask hides (timestep, sensor) units of each target group. Hiding a unit hides the raw
columns of that sensor and every engineered feature that reads them at that timestep or, for
rates and differences, at the next one, so nothing hidden leaks into the model input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def expand_to_features(layout, hidden_raw: jax.Array) -> jax.Array:
  """Map a (B, W, C_raw) hidden mask to (B, W, F) through the feature dependencies."""
  now = jnp.asarray(layout.feature_set.depends_now.T, jnp.float32)
  prev = jnp.asarray(layout.feature_set.depends_prev.T, jnp.float32)
  raw = hidden_raw.astype(jnp.float32)
  # Within a window the first timestep has no previous one; the value before the window is
  # not part of the input, so nothing can leak from it.
  raw_prev = jnp.pad(raw[:, :-1], ((0, 0), (1, 0), (0, 0)))
  return (raw @ now + raw_prev @ prev) > 0


def sample_hidden(rng: jax.Array, layouts, batch_size: int, window: int, ratio,
                  imu_only_prob) -> dict[str, jax.Array]:
  """Draw (B, W, C_raw) hidden masks for every target group (ratio 1 hides everything).

  Each (timestep, sensor) unit is hidden with probability `ratio`; with probability
  `imu_only_prob` a window hides every unit of every target group, the IMU-only case.
  `ratio` and `imu_only_prob` may be traced scalars (schedules of the step).
  """
  rng_all, *rng_groups = jax.random.split(rng, len(layouts) + 1)
  imu_only = jax.random.bernoulli(rng_all, imu_only_prob, (batch_size, 1, 1))
  hidden = {}
  for layout, key in zip(layouts, rng_groups):
    units = jax.random.bernoulli(key, ratio, (batch_size, window, layout.num_sensors))
    units = units | imu_only
    hidden[layout.name] = units[..., np.asarray(layout.sensor_of_raw)]
  return hidden

