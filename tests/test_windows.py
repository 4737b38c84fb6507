"""Windows keep observed, missing and padding apart, and scaling uses training data only."""

import numpy as np
import pytest

from imputer import folds
from imputer import layout as layout_lib
from imputer import scaling
from imputer import windows

from tests import helpers


def test_window_starts_cover_every_timestep():
  assert windows.window_starts(10, 4, 4) == [0, 4, 8]
  assert windows.window_starts(8, 4, 4) == [0, 4]
  assert windows.window_starts(3, 4, 2) == [0]
  assert windows.window_starts(9, 4, 2) == [0, 2, 4, 6]


def test_stride_longer_than_window_is_rejected():
  with pytest.raises(ValueError, match='data.train_stride'):
    windows.window_starts(30, 16, 32)


def test_observed_missing_and_padding_stay_distinct():
  seq = helpers.make_sequence('s', 'a', 6, 0)
  seq.observed['thm'][2, 1] = False
  seq.raw['thm'][2, 1] = np.nan
  layouts = layout_lib.build_layouts([helpers.accel_spec(), helpers.thm_spec()])
  engineered = windows.engineer_sequences([seq], layouts)
  scalers = windows.fit_scalers(engineered, layouts)
  made = windows.make_windows(engineered, layouts, scalers, window=4, stride=4)
  batch = made.batch
  np.testing.assert_array_equal(made.index, [[0, 0, 4], [0, 4, 2]])
  np.testing.assert_array_equal(batch['valid'], [[1, 1, 1, 1], [1, 1, 0, 0]])
  observed = batch['observed']['thm']
  assert not observed[0, 2, 1]           # Missing in the recording, inside the sequence.
  assert batch['valid'][0, 2]            # ...but not padding.
  assert not observed[1, 2:].any()       # Padding is never observed.
  assert observed[1, :2, :5].all()
  for group in ('acc', 'thm'):
    assert np.isfinite(batch['values'][group]).all()
    assert (batch['values'][group][~batch['observed'][group]] == 0).all()
  expected = (seq.raw['thm'][5, 0] - scalers['thm'].center[0]) / scalers['thm'].scale[0]
  np.testing.assert_allclose(batch['values']['thm'][1, 1, 0], expected, rtol=1e-6)


def test_scaler_is_fitted_on_training_subjects_only():
  recording_set = helpers.make_recording_set(subjects=6)
  for seq in recording_set.sequences:
    if seq.subject in ('subject_0', 'subject_1'):
      seq.raw['thm'] += 1000.0  # Far outside the others: would move any shared statistic.
  split = folds.split_subjects(recording_set, 3, 0, seed=0)
  layouts = layout_lib.build_layouts(recording_set.groups)
  train = windows.engineer_sequences(recording_set.select_subjects(split.train), layouts)
  scalers = windows.fit_scalers(train, layouts)
  values = np.concatenate([s.raw['thm'][:, 0] for s in recording_set.select_subjects(split.train)])
  q25, q50, q75 = np.percentile(values, [25, 50, 75])
  np.testing.assert_allclose(scalers['thm'].center[0], q50)
  np.testing.assert_allclose(scalers['thm'].scale[0], q75 - q25)


def test_scaler_ignores_unobserved_values_and_handles_constants():
  values = [np.array([[1.0, 5.0], [3.0, 5.0], [100.0, 5.0], [np.nan, 5.0]])]
  observed = [np.array([[1, 1], [1, 1], [0, 1], [0, 1]], bool)]
  scaler = scaling.fit_group(values, observed)
  np.testing.assert_allclose(scaler.center, [2.0, 5.0])
  np.testing.assert_allclose(scaler.scale, [1.0, 1.0])  # IQR of [1, 3] is 1; constant -> 1.
  np.testing.assert_array_equal(scaler.count, [2, 4])
  restored = scaling.GroupScaler.from_json(scaler.to_json())
  np.testing.assert_allclose(restored.inverse(scaler.transform(np.array([7.0, 2.0]))), [7.0, 2.0])


def test_scaler_with_no_observed_value():
  scaler = scaling.fit_group([np.full((3, 1), np.nan)], [np.zeros((3, 1), bool)])
  np.testing.assert_array_equal(scaler.center, [0.0])
  np.testing.assert_array_equal(scaler.scale, [1.0])
  np.testing.assert_array_equal(scaler.count, [0])


def test_scaler_quartiles_equal_nanpercentile_bit_for_bit():
  # Saved scalers are compared exactly when a run resumes, so the fit must not change them.
  rng = np.random.default_rng(3)
  values = [rng.standard_t(3, size=(n, 6)) * 40.0 for n in (1, 7, 30, 64)]
  observed = [rng.random(v.shape) < 0.7 for v in values]
  observed[2][:, 4] = False
  for v, m in zip(values, observed):
    v[~m] = np.nan
  for m in observed:
    m[:, 5] = False  # A feature never observed.
  scaler = scaling.fit_group(values, observed)
  stacked, mask = np.concatenate(values), np.concatenate(observed)
  q25, q50, q75 = np.nanpercentile(np.where(mask, stacked, np.nan)[:, :5], [25, 50, 75], axis=0)
  np.testing.assert_array_equal(scaler.center[:5], q50)
  np.testing.assert_array_equal(scaler.scale[:5], q75 - q25)
  np.testing.assert_array_equal(scaler.count, mask.sum(0))
  assert (scaler.center[5], scaler.scale[5], scaler.count[5]) == (0.0, 1.0, 0.0)
