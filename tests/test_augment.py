"""Time warps and jitter of the input groups against numpy references and hand computations."""

import jax
import numpy as np
import pytest

from imputer import augment
from imputer import features
from imputer import layout as layout_lib
from imputer import recordings
from imputer import scaling

from tests import helpers

WINDOW = 24
LENGTHS = np.array([24, 17, 5, 2, 1, 0])
# Every length from 0 to WINDOW, repeated, for statistics over a larger batch.
MANY_LENGTHS = np.arange(200) % (WINDOW + 1)
FEATURES = 6  # Feature count of the random batches. QUATERNION is at features 1..4.
QUATERNION = augment.QuaternionChannels(
    1, np.array([0.1, -0.2, 0.05, 0.3]), np.array([0.5, 0.8, 1.2, 0.6]))

# The functions run jitted, as in the train step. Jitting whole functions also compiles far
# faster than running their many small operations eagerly.
jitted_positions = jax.jit(augment.warp_positions, static_argnames=('window', 'knots'))
jitted_jitter = jax.jit(augment.jitter)
plain_time_warp = jax.jit(lambda *arrays: augment.time_warp(*arrays, None))
quaternion_time_warp = jax.jit(lambda *arrays: augment.time_warp(*arrays, QUATERNION))


def valid_mask(lengths=LENGTHS, window=WINDOW):
  return np.arange(window)[None, :] < np.asarray(lengths)[:, None]


def random_batch(seed, lengths=LENGTHS, features_count=FEATURES, window=WINDOW):
  """Return (values, observed, valid) with about 80% observed and zeros outside."""
  rng = np.random.default_rng(seed)
  valid = valid_mask(lengths, window)
  shape = (len(lengths), window, features_count)
  observed = (rng.random(shape) < 0.8) & valid[..., None]
  values = np.where(observed, rng.normal(size=shape), 0.0).astype(np.float32)
  return values, observed, valid


def positions_for(seed, strength, lengths=LENGTHS, window=WINDOW, knots=4):
  return np.asarray(jitted_positions(
      jax.random.PRNGKey(seed), np.asarray(lengths), window=window, strength=strength,
      knots=knots))


def random_unit_quaternions(rng, shape):
  q = rng.normal(size=shape + (4,))
  return q / np.linalg.norm(q, axis=-1, keepdims=True)


def imu_layout():
  spec = recordings.GroupSpec('imu', features.CMI_IMU_COLUMNS, ('acc', 'rot'),
                              (0, 0, 0, 1, 1, 1, 1), 'cmi_imu')
  return layout_lib.build_layouts([spec])[0]


def scaler_for(num_features):
  center = np.linspace(-0.5, 0.5, num_features)
  scale = np.linspace(0.5, 2.0, num_features)
  return scaling.GroupScaler(center, scale, np.ones(num_features))


def scale_quaternions(q, channels=QUATERNION):
  return (q - channels.center) / channels.scale


def unscale_quaternions(scaled, channels=QUATERNION):
  return scaled * channels.scale + channels.center


def warp_windows(values, observed, valid, positions, with_quaternion=False):
  """Run the jitted time warp, with the channels of QUATERNION or without any."""
  run = quaternion_time_warp if with_quaternion else plain_time_warp
  warped, warped_observed = run(values, observed, valid, positions)
  return np.asarray(warped), np.asarray(warped_observed)


# Warp positions.


def test_positions_shape_and_dtype():
  positions = positions_for(0, 0.5)
  assert positions.shape == (len(LENGTHS), WINDOW)
  assert positions.dtype == np.float32


def test_positions_increase_on_valid_prefix():
  for seed in range(5):
    positions = positions_for(seed, 0.8)
    for row, length in enumerate(LENGTHS):
      prefix = positions[row, :length]
      if length >= 2:
        assert (np.diff(prefix) > 0).all(), (seed, row)
      if length >= 1:
        assert prefix[0] == 0.0, (seed, row)
        assert prefix[-1] == length - 1, (seed, row)


def test_positions_are_identity_past_length():
  positions = positions_for(1, 0.8)
  for row, length in enumerate(LENGTHS):
    np.testing.assert_array_equal(positions[row, length:], np.arange(length, WINDOW))


def test_positions_with_strength_warp_time():
  positions = positions_for(2, 0.5)
  assert np.abs(positions[0] - np.arange(WINDOW)).max() > 0.1


def test_zero_strength_positions_are_exact_identity():
  positions = positions_for(3, 0.0)
  np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(WINDOW), positions.shape))


def test_positions_match_numpy_construction():
  key, strength, knots = jax.random.PRNGKey(4), 0.6, 4
  positions = np.asarray(
      jitted_positions(key, LENGTHS, window=WINDOW, strength=strength, knots=knots))
  draws = np.asarray(jax.random.normal(key, (len(LENGTHS), knots + 1)), np.float64)
  for row, length in enumerate(LENGTHS):
    if length < 2:
      continue
    u = np.arange(length) / (length - 1)
    speed = np.exp(strength * np.interp(u, np.linspace(0, 1, knots + 1), draws[row]))
    cumulative = np.concatenate([[0.0], np.cumsum((speed[1:] + speed[:-1]) / 2)])
    expected = cumulative * (length - 1) / cumulative[-1]
    np.testing.assert_allclose(positions[row, :length], expected, rtol=1e-5, atol=1e-5)


def test_positions_reject_zero_knots():
  with pytest.raises(ValueError, match='knots=0'):
    augment.warp_positions(jax.random.PRNGKey(0), LENGTHS, WINDOW, 0.5, 0)


# Time warp.


def test_time_warp_keeps_shape_and_padding():
  values, observed, valid = random_batch(5)
  warped, warped_observed = warp_windows(values, observed, valid, positions_for(5, 0.7))
  assert warped.shape == values.shape
  assert warped_observed.shape == observed.shape
  assert (warped[~valid] == 0).all()
  assert not warped_observed[~valid].any()
  assert (warped[~warped_observed] == 0).all()
  empty = LENGTHS == 0
  np.testing.assert_array_equal(warped[empty], values[empty])
  np.testing.assert_array_equal(warped_observed[empty], observed[empty])


def test_zero_strength_warp_is_identity():
  values, observed, valid = random_batch(6)
  warped, warped_observed = warp_windows(values, observed, valid, positions_for(6, 0.0))
  np.testing.assert_allclose(warped, values, atol=1e-6)
  np.testing.assert_array_equal(warped_observed, observed)


def test_zero_strength_warp_keeps_quaternions():
  rng = np.random.default_rng(7)
  values, observed, valid = random_batch(7)
  observed = np.broadcast_to(valid[..., None], observed.shape).copy()
  values[..., 1:5] = scale_quaternions(random_unit_quaternions(rng, valid.shape))
  values = np.where(observed, values, 0.0).astype(np.float32)
  warped, warped_observed = warp_windows(
      values, observed, valid, positions_for(7, 0.0), with_quaternion=True)
  np.testing.assert_allclose(warped, values, atol=1e-6)
  np.testing.assert_array_equal(warped_observed, observed)


def test_time_warp_matches_numpy_interp():
  values, _, valid = random_batch(8)
  observed = np.broadcast_to(valid[..., None], values.shape).copy()
  values = np.where(observed, values, 0.0).astype(np.float32)
  positions = positions_for(8, 0.7)
  warped, warped_observed = warp_windows(values, observed, valid, positions)
  np.testing.assert_array_equal(warped_observed, observed)
  for row, length in enumerate(LENGTHS):
    if length == 0:
      continue
    for channel in range(values.shape[-1]):
      expected = np.interp(positions[row, :length], np.arange(length),
                           values[row, :length, channel])
      np.testing.assert_allclose(warped[row, :length, channel], expected, atol=1e-5)


def test_unobserved_step_hand_positions():
  values = np.arange(6, dtype=np.float32).reshape(1, 6, 1)
  observed = np.ones((1, 6, 1), bool)
  observed[0, 2] = False
  values[0, 2] = 0.0
  valid = np.ones((1, 6), bool)
  positions = np.array([[0.0, 1.0, 1.5, 2.0, 3.5, 5.0]], np.float32)
  warped, warped_observed = warp_windows(values, observed, valid, positions)
  # 1.0 reads step 1 only, 1.5 reads 1 and 2, 2.0 reads 2, 3.5 reads 3 and 4.
  np.testing.assert_array_equal(warped_observed[0, :, 0], [True, True, False, False, True, True])
  np.testing.assert_allclose(warped[0, :, 0], [0.0, 1.0, 0.0, 0.0, 3.5, 5.0])


def test_unobserved_step_warped_positions():
  values, _, valid = random_batch(9)
  observed = np.broadcast_to(valid[..., None], values.shape).copy()
  observed[:, 3, 0] = False
  values = np.where(observed, values, 0.0).astype(np.float32)
  positions = positions_for(9, 0.7)
  _, warped_observed = warp_windows(values, observed, valid, positions)
  for row, length in enumerate(LENGTHS):
    if length <= 3:
      continue
    first = np.floor(positions[row, :length]).astype(int)
    second = np.minimum(first + 1, length - 1)
    fraction = positions[row, :length] - first
    reads_step = (first == 3) | ((second == 3) & (fraction > 0))
    assert reads_step.any(), row
    np.testing.assert_array_equal(warped_observed[row, :length, 0], ~reads_step)
    assert warped_observed[row, :length, 1:].all()


def test_warped_quaternions_have_unit_norm():
  rng = np.random.default_rng(10)
  values, observed, valid = random_batch(10)
  q = random_unit_quaternions(rng, valid.shape)
  flips = rng.random(valid.shape) < 0.4
  q = np.where(flips[..., None], -q, q)
  values[..., 1:5] = scale_quaternions(q)
  observed[..., 1:5] = (rng.random(valid.shape) < 0.9)[..., None] & valid[..., None]
  values = np.where(observed, values, 0.0).astype(np.float32)
  warped, warped_observed = warp_windows(
      values, observed, valid, positions_for(10, 0.7), with_quaternion=True)
  rotation_observed = warped_observed[..., 1]
  assert rotation_observed.sum() > 20
  norms = np.linalg.norm(unscale_quaternions(warped[..., 1:5]), axis=-1)
  np.testing.assert_allclose(norms[rotation_observed], 1.0, atol=1e-5)


def test_sign_flipped_neighbour_keeps_rotation():
  q = np.array([0.6, 0.0, 0.8, 0.0])
  r = np.array([0.0, 0.6, 0.8, 0.0])
  # Rows: [q, -q] at t = 0, 1 and [q, -r], where r is on q's side (q . r = 0.64).
  pairs = np.stack([np.stack([q, -q]), np.stack([q, -r])])
  values = np.zeros((2, 2, 6), np.float32)
  values[..., 1:5] = scale_quaternions(pairs)
  observed = np.ones((2, 2, 6), bool)
  valid = np.ones((2, 2), bool)
  positions = np.array([[0.0, 0.5], [0.0, 0.5]], np.float32)
  warped, _ = warp_windows(values, observed, valid, positions, with_quaternion=True)
  middle = unscale_quaternions(warped[:, 1, 1:5])
  np.testing.assert_allclose(np.abs(middle[0] @ q), 1.0, atol=1e-5)
  half_way = (q + r) / np.linalg.norm(q + r)
  np.testing.assert_allclose(middle[1], half_way, atol=1e-5)


def test_partial_quaternion_is_unobserved():
  rng = np.random.default_rng(11)
  values = np.zeros((2, 2, 6), np.float32)
  values[..., 1:5] = scale_quaternions(random_unit_quaternions(rng, (2, 2)))
  observed = np.ones((2, 2, 6), bool)
  observed[0, 1, 3] = False  # The y channel of step 1 in row 0.
  values[0, 1, 3] = 0.0
  valid = np.ones((2, 2), bool)
  positions = np.array([[0.0, 1.0], [0.0, 0.5]], np.float32)
  warped, warped_observed = warp_windows(values, observed, valid, positions, True)
  assert not warped_observed[0, 1, 1:5].any()
  assert (warped[0, 1, 1:5] == 0).all()
  assert warped_observed[0, 1, [0, 5]].all()
  assert warped_observed[0, 0].all()
  assert warped_observed[1].all()


def test_time_warp_rejects_quaternion_past_features():
  values, observed, valid = random_batch(11)
  channels = augment.QuaternionChannels(FEATURES - 3, np.zeros(4), np.ones(4))
  with pytest.raises(ValueError, match=f'quaternion start {FEATURES - 3}'):
    augment.time_warp(values, observed, valid, positions_for(11, 0.5), channels)


# Jitter.


def test_jitter_noise_has_sigma_spread():
  values, observed, valid = random_batch(12, MANY_LENGTHS)
  sigma = 0.3
  jittered = np.asarray(jitted_jitter(jax.random.PRNGKey(12), values, observed, valid, sigma))
  inside = observed & valid[..., None]
  noise = (jittered - values)[inside]
  assert noise.size > 10000
  assert abs(noise.std() / sigma - 1.0) < 0.03
  assert abs(noise.mean()) < 0.01
  np.testing.assert_array_equal(jittered[~inside], values[~inside])


def test_zero_sigma_jitter_is_exact_identity():
  values, observed, valid = random_batch(13, MANY_LENGTHS)
  jittered = jitted_jitter(jax.random.PRNGKey(13), values, observed, valid, 0.0)
  np.testing.assert_array_equal(np.asarray(jittered), values)


# Both augmentations over a batch.


def ramp_batch(lengths=LENGTHS):
  """Return a batch whose two input groups and one target group all hold the timestep."""
  valid = valid_mask(lengths)
  ramp = np.where(valid, np.arange(WINDOW), 0.0).astype(np.float32)[..., None]
  shapes = {'first': 1, 'second': 2, 'target': 1}
  return {
      'valid': valid,
      'values': {name: np.repeat(ramp, count, axis=-1) for name, count in shapes.items()},
      'observed': {name: np.repeat(valid[..., None], count, axis=-1)
                   for name, count in shapes.items()},
  }


def ramp_layouts():
  specs = [recordings.single_sensor_group('first', ('a',)),
           recordings.single_sensor_group('second', ('b', 'c'))]
  return layout_lib.build_layouts(specs)


ramp_view = jax.jit(lambda key, batch, sigma: augment.augment_inputs(
    key, batch, ramp_layouts(), {'first': None, 'second': None}, 0.7, 4, sigma))


def test_augment_shares_warp_across_groups():
  view = ramp_view(jax.random.PRNGKey(14), ramp_batch(MANY_LENGTHS), 0.0)
  assert set(view['values']) == {'first', 'second'}
  assert set(view['observed']) == {'first', 'second'}
  first = np.asarray(view['values']['first'])[..., 0]
  second = np.asarray(view['values']['second'])
  np.testing.assert_allclose(second[..., 0], first, atol=1e-6)
  np.testing.assert_allclose(second[..., 1], first, atol=1e-6)
  # A ramp resampled at s_t reads s_t, so every group shows one warp of the window.
  full = MANY_LENGTHS == WINDOW
  assert np.abs(first[full] - np.arange(WINDOW)).max() > 0.1
  for row, length in enumerate(MANY_LENGTHS):
    if length >= 2:
      assert (np.diff(first[row, :length]) > 0).all(), row
    np.testing.assert_allclose(first[row, length - 1:length], length - 1, atol=1e-5)
    assert (first[row, length:] == 0).all(), row


def test_augment_jitters_groups_independently():
  batch = ramp_batch(MANY_LENGTHS)
  key = jax.random.PRNGKey(15)
  warped = ramp_view(key, batch, 0.0)
  noisy = ramp_view(key, batch, 0.2)
  first = np.asarray(noisy['values']['first']) - np.asarray(warped['values']['first'])
  second = np.asarray(noisy['values']['second']) - np.asarray(warped['values']['second'])
  valid = batch['valid']
  correlation = np.corrcoef(first[valid, 0], second[valid, 0])[0, 1]
  assert abs(correlation) < 0.1
  assert abs(first[valid, 0].std() / 0.2 - 1.0) < 0.1
  assert (first[~valid] == 0).all()


def test_augment_rejects_missing_quaternion_entry():
  with pytest.raises(ValueError, match="'second'"):
    augment.augment_inputs(jax.random.PRNGKey(0), ramp_batch(), ramp_layouts(),
                           {'first': None}, 0.5, 4, 0.1)


# Quaternion channels of a layout.


def test_quaternion_channels_none_without_rotation():
  specs = [helpers.accel_spec(), recordings.single_sensor_group('raw', ('a', 'b', 'c', 'd'))]
  for layout in layout_lib.build_layouts(specs):
    assert augment.quaternion_channels(layout, scaler_for(layout.num_features)) is None


def test_quaternion_channels_of_cmi_imu():
  layout = imu_layout()
  scaler = scaler_for(layout.num_features)
  channels = augment.quaternion_channels(layout, scaler)
  assert channels.start == 3
  assert layout.feature_set.names[3:7] == ('rot_w', 'rot_x', 'rot_y', 'rot_z')
  np.testing.assert_array_equal(channels.center, scaler.center[3:7])
  np.testing.assert_array_equal(channels.scale, scaler.scale[3:7])


def test_quaternion_channels_reject_wrong_scaler():
  with pytest.raises(ValueError, match="group 'imu'"):
    augment.quaternion_channels(imu_layout(), scaler_for(7))


def test_imu_warp_keeps_unit_rotations():
  layout = imu_layout()
  scaler = scaler_for(layout.num_features)
  channels = augment.quaternion_channels(layout, scaler)
  rng = np.random.default_rng(17)
  valid = valid_mask()
  raw = np.concatenate([rng.normal(size=valid.shape + (3,)),
                        random_unit_quaternions(rng, valid.shape)], axis=-1)
  engineered = np.concatenate([raw, rng.normal(size=valid.shape + (13,))], axis=-1)
  observed = np.broadcast_to(valid[..., None], engineered.shape).copy()
  values = np.where(observed, scaler.transform(engineered), 0.0).astype(np.float32)
  batch = {'valid': valid, 'values': {'imu': values}, 'observed': {'imu': observed}}
  view_of = jax.jit(lambda key, batch: augment.augment_inputs(
      key, batch, [layout], {'imu': channels}, 0.7, 4, 0.0))
  view = view_of(jax.random.PRNGKey(17), batch)
  warped = scaler.inverse(np.asarray(view['values']['imu'], np.float64))
  norms = np.linalg.norm(warped[..., 3:7], axis=-1)
  np.testing.assert_allclose(norms[valid], 1.0, atol=1e-5)
