"""Engineered channels against hand computations, including sequence boundaries."""

import numpy as np
import pytest

from imputer import features
from imputer import layout as layout_lib
from imputer import recordings
from imputer import windows


def thm_set():
  return features.feature_set('cmi_thm', features.CMI_THM_COLUMNS)


def test_thm_values_match_hand_computation():
  raw = np.array([[30.0, 31.0, 33.0, 30.0, 29.0],
                  [32.0, 31.5, 33.0, 31.0, 28.0]])
  values, observed = features.engineer(thm_set(), raw, np.ones_like(raw, bool))
  assert observed[1].all()
  assert not observed[0, 5:10].any()  # No previous row for the rates.
  np.testing.assert_allclose(values[1, :5], raw[1])
  np.testing.assert_allclose(values[1, 5:10], [2.0, 0.5, 0.0, 1.0, -1.0])
  np.testing.assert_allclose(values[1, 10:14], [-0.5, 1.5, -2.0, -3.0])
  np.testing.assert_allclose(values[1, 14], np.mean(raw[1]))
  np.testing.assert_allclose(values[1, 15], 33.0 - 28.0)
  np.testing.assert_allclose(values[1, 16], np.std(raw[1]))


def test_thm_missing_value_propagates_to_dependents():
  raw = np.full((3, 5), 30.0)
  observed = np.ones((3, 5), bool)
  observed[1, 2] = False
  values, feature_observed = features.engineer(thm_set(), raw, observed)
  names = thm_set().names
  missing_row1 = {names[f] for f in np.flatnonzero(~feature_observed[1])}
  assert missing_row1 == {'thm_3', 'thm_3_rate', 'thm_3_minus_2', 'thm_4_minus_3',
                          'thm_mean', 'thm_range', 'thm_std'}
  missing_row2 = {names[f] for f in np.flatnonzero(~feature_observed[2])}
  assert missing_row2 == {'thm_3_rate'}  # Reads row 1 as its previous value.
  assert np.isnan(values[~feature_observed]).all()
  assert np.isfinite(values[feature_observed]).all()


def test_features_never_difference_across_sequences():
  spec = recordings.GroupSpec('thm', features.CMI_THM_COLUMNS,
                              features.CMI_THM_COLUMNS, tuple(range(5)), 'cmi_thm')
  layouts = layout_lib.build_layouts([spec])
  first = np.full((4, 5), 20.0)
  second = np.full((3, 5), 40.0)
  seqs = [recordings.Sequence(f's{i}', 'subject', {'thm': x}, {'thm': np.ones_like(x, bool)})
          for i, x in enumerate([first, second])]
  engineered = windows.engineer_sequences(seqs, layouts)
  rate = slice(5, 10)
  assert not engineered[1].observed['thm'][0, rate].any()
  np.testing.assert_allclose(engineered[1].values['thm'][1:, rate], 0.0)
  np.testing.assert_allclose(engineered[0].values['thm'][1:, rate], 0.0)


def quaternion_about_z(angle):
  return np.array([np.cos(angle / 2), 0.0, 0.0, np.sin(angle / 2)])


def test_imu_features_for_rotation_about_gravity():
  fs = features.feature_set('cmi_imu', features.CMI_IMU_COLUMNS)
  step = 0.1
  rows = [np.concatenate([[0.0, 0.0, features.GRAVITY], quaternion_about_z(step * t)])
          for t in range(4)]
  raw = np.array(rows)
  values, observed = features.engineer(fs, raw, np.ones_like(raw, bool))
  named = dict(zip(fs.names, values.T))
  np.testing.assert_allclose(named['acc_mag'], features.GRAVITY)
  # The device only spins about the world z axis, so gravity is fully removed.
  for axis in 'xyz':
    np.testing.assert_allclose(named[f'linear_acc_{axis}'], 0.0, atol=1e-9)
  np.testing.assert_allclose(named['rot_angle'], step * np.arange(4), atol=1e-7)
  np.testing.assert_allclose(named['angular_vel_z'][1:], step, atol=1e-7)
  np.testing.assert_allclose(named['angular_vel_x'][1:], 0.0, atol=1e-9)
  np.testing.assert_allclose(named['angular_distance'][1:], step, atol=1e-7)
  np.testing.assert_allclose(named['rot_angle_rate'][1:], step, atol=1e-7)
  assert not observed[0, fs.names.index('angular_distance')]


def test_imu_linear_acceleration_of_tilted_device():
  fs = features.feature_set('cmi_imu', features.CMI_IMU_COLUMNS)
  # Rotated 90 degrees about x, so the world z axis lies along the sensor's +y axis.
  angle = np.pi / 2
  q = np.array([np.cos(angle / 2), np.sin(angle / 2), 0.0, 0.0])
  gravity_in_sensor = np.array([0.0, features.GRAVITY, 0.0])  # Third row of R(q).
  raw = np.concatenate([gravity_in_sensor + [1.0, 0.0, 0.0], q])[None]
  values, _ = features.engineer(fs, raw, np.ones_like(raw, bool))
  named = dict(zip(fs.names, values[0]))
  np.testing.assert_allclose([named['linear_acc_x'], named['linear_acc_y'],
                              named['linear_acc_z']], [1.0, 0.0, 0.0], atol=1e-9)
  np.testing.assert_allclose(named['linear_acc_mag'], 1.0)


def test_unobserved_quaternion_hides_rotation_features():
  fs = features.feature_set('cmi_imu', features.CMI_IMU_COLUMNS)
  raw = np.tile([0.0, 0.0, 9.81, 1.0, 0.0, 0.0, 0.0], (3, 1))
  observed = np.ones_like(raw, bool)
  observed[1, 3:] = False
  values, feature_observed = features.engineer(fs, raw, observed)
  named_obs = dict(zip(fs.names, feature_observed.T))
  assert named_obs['acc_mag'][1]
  assert not named_obs['linear_acc_x'][1]
  assert not named_obs['angular_distance'][1]
  assert not named_obs['angular_distance'][2]
  assert np.isfinite(values[feature_observed]).all()


def test_infinite_raw_value_is_rejected():
  raw = np.full((2, 5), 30.0)
  raw[1, 0] = np.inf
  with pytest.raises(ValueError, match='thm_1'):
    features.engineer(thm_set(), raw, np.ones_like(raw, bool), 'sequence s1')


def test_unknown_feature_set_is_rejected():
  with pytest.raises(ValueError, match='unknown feature set'):
    features.feature_set('fourier', ('a',))


def test_accel_features_match_hand_computation():
  fs = features.feature_set('accel', ('x', 'y', 'z'))
  raw = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
  values, observed = features.engineer(fs, raw, np.ones_like(raw, bool))
  assert fs.names == ('x', 'y', 'z', 'magnitude', 'magnitude_change', 'x_change', 'y_change',
                      'z_change')
  np.testing.assert_allclose(values[:, 3], [5.0, 2.0])
  np.testing.assert_allclose(values[1, 4:], [-3.0, -3.0, -4.0, 2.0])
  assert not observed[0, 4:].any()
  assert observed[0, :4].all()
