"""Linear probes that measure what a frozen window representation makes linearly available.

Every probe is a ridge regression fitted on the training subjects' windows. Its ridge strength
(alpha) is chosen on the validation subjects' windows, and its score is taken on a held-out
split ('test' or 'validation'). The same probes on hand-made window statistics (mean and
standard deviation of every observed input feature) are the baseline that a learned
representation has to beat.

Regression targets are the window means of each target group's raw channels in original
units. Each mean is weighted by the number of observed timesteps it averages. The
classification probe predicts each window's gesture label.
"""

from __future__ import annotations

import collections

import numpy as np

# Ridge strengths tried, on features standardised over the training windows. The grid reaches
# 1e5 because with thousands of correlated windows the best strength can exceed 1000.
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)

# Alpha used when no alpha has a validation score, because the validation targets have no
# variance or no scored value.
FALLBACK_ALPHA = 1.0

# A feature whose standard deviation over the training rows is below this is only centred.
MIN_FEATURE_STD = 1e-8

# Windows processed at once when averaging over time. Each float64 copy then contains at most
# ROW_CHUNK * W * F values, about 170 MB for 320 ToF channels and W=64.
ROW_CHUNK = 1024

SCORED_SPLITS = ('test', 'validation')


def _masked_moments(values: np.ndarray, mask: np.ndarray):
  """Return per-window (mean, std, count) of (N, W, F) `values` over the `mask`ed timesteps.

  Mean and std are 0 where the count is 0. The std is the population std (ddof 0).
  """
  num_windows, _, num_features = values.shape
  means = np.zeros((num_windows, num_features))
  stds = np.zeros((num_windows, num_features))
  counts = np.zeros((num_windows, num_features), np.int64)
  for start in range(0, num_windows, ROW_CHUNK):
    rows = slice(start, start + ROW_CHUNK)
    chunk_mask = mask[rows]
    chunk = np.where(chunk_mask, values[rows].astype(np.float64), 0.0)
    count = chunk_mask.sum(axis=1)
    mean = chunk.sum(axis=1) / np.maximum(count, 1)
    deviation = np.where(chunk_mask, chunk - mean[:, None, :], 0.0)
    means[rows] = mean
    stds[rows] = np.sqrt((deviation * deviation).sum(axis=1) / np.maximum(count, 1))
    counts[rows] = count
  return means, stds, counts


def window_means(windows, target_layouts, scalers) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Average each target group's raw channels over every window's valid, observed timesteps.

  Returns {group: (means (N, C_raw) in original units, counts (N, C_raw))}. A mean is 0 where
  its count is 0. The scaler is affine per channel, so unscaling the scaled mean gives the
  mean of the unscaled values.
  """
  missing = [layout.name for layout in target_layouts if layout.name not in scalers]
  if missing:
    raise ValueError(f'window_means: no scaler for the target group(s) {missing}; pass the '
                     'scalers fitted on the training subjects for every target group.')
  valid = windows.batch['valid'][:, :, None]
  out = {}
  for layout in target_layouts:
    name, num_raw = layout.name, layout.num_raw
    values = windows.batch['values'][name][:, :, :num_raw]
    mask = windows.batch['observed'][name][:, :, :num_raw] & valid
    scaled_means, _, counts = _masked_moments(values, mask)
    means = scalers[name].inverse(scaled_means, slice(0, num_raw))
    out[name] = (np.where(counts > 0, means, 0.0), counts)
  return out


def input_statistics(windows, input_layouts) -> np.ndarray:
  """Return the hand-made baseline representation: (N, 2 * sum F_in) window statistics.

  For each input group in order, the columns are the F_in feature means followed by the F_in
  population standard deviations. Both are taken over the valid, observed timesteps in scaled
  units and are 0 where a feature has no such timestep.
  """
  valid = windows.batch['valid'][:, :, None]
  columns = [np.zeros((len(windows), 0))]
  for layout in input_layouts:
    values = windows.batch['values'][layout.name]
    mask = windows.batch['observed'][layout.name] & valid
    means, stds, _ = _masked_moments(values, mask)
    columns += [means, stds]
  return np.concatenate(columns, axis=1)


def _check_regression_data(features, targets, weights, context: str) -> None:
  """Raise ValueError unless the arrays have matching shapes and usable values."""
  if features.ndim != 2:
    raise ValueError(f'{context}: features have shape {features.shape}; pass an (N, D) array.')
  if targets.ndim != 2 or targets.shape != weights.shape:
    raise ValueError(
        f'{context}: targets have shape {targets.shape} and weights {weights.shape}; pass two '
        '(N, C) arrays of the same shape.')
  if targets.shape[0] != features.shape[0]:
    raise ValueError(
        f'{context}: features have {features.shape[0]} rows but targets {targets.shape[0]}; '
        'pass one row per window in both.')
  if not np.isfinite(features).all():
    row = int(np.argwhere(~np.isfinite(features))[0, 0])
    raise ValueError(f'{context}: features row {row} is not finite; check the representation.')
  invalid = ~np.isfinite(weights) | (weights < 0)
  if invalid.any():
    row, channel = np.argwhere(invalid)[0]
    raise ValueError(
        f'{context}: weight {weights[row, channel]} at row {row}, channel {channel} is invalid; '
        'weights must be finite and non-negative.')
  broken = (weights > 0) & ~np.isfinite(targets)
  if broken.any():
    row, channel = np.argwhere(broken)[0]
    raise ValueError(
        f'{context}: target row {row}, channel {channel} is not finite but has a positive '
        'weight; give it weight 0 or a finite value.')


def _standardisation(features: np.ndarray, rows: np.ndarray):
  """Return the mean and std (std < MIN_FEATURE_STD -> 1) of `features` over `rows`."""
  if not rows.any():
    return np.zeros(features.shape[1]), np.ones(features.shape[1])
  used = features[rows]
  std = used.std(axis=0)
  return used.mean(axis=0), np.where(std < MIN_FEATURE_STD, 1.0, std)


def _design(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Return standardised features with a leading column of ones for the intercept."""
  standardised = (np.asarray(features, np.float64) - mean) / std
  return np.concatenate([np.ones((standardised.shape[0], 1)), standardised], axis=1)


def _weight_patterns(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Return the distinct weight columns (U, N) and the pattern index of each channel (C,)."""
  columns = np.ascontiguousarray(weights.T)
  index_of_pattern = {}
  pattern_of_channel = np.array(
      [index_of_pattern.setdefault(column.tobytes(), len(index_of_pattern)) for column in columns],
      np.int64)
  first_channel = np.unique(pattern_of_channel, return_index=True)[1]
  return columns[first_channel], pattern_of_channel


def _weighted_grams(design: np.ndarray, patterns: np.ndarray) -> np.ndarray:
  """Return sum_i patterns[u, i] * outer(design[i], design[i]) for every pattern u.

  All patterns share one matrix product per block of rows. For 320 patterns of 20000 rows and
  65 columns this took 2 s, against 27 s for one Gram product per pattern (2 CPU cores).
  """
  size = design.shape[1]
  # Rows per block, so that a block of outer products stays at about 2**22 float64 (32 MiB).
  block = max(1, 2**22 // (size * size))
  grams = np.zeros((len(patterns), size * size))
  for start in range(0, design.shape[0], block):
    rows = design[start:start + block]
    outer = (rows[:, :, None] * rows[:, None, :]).reshape(len(rows), -1)
    grams += patterns[:, start:start + block] @ outer
  return grams.reshape(len(patterns), size, size)


def _fit_ridge_path(features, targets, weights, alphas) -> list[tuple]:
  """Fit one ridge model per alpha, sharing the normal equations between alphas.

  Channels with the same weight column share one Gram matrix, so a group whose channels share
  one mask pattern per sensor needs one Gram matrix per sensor, not per channel.
  """
  # NOTE: the cost grows with N * D² per distinct weight pattern. Measured: 3 s for N=20000,
  # D=64 and 320 distinct patterns on a busy 2-core machine. D in the hundreds takes far longer.
  features = np.asarray(features, np.float64)
  weights = np.asarray(weights, np.float64)
  targets = np.where(weights > 0, targets, 0.0).astype(np.float64)
  mean, std = _standardisation(features, (weights > 0).any(axis=1))
  design = _design(features, mean, std)
  patterns, pattern_of_channel = _weight_patterns(weights)
  grams = _weighted_grams(design, patterns)
  right_hand_sides = (weights * targets).T @ design  # (C, D+1)

  models = []
  for alpha in alphas:
    penalty = alpha * np.eye(design.shape[1])
    penalty[0, 0] = 0.0  # The intercept is not penalised.
    coefficients = np.zeros((design.shape[1], targets.shape[1]))
    for index, (pattern, gram) in enumerate(zip(patterns, grams)):
      if not (pattern > 0).any():
        continue  # No training value: the channel keeps all-zero coefficients.
      channels = pattern_of_channel == index
      coefficients[:, channels] = np.linalg.solve(gram + penalty, right_hand_sides[channels].T)
    models.append((mean, std, coefficients))
  return models


def fit_ridge(features, targets, weights, alpha) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Fit a weighted ridge regression per output channel, with an unpenalised intercept.

  Channel c minimises sum_i weights[i, c] * (targets[i, c] - prediction[i, c])² plus alpha
  times the squared norm of its slopes, over the rows with weights[i, c] > 0. Features are
  standardised with the unweighted mean and std of the rows that have any positive weight, so
  rows whose weights are all 0 change nothing. A channel without a positive weight gets
  all-zero coefficients.

  Returns (feature mean (D,), feature std (D,), coefficients (D+1, C)), where row 0 of the
  coefficients is the intercept.
  """
  if not alpha > 0:
    raise ValueError(f'fit_ridge: alpha is {alpha}; pass a positive ridge strength.')
  features, targets, weights = (np.asarray(a) for a in (features, targets, weights))
  _check_regression_data(features, targets, weights, 'fit_ridge')
  return _fit_ridge_path(features, targets, weights, (alpha,))[0]


def predict_ridge(model, features) -> np.ndarray:
  """Return the (N, C) predictions of a `fit_ridge` model for (N, D) features."""
  mean, std, coefficients = model
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[1] != mean.shape[0]:
    raise ValueError(
        f'predict_ridge: features have shape {features.shape} but the model was fitted on '
        f'{mean.shape[0]} features; pass an (N, {mean.shape[0]}) array.')
  return _design(features, mean, std) @ coefficients


def variance_weighted_r2(truth, prediction, weights) -> float | None:
  """Return 1 - SSE / SST over the entries with a positive weight, each weighted.

  SST sums each channel's weighted squared deviations from that channel's own weighted mean.
  With 0/1 weights this is the R² of `evaluation.ErrorSums`, including its threshold. Returns
  None when no entry has a positive weight or SST is at most 1e-12 times the total weight.
  """
  truth, prediction, weights = (np.asarray(a, np.float64) for a in (truth, prediction, weights))
  if not truth.shape == prediction.shape == weights.shape:
    raise ValueError(
        f'variance_weighted_r2: truth {truth.shape}, prediction {prediction.shape} and weights '
        f'{weights.shape} must have the same shape.')
  scored = weights > 0
  total_weight = float(weights[scored].sum())
  if total_weight == 0:
    return None
  channel_weight = np.where(scored, weights, 0.0).sum(axis=0)
  truth = np.where(scored, truth, 0.0)
  error = np.where(scored, prediction - truth, 0.0)
  channel_mean = (weights * truth).sum(axis=0) / np.maximum(channel_weight, 1e-300)
  deviation = np.where(scored, truth - channel_mean, 0.0)
  total = float((weights * deviation * deviation).sum())
  if total <= 1e-12 * total_weight:
    return None
  return 1.0 - float((weights * error * error).sum()) / total


def _probe_splits(scored: str) -> tuple[str, ...]:
  if scored not in SCORED_SPLITS:
    raise ValueError(f"scored split {scored!r} is invalid; use 'test' or 'validation'.")
  return ('train', 'validation') if scored == 'validation' else ('train', 'validation', scored)


def _require_splits(mapping: dict, splits, name: str) -> None:
  missing = [split for split in splits if split not in mapping]
  if missing:
    raise ValueError(
        f'{name} has no entry for the split(s) {missing}; pass one for each of {list(splits)}.')


def _best_alpha_index(scores) -> int | None:
  """Return the index of the highest score (the smallest alpha on ties), None if all are None."""
  present = [(score, -index) for index, score in enumerate(scores) if score is not None]
  return -max(present)[1] if present else None


def regression_probe(features: dict, targets: dict, weights: dict, scored: str) -> dict:
  """Fit ridge probes on 'train', choose alpha by validation R² and score on `scored`.

  Each dict maps a split name to (N, D) features, (N, C) targets or (N, C) weights. A channel
  with no positive training weight cannot be fitted. It is left out of both R² values and
  counted in 'channels_without_training_values'. When no alpha has a validation R², alpha is
  FALLBACK_ALPHA and 'validation_r2' is None. The window counts include only windows with a
  positive weight on some channel.
  """
  splits = _probe_splits(scored)
  for mapping, name in ((features, 'features'), (targets, 'targets'), (weights, 'weights')):
    _require_splits(mapping, splits, name)
  arrays = {}
  for split in splits:
    arrays[split] = tuple(np.asarray(d[split]) for d in (features, targets, weights))
    _check_regression_data(*arrays[split], f'regression probe, {split} split')
  widths = {split: arrays[split][0].shape[1] for split in splits}
  channels = {split: arrays[split][1].shape[1] for split in splits}
  if len(set(widths.values())) > 1 or len(set(channels.values())) > 1:
    raise ValueError(
        f'regression probe: feature widths {widths} and target channels {channels} differ '
        'between splits; pass the same representation and targets for every split.')

  train_features, train_targets, train_weights = arrays['train']
  fitted = (train_weights > 0).any(axis=0)
  scoring_weights = {split: np.where(fitted, arrays[split][2], 0.0) for split in splits}
  models = _fit_ridge_path(train_features, train_targets, train_weights, ALPHAS)

  def score(model, split):
    split_features, split_targets, _ = arrays[split]
    return variance_weighted_r2(split_targets, predict_ridge(model, split_features),
                                scoring_weights[split])

  validation_scores = [score(model, 'validation') for model in models]
  best = _best_alpha_index(validation_scores)
  if best is None:
    best = ALPHAS.index(FALLBACK_ALPHA)
  return {
      'r2': score(models[best], scored),
      'validation_r2': validation_scores[best],
      'alpha': ALPHAS[best],
      'train_windows': int((train_weights > 0).any(axis=1).sum()),
      'scored_windows': int((scoring_weights[scored] > 0).any(axis=1).sum()),
      'channels_without_training_values': int((~fitted).sum()),
  }


def _accuracy(predicted: list, labels: list) -> float | None:
  if not labels:
    return None
  return sum(p == l for p, l in zip(predicted, labels)) / len(labels)


def classification_probe(features: dict, labels: dict, scored: str) -> dict | None:
  """Fit a linear classifier on 'train', choose alpha by validation accuracy, score `scored`.

  The classifier is a ridge regression on the one-hot training labels, and the largest output
  decides. Returns None when any window of the three splits has no label (None). A scored
  label that never occurs in training is always counted as wrong. Such windows are counted in
  'unseen_label_windows'. The majority baseline predicts the most frequent training label,
  the first in sorted order on ties. Accuracies are None for a split without windows.
  """
  splits = _probe_splits(scored)
  _require_splits(features, splits, 'features')
  _require_splits(labels, splits, 'labels')
  for split in splits:
    split_features = np.asarray(features[split])
    if split_features.ndim != 2 or split_features.shape[0] != len(labels[split]):
      raise ValueError(
          f'classification probe, {split} split: features have shape {split_features.shape} '
          f'for {len(labels[split])} labels; pass one feature row per label.')
    if not np.isfinite(split_features).all():
      raise ValueError(
          f'classification probe, {split} split: some features are not finite; check the '
          'representation.')
  if any(label is None for split in splits for label in labels[split]):
    return None
  classes = sorted(set(labels['train']))
  if not classes:
    raise ValueError(
        'classification probe: the train split has no windows; pass at least one labelled '
        'training window.')

  train_labels = np.asarray(labels['train'], dtype=object)
  one_hot = (train_labels[:, None] == np.asarray(classes, dtype=object)[None, :]).astype(float)
  models = _fit_ridge_path(features['train'], one_hot, np.ones_like(one_hot), ALPHAS)

  def accuracy(model, split):
    outputs = predict_ridge(model, features[split])
    return _accuracy([classes[k] for k in outputs.argmax(axis=1)], list(labels[split]))

  validation_scores = [accuracy(model, 'validation') for model in models]
  best = _best_alpha_index(validation_scores)
  if best is None:
    best = ALPHAS.index(FALLBACK_ALPHA)
  label_counts = collections.Counter(labels['train'])
  majority = max(classes, key=label_counts.__getitem__)
  scored_labels = list(labels[scored])
  return {
      'accuracy': accuracy(models[best], scored),
      'validation_accuracy': validation_scores[best],
      'alpha': ALPHAS[best],
      'majority_accuracy': _accuracy([majority] * len(scored_labels), scored_labels),
      'classes': classes,
      'scored_windows': len(scored_labels),
      'unseen_label_windows': sum(label not in label_counts for label in scored_labels),
  }


def probe_report(representations: dict, windows: dict, labels: dict, input_layouts,
                 target_layouts, scalers, scored: str, description: str) -> dict:
  """Probe a representation and the window-statistics baseline on every target group.

  `representations`, `windows` and `labels` map 'train', 'validation' and `scored` to the
  (N, D) features, the matching `windows.Windows` and the per-window labels (str or None).
  Regression weights are the observed-timestep counts of `window_means`.
  """
  splits = _probe_splits(scored)
  for mapping, name in ((representations, 'representations'), (windows, 'windows'),
                        (labels, 'labels')):
    _require_splits(mapping, splits, name)
  means, statistics = {}, {}
  for split in splits:
    rows = np.asarray(representations[split]).shape[0]
    if rows != len(windows[split]) or len(labels[split]) != len(windows[split]):
      raise ValueError(
          f'probe report, {split} split: {rows} representation rows and {len(labels[split])} '
          f'labels for {len(windows[split])} windows; pass one of each per window, in order.')
    means[split] = window_means(windows[split], target_layouts, scalers)
    statistics[split] = input_statistics(windows[split], input_layouts)

  groups = {}
  for layout in target_layouts:
    targets = {split: means[split][layout.name][0] for split in splits}
    weights = {split: means[split][layout.name][1] for split in splits}
    groups[layout.name] = {
        'model': regression_probe(representations, targets, weights, scored),
        'input_statistics': regression_probe(statistics, targets, weights, scored),
    }

  gesture_model = classification_probe(representations, labels, scored)
  gesture = None
  if gesture_model is not None:
    gesture = {'model': gesture_model,
               'input_statistics': classification_probe(statistics, labels, scored)}
  return {'representation': description, 'scored_split': scored, 'groups': groups,
          'gesture': gesture}


def _format(value) -> str:
  return 'n/a' if value is None else f'{value:.4g}'


def markdown_lines(section: dict) -> list[str]:
  """Render a `probe_report` section as markdown lines under a '## probe' heading."""
  scored = section['scored_split']
  grid = ', '.join(f'{alpha:g}' for alpha in ALPHAS)
  lines = [
      '## probe', '',
      f"Representation: {section['representation']}", '',
      f"Each probe is a ridge regression fitted on the training subjects' windows, with alpha "
      f'chosen from {{{grid}}} on the validation subjects and scored on the {scored} subjects.',
      "The regression targets are the per-window means of each target group's raw channels in "
      'original units, and R² is variance-weighted. Window statistics are the mean and standard deviation of '
      'every observed input feature. The alpha column reads representation / window statistics.',
      '',
      '| group | representation R² | window-statistics R² | alpha | windows |',
      '|---|---|---|---|---|',
  ]
  for name, group in section['groups'].items():
    model, baseline = group['model'], group['input_statistics']
    lines.append(f"| {name} | {_format(model['r2'])} | {_format(baseline['r2'])} | "
                 f"{model['alpha']:g} / {baseline['alpha']:g} | {model['scored_windows']} |")
  unfitted = {name: group['model']['channels_without_training_values']
              for name, group in section['groups'].items()}
  if any(unfitted.values()):
    lines += ['', 'Channels left out of the fit and of R² because no training window observes '
              'them: ' + ', '.join(f'{name} {count}' for name, count in unfitted.items())]

  gesture = section['gesture']
  lines.append('')
  if gesture is None:
    lines.append('Gesture probe: not run, because the data carry no gesture labels '
                 '(at least one window has none).')
    return lines
  model, baseline = gesture['model'], gesture['input_statistics']
  lines += [
      f"Gesture probe over {len(model['classes'])} classes on {model['scored_windows']} "
      f"{scored} windows, {model['unseen_label_windows']} of them with a label that training "
      'never shows (always wrong):', '',
      '| gesture classifier | accuracy | validation accuracy | alpha |', '|---|---|---|---|',
      f"| representation | {_format(model['accuracy'])} | "
      f"{_format(model['validation_accuracy'])} | {model['alpha']:g} |",
      f"| window statistics | {_format(baseline['accuracy'])} | "
      f"{_format(baseline['validation_accuracy'])} | {baseline['alpha']:g} |",
      f"| majority class | {_format(model['majority_accuracy'])} | n/a | n/a |",
  ]
  return lines
