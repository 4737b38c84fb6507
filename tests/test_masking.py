"""Mask sampling and the mapping of hidden sensors to raw columns and features."""

import jax
import numpy as np
import pytest

from imputer import features
from imputer import layout as layout_lib
from imputer import masking
from imputer import recordings

from tests import helpers


def tof_layout():
  columns = tuple(f'tof_{s}_v{p}' for s in range(1, 6) for p in range(64))
  spec = recordings.GroupSpec('tof', columns, tuple(f'tof_{s}' for s in range(1, 6)),
                              tuple(i // 64 for i in range(320)), 'raw')
  return layout_lib.build_layouts([spec])[0]


def test_hidden_sensor_hides_its_pixels_together():
  layout = tof_layout()
  hidden = masking.sample_hidden(jax.random.PRNGKey(0), [layout], 8, 16, 0.5, 0.0)['tof']
  hidden = np.asarray(hidden).reshape(8, 16, 5, 64)
  assert (hidden.all(-1) == hidden.any(-1)).all()
  assert 0.4 < hidden[..., 0].mean() < 0.6


def test_imu_only_windows_hide_every_group():
  layouts = [tof_layout(), layout_lib.build_layouts([helpers.thm_spec()])[0]]
  hidden = masking.sample_hidden(jax.random.PRNGKey(1), layouts, 400, 8, 0.0, 0.3)
  tof = np.asarray(hidden['tof']).reshape(400, -1)
  thm = np.asarray(hidden['thm']).reshape(400, -1)
  # With ratio 0 only the IMU-only draw hides anything, and it hides whole windows.
  assert (tof.all(1) == tof.any(1)).all()
  np.testing.assert_array_equal(tof.all(1), thm.all(1))
  assert 0.22 < tof.all(1).mean() < 0.38


def test_hidden_raw_expands_to_dependent_features():
  layout = layout_lib.build_layouts([helpers.thm_spec()])[0]
  hidden = np.zeros((1, 3, 5), bool)
  hidden[0, 1, 0] = True
  expanded = np.asarray(masking.expand_to_features(layout, hidden))[0]
  names = features.feature_set('cmi_thm', features.CMI_THM_COLUMNS).names
  at_1 = {names[f] for f in np.flatnonzero(expanded[1])}
  at_2 = {names[f] for f in np.flatnonzero(expanded[2])}
  assert at_1 == {'thm_1', 'thm_1_rate', 'thm_2_minus_1', 'thm_mean', 'thm_range', 'thm_std'}
  assert at_2 == {'thm_1_rate'}
  assert not expanded[0].any()


def dependency_reference(fs, hidden):
  """The hidden features by the definition: any input read at t or t-1 is hidden."""
  prev = np.zeros_like(hidden)
  prev[:, 1:] = hidden[:, :-1]
  return (np.einsum('bwc,fc->bwf', hidden.astype(int), fs.depends_now.astype(int))
          + np.einsum('bwc,fc->bwf', prev.astype(int), fs.depends_prev.astype(int))) > 0


@pytest.mark.parametrize('name, columns', [
    ('raw', tuple(f'c{i}' for i in range(11))), ('cmi_imu', features.CMI_IMU_COLUMNS),
    ('cmi_thm', features.CMI_THM_COLUMNS), ('accel', ('x', 'y', 'z'))])
def test_copied_features_match_the_dependency_product(name, columns):
  fs = features.feature_set(name, columns)
  spec = recordings.GroupSpec('g', columns, columns, tuple(range(len(columns))), name)
  layout = layout_lib.build_layouts([spec])[0]
  hidden = np.random.default_rng(0).random((3, 9, len(columns))) < 0.3
  expanded = np.asarray(masking.expand_to_features(layout, hidden))
  assert expanded.shape == (3, 9, fs.num_features)
  np.testing.assert_array_equal(expanded, dependency_reference(fs, hidden))
  # The host-side mask of observed features follows the same dependencies.
  observed = ~hidden[0]
  missing_prev = np.ones_like(hidden[0])
  missing_prev[1:] = hidden[0, :-1]
  expected = ~((hidden[0].astype(int) @ fs.depends_now.T.astype(int)
                + missing_prev.astype(int) @ fs.depends_prev.T.astype(int)) > 0)
  np.testing.assert_array_equal(features.engineered_observed(fs, observed), expected)


def test_ratio_one_hides_every_raw_value():
  hidden = masking.sample_hidden(jax.random.PRNGKey(2), [tof_layout()], 2, 4, 1.0, 0.0)
  assert hidden['tof'].shape == (2, 4, 320)
  assert np.asarray(hidden['tof']).all()


def test_scheduled_ratio_ramps_then_holds():
  values = [float(masking.scheduled_ratio(step, 0.3, 0.75, 100)) for step in (0, 50, 100, 250)]
  np.testing.assert_allclose(values, [0.3, 0.525, 0.75, 0.75], rtol=1e-6)


def test_scheduled_ratio_without_ramp_is_constant():
  values = [float(masking.scheduled_ratio(step, 0.3, 0.6, 0)) for step in (0, 10)]
  np.testing.assert_allclose(values, [0.6, 0.6], rtol=1e-6)


def test_applied_ratio_counts_observed_values_only():
  hidden = {'a': np.array([[True, True], [False, True]])}
  observed = {'a': np.array([[True, False], [True, True]])}
  # Observed: 3 values; hidden among them: (0, 0) and (1, 1).
  np.testing.assert_allclose(float(masking.applied_ratio(hidden, observed)), 2 / 3, rtol=1e-6)


@pytest.mark.parametrize('kind', range(3))
@pytest.mark.parametrize('ratio', [0.3, 0.75])
def test_each_mask_kind_hides_about_ratio(kind, ratio):
  weights = [0.0, 0.0, 0.0]
  weights[kind] = 1.0
  layout = layout_lib.build_layouts([helpers.thm_spec()])[0]
  hidden = masking.sample_hidden(jax.random.PRNGKey(kind), [layout], 512, 64, ratio, 0.0,
                                 kind_weights=weights, span_length=4)
  hidden = np.asarray(hidden['thm'])
  # Spans starting before the window are not drawn, so the first steps are hidden less often.
  interior = hidden[:, 8:] if kind == 2 else hidden
  assert abs(interior.mean() - ratio) < 0.03


def test_sensor_kind_hides_whole_sensors():
  layout = layout_lib.build_layouts([helpers.thm_spec()])[0]
  hidden = np.asarray(masking.sample_hidden(
      jax.random.PRNGKey(3), [layout], 64, 16, 0.5, 0.0, kind_weights=(0, 1, 0))['thm'])
  assert (hidden.all(axis=1) == hidden.any(axis=1)).all()


def test_span_kind_hides_contiguous_runs():
  layout = layout_lib.build_layouts([helpers.thm_spec()])[0]
  hidden = np.asarray(masking.sample_hidden(
      jax.random.PRNGKey(4), [layout], 64, 32, 0.3, 0.0, kind_weights=(0, 0, 1),
      span_length=4)['thm'])
  # Every interior run of hidden timesteps is at least span_length long.
  for b in range(64):
    for c in range(5):
      runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], hidden[b, :, c], [0]]))))[::2]
      starts = np.flatnonzero(np.diff(np.concatenate([[0], hidden[b, :, c].astype(int)])) == 1)
      for start, length in zip(starts, runs):
        if start > 0 and start + length < 32:
          assert length >= 4
