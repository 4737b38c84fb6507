"""Tests for the synthetic CMI-schema generator: schema, determinism, missingness and physics."""

import numpy as np
import polars as pl
import pytest

from imputer import cmi, features, synthetic

SMALL = dict(num_subjects=4, sequences_per_subject=10, min_length=30, max_length=60)


@pytest.fixture(scope='module')
def frame() -> pl.DataFrame:
  return synthetic.generate_cmi_frame(seed=11)


@pytest.fixture(scope='module')
def recordings():
  return synthetic.load_synthetic(seed=11)


def rows_per_sequence(frame: pl.DataFrame, expression: pl.Expr) -> pl.DataFrame:
  return frame.group_by('sequence_id', maintain_order=True).agg(expression.alias('value'))


def test_columns_match_cmi_train(frame):
  assert tuple(frame.columns) == cmi.CMI_TRAIN_COLUMNS
  assert frame.schema['sequence_counter'] == pl.Int64
  assert frame.schema['acc_x'] == pl.Float64
  assert frame.schema['rot_w'] == pl.Float64
  assert frame.schema['thm_1'] == pl.Float64
  assert frame.schema['tof_1_v0'] == pl.Int64
  for name in ('row_id', 'sequence_id', 'subject') + cmi.CMI_LABEL_COLUMNS:
    assert frame.schema[name] == pl.String, name


def test_identifiers_and_counters(frame):
  first = frame.row(0, named=True)
  assert first['sequence_id'] == 'SEQ_000001'
  assert first['subject'] == 'SUBJ_000001'
  assert first['row_id'] == 'SEQ_000001_000000'
  assert frame['row_id'].n_unique() == frame.height

  sizes = rows_per_sequence(frame, pl.len())['value'].to_numpy()
  assert len(sizes) == 8 * 24
  assert sizes.min() >= 40
  assert sizes.max() <= 120
  counters_ok = rows_per_sequence(
      frame, (pl.col('sequence_counter') == pl.int_range(pl.len())).all())
  assert counters_ok['value'].all()
  assert frame['subject'].n_unique() == 8


def test_labels_consistent(frame):
  gesture_types = {name: kind for name, kind, *_ in synthetic.GESTURES}
  pairs = frame.select('gesture', 'sequence_type').unique().rows()
  for gesture, sequence_type in pairs:
    assert gesture_types[gesture] == sequence_type
  assert set(frame['orientation']) <= {name for name, *_ in synthetic.ORIENTATIONS}
  assert set(frame['phase']) == {'Transition', 'Gesture'}
  assert frame.select('sequence_id', 'gesture').unique().height == frame['sequence_id'].n_unique()
  # Within each sequence every Transition row comes before every Gesture row.
  in_gesture = (pl.col('phase') == 'Gesture').cast(pl.Int8)
  smallest_step = rows_per_sequence(frame, in_gesture.diff().min())['value']
  assert (smallest_step.fill_null(0) >= 0).all()


def test_same_seed_same_frame():
  first = synthetic.generate_cmi_frame(**SMALL, seed=5)
  second = synthetic.generate_cmi_frame(**SMALL, seed=5)
  other = synthetic.generate_cmi_frame(**SMALL, seed=6)

  assert first.equals(second)
  assert not first.equals(other)


@pytest.mark.parametrize('fraction', [0.0, 0.25, 1.0])
def test_imu_only_fraction(fraction):
  frame = synthetic.generate_cmi_frame(**SMALL, imu_only_fraction=fraction, seed=2)
  target_columns = list(features.CMI_THM_COLUMNS + cmi.CMI_TOF_COLUMNS)
  all_empty = rows_per_sequence(
      frame, pl.all_horizontal(pl.col(target_columns).is_null()).all())['value']

  assert all_empty.sum() == round(fraction * 40)
  # The IMU is present in every sequence.
  assert frame['acc_x'].null_count() == 0


def test_missingness_kinds_present(frame):
  tof = frame.select(cmi.CMI_TOF_COLUMNS).to_numpy()
  thm_null = frame.select(features.CMI_THM_COLUMNS).to_numpy()
  thm_null = np.isnan(thm_null.astype(np.float64))
  tof_null = np.isnan(tof.astype(np.float64))
  imu_only_row = thm_null.all(axis=1) & tof_null.all(axis=1)

  assert (tof == -1).sum() > 1000
  # THM dropouts: one sensor empty while the others have values.
  thm_dropout = thm_null.any(axis=1) & ~thm_null.all(axis=1)
  assert thm_dropout.sum() > 20
  # Whole ToF sensors empty while another sensor has values.
  sensor_empty = tof_null.reshape(-1, 5, 64).all(axis=2)
  assert (sensor_empty.any(axis=1) & ~sensor_empty.all(axis=1)).sum() > 50
  # No single ToF pixel is null on its own: nulls cover whole sensors.
  assert (tof_null.reshape(-1, 5, 64).any(axis=2) == sensor_empty).all()
  rot_null = frame.select(['rot_w', 'rot_x', 'rot_y', 'rot_z']).to_numpy()
  rot_missing_rows = np.isnan(rot_null).all(axis=1)
  assert 0 < rot_missing_rows.sum() < 60
  assert (np.isnan(rot_null).any(axis=1) == rot_missing_rows).all()
  assert imu_only_row.sum() > 0


def test_value_ranges(recordings):
  thm = np.concatenate([s.raw['thm'] for s in recordings.sequences])
  tof = np.concatenate([s.raw['tof'] for s in recordings.sequences])
  quaternion = np.concatenate([s.raw['imu'][:, 3:] for s in recordings.sequences])

  assert np.nanmin(thm) > 20.0
  assert np.nanmax(thm) < 40.0
  assert np.nanmin(tof) >= 0.0
  assert np.nanmax(tof) <= synthetic.TOF_RANGE_LIMIT
  present = ~np.isnan(quaternion).any(axis=1)
  np.testing.assert_allclose(np.linalg.norm(quaternion[present], axis=1), 1.0)


def test_accelerometer_follows_quaternion_gravity(recordings):
  """The features module removes gravity with its own convention, leaving only hand motion."""
  linear, magnitude = [], []
  imu_features = features.feature_set('cmi_imu', features.CMI_IMU_COLUMNS)
  linear_index = imu_features.names.index('linear_acc_mag')
  magnitude_index = imu_features.names.index('acc_mag')
  for sequence in recordings.sequences:
    values, observed = features.engineer(
        imu_features, sequence.raw['imu'], sequence.observed['imu'], sequence.sequence_id)
    linear.append(values[observed[:, linear_index], linear_index])
    magnitude.append(values[observed[:, magnitude_index], magnitude_index])
  linear, magnitude = np.concatenate(linear), np.concatenate(magnitude)

  assert np.median(linear) < 0.5
  assert abs(np.median(magnitude) - features.GRAVITY) < 0.5


def lift_angle_and_targets(recordings):
  """Return per-row rotation angle from the sequence's first quaternion, THM mean and ToF mean."""
  angles, thm_means, tof_means = [], [], []
  for sequence in recordings.sequences:
    rows = sequence.observed['imu'][:, 3] & sequence.observed['thm'].all(axis=1)
    rows &= sequence.observed['tof'].any(axis=1)
    if not rows.any():
      continue
    quaternion = sequence.raw['imu'][:, 3:]
    start = quaternion[np.flatnonzero(sequence.observed['imu'][:, 3])[0]]
    cos_half = np.clip(np.abs(quaternion[rows] @ start), 0.0, 1.0)
    angles.append(2 * np.arccos(cos_half))
    thm_means.append(sequence.raw['thm'][rows].mean(axis=1))
    tof_means.append(np.nanmean(sequence.raw['tof'][rows], axis=1))
  return np.concatenate(angles), np.concatenate(thm_means), np.concatenate(tof_means)


def test_targets_predictable_from_quaternion(recordings):
  angle, thm_mean, tof_mean = lift_angle_and_targets(recordings)

  assert len(angle) > 3000
  assert np.corrcoef(angle, thm_mean)[0, 1] > 0.6
  assert np.corrcoef(angle, tof_mean)[0, 1] < -0.6


def test_subjects_differ_in_ambient_temperature(frame):
  first_rows = frame.filter(pl.col('sequence_counter') == 0)
  ambient = first_rows.group_by('subject').agg(pl.col('thm_1').median())['thm_1'].drop_nulls()

  assert ambient.max() - ambient.min() > 1.0


def test_load_synthetic_matches_frame():
  recordings = synthetic.load_synthetic(**SMALL, seed=4, tof_no_return='far', tof_far_value=300.0)
  expected = cmi.from_cmi_frame(
      synthetic.generate_cmi_frame(**SMALL, seed=4), 'expected', 'far', 300.0)

  assert 'synthetic' in recordings.source
  assert 'seed 4' in recordings.source
  assert len(recordings.sequences) == 40
  for got, want in zip(recordings.sequences, expected.sequences):
    assert got.sequence_id == want.sequence_id
    assert got.label == want.label
    np.testing.assert_array_equal(got.raw['tof'], want.raw['tof'])
  tof = np.concatenate([s.raw['tof'] for s in recordings.sequences])
  assert (tof == 300.0).any()


@pytest.mark.parametrize('arguments, message', [
    (dict(num_subjects=0), 'num_subjects must be at least 1'),
    (dict(sequences_per_subject=0), 'sequences_per_subject must be at least 1'),
    (dict(min_length=5), 'min_length must be at least 10'),
    (dict(min_length=50, max_length=40), r'max_length \(40\) is less than min_length \(50\)'),
    (dict(imu_only_fraction=1.5), 'imu_only_fraction must be between 0 and 1'),
])
def test_invalid_arguments_raise(arguments, message):
  with pytest.raises(ValueError, match=message):
    synthetic.generate_cmi_frame(**arguments)


def test_shortest_sequences_generate():
  frame = synthetic.generate_cmi_frame(
      num_subjects=2, sequences_per_subject=5, min_length=10, max_length=10, seed=1)
  recordings = cmi.from_cmi_frame(frame, 'short')

  assert all(sequence.length == 10 for sequence in recordings.sequences)
  assert set(frame['phase']) == {'Transition', 'Gesture'}
