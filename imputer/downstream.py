"""Downstream check: does imputed THM/ToF help a gesture classifier on IMU-only recordings?

Three settings are cross-validated over the same held-out-subject folds, with the same
classifier and the same choice of its L2 strength:

* `imu_only`: features of the input groups alone.
* `imu_imputed`: those plus features of the target groups as the imputer fills them from the
  inputs alone (every target value hidden from the model), for every sequence.
* `imu_real`: those plus features of the recorded target groups. A sequence without any
  observed target value (an IMU-only recording) has none to give, so every one of its
  target features gets the training-fold mean. Such sequences are kept, and counted in the
  report as `sequences_without_real_targets`.

Features: for every raw channel, the mean, standard deviation, minimum, maximum and mean
absolute first difference over time, ignoring missing values. A sensor with more than
`MAX_COLUMNS_PER_SENSOR` columns (a ToF sensor's 64 pixels) is first reduced to the mean and
minimum over its pixels at every timestep. A feature that has no value in a sequence gets
the training-fold mean, and every feature is then standardised with training-fold statistics.

Classifier: multinomial logistic regression with an L2 penalty on the weights (the
intercepts are not penalised), each class weighted equally (`class_balanced_weights`). It is fitted by full-batch gradient descent with Nesterov
momentum: `ITERATIONS` steps of size 1/L from zero, where L bounds the curvature of the loss,
so the fit is deterministic. The L2 strength comes from `L2_STRENGTHS`: each candidate is fitted
on part of the training subjects and scored on the rest (about one in `INNER_FOLDS`, grouped
by `folds.assign_folds`), and the best score wins, with ties going to the stronger penalty.
The test fold never takes part. A fold with a single training subject cannot be split, so it
uses `FALLBACK_L2_STRENGTH`, and the report records that.

Metrics, those of the CMI competition:

* binary F1 of Target against Non-Target, where a prediction is Target when the predicted
  gesture is a Target gesture;
* macro F1 over the gestures after every Non-Target gesture is merged into the class
  'non_target';
* the score, which is their mean.

A class enters the macro mean when it occurs in the truth or in the predictions. An F1 whose
denominator is zero counts as 0, as scikit-learn's f1_score computes it by default.

Sensor streams label each timestep instead (a stream with role 'label', such as the watch
preset's annotated behaviour, 0 for none). Their sequences are cut into consecutive segments
of `data.window` timesteps, and each segment is one example: its label is the most frequent
label among its timesteps (the smallest on a tie), 'none' for 0 and 'behaviour K' otherwise.
Label 0 is Non-Target, and every other label is Target. A segment with labels on fewer than
half its timesteps, and the shorter remainder at the end of a sequence, are left out and
counted.

The imputer learned the THM/ToF (never the labels) of its training subjects, so imputed
features are closer to the truth for them than for unseen subjects. Only the imputer's test
fold (`data.fold` of the run) scores subjects whose THM/ToF it never saw, so the report marks
that fold as the honest figure and also gives the mean over all folds.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import warnings

import numpy as np
from absl import logging

from imputer import folds
from imputer import impute

SETTINGS = ('imu_only', 'imu_imputed', 'imu_real')
TARGET_TYPE, NON_TARGET_TYPE = 'Target', 'Non-Target'
NON_TARGET_CLASS = 'non_target'
METRICS = ('binary_f1', 'macro_f1', 'score')

STATISTICS = ('mean', 'std', 'min', 'max', 'mean_abs_diff')
# A sensor with more columns than this is a pixel grid, reduced per timestep before the
# statistics so that 5 ToF sensors give 10 channels rather than 320.
MAX_COLUMNS_PER_SENSOR = 8
PIXEL_STATISTICS = ('pixel_mean', 'pixel_min')

# Candidate L2 strengths, for standardised features and the mean loss per sequence.
L2_STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
FALLBACK_L2_STRENGTH = 1e-2
INNER_FOLDS = 4
# With 5000 random rows of 110 correlated standardised features, 18 classes and L2 1e-3,
# 300 steps came within 0.05 % of the loss that 3000 steps reach.
ITERATIONS = 300
MIN_FEATURE_STD = 1e-8  # A feature with a smaller training std is only centred.

# Sequences sent through the imputer at once. The predictions are reduced to features before
# the next chunk, so memory grows with the chunk rather than with the data.
PREDICTION_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class Gestures:
  """The gesture classes in sorted order and the subset that are Target gestures."""

  names: tuple[str, ...]
  targets: frozenset[str]

  def indices(self, gestures) -> np.ndarray:
    position = {name: i for i, name in enumerate(self.names)}
    return np.array([position[gesture] for gesture in gestures], dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Classifier:
  """Logistic regression parameters: weights (F, K) and intercepts (K,), for K classes."""

  weights: np.ndarray
  intercepts: np.ndarray


@dataclasses.dataclass(frozen=True)
class Standardisation:
  """Per-feature training mean (which also fills missing values) and scale."""

  mean: np.ndarray
  scale: np.ndarray


# Labels.


def gesture_classes(sequences, source: str) -> Gestures:
  """Check the gesture and sequence_type of every sequence and return the gesture classes.

  Raises ValueError, naming `source`, when a sequence has no gesture or no sequence_type,
  when a sequence_type is neither 'Target' nor 'Non-Target', or when one gesture has both.
  """
  unlabelled = [seq.sequence_id for seq in sequences if seq.label is None]
  if unlabelled:
    raise ValueError(
        f'{source}: the data has no gesture labels ({len(unlabelled)} of {len(sequences)} '
        f'sequences lack one, the first is {unlabelled[0]!r}); downstream mode trains a gesture '
        'classifier, so give a table with a gesture value for every sequence, such as the CMI '
        'train.csv.')
  untyped = [seq.sequence_id for seq in sequences if seq.sequence_type is None]
  if untyped:
    raise ValueError(
        f'{source}: {len(untyped)} of {len(sequences)} sequences have no sequence_type, the '
        f'first is {untyped[0]!r}, so the binary Target/Non-Target F1 cannot be computed; give a '
        "table with a sequence_type column ('Target' or 'Non-Target') for every sequence.")
  type_of = {}
  for seq in sequences:
    if seq.sequence_type not in (TARGET_TYPE, NON_TARGET_TYPE):
      raise ValueError(
          f'{source}: sequence {seq.sequence_id!r} has the invalid sequence_type '
          f"{seq.sequence_type!r}; use 'Target' or 'Non-Target'.")
    known = type_of.setdefault(seq.label, seq.sequence_type)
    if known != seq.sequence_type:
      raise ValueError(
          f'{source}: the gesture {seq.label!r} is {known!r} in some sequences and '
          f'{seq.sequence_type!r} in sequence {seq.sequence_id!r}; every gesture needs a single '
          'sequence_type, so correct the sequence_type column.')
  targets = frozenset(name for name, kind in type_of.items() if kind == TARGET_TYPE)
  return Gestures(tuple(sorted(type_of)), targets)


def behaviour_segments(sequences, length: int) -> tuple[list, collections.Counter]:
  """Cut sequences with per-timestep labels into labelled segments of `length` timesteps.

  Returns the segments (recordings.Sequence, with label and sequence_type set) and a Counter
  of what was left out, keyed by the reason.
  """
  segments, left_out = [], collections.Counter()
  for seq in sequences:
    if seq.timestep_labels is None:
      left_out['sequences without per-timestep labels'] += 1
      continue
    starts = range(0, seq.length - length + 1, length)
    left_out['timesteps after the last whole segment of a sequence'] += seq.length % length
    for start in starts:
      labels = seq.timestep_labels[start:start + length]
      known = np.round(labels[np.isfinite(labels)]).astype(np.int64)
      if 2 * known.size < length:
        left_out['segments with labels on fewer than half their timesteps'] += 1
        continue
      codes, counts = np.unique(known, return_counts=True)
      code = int(codes[np.argmax(counts)])
      window = slice(start, start + length)
      segments.append(dataclasses.replace(
          seq, sequence_id=f'{seq.sequence_id}@{start}',
          raw={name: values[window] for name, values in seq.raw.items()},
          observed={name: mask[window] for name, mask in seq.observed.items()},
          label='none' if code == 0 else f'behaviour {code}',
          sequence_type=NON_TARGET_TYPE if code == 0 else TARGET_TYPE,
          timestep_labels=labels))
  return segments, +left_out


def examples(recording_set, length: int):
  """Return (recording set of labelled examples, what was left out, the unit's description).

  Sequences with a gesture label are the examples. Without one, sequences with per-timestep
  labels are cut into segments (`behaviour_segments`).
  """
  sequences = recording_set.sequences
  if any(seq.label is not None for seq in sequences) or not any(
      seq.timestep_labels is not None for seq in sequences):
    return recording_set, collections.Counter(), 'sequence'
  segments, left_out = behaviour_segments(sequences, length)
  if not segments:
    raise ValueError(
        f'{recording_set.source}: no labelled segment of {length} timesteps could be cut; '
        f'left out: {dict(left_out)}. Check the label stream, or lower data.window.')
  return (dataclasses.replace(recording_set, sequences=segments), left_out,
          f'segment of {length} timesteps')


# Features.


def _pixel_sensors(group) -> list[int]:
  """Return the indices of the group's sensors with more than MAX_COLUMNS_PER_SENSOR columns."""
  counts = collections.Counter(group.sensor_of_column)
  return [k for k in range(len(group.sensors)) if counts[k] > MAX_COLUMNS_PER_SENSOR]


def channel_names(group) -> list[str]:
  """Return the names of the channels that `group_channels` gives for `group`."""
  pixel_sensors = _pixel_sensors(group)
  names = [column for column, sensor in zip(group.columns, group.sensor_of_column)
           if sensor not in pixel_sensors]
  names += [f'{group.sensors[k]}_{statistic}' for k in pixel_sensors
            for statistic in PIXEL_STATISTICS]
  return names


def group_channels(group, values: np.ndarray) -> np.ndarray:
  """Reduce each pixel sensor of `group` to the mean and min of its pixels per timestep.

  Returns (T, C') channels: the columns of the other sensors, then per pixel sensor the mean
  and minimum over its observed pixels (NaN at a timestep without any).
  """
  sensor_of_column = np.asarray(group.sensor_of_column)
  pixel_sensors = _pixel_sensors(group)
  ordinary_columns = values[:, ~np.isin(sensor_of_column, pixel_sensors)]
  reduced = []
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # Rows without any observed pixel.
    for k in pixel_sensors:
      pixels = values[:, sensor_of_column == k]
      reduced += [np.nanmean(pixels, axis=1), np.nanmin(pixels, axis=1)]
  return np.concatenate([ordinary_columns] + [column[:, None] for column in reduced], axis=1)


def channel_statistics(channels: np.ndarray) -> np.ndarray:
  """Return (C * 5,) statistics of (T, C) channels over time, ignoring NaN.

  Per channel, in order: mean, std (population), min, max, and the mean absolute difference
  between consecutive timesteps where both are observed. A statistic without any value is NaN.
  """
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # Channels without any value.
    statistics = [
        np.nanmean(channels, axis=0), np.nanstd(channels, axis=0),
        np.nanmin(channels, axis=0), np.nanmax(channels, axis=0),
        np.nanmean(np.abs(np.diff(channels, axis=0)), axis=0)]
  return np.stack(statistics, axis=1).reshape(-1)


def feature_names(groups) -> list[str]:
  """Return the names of `sequence_features` for `groups`, in order."""
  return [f'{group.name}/{channel}_{statistic}' for group in groups
          for channel in channel_names(group) for statistic in STATISTICS]


def sequence_features(groups, arrays: dict) -> np.ndarray:
  """Return one sequence's feature vector from its (T, C_raw) arrays per group name."""
  parts = [channel_statistics(group_channels(group, arrays[group.name])) for group in groups]
  return np.concatenate(parts)


def setting_features(sequences, predictions, input_groups, target_groups) -> dict:
  """Return {setting: (N, F) features} for sequences and their imputer predictions."""
  rows = {setting: [] for setting in SETTINGS}
  for seq, prediction in zip(sequences, predictions):
    inputs = sequence_features(input_groups, seq.raw)
    rows['imu_only'].append(inputs)
    rows['imu_imputed'].append(
        np.concatenate([inputs, sequence_features(target_groups, prediction.mean)]))
    rows['imu_real'].append(np.concatenate([inputs, sequence_features(target_groups, seq.raw)]))
  return {setting: np.stack(values) for setting, values in rows.items()}


def impute_and_extract(imputer, recording_set, stride: int | None) -> dict:
  """Fill every sequence's target groups from its inputs alone and return `setting_features`.

  Sequences go through the model in chunks of PREDICTION_CHUNK, reduced to features at once.
  """
  sequences = recording_set.sequences
  parts = []
  for start in range(0, len(sequences), PREDICTION_CHUNK):
    chunk = sequences[start:start + PREDICTION_CHUNK]
    predictions = impute.predict_sequences(imputer, chunk, stride, show_targets=False)
    parts.append(setting_features(chunk, predictions, recording_set.input_groups,
                                  recording_set.target_groups))
    logging.info('Imputed and extracted features for %d of %d sequences.',
                 start + len(chunk), len(sequences))
  return {setting: np.concatenate([part[setting] for part in parts]) for setting in SETTINGS}


# Standardisation and classifier.


def fit_standardisation(features: np.ndarray) -> Standardisation:
  """Fit the per-feature mean (0 for a feature without values) and std of training rows."""
  observed = np.isfinite(features)
  counts = observed.sum(axis=0)
  mean = np.where(observed, features, 0.0).sum(axis=0) / np.maximum(counts, 1)
  filled = np.where(observed, features, mean)
  std = filled.std(axis=0)
  return Standardisation(mean, np.where(std > MIN_FEATURE_STD, std, 1.0))


def standardise(features: np.ndarray, standardisation: Standardisation) -> np.ndarray:
  """Fill missing features with the training mean, then centre and scale them."""
  filled = np.where(np.isfinite(features), features, standardisation.mean)
  return (filled - standardisation.mean) / standardisation.scale


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
  return shifted / shifted.sum(axis=1, keepdims=True)


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
  """Return per-row weights N / (K · n_k) that give each present class the same total."""
  classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  return len(labels) / (len(classes) * counts[inverse].astype(np.float64))


def fit_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int,
                   l2_strength: float, iterations: int = ITERATIONS) -> Classifier:
  """Fit multinomial logistic regression to (N, F) finite features and (N,) class indices.

  Minimises the class-balanced mean cross-entropy plus l2_strength / 2 * |weights|². Each row
  weighs N / (K · n_k), for K classes present and n_k rows of its class, so every class
  counts equally. Rare classes would otherwise never be predicted, which F1 punishes. The
  softmax Hessian is at most 1/2 times the weighted Gram matrix, so
  L = |√w X|₂² / (2N) + l2_strength bounds the curvature (X with a column of ones for the
  intercepts) and 1/L is a safe step.
  """
  features = np.asarray(features, dtype=np.float64)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(
        f'fit_classifier: features of shape {features.shape} and labels of shape '
        f'{labels.shape}; pass (N, F) features and one class index per row.')
  if not np.isfinite(features).all():
    raise ValueError('fit_classifier: some features are not finite; standardise them first, '
                     'which fills missing values.')
  if labels.size == 0:
    raise ValueError('fit_classifier: no training rows; pass at least one labelled row.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
        f'fit_classifier: invalid class indices {labels.min()}..{labels.max()}; they must lie '
        f'in 0..{num_classes - 1}.')
  num_rows, num_features = features.shape
  design = np.hstack([features, np.ones((num_rows, 1))])
  one_hot = np.eye(num_classes)[labels]
  penalty = np.full((num_features + 1, 1), float(l2_strength))
  penalty[-1] = 0.0
  weights = class_balanced_weights(labels)
  curvature = np.linalg.norm(np.sqrt(weights)[:, None] * design, 2) ** 2 / (2.0 * num_rows)
  step = 1.0 / (curvature + l2_strength)

  params = np.zeros((num_features + 1, num_classes))
  previous = params
  for iteration in range(iterations):
    lookahead = params + iteration / (iteration + 3.0) * (params - previous)
    residual = (_softmax(design @ lookahead) - one_hot) * weights[:, None]
    gradient = design.T @ residual / num_rows + penalty * lookahead
    previous, params = params, lookahead - step * gradient
  return Classifier(params[:-1], params[-1])


def predict_classes(classifier: Classifier, features: np.ndarray) -> np.ndarray:
  """Return the class index of the largest logit per row (the lowest index on ties)."""
  return np.argmax(features @ classifier.weights + classifier.intercepts, axis=1)


# Metrics.


def _f1(true_positives: int, false_positives: int, false_negatives: int) -> float:
  denominator = 2 * true_positives + false_positives + false_negatives
  return 2.0 * true_positives / denominator if denominator else 0.0


def binary_f1(truth, predicted) -> float:
  """Return the F1 of the positive (True) class of two boolean sequences; 0 if neither has one."""
  truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
  return _f1(int((truth & predicted).sum()), int((~truth & predicted).sum()),
             int((truth & ~predicted).sum()))


def macro_f1(truth, predicted) -> float:
  """Return the mean one-against-rest F1 over the classes in the truth or the predictions."""
  truth, predicted = np.asarray(truth, dtype=object), np.asarray(predicted, dtype=object)
  classes = sorted(set(truth.tolist()) | set(predicted.tolist()))
  return float(np.mean([binary_f1(truth == name, predicted == name) for name in classes]))


def f1_scores(true_gestures, predicted_gestures, gestures: Gestures) -> dict:
  """Return the competition's binary F1, macro F1 and score (their mean) for gesture names."""
  def collapse(names):
    return [name if name in gestures.targets else NON_TARGET_CLASS for name in names]

  binary = binary_f1([name in gestures.targets for name in true_gestures],
                     [name in gestures.targets for name in predicted_gestures])
  macro = macro_f1(collapse(true_gestures), collapse(predicted_gestures))
  return {'binary_f1': binary, 'macro_f1': macro, 'score': (binary + macro) / 2.0}


# Cross-validation.


def _fit_and_score(features, labels, fit_rows, scored_rows, gestures: Gestures,
                   l2_strength: float) -> dict:
  """Standardise on `fit_rows`, fit there, and return `f1_scores` on `scored_rows`."""
  standardisation = fit_standardisation(features[fit_rows])
  classifier = fit_classifier(standardise(features[fit_rows], standardisation),
                              labels[fit_rows], len(gestures.names), l2_strength)
  predicted = predict_classes(classifier, standardise(features[scored_rows], standardisation))
  return f1_scores([gestures.names[k] for k in labels[scored_rows]],
                   [gestures.names[k] for k in predicted], gestures)


def inner_validation_subjects(train_sequences, seed: int) -> set[str]:
  """Return about one in INNER_FOLDS of the training subjects, or none when there is only one."""
  subjects = {seq.subject for seq in train_sequences}
  if len(subjects) < 2:
    return set()
  assignment = folds.assign_folds(train_sequences, min(INNER_FOLDS, len(subjects)), seed)
  return {subject for subject, fold in assignment.items() if fold == 0}


def choose_l2_strength(features, labels, fit_rows, validation_rows, gestures: Gestures) -> dict:
  """Return the L2 strength with the best validation score, the stronger one on ties.

  The result also lists every candidate's validation score. Without validation rows it is
  FALLBACK_L2_STRENGTH.
  """
  if not validation_rows.any():
    return {'l2_strength': FALLBACK_L2_STRENGTH,
            'chosen_by': 'fallback: a single training subject cannot be split'}
  scores = {strength: _fit_and_score(features, labels, fit_rows, validation_rows, gestures,
                                     strength)['score'] for strength in L2_STRENGTHS}
  best = max(sorted(L2_STRENGTHS, reverse=True), key=scores.__getitem__)
  return {'l2_strength': best, 'chosen_by': 'inner validation score',
          'validation_scores': {f'{strength:g}': score for strength, score in scores.items()}}


def cross_validate(features: np.ndarray, sequences, fold_of_subject: dict, gestures: Gestures,
                   seed: int) -> list[dict]:
  """Hold out each fold's subjects once and return its scores, fold by fold.

  `features` has one row per sequence, NaN where a feature has no value. The L2 strength is
  chosen on `inner_validation_subjects` of the training folds.
  """
  if len(features) != len(sequences):
    raise ValueError(f'cross_validate: {len(features)} feature rows for {len(sequences)} '
                     'sequences; pass one row per sequence, in order.')
  labels = gestures.indices([seq.label for seq in sequences])
  fold_of_row = np.array([fold_of_subject[seq.subject] for seq in sequences])
  results = []
  for fold in sorted(set(fold_of_subject.values())):
    test_rows = fold_of_row == fold
    train_rows = ~test_rows
    train_sequences = [seq for seq, train in zip(sequences, train_rows) if train]
    validation_subjects = inner_validation_subjects(train_sequences, seed)
    validation_rows = train_rows & np.array([seq.subject in validation_subjects
                                             for seq in sequences])
    choice = choose_l2_strength(features, labels, train_rows & ~validation_rows,
                                validation_rows, gestures)
    scores = _fit_and_score(features, labels, train_rows, test_rows, gestures,
                            choice['l2_strength'])
    results.append({
        'fold': fold,
        'test_subjects': len({seq.subject for seq, test in zip(sequences, test_rows) if test}),
        'test_sequences': int(test_rows.sum()), 'train_sequences': int(train_rows.sum()),
        'inner_validation_subjects': len(validation_subjects), **choice, **scores})
  return results


def summarise(fold_results: list[dict], imputer_test_fold: int) -> dict:
  """Return the metrics of the imputer's test fold, their mean over folds and every fold's."""
  test = next(result for result in fold_results if result['fold'] == imputer_test_fold)
  return {'imputer_test_fold': {metric: test[metric] for metric in METRICS},
          'mean_over_folds': {metric: float(np.mean([result[metric] for result in fold_results]))
                              for metric in METRICS},
          'folds': fold_results}


# Report.


def imputer_roles(recording_set, data_config) -> dict[str, str]:
  """Return {subject: 'train', 'validation' or 'test'}, the subject's part in the imputer's run."""
  split = folds.split_subjects(recording_set, data_config.num_folds, data_config.fold,
                               data_config.split_seed)
  roles = {subject: 'train' for subject in split.train}
  roles.update({subject: 'validation' for subject in split.validation})
  roles.update({subject: 'test' for subject in split.test})
  return roles


def describe_folds(recording_set, fold_of_subject: dict, data_config) -> list[dict]:
  """Return per fold its subject and sequence counts and its subjects' part in the imputer's run.

  The training run split its subjects with the same `folds.assign_folds` call, so all subjects
  of a fold share one part.
  """
  roles = imputer_roles(recording_set, data_config)
  table = []
  for fold in range(data_config.num_folds):
    subjects = sorted(subject for subject, k in fold_of_subject.items() if k == fold)
    table.append({
        'fold': fold, 'imputer_role': roles[subjects[0]], 'subjects': len(subjects),
        'sequences': sum(fold_of_subject[seq.subject] == fold
                         for seq in recording_set.sequences)})
  return table


def write_report(report: dict, workdir: str) -> str:
  """Write downstream.json and downstream.md into `workdir` and return the .md path."""
  with open(os.path.join(workdir, 'downstream.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  markdown_path = os.path.join(workdir, 'downstream.md')
  with open(markdown_path, 'w', encoding='utf-8') as f:
    f.write(to_markdown(report))
  return markdown_path


def _format(value: float) -> str:
  return f'{value:.4f}'


def to_markdown(report: dict) -> str:
  """Render the downstream report as markdown."""
  test_fold = report['imputer_test_fold']
  targets = '/'.join(report['target_groups'])
  lines = [
      '# Downstream gesture check', '',
      f"Data: {report['source']}. {report['sequences']} examples (each a {report['unit']}) "
      f"from {report['subjects']} subjects, {report['num_classes']} classes "
      f"({len(report['target_gestures'])} Target), {report['num_folds']} folds of held-out "
      'subjects.', '',
      f"Imputer: {report['workdir']}, step {report['checkpoint']['step']} "
      f"({report['checkpoint']['kind']}), windows every {report['stride']} timesteps, every "
      f'{targets} value hidden from the model.', '',
      f"Sequences without any real {targets} value: {report['sequences_without_real_targets']}. "
      'Setting imu_real gives their target features the training-fold mean, and keeps them.', '',
      f'Fold {test_fold} is the imputer\'s test fold: it never saw those subjects, so its '
      'imu_imputed figures are the honest ones. In the other folds the imputer was trained '
      f'on, or selected on, the test subjects\' {targets}, which flatters imu_imputed.', '',
      f'| setting | binary F1 (fold {test_fold}) | macro F1 (fold {test_fold}) | '
      f'score (fold {test_fold}) '
      '| binary F1 (mean) | macro F1 (mean) | score (mean) |',
      '|---|---|---|---|---|---|---|']
  for setting in SETTINGS:
    result = report['settings'][setting]
    cells = [_format(result[part][metric]) for part in ('imputer_test_fold', 'mean_over_folds')
             for metric in METRICS]
    lines.append(f"| {setting} | {' | '.join(cells)} |")
  if report.get('left_out_examples'):
    lines += ['', 'Left out when cutting segments: ' + ', '.join(
        f'{count} x {reason}' for reason, count in report['left_out_examples'].items()) + '.']
  lines += [
      '', '## Per fold', '',
      '| fold | imputer role | test subjects | test examples | setting | L2 strength | '
      'binary F1 | macro F1 | score |',
      '|---|---|---|---|---|---|---|---|---|']
  for fold in report['folds']:
    for setting in SETTINGS:
      result = next(result for result in report['settings'][setting]['folds']
                    if result['fold'] == fold['fold'])
      lines.append(
          f"| {fold['fold']} | {fold['imputer_role']} | {fold['subjects']} | "
          f"{fold['sequences']} | {setting} | {result['l2_strength']:g} | "
          f"{' | '.join(_format(result[metric]) for metric in METRICS)} |")
  filled = ', '.join(f'{setting} {count}'
                     for setting, count in report['feature_values_without_data'].items())
  lines += [
      '', '## Method', '',
      f"* Features ({', '.join(f'{s} {n}' for s, n in report['feature_counts'].items())}): per raw "
      'channel the mean, std, min, max and mean absolute first difference over time, ignoring '
      'missing values, with each ToF sensor first reduced to its pixel mean and min per '
      'timestep; missing features get the training-fold mean, and all are standardised on the '
      'training fold.',
      '* Classifier: multinomial logistic regression with an L2 penalty, fitted by full-batch '
      'gradient descent for a fixed number of steps, with the strength chosen from '
      f"{', '.join(f'{s:g}' for s in L2_STRENGTHS)} on an inner validation split of the "
      'training subjects.', '',
      f'Feature values without data (given the training-fold mean): {filled}.']
  if report['read_as_missing']:
    lines += ['', 'Read as missing by the data source: ' + ', '.join(
        f'{reason}: {count}' for reason, count in report['read_as_missing'].items()) + '.']
  return '\n'.join(lines) + '\n'


def run(workdir: str, stride: int | None) -> str:
  """Cross-validate the three settings on the run's data; write downstream.json and .md.

  Returns the path of downstream.md.
  """
  config = impute.read_workdir_config(workdir)
  data = config.data
  loaded = impute.load_workdir_data(workdir, config)
  recording_set, left_out, unit = examples(loaded, data.window)
  sequences = recording_set.sequences
  gestures = gesture_classes(sequences, recording_set.source)
  imputer = impute.load_imputer(workdir, recording_set)
  features = impute_and_extract(imputer, recording_set, stride)

  fold_of_subject = folds.assign_folds(sequences, data.num_folds, data.split_seed)
  settings = {}
  for setting in SETTINGS:
    logging.info('Cross-validating %s on %d features.', setting, features[setting].shape[1])
    results = cross_validate(features[setting], sequences, fold_of_subject, gestures,
                             data.split_seed)
    settings[setting] = summarise(results, data.fold)

  report = {
      'source': recording_set.source, 'workdir': workdir, 'checkpoint': imputer.checkpoint,
      'stride': stride or max(imputer.window // 2, 1),
      'unit': unit, 'left_out_examples': dict(left_out),
      'sequences': len(sequences), 'subjects': len(recording_set.subjects),
      'num_classes': len(gestures.names), 'classes': list(gestures.names),
      'target_gestures': sorted(gestures.targets), 'num_folds': data.num_folds,
      'imputer_test_fold': data.fold, 'target_groups': list(recording_set.target_names),
      'sequences_without_real_targets': sum(
          not seq.has_target_truth(recording_set.target_names) for seq in sequences),
      'feature_counts': {setting: int(values.shape[1]) for setting, values in features.items()},
      'feature_values_without_data': {
          setting: int(np.isnan(values).sum()) for setting, values in features.items()},
      'read_as_missing': dict(recording_set.excluded),
      'folds': describe_folds(recording_set, fold_of_subject, data), 'settings': settings}
  for setting in SETTINGS:
    logging.info('%s: score %.4f on fold %d (the imputer\'s test fold), %.4f over folds.',
                 setting, settings[setting]['imputer_test_fold']['score'], data.fold,
                 settings[setting]['mean_over_folds']['score'])
  return write_report(report, workdir)
