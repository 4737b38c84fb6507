"""Random time warps and jitter of the input groups, drawn on device inside the jitted step.

Two augmented views of each training window form the positive pair of a contrastive loss. A
view resamples every input group of a window at the same warped source positions, then adds
independent Gaussian jitter to each observed value. Target groups are never augmented.

All arrays follow the batch layout of `windows.Windows`: `valid` is True on a prefix of each
window (its length L), and values are in scaled units and zero wherever unobserved or padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class QuaternionChannels:
  """Feature position and scaling of a group's scalar-first unit quaternion."""

  start: int            # Feature index of w. The quaternion is features start..start+3.
  center: np.ndarray    # (4,) scaler centre of those four features.
  scale: np.ndarray     # (4,) scaler scale of those four features.

  def __post_init__(self):
    for field in ('center', 'scale'):
      shape = np.shape(getattr(self, field))
      if shape != (4,):
        raise ValueError(
            f'QuaternionChannels.{field} has shape {shape}, but it needs the 4 scaler values '
            f'of the features {self.start}..{self.start + 3} (w, x, y, z).')


def quaternion_channels(layout, scaler) -> QuaternionChannels | None:
  """Return the quaternion channels of `layout` with their scaling, or None if it has none.

  `scaler` is the group's `scaling.GroupScaler`, fitted on the same feature set.
  """
  start = layout.feature_set.quaternion_start
  if start is None:
    return None
  center = np.asarray(scaler.center, np.float64)
  scale = np.asarray(scaler.scale, np.float64)
  if center.shape != (layout.num_features,) or scale.shape != (layout.num_features,):
    raise ValueError(
        f'group {layout.name!r}: the scaler has {center.shape} centres and {scale.shape} '
        f'scales for {layout.num_features} features of feature set '
        f'{layout.feature_set.name!r}. Fit the scaler on this feature set.')
  columns = slice(start, start + 4)
  return QuaternionChannels(start, center[columns], scale[columns])


def _interpolate_rows(u: jax.Array, knot_values: jax.Array) -> jax.Array:
  """Interpolate (B, K + 1) knot values at (B, W) times u in [0, 1], knots evenly spaced."""
  grid = jnp.linspace(0.0, 1.0, knot_values.shape[1])
  return jax.vmap(lambda times, row: jnp.interp(times, grid, row))(u, knot_values)


def warp_positions(key, lengths, window: int, strength: float, knots: int) -> jax.Array:
  """Draw (B, W) float32 source positions s_t of a smooth random time warp per window.

  On the valid prefix (t < L) the positions are strictly increasing with s_0 = 0 and
  s_{L-1} = L - 1 exactly. Past it s_t = t. The log-speed is `strength` times a piecewise
  linear curve through `knots` + 1 standard normal draws at evenly spaced normalised times
  u = t / (L - 1). The positions are the cumulative trapezoid sum of the speed, rescaled so
  that the last valid one is L - 1. With `strength` 0 the warp is exactly s_t = t.

  NOTE: the sum runs in float32. At large strengths (roughly above 2) a neighbour's
  increment can fall below float32 resolution, and two positions can then be equal.
  """
  if knots < 1:
    raise ValueError(f'invalid time warp knots={knots}: use at least 1 knot interval.')
  lengths = jnp.asarray(lengths, jnp.int32)
  last = (lengths - 1).astype(jnp.float32)[:, None]  # (B, 1), -1 for an empty window.
  time = jnp.arange(window, dtype=jnp.float32)[None, :]
  u = jnp.clip(time / jnp.maximum(last, 1.0), 0.0, 1.0)

  draws = jax.random.normal(key, (lengths.shape[0], knots + 1), jnp.float32)
  speed = jnp.exp(strength * _interpolate_rows(u, draws))
  increments = 0.5 * (speed[:, 1:] + speed[:, :-1])
  cumulative = jnp.concatenate(
      [jnp.zeros_like(speed[:, :1]), jnp.cumsum(increments, axis=1)], axis=1)

  last_index = jnp.clip(lengths - 1, 0, window - 1)[:, None]
  total = jnp.take_along_axis(cumulative, last_index, axis=1)
  # Multiplying by (L - 1) / total keeps strength 0 exact: total is then L - 1 and the
  # factor is exactly 1. A window of length 1 has total 0 and stays at s_0 = 0.
  rescale = jnp.where(total > 0, last / jnp.where(total > 0, total, 1.0), 0.0)
  positions = jnp.minimum(cumulative * rescale, last)
  positions = jnp.where(time == last, last, positions)
  return jnp.where(time < lengths[:, None], positions, time)


def _gather_rows(array: jax.Array, index: jax.Array) -> jax.Array:
  """Return array[b, index[b, t]] for a (B, W, ...) array and (B, W) indices."""
  return jax.vmap(lambda row, row_index: row[row_index])(array, index)


def _interpolate_quaternions(first, second, fraction, channels: QuaternionChannels):
  """Interpolate scaled quaternions on the short arc and return them scaled, at unit norm."""
  center = jnp.asarray(channels.center, jnp.float32)
  scale = jnp.asarray(channels.scale, jnp.float32)
  q0 = first * scale + center
  q1 = second * scale + center
  # q and -q are the same rotation. Flipping the second into the first one's hemisphere
  # keeps the blend away from zero.
  same_side = jnp.sum(q0 * q1, axis=-1, keepdims=True) >= 0
  q1 = jnp.where(same_side, q1, -q1)
  blend = (1.0 - fraction) * q0 + fraction * q1
  norm = jnp.linalg.norm(blend, axis=-1, keepdims=True)
  unit = blend / jnp.where(norm > 0, norm, 1.0)
  return (unit - center) / scale


def time_warp(values, observed, valid, positions, quaternion: QuaternionChannels | None):
  """Resample each window linearly at its source `positions` and return (values, observed).

  With i0 = floor(s), i1 = min(i0 + 1, L - 1) and f = s - i0, the value at t is
  (1 - f) v[i0] + f v[i1]. It is observed where i0 is observed, and i1 too when f > 0.
  Unobserved results are 0, and padding (t >= L) comes back unchanged. `valid` must be True
  on a prefix of each window, as `windows.make_windows` builds it.

  Engineered channels are resampled like any channel: derived rates and differences are
  resampled, not recomputed from the warped raw channels. With `quaternion`, its four
  channels are unscaled, interpolated on the short arc, normalised to unit length and scaled
  back. They are observed only where all four are, since a partial quaternion has no norm.
  """
  num_features = values.shape[-1]
  if quaternion is not None and not 0 <= quaternion.start <= num_features - 4:
    raise ValueError(
        f'quaternion start {quaternion.start} does not fit {num_features} features, because '
        f'it must leave 4 channels (w, x, y, z). Check the group passed to time_warp.')
  lengths = jnp.sum(valid, axis=-1).astype(jnp.int32)
  last_index = jnp.maximum(lengths - 1, 0)[:, None]
  first_index = jnp.clip(jnp.floor(positions).astype(jnp.int32), 0, last_index)
  second_index = jnp.minimum(first_index + 1, last_index)
  fraction = (positions - first_index.astype(positions.dtype))[..., None]

  first, second = _gather_rows(values, first_index), _gather_rows(values, second_index)
  first_observed = _gather_rows(observed, first_index)
  second_observed = _gather_rows(observed, second_index)
  warped_observed = first_observed & (second_observed | (fraction == 0))
  warped = (1.0 - fraction) * first + fraction * second

  if quaternion is not None:
    channels = slice(quaternion.start, quaternion.start + 4)
    rotation = _interpolate_quaternions(
        first[..., channels], second[..., channels], fraction, quaternion)
    warped = warped.at[..., channels].set(rotation)
    whole = jnp.all(warped_observed[..., channels], axis=-1, keepdims=True)
    warped_observed = warped_observed.at[..., channels].set(
        jnp.broadcast_to(whole, rotation.shape))

  warped = jnp.where(warped_observed, warped, 0.0).astype(values.dtype)
  inside = valid[..., None]
  return jnp.where(inside, warped, values), jnp.where(inside, warped_observed, observed)


def jitter(key, values, observed, valid, sigma: float) -> jax.Array:
  """Add sigma * N(0, 1) noise where `observed & valid`; other values are returned unchanged.

  Quaternion channels are jittered like any channel, so they leave unit norm by about sigma.
  """
  noise = sigma * jax.random.normal(key, values.shape, values.dtype)
  return values + jnp.where(observed & valid[..., None], noise, 0.0).astype(values.dtype)


def augment_inputs(key, batch, input_layouts, quaternions: dict, strength: float, knots: int,
                   sigma: float) -> dict:
  """Return one augmented view {'values': {g: ...}, 'observed': {g: ...}} of the input groups.

  Every input group of a window is resampled at the same warp positions, so the groups stay
  aligned in time. Each group then gets its own jitter. `quaternions` maps every input group
  name to its `QuaternionChannels` or None, as `quaternion_channels` returns them.
  """
  missing = [layout.name for layout in input_layouts if layout.name not in quaternions]
  if missing:
    raise ValueError(
        f'missing quaternion entry for input groups {missing}. Map each input group name '
        f'to quaternion_channels(layout, scaler), which is None for groups without one.')
  valid = batch['valid']
  warp_key, jitter_key = jax.random.split(key)
  lengths = jnp.sum(valid, axis=-1)
  positions = warp_positions(warp_key, lengths, valid.shape[1], strength, knots)
  jitter_keys = jax.random.split(jitter_key, len(input_layouts))

  values, observed = {}, {}
  for layout, group_key in zip(input_layouts, jitter_keys):
    name = layout.name
    warped, warped_observed = time_warp(
        batch['values'][name], batch['observed'][name], valid, positions, quaternions[name])
    values[name] = jitter(group_key, warped, warped_observed, valid, sigma)
    observed[name] = warped_observed
  return {'values': values, 'observed': observed}
