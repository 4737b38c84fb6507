"""Linear interpolation over time of the visible values in a window, on device.

The model receives it as a prior for every target group's raw channels and predicts a
correction on top of it. Where part of a sensor is visible, the model thus starts from the
interpolation baseline instead of having to learn to copy neighbouring values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def interpolate_visible(values: jax.Array, visible: jax.Array) -> jax.Array:
  """Interpolate each channel of (B, W, C) `values` linearly over its `visible` timesteps.

  Before the first and after the last visible timestep the nearest visible value is held. A
  channel with no visible timestep in the window gets 0, which is the training median in
  scaled units.
  """
  window = values.shape[1]
  time = jnp.arange(window)[None, :, None]
  visible = visible.astype(bool)
  prev_index = jax.lax.cummax(jnp.where(visible, time, -1), axis=1)
  next_index = jax.lax.cummin(jnp.where(visible, time, window), axis=1, reverse=True)
  has_prev, has_next = prev_index >= 0, next_index < window
  prev_value = jnp.take_along_axis(values, jnp.clip(prev_index, 0, window - 1), axis=1)
  next_value = jnp.take_along_axis(values, jnp.clip(next_index, 0, window - 1), axis=1)
  span = jnp.maximum(next_index - prev_index, 1)
  weight = jnp.where(has_prev & has_next, (time - prev_index) / span, 0.0)
  between = prev_value + weight * (next_value - prev_value)
  return jnp.where(has_prev, jnp.where(has_next, between, prev_value),
                   jnp.where(has_next, next_value, 0.0))
