"""Mask sampling and the mapping of hidden sensors to raw columns and features."""

import jax
import numpy as np

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


def test_ratio_one_hides_every_raw_value():
  hidden = masking.sample_hidden(jax.random.PRNGKey(2), [tof_layout()], 2, 4, 1.0, 0.0)
  assert hidden['tof'].shape == (2, 4, 320)
  assert np.asarray(hidden['tof']).all()
