"""Linear probes against numpy and hand computations: window targets, ridge, R² and reports."""

import numpy as np
import pytest

from imputer import evaluation
from imputer import layout as layout_lib
from imputer import probe
from imputer import recordings
from imputer import scaling
from imputer import windows as windows_lib


def accel_layout():
  """Return a layout with 3 raw columns and 8 features, so raw slicing is visible."""
  spec = recordings.single_sensor_group('acc', ('x', 'y', 'z'), 'accel')
  return layout_lib.build_layouts([spec])[0]


def random_windows(rng, num_windows, width, layouts):
  """Return Windows with random valid lengths and masks, zero wherever unobserved."""
  lengths = rng.integers(1, width + 1, size=num_windows)
  valid = np.arange(width)[None, :] < lengths[:, None]
  values, observed = {}, {}
  for layout in layouts:
    shape = (num_windows, width, layout.num_features)
    observed[layout.name] = (rng.random(shape) < 0.7) & valid[:, :, None]
    values[layout.name] = np.where(
        observed[layout.name], rng.normal(size=shape), 0.0).astype(np.float32)
  index = np.stack([np.arange(num_windows), np.zeros(num_windows, int), lengths], axis=1)
  return windows_lib.Windows({'valid': valid, 'values': values, 'observed': observed},
                             index.astype(np.int64))


def slopes_and_intercept(model):
  """Return a `fit_ridge` model's coefficients in the units of the unstandardised features."""
  mean, std, coefficients = model
  slopes = coefficients[1:] / std[:, None]
  return slopes, coefficients[0] - mean @ slopes


def closed_form_ridge(features, target, weight, alpha, mean, std):
  """Solve one channel's weighted ridge by centring on weighted means (intercept unpenalised)."""
  rows = weight > 0
  standardised = (features[rows] - mean) / std
  w = weight[rows]
  feature_mean = w @ standardised / w.sum()
  target_mean = w @ target[rows] / w.sum()
  centred = standardised - feature_mean
  gram = centred.T @ (w[:, None] * centred) + alpha * np.eye(features.shape[1])
  slopes = np.linalg.solve(gram, centred.T @ (w * (target[rows] - target_mean)))
  return np.concatenate([[target_mean - feature_mean @ slopes], slopes])


# window_means and input_statistics


def test_window_means_by_hand():
  layout = accel_layout()
  # Raw channels 0..2 have their own centre and scale. Engineered channels 3..7 must be ignored.
  scaler = scaling.GroupScaler(np.array([1.0, -3.0, 100.0, 0, 0, 0, 0, 0]),
                               np.array([2.0, 10.0, 0.5, 1, 1, 1, 1, 1]), np.ones(8))
  valid = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  values = np.full((2, 4, 8), 1000.0, np.float32)
  observed = np.ones((2, 4, 8), bool)
  values[0, :, 0], observed[0, :, 0] = [1, 2, 3, 9], [1, 0, 1, 1]  # The 9 is padding.
  values[0, :, 1], observed[0, :, 1] = [1, 2, -3, 0], [1, 1, 1, 0]
  values[0, :, 2], observed[0, :, 2] = [4, 0, 0, 0], [1, 0, 0, 0]
  values[1, :, 0], observed[1, :, 0] = [1, 3, 7, 0], [1, 1, 1, 0]
  values[1, :, 1], observed[1, :, 1] = [5, 5, 5, 5], [0, 0, 0, 0]
  values[1, :, 2], observed[1, :, 2] = [2, 4, 0, 0], [1, 1, 0, 0]
  windows = windows_lib.Windows({'valid': valid, 'values': {'acc': values},
                              'observed': {'acc': observed}},
                             np.array([[0, 0, 3], [1, 0, 2]], np.int64))

  means, counts = probe.window_means(windows, [layout], {'acc': scaler})['acc']

  # Scaled means (1+3)/2, (1+2-3)/3, 4 and (1+3)/2, none, (2+4)/2, then x * scale + centre.
  np.testing.assert_allclose(means, [[2 * 2 + 1, 0 * 10 - 3, 4 * 0.5 + 100],
                                     [2 * 2 + 1, 0.0, 3 * 0.5 + 100]])
  np.testing.assert_array_equal(counts, [[2, 3, 1], [2, 0, 2]])


def test_input_statistics_match_numpy():
  rng = np.random.default_rng(0)
  accel = accel_layout()
  heart = layout_lib.build_layouts([recordings.single_sensor_group('hr', ('bpm',))])[0]
  windows = random_windows(rng, 6, 5, [accel, heart])
  windows.batch['observed']['hr'][2] = False
  windows.batch['values']['hr'][2] = 0.0

  statistics = probe.input_statistics(windows, [accel, heart])

  assert statistics.shape == (6, 2 * 8 + 2 * 1)
  for row in range(6):
    expected = []
    for name in ('acc', 'hr'):
      mask = windows.batch['observed'][name][row] & windows.batch['valid'][row][:, None]
      values = windows.batch['values'][name][row].astype(np.float64)
      for reduce in (np.mean, np.std):
        expected += [reduce(values[mask[:, f], f]) if mask[:, f].any() else 0.0
                     for f in range(values.shape[1])]
    np.testing.assert_allclose(statistics[row], expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(statistics[2, 16:], [0.0, 0.0])


# fit_ridge and predict_ridge


def test_fit_ridge_recovers_noiseless_coefficients():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(200, 5)) * [1.0, 10.0, 0.1, 3.0, 1.0] + 7.0
  slopes = rng.normal(size=(5, 3))
  intercept = np.array([1.0, -2.0, 50.0])
  targets = features @ slopes + intercept

  model = probe.fit_ridge(features, targets, np.ones_like(targets), 1e-9)

  fitted_slopes, fitted_intercept = slopes_and_intercept(model)
  np.testing.assert_allclose(fitted_slopes, slopes, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(fitted_intercept, intercept, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(probe.predict_ridge(model, features), targets, rtol=1e-7, atol=1e-6)


def test_fit_ridge_ignores_rows_of_weight_zero():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(60, 4))
  targets = features @ rng.normal(size=(4, 2)) + rng.normal(size=(60, 2))
  weights = rng.uniform(0.5, 3.0, size=(60, 2))
  dropped = rng.random(60) < 0.3
  weights[dropped] = 0.0
  targets[dropped] = np.nan  # Unused values may be anything, NaN included.
  kept = ~dropped

  model = probe.fit_ridge(features, targets, weights, 3.0)
  subset = probe.fit_ridge(features[kept], targets[kept], weights[kept], 3.0)

  for fitted, expected in zip(model, subset):
    np.testing.assert_allclose(fitted, expected, rtol=1e-10, atol=1e-12)


def test_fit_ridge_per_channel_rows():
  """Channel 0 skips some rows and channel 1 uses all, so their fits use different rows."""
  rng = np.random.default_rng(3)
  features = rng.normal(size=(80, 3))
  targets = features @ rng.normal(size=(3, 2)) + rng.normal(size=(80, 2))
  weights = np.ones((80, 2))
  weights[::3, 0] = 0.0
  kept = weights[:, 0] > 0

  model = probe.fit_ridge(features, targets, weights, 1e-9)
  alone = probe.fit_ridge(features[kept], targets[kept, :1], np.ones((kept.sum(), 1)), 1e-9)

  # Without a penalty the fit does not depend on the standardisation, so the slopes agree.
  np.testing.assert_allclose(slopes_and_intercept(model)[0][:, 0],
                             slopes_and_intercept(alone)[0][:, 0], rtol=1e-6)
  np.testing.assert_allclose(probe.predict_ridge(model, features)[:, 0],
                             probe.predict_ridge(alone, features)[:, 0], rtol=1e-6, atol=1e-9)


def test_fit_ridge_matches_closed_form():
  rng = np.random.default_rng(4)
  features = rng.normal(size=(50, 4)) * 5.0 + 2.0
  targets = rng.normal(size=(50, 6)) + 10.0
  # Distinct weight columns, two repeated columns and a channel without any training row.
  weights = rng.integers(0, 4, size=(50, 6)).astype(float)
  weights[:, 3] = weights[:, 1]
  weights[:, 4] = 1.0
  weights[:, 5] = 0.0
  alpha = 2.5

  mean, std, coefficients = probe.fit_ridge(features, targets, weights, alpha)

  rows = (weights > 0).any(axis=1)
  np.testing.assert_allclose(mean, features[rows].mean(axis=0))
  np.testing.assert_allclose(std, features[rows].std(axis=0))
  for channel in range(5):
    expected = closed_form_ridge(features, targets[:, channel], weights[:, channel], alpha,
                                 mean, std)
    np.testing.assert_allclose(coefficients[:, channel], expected, rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(coefficients[:, 5], np.zeros(5))


def test_fit_ridge_constant_feature_is_only_centred():
  rng = np.random.default_rng(5)
  features = np.concatenate([rng.normal(size=(30, 1)), np.full((30, 1), 4.0)], axis=1)
  targets = 3.0 * features[:, :1] + 1.0

  mean, std, coefficients = probe.fit_ridge(features, targets, np.ones_like(targets), 1e-9)

  assert std[1] == 1.0
  assert mean[1] == 4.0
  np.testing.assert_allclose(coefficients[2], [0.0], atol=1e-9)


def test_fit_ridge_rejects_bad_input():
  features = np.ones((4, 2))
  targets = np.zeros((4, 1))
  weights = np.ones((4, 1))
  with pytest.raises(ValueError, match='alpha is 0'):
    probe.fit_ridge(features, targets, weights, 0.0)
  with pytest.raises(ValueError, match='3 rows but targets 4'):
    probe.fit_ridge(features[:3], targets, weights, 1.0)
  with pytest.raises(ValueError, match='row 2, channel 0 is not finite'):
    probe.fit_ridge(features, np.array([[0.0], [0.0], [np.nan], [0.0]]), weights, 1.0)
  with pytest.raises(ValueError, match='weight -1.0 at row 0'):
    probe.fit_ridge(features, targets, -weights, 1.0)
  with pytest.raises(ValueError, match='fitted on 2 features'):
    probe.predict_ridge(probe.fit_ridge(features, targets, weights, 1.0), np.ones((4, 3)))


# variance_weighted_r2


def test_r2_matches_error_sums():
  rng = np.random.default_rng(6)
  truth = rng.normal(size=(40, 3)) + np.array([0.0, 50.0, -20.0])
  prediction = truth + rng.normal(size=(40, 3)) * 0.5
  scored = rng.random((40, 3)) < 0.6
  sums = evaluation.ErrorSums(3)
  sums.add(truth, prediction, scored)

  r2 = probe.variance_weighted_r2(truth, prediction, scored.astype(float))

  np.testing.assert_allclose(r2, sums.result()['r2'], rtol=1e-10)


def test_r2_integer_weights_repeat_values():
  """A weight of k counts an entry k times, as k copies fed to ErrorSums would."""
  rng = np.random.default_rng(7)
  truth = rng.normal(size=(30, 2)) * 3.0
  prediction = truth + rng.normal(size=(30, 2))
  weights = rng.integers(0, 4, size=(30, 2)).astype(float)
  sums = evaluation.ErrorSums(2)
  for copy in range(1, 4):
    sums.add(truth, prediction, weights >= copy)

  r2 = probe.variance_weighted_r2(truth, prediction, weights)

  np.testing.assert_allclose(r2, sums.result()['r2'], rtol=1e-10)


def test_r2_none_without_values_or_variance():
  truth = np.array([[2.0, 5.0], [2.0, 7.0]])
  prediction = np.zeros((2, 2))
  assert probe.variance_weighted_r2(truth, prediction, np.zeros((2, 2))) is None
  assert probe.variance_weighted_r2(truth, prediction, np.array([[1.0, 0], [1.0, 0]])) is None
  assert probe.variance_weighted_r2(truth, prediction, np.array([[1.0, 1], [1.0, 0]])) is None


# regression_probe


def split_data(rng, sizes, slopes, noise):
  """Return features, targets and unit weights per split for a linear target plus noise."""
  features, targets, weights = {}, {}, {}
  for split, size in sizes.items():
    features[split] = rng.normal(size=(size, slopes.shape[0]))
    targets[split] = features[split] @ slopes + 5.0 + noise[split] * rng.normal(
        size=(size, slopes.shape[1]))
    weights[split] = np.ones_like(targets[split])
  return features, targets, weights


def test_regression_probe_picks_best_validation_alpha():
  rng = np.random.default_rng(8)
  slopes = rng.normal(size=(20, 1)) * 0.1
  # 25 noisy training rows for 20 features: the unpenalised fit is mostly noise.
  features, targets, weights = split_data(
      rng, {'train': 25, 'validation': 400, 'test': 400}, slopes,
      {'train': 3.0, 'validation': 0.0, 'test': 0.0})

  result = probe.regression_probe(features, targets, weights, 'test')

  validation_r2 = [
      probe.variance_weighted_r2(
          targets['validation'],
          probe.predict_ridge(probe.fit_ridge(features['train'], targets['train'],
                                              weights['train'], alpha), features['validation']),
          weights['validation'])
      for alpha in probe.ALPHAS]
  best = int(np.argmax(validation_r2))
  assert result['alpha'] == probe.ALPHAS[best]
  assert result['alpha'] >= 10.0
  np.testing.assert_allclose(result['validation_r2'], validation_r2[best])
  assert validation_r2[best] > validation_r2[0] + 0.5
  assert result['train_windows'] == 25
  assert result['scored_windows'] == 400


def test_regression_probe_linear_target_scores_one():
  rng = np.random.default_rng(9)
  slopes = rng.normal(size=(6, 3))
  noise = {'train': 0.0, 'validation': 0.0, 'test': 0.0}
  features, targets, weights = split_data(
      rng, {'train': 500, 'validation': 100, 'test': 100}, slopes, noise)

  result = probe.regression_probe(features, targets, weights, 'test')

  assert result['r2'] > 1 - 1e-6
  assert result['alpha'] == probe.ALPHAS[0]
  assert result['channels_without_training_values'] == 0


def test_regression_probe_counts_unfitted_channels():
  rng = np.random.default_rng(10)
  slopes = rng.normal(size=(4, 2))
  noise = {'train': 0.0, 'validation': 0.0, 'test': 0.0}
  features, targets, weights = split_data(
      rng, {'train': 100, 'validation': 50, 'test': 50}, slopes, noise)
  weights['train'][:, 1] = 0.0
  weights['test'][:10] = 0.0

  result = probe.regression_probe(features, targets, weights, 'test')

  # Channel 1 was never seen in training: it is counted and left out of the score.
  assert result['channels_without_training_values'] == 1
  assert result['r2'] > 1 - 1e-6
  assert result['scored_windows'] == 40
  assert result['train_windows'] == 100


def test_regression_probe_on_validation_split():
  rng = np.random.default_rng(11)
  features, targets, weights = split_data(
      rng, {'train': 40, 'validation': 30}, rng.normal(size=(3, 1)),
      {'train': 1.0, 'validation': 1.0})

  result = probe.regression_probe(features, targets, weights, 'validation')

  assert result['r2'] == result['validation_r2']
  with pytest.raises(ValueError, match="scored split 'train' is invalid"):
    probe.regression_probe(features, targets, weights, 'train')
  with pytest.raises(ValueError, match=r"no entry for the split\(s\) \['test'\]"):
    probe.regression_probe(features, targets, weights, 'test')


# classification_probe


def clustered(rng, counts, dimensions=4):
  """Return features and labels of well separated clusters with `counts` windows per label."""
  centres = {'clap': 0, 'scratch': 1, 'wave': 2, 'unknown': 3}
  labels = [label for label, count in counts.items() for _ in range(count)]
  features = np.stack([10.0 * np.eye(dimensions)[centres[label]] for label in labels])
  return features + 0.1 * rng.normal(size=features.shape), labels


def test_classification_probe_separable_clusters():
  rng = np.random.default_rng(12)
  features, labels = {}, {}
  features['train'], labels['train'] = clustered(rng, {'wave': 10, 'clap': 6, 'scratch': 4})
  features['validation'], labels['validation'] = clustered(rng, {'clap': 3, 'wave': 3})
  features['test'], labels['test'] = clustered(rng, {'wave': 3, 'clap': 5, 'scratch': 2})

  result = probe.classification_probe(features, labels, 'test')

  assert result['accuracy'] == 1.0
  assert result['validation_accuracy'] == 1.0
  assert result['majority_accuracy'] == 3 / 10  # 'wave' is the most frequent training label.
  assert result['classes'] == ['clap', 'scratch', 'wave']
  assert result['scored_windows'] == 10
  assert result['unseen_label_windows'] == 0
  assert result['alpha'] in probe.ALPHAS


def test_classification_unseen_label_counts_wrong():
  rng = np.random.default_rng(13)
  features, labels = {}, {}
  features['train'], labels['train'] = clustered(rng, {'wave': 5, 'clap': 5})
  features['validation'], labels['validation'] = clustered(rng, {'clap': 2, 'wave': 2})
  features['test'], labels['test'] = clustered(rng, {'wave': 2, 'clap': 1, 'unknown': 1})

  result = probe.classification_probe(features, labels, 'test')

  assert result['accuracy'] == 3 / 4
  assert result['unseen_label_windows'] == 1
  assert result['majority_accuracy'] == 1 / 4  # Tie broken by sorted order: 'clap'.


def test_classification_probe_missing_labels():
  rng = np.random.default_rng(14)
  features, labels = {}, {}
  for split in ('train', 'validation', 'test'):
    features[split], labels[split] = clustered(rng, {'wave': 2, 'clap': 2})
  labels['validation'][1] = None

  assert probe.classification_probe(features, labels, 'test') is None
  labels['validation'] = labels['validation'][:2]
  with pytest.raises(ValueError, match='validation split: features have shape'):
    probe.classification_probe(features, labels, 'test')


# probe_report and markdown_lines


def report_inputs(rng, with_labels):
  input_layouts = layout_lib.build_layouts(
      [recordings.single_sensor_group('acc', ('x', 'y', 'z'), 'accel')])
  target_layouts = layout_lib.build_layouts([
      recordings.single_sensor_group('hr', ('bpm',)),
      recordings.single_sensor_group('temp', ('skin', 'air')),
  ])
  scalers = {layout.name: scaling.GroupScaler(rng.normal(size=layout.num_features),
                                              rng.uniform(0.5, 2, size=layout.num_features),
                                              np.ones(layout.num_features))
             for layout in target_layouts}
  windows, representations, labels = {}, {}, {}
  for split, size in (('train', 60), ('validation', 30), ('test', 30)):
    windows[split] = random_windows(rng, size, 6, input_layouts + target_layouts)
    representations[split] = rng.normal(size=(size, 5)).astype(np.float32)
    labels[split] = [('wave', 'clap')[k % 2] if with_labels else None for k in range(size)]
  return representations, windows, labels, input_layouts, target_layouts, scalers


def test_probe_report_matches_direct_probes():
  rng = np.random.default_rng(15)
  representations, windows, labels, input_layouts, target_layouts, scalers = report_inputs(
      rng, with_labels=True)

  section = probe.probe_report(representations, windows, labels, input_layouts, target_layouts,
                               scalers, 'test', 'encoder mean pool')

  assert section['representation'] == 'encoder mean pool'
  assert section['scored_split'] == 'test'
  assert list(section['groups']) == ['hr', 'temp']
  means = {split: probe.window_means(windows[split], target_layouts, scalers)['temp']
           for split in windows}
  direct = probe.regression_probe(representations, {s: m[0] for s, m in means.items()},
                                  {s: m[1] for s, m in means.items()}, 'test')
  assert section['groups']['temp']['model'] == direct
  statistics = {split: probe.input_statistics(windows[split], input_layouts) for split in windows}
  assert section['gesture']['input_statistics'] == probe.classification_probe(
      statistics, labels, 'test')
  assert section['gesture']['model']['classes'] == ['clap', 'wave']


def test_markdown_lines_table_per_group():
  rng = np.random.default_rng(16)
  inputs = report_inputs(rng, with_labels=True)
  section = probe.probe_report(*inputs, 'test', 'encoder mean pool')

  lines = probe.markdown_lines(section)

  assert lines[0] == '## probe'
  assert '| group | representation R² | window-statistics R² | alpha | windows |' in lines
  for name in ('hr', 'temp'):
    rows = [line for line in lines if line.startswith(f'| {name} |')]
    assert len(rows) == 1
    assert rows[0].endswith(f"| {section['groups'][name]['model']['scored_windows']} |")
  assert any(line.startswith('| majority class |') for line in lines)


def test_markdown_lines_without_labels():
  rng = np.random.default_rng(17)
  inputs = report_inputs(rng, with_labels=False)
  section = probe.probe_report(*inputs, 'test', 'encoder mean pool')
  section['groups']['hr']['model']['r2'] = None

  lines = probe.markdown_lines(section)

  assert section['gesture'] is None
  assert any('no gesture labels' in line for line in lines)
  assert not any(line.startswith('| majority class |') for line in lines)
  assert [line for line in lines if line.startswith('| hr |')][0].startswith('| hr | n/a |')


def test_probe_report_rejects_mismatched_rows():
  rng = np.random.default_rng(18)
  representations, windows, labels, input_layouts, target_layouts, scalers = report_inputs(
      rng, with_labels=True)
  representations['test'] = representations['test'][:-1]
  with pytest.raises(ValueError, match='test split: 29 representation rows'):
    probe.probe_report(representations, windows, labels, input_layouts, target_layouts, scalers,
                       'test', 'encoder mean pool')
