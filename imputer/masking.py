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
  """Map a (B, W, C_raw) hidden mask to (B, W, F) through the feature dependencies.

  The leading features that copy a raw channel (`FeatureSet.num_copied`) take its mask as it
  is; only the engineered rest goes through the dependency matrices.
  """
  fs = layout.feature_set
  copied = fs.num_copied
  if copied == fs.num_features:
    return hidden_raw[..., :copied]
  now = jnp.asarray(fs.depends_now[copied:].T, jnp.float32)
  prev = jnp.asarray(fs.depends_prev[copied:].T, jnp.float32)
  raw = hidden_raw.astype(jnp.float32)
  # The first timestep of a window has no previous one inside it. The value before the
  # window is not part of the input, so nothing can leak from it.
  raw_prev = jnp.pad(raw[:, :-1], ((0, 0), (1, 0), (0, 0)))
  engineered = (raw @ now + raw_prev @ prev) > 0
  return jnp.concatenate([hidden_raw[..., :copied], engineered], axis=-1)


def scheduled_ratio(step, start: float, end: float, ramp_steps: int) -> jax.Array:
  """Return the mask ratio at `step`: linear from `start` to `end` over `ramp_steps` steps.

  After the ramp, and throughout when `ramp_steps` is 0, the ratio is `end`. A jnp function of
  the step, so a schedule never recompiles the step and a resumed run continues the ramp.
  The three settings may also be arrays, one value per variant of a side-by-side study.
  """
  if not isinstance(ramp_steps, (int, np.integer)):
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.maximum(ramp_steps, 1), 0.0, 1.0)
    return start + (end - start) * jnp.where(ramp_steps > 0, progress, 1.0)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(ramp_steps, 1), 0.0, 1.0)
  if ramp_steps == 0:
    progress = jnp.ones_like(progress)
  return start + (end - start) * progress


def applied_ratio(hidden_raw, observed_raw) -> jax.Array:
  """Return the fraction of observed raw target values that `hidden_raw` hides."""
  hidden = sum(jnp.sum(hidden_raw[g] & observed_raw[g]) for g in hidden_raw)
  observed = sum(jnp.sum(observed_raw[g]) for g in hidden_raw)
  return hidden / jnp.maximum(observed, 1)


MASK_KINDS = ('element', 'sensor', 'span')


def _span_units(rng, ratio, shape, span_length: int) -> jax.Array:
  """Hide runs of `span_length` timesteps per sensor, covering about `ratio` of the window.

  Runs start independently with probability p = 1 - (1 - ratio)^(1 / span_length), so a
  timestep away from the window's start is covered by no run with probability 1 - ratio.
  """
  span_length = min(span_length, shape[1])
  start_prob = 1.0 - (1.0 - ratio) ** (1.0 / span_length)
  starts = jax.random.bernoulli(rng, start_prob, shape).astype(jnp.int32)
  counts = jnp.cumsum(starts, axis=1)
  before = jnp.pad(counts[:, :-span_length], ((0, 0), (span_length, 0), (0, 0)))
  return (counts - before) > 0


def sample_hidden(rng: jax.Array, layouts, batch_size: int, window: int, ratio,
                  imu_only_prob, kind_weights=(1.0, 0.0, 0.0),
                  span_length: int = 8) -> dict[str, jax.Array]:
  """Draw (B, W, C_raw) hidden masks for every target group (ratio 1 hides everything).

  Each window draws one kind from `MASK_KINDS` with probabilities proportional to
  `kind_weights`: 'element' hides each (timestep, sensor) unit with probability `ratio`;
  'sensor' hides each sensor for the whole window with probability `ratio`; 'span' hides
  runs of `span_length` timesteps per sensor covering about `ratio` of the window. On top,
  with probability `imu_only_prob` a window hides every unit of every target group, the
  IMU-only case. `ratio` and `imu_only_prob` may be traced scalars (schedules of the step).
  """
  # Element masks use the same keys as when they were the only kind, so runs with the
  # default weights draw the same masks as before the other kinds existed.
  rng_all, *rng_groups = jax.random.split(rng, len(layouts) + 1)
  imu_only = jax.random.bernoulli(rng_all, imu_only_prob, (batch_size, 1, 1))
  weights = np.asarray(kind_weights, np.float32)
  kind = jax.random.choice(jax.random.fold_in(rng, len(layouts) + 1), len(MASK_KINDS),
                           (batch_size, 1, 1), p=jnp.asarray(weights / weights.sum()))
  hidden = {}
  for layout, key in zip(layouts, rng_groups):
    shape = (batch_size, window, layout.num_sensors)
    key_sensor, key_span = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    element = jax.random.bernoulli(key, ratio, shape)
    sensor = jnp.broadcast_to(
        jax.random.bernoulli(key_sensor, ratio, (batch_size, 1, layout.num_sensors)), shape)
    span = _span_units(key_span, ratio, shape, span_length)
    units = jnp.where(kind == 0, element, jnp.where(kind == 1, sensor, span))
    units = units | imu_only
    hidden[layout.name] = units[..., np.asarray(layout.sensor_of_raw)]
  return hidden
