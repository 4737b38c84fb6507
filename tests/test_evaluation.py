"""Evaluation figures against numpy: metrics, baselines, stitching and the report."""

import numpy as np
import pytest

from imputer import evaluation
from imputer import layout as layout_lib
from imputer import recordings
from imputer import report
from imputer import scaling


def test_error_sums_match_numpy():
  rng = np.random.default_rng(0)
  truth = rng.normal(size=(25, 2)) + np.array([0.0, 100.0])
  prediction = truth + rng.normal(size=(25, 2))
  scored = rng.random((25, 2)) < 0.7
  sums = evaluation.ErrorSums(2)
  sums.add(truth[:10], prediction[:10], scored[:10])
  sums.add(truth[10:], prediction[10:], scored[10:])
  result = sums.result()
  error = (prediction - truth)[scored]
  np.testing.assert_allclose(result['mae'], np.abs(error).mean())
  np.testing.assert_allclose(result['rmse'], np.sqrt((error ** 2).mean()))
  # Each channel is centred on its own mean, so the offset of 100 explains nothing.
  total = sum(((truth[scored[:, c], c] - truth[scored[:, c], c].mean()) ** 2).sum()
              for c in range(2))
  np.testing.assert_allclose(result['r2'], 1 - (error ** 2).sum() / total)
  assert result['r2'] < 0.5
  assert result['count'] == scored.sum()


def test_error_sums_without_values_or_variance():
  empty = evaluation.ErrorSums(1)
  assert empty.result() == {'mae': None, 'rmse': None, 'r2': None, 'count': 0}
  sums = evaluation.ErrorSums(1)
  sums.add(np.array([[2.0], [2.0]]), np.array([[1.0], [3.0]]), np.ones((2, 1), bool))
  assert sums.result()['r2'] is None
  assert sums.result()['mae'] == 1.0


def test_interpolation_is_linear_with_constant_ends():
  values = np.array([[1.0, 5.0], [np.nan, 0.0], [3.0, 0.0], [4.0, 0.0], [np.nan, 0.0]])
  visible = np.array([[1, 0], [0, 0], [1, 0], [0, 0], [0, 0]], bool)
  filled, used = evaluation.interpolate_sequence(values, visible, np.array([9.0, 7.0]))
  np.testing.assert_allclose(filled[:, 0], [1.0, 2.0, 3.0, 3.0, 3.0])
  np.testing.assert_allclose(filled[:, 1], 7.0)
  np.testing.assert_array_equal(used, [False, True])


def test_stitch_puts_windows_back():
  index = np.array([[0, 0, 3], [0, 3, 2], [1, 0, 2]])
  arrays = np.arange(3 * 3 * 1).reshape(3, 3, 1).astype(float)
  out = evaluation.stitch(index, arrays, [5, 2])
  np.testing.assert_array_equal(out[0][:, 0], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(out[1][:, 0], [6, 7])


def two_sensor_layout():
  spec = recordings.GroupSpec('g', ('a', 'b'), ('sensor_a', 'sensor_b'), (0, 1), 'raw')
  return layout_lib.build_layouts([spec])[0]


def test_score_scenario_matches_numpy():
  layout = two_sensor_layout()
  rng = np.random.default_rng(1)
  truth = [rng.normal(10, 2, size=(6, 2)), rng.normal(10, 2, size=(4, 2))]
  observed = [np.ones((6, 2), bool), np.ones((4, 2), bool)]
  observed[0][2, 1] = False
  truth[0][2, 1] = np.nan
  sequences = [recordings.Sequence(f's{i}', 'x', {'g': t}, {'g': o})
               for i, (t, o) in enumerate(zip(truth, observed))]
  scaler = scaling.GroupScaler(np.array([10.0, 9.0]), np.array([2.0, 4.0]), np.ones(2))
  scaled_pred = [rng.normal(size=(6, 2)), rng.normal(size=(4, 2))]
  hidden = [rng.random((6, 2)) < 0.5, rng.random((4, 2)) < 0.5]
  hidden[0][0, 0] = hidden[0][1, 0] = True
  result = evaluation.score_scenario('random_mask', sequences, {'g': scaled_pred},
                                     {'g': hidden}, [layout], {'g': scaler})

  scored = [h & o for h, o in zip(hidden, observed)]
  truth_scored = np.concatenate([t[s] for t, s in zip(truth, scored)])
  model = np.concatenate([(p * scaler.scale + scaler.center)[s]
                          for p, s in zip(scaled_pred, scored)])
  np.testing.assert_allclose(result['model']['g']['mae'], np.abs(model - truth_scored).mean())
  median = np.concatenate([np.broadcast_to(scaler.center, t.shape)[s]
                           for t, s in zip(truth, scored)])
  np.testing.assert_allclose(result['baselines']['median']['g']['rmse'],
                             np.sqrt(((median - truth_scored) ** 2).mean()))
  assert result['model']['g']['count'] == truth_scored.size
  # Sensor b of the model, against numpy.
  b_truth = np.concatenate([t[:, 1][s[:, 1]] for t, s in zip(truth, scored)])
  b_model = np.concatenate([(p[:, 1] * 4.0 + 9.0)[s[:, 1]] for p, s in zip(scaled_pred, scored)])
  np.testing.assert_allclose(result['model']['g']['per_sensor']['sensor_b']['mae'],
                             np.abs(b_model - b_truth).mean())
  # Interpolation over the visible values of each sequence.
  interp = []
  for t, o, h, s in zip(truth, observed, hidden, scored):
    time = np.arange(len(t))
    for c in range(2):
      vis = o[:, c] & ~h[:, c]
      filled = np.interp(time, time[vis], t[vis, c]) if vis.any() else np.full(len(t), scaler.center[c])
      interp.append((filled[s[:, c]], t[s[:, c], c]))
  pred_i = np.concatenate([p for p, _ in interp])
  truth_i = np.concatenate([t for _, t in interp])
  np.testing.assert_allclose(result['baselines']['interpolation']['g']['mae'],
                             np.abs(pred_i - truth_i).mean())


def test_imu_only_scenario_has_no_interpolation():
  layout = two_sensor_layout()
  seq = recordings.Sequence('s', 'x', {'g': np.ones((3, 2))}, {'g': np.ones((3, 2), bool)})
  scaler = scaling.GroupScaler(np.zeros(2), np.ones(2), np.ones(2))
  result = evaluation.score_scenario('imu_only', [seq], {'g': [np.zeros((3, 2))]},
                                     {'g': [np.ones((3, 2), bool)]}, [layout], {'g': scaler})
  assert set(result['baselines']) == {'median'}
  assert result['model']['g']['mae'] == pytest.approx(1.0)


def test_markdown_report_lists_every_method():
  entry = {'mae': 1.5, 'rmse': 2.0, 'r2': 0.25, 'count': 10}
  scenario = {'model': {'g': dict(entry)}, 'baselines': {'median': {'g': dict(entry)}}}
  text = report.to_markdown({
      'source': 'synthetic CMI-schema data', 'split': {'test': ['s1']},
      'evaluated_split': 'test',
      'checkpoint': {'step': 5, 'kind': 'final'},
      'sequences': {'evaluated': 1, 'skipped_without_ground_truth': 2},
      'scenarios': {'imu_only': scenario}})
  assert '| g | model | 1.5 | 2 | 0.25 | 10 |' in text
  assert '| g | median |' in text
  assert 'synthetic' in text
  assert 'skipped without ground truth' in text


def test_tof_image_shares_one_scale():
  target = np.arange(320, dtype=float)
  image = evaluation.tof_comparison_image(target, target)
  assert image.shape == (16, 40)
  np.testing.assert_allclose(image[:8], image[8:])
  assert image.min() == 0.0
  assert image.max() == 1.0


def test_expected_coverage_of_gaussian_and_laplace():
  np.testing.assert_allclose(evaluation.expected_coverage('conf_mse', 1), 0.682689, atol=1e-6)
  np.testing.assert_allclose(evaluation.expected_coverage('conf_mse', 2), 0.954500, atol=1e-6)
  np.testing.assert_allclose(evaluation.expected_coverage('conf_mae', 1),
                             1 - np.exp(-np.sqrt(2)), rtol=1e-12)


@pytest.mark.parametrize('kind', ['conf_mse', 'conf_mae'])
def test_calibration_sums_by_hand(kind):
  truth = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
  prediction = np.array([[0.5, 1.0], [0.0, 3.15], [4.0, 9.0]])
  std = np.array([[1.0, 2.0], [1.5, 0.1], [1.0, 1.0]])
  scored = np.array([[True, True], [True, True], [False, True]])
  sums = evaluation.CalibrationSums(kind)
  sums.add(truth, prediction, std, scored)
  result = sums.result()
  # Errors 0.5, 0, -2, 0.15, 4 against sigma 1, 2, 1.5, 0.1, 1.
  assert result['count'] == 5
  assert result['coverage_1sigma'] == pytest.approx(2 / 5)
  assert result['coverage_2sigma'] == pytest.approx(4 / 5)
  errors, sigmas = np.array([0.5, 0, -2, 0.15, 4]), np.array([1, 2, 1.5, 0.1, 1])
  if kind == 'conf_mse':
    nll = 0.5 * np.log(2 * np.pi * sigmas ** 2) + 0.5 * (errors / sigmas) ** 2
  else:
    b = sigmas / np.sqrt(2)
    nll = np.log(2 * b) + np.abs(errors) / b
  assert result['nll'] == pytest.approx(nll.mean())
  assert result['mean_std'] == pytest.approx(sigmas.mean())
