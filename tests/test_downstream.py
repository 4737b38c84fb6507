"""Downstream gesture check: F1 metrics, features, classifier, folds and the end-to-end run."""

import json
import os
import re
import shutil

import numpy as np
import polars as pl
import pytest

from imputer import cmi
from imputer import downstream
from imputer import recordings

GESTURES = downstream.Gestures(('drink', 'pull', 'scratch', 'wave'),
                               frozenset({'pull', 'scratch'}))


def labelled_sequence(sequence_id, subject, label, sequence_type):
  return recordings.Sequence(sequence_id, subject, {}, {}, label, sequence_type)


def blob_data(num_subjects, per_subject, seed):
  """Return (features, sequences) where each gesture's features form a tight, distant cluster."""
  rng = np.random.default_rng(seed)
  centres = 10.0 * np.eye(len(GESTURES.names), 6)
  rows, sequences = [], []
  for s in range(num_subjects):
    for k in range(per_subject):
      label = GESTURES.names[(s + k) % len(GESTURES.names)]
      kind = 'Target' if label in GESTURES.targets else 'Non-Target'
      sequences.append(labelled_sequence(f'S{s}_{k}', f'subject_{s}', label, kind))
      rows.append(centres[GESTURES.names.index(label)] + rng.normal(scale=0.5, size=6))
  return np.stack(rows), sequences


# Metrics.


def test_binary_f1_matches_hand_count():
  truth = [True, True, False, False, True]
  predicted = [True, False, True, False, True]
  # TP 2, FP 1, FN 1: F1 = 2 * 2 / (2 * 2 + 1 + 1).
  assert downstream.binary_f1(truth, predicted) == pytest.approx(4 / 6)


def test_binary_f1_without_positives_is_zero():
  assert downstream.binary_f1([False, False], [False, False]) == 0.0


def test_macro_f1_matches_hand_count():
  truth = ['a', 'a', 'b', 'c']
  predicted = ['a', 'b', 'b', 'd']
  # a: TP 1, FN 1 -> 2/3. b: TP 1, FP 1 -> 2/3. c: FN 1 -> 0. d: FP 1 -> 0.
  assert downstream.macro_f1(truth, predicted) == pytest.approx((2 / 3 + 2 / 3) / 4)


def test_f1_scores_merge_non_target_gestures():
  truth = ['pull', 'scratch', 'drink', 'wave', 'pull']
  predicted = ['pull', 'pull', 'wave', 'drink', 'drink']
  scores = downstream.f1_scores(truth, predicted, GESTURES)
  # Binary: Target truth 1,1,0,0,1 and predictions 1,1,0,0,0 give TP 2, FN 1 -> 0.8.
  assert scores['binary_f1'] == pytest.approx(0.8)
  # Merged: pull TP 1, FP 1, FN 1 -> 0.5; scratch FN 1 -> 0; non_target TP 2, FP 1 -> 0.8.
  assert scores['macro_f1'] == pytest.approx((0.5 + 0.0 + 0.8) / 3)
  assert scores['score'] == pytest.approx((0.8 + 1.3 / 3) / 2)


# Labels.


def test_gesture_classes_sorts_and_marks_targets():
  sequences = [labelled_sequence('1', 's', 'wave', 'Non-Target'),
               labelled_sequence('2', 's', 'pull', 'Target'),
               labelled_sequence('3', 's', 'drink', 'Non-Target'),
               labelled_sequence('4', 's', 'pull', 'Target')]
  gestures = downstream.gesture_classes(sequences, 'test data')
  assert gestures.names == ('drink', 'pull', 'wave')
  assert gestures.targets == frozenset({'pull'})
  np.testing.assert_array_equal(gestures.indices(['wave', 'drink', 'pull']), [2, 0, 1])


@pytest.mark.parametrize('label, kind, message', [
    (None, 'Target', 'test data: the data has no gesture labels'),
    ('pull', None, 'no sequence_type'),
    ('pull', 'target', "invalid sequence_type 'target'"),
    ('pull', 'Non-Target', "'pull' is 'Target' in some sequences"),
])
def test_gesture_classes_rejects_bad_labels(label, kind, message):
  sequences = [labelled_sequence('1', 's', 'pull', 'Target'),
               labelled_sequence('2', 's', label, kind)]
  with pytest.raises(ValueError, match=message):
    downstream.gesture_classes(sequences, 'test data')


# Features.


def pixel_group():
  """Two ordinary columns of sensor 'a' and a 3x4 pixel grid from sensor 'grid'."""
  columns = ('a1', 'a2') + tuple(f'p{i}' for i in range(12))
  return recordings.GroupSpec('g', columns, ('a', 'grid'), (0, 0) + (1,) * 12)


def expected_statistics(channel):
  observed = channel[~np.isnan(channel)]
  pairs = ~np.isnan(channel[1:]) & ~np.isnan(channel[:-1])
  steps = np.abs(channel[1:] - channel[:-1])[pairs]
  return [observed.mean(), observed.std(), observed.min(), observed.max(), steps.mean()]


def test_sequence_features_match_numpy():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(9, 14))
  values[2, 0] = np.nan
  values[5, 1] = np.nan
  values[4, 2:] = np.nan  # No pixel at timestep 4.
  values[7, 3:8] = np.nan
  group = pixel_group()

  features = downstream.sequence_features((group,), {'g': values})

  pixels = values[:, 2:]
  pixel_mean = np.array([row[~np.isnan(row)].mean() if (~np.isnan(row)).any() else np.nan
                         for row in pixels])
  pixel_min = np.array([row[~np.isnan(row)].min() if (~np.isnan(row)).any() else np.nan
                        for row in pixels])
  channels = [values[:, 0], values[:, 1], pixel_mean, pixel_min]
  expected = np.concatenate([expected_statistics(channel) for channel in channels])
  np.testing.assert_allclose(features, expected, rtol=1e-12)
  assert downstream.feature_names((group,))[:5] == [
      'g/a1_mean', 'g/a1_std', 'g/a1_min', 'g/a1_max', 'g/a1_mean_abs_diff']
  assert downstream.feature_names((group,))[-1] == 'g/grid_pixel_min_mean_abs_diff'


def test_channel_without_values_gives_nan():
  values = np.full((5, 2), np.nan)
  values[:, 0] = [1.0, 3.0, np.nan, 4.0, 0.0]
  features = downstream.channel_statistics(values)
  np.testing.assert_allclose(features[:5], expected_statistics(values[:, 0]))
  assert np.isnan(features[5:]).all()


def test_cmi_features_reduce_tof_per_sensor():
  input_groups, target_groups = cmi.cmi_groups()
  names = downstream.feature_names(input_groups + target_groups)
  # IMU 7 columns, THM 5 columns, ToF 5 sensors x (pixel mean, pixel min), 5 statistics each.
  assert len(names) == (7 + 5 + 10) * 5
  assert 'tof/tof_3_pixel_min_max' in names
  rng = np.random.default_rng(1)
  arrays = {group.name: rng.normal(size=(12, len(group.columns)))
            for group in input_groups + target_groups}
  features = downstream.sequence_features(input_groups + target_groups, arrays)
  assert features.shape == (len(names),)
  tof_sensor_2 = arrays['tof'][:, 64:128]
  start = names.index('tof/tof_2_pixel_mean_mean')
  assert features[start] == pytest.approx(tof_sensor_2.mean())
  assert features[start + 5 + 2] == pytest.approx(tof_sensor_2.min(axis=1).min())


# Standardisation and classifier.


def test_standardise_fills_with_training_mean():
  train = np.array([[1.0, np.nan, 5.0], [3.0, np.nan, 5.0], [np.nan, np.nan, 5.0]])
  standardisation = downstream.fit_standardisation(train)
  np.testing.assert_allclose(standardisation.mean, [2.0, 0.0, 5.0])
  scaled = downstream.standardise(train, standardisation)
  filled_std = np.std([1.0, 3.0, 2.0])
  np.testing.assert_allclose(scaled[:, 0], np.array([-1.0, 1.0, 0.0]) / filled_std)
  np.testing.assert_allclose(scaled[:, 1:], 0.0)
  other = downstream.standardise(np.array([[np.nan, 7.0, 6.0]]), standardisation)
  np.testing.assert_allclose(other, [[0.0, 7.0, 1.0]])


def test_classifier_separates_blobs():
  features, sequences = blob_data(num_subjects=4, per_subject=8, seed=0)
  labels = GESTURES.indices([seq.label for seq in sequences])
  classifier = downstream.fit_classifier(features[:24], labels[:24], 4, l2_strength=1e-3)
  np.testing.assert_array_equal(downstream.predict_classes(classifier, features[24:]),
                                labels[24:])


def test_classifier_reaches_penalised_optimum():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(80, 5))
  labels = rng.integers(0, 3, size=80)
  l2_strength = 0.5
  classifier = downstream.fit_classifier(features, labels, 3, l2_strength)
  logits = features @ classifier.weights + classifier.intercepts
  probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  # Class-balanced rows: each weighs 80 / (3 * rows of its class).
  counts = np.bincount(labels, minlength=3)
  row_weights = 80 / (3 * counts[labels])
  residual = (probabilities - np.eye(3)[labels]) * row_weights[:, None]
  weight_gradient = features.T @ residual / 80 + l2_strength * classifier.weights
  intercept_gradient = residual.mean(axis=0)
  assert np.abs(weight_gradient).max() < 1e-6
  assert np.abs(intercept_gradient).max() < 1e-6


def test_class_balanced_weights_by_hand():
  weights = downstream.class_balanced_weights(np.array([0, 0, 0, 1, 2, 2]))
  np.testing.assert_allclose(weights, [6 / 9, 6 / 9, 6 / 9, 2.0, 1.0, 1.0])


def test_classifier_rejects_missing_features():
  with pytest.raises(ValueError, match='not finite'):
    downstream.fit_classifier(np.array([[np.nan], [1.0]]), np.array([0, 1]), 2, 1.0)


# Cross-validation.


def test_inner_validation_holds_out_some_training_subjects():
  _, sequences = blob_data(num_subjects=6, per_subject=2, seed=0)
  held_out = downstream.inner_validation_subjects(sequences, seed=0)
  subjects = {seq.subject for seq in sequences}
  assert held_out < subjects
  assert len(held_out) >= 1
  assert downstream.inner_validation_subjects(sequences[:2], seed=0) == set()


def test_cross_validate_scores_separable_folds():
  features, sequences = blob_data(num_subjects=6, per_subject=8, seed=1)
  fold_of_subject = {f'subject_{s}': s % 3 for s in range(6)}
  results = downstream.cross_validate(features, sequences, fold_of_subject, GESTURES, seed=0)
  assert [result['fold'] for result in results] == [0, 1, 2]
  assert sum(result['test_sequences'] for result in results) == len(sequences)
  for result in results:
    assert result['test_subjects'] == 2
    assert result['train_sequences'] == 32
    assert result['score'] == pytest.approx(1.0)
    # Every strength separates the blobs, so the tie goes to the strongest penalty.
    assert result['chosen_by'] == 'inner validation score'
    assert result['l2_strength'] == max(downstream.L2_STRENGTHS)


def test_cross_validate_uses_fallback_for_one_training_subject():
  features, sequences = blob_data(num_subjects=2, per_subject=8, seed=2)
  fold_of_subject = {'subject_0': 0, 'subject_1': 1}
  results = downstream.cross_validate(features, sequences, fold_of_subject, GESTURES, seed=0)
  for result in results:
    assert result['l2_strength'] == downstream.FALLBACK_L2_STRENGTH
    assert result['chosen_by'].startswith('fallback')


# End to end.


def copy_workdir(trained_cmi_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_cmi_run.workdir, workdir)
  return str(workdir)


def test_run_writes_three_settings(trained_cmi_run, tmp_path):
  workdir = copy_workdir(trained_cmi_run, tmp_path)
  path = downstream.run(workdir, stride=None)
  assert path == os.path.join(workdir, 'downstream.md')
  with open(os.path.join(workdir, 'downstream.json'), encoding='utf-8') as f:
    report = json.load(f)

  frame = trained_cmi_run.frame
  target_columns = [c for c in frame.columns if c.startswith(('thm_', 'tof_'))]
  without_targets = frame.group_by('sequence_id').agg(
      pl.all_horizontal(pl.col(target_columns).is_null()).all().alias('empty'))
  expected_without = int(without_targets['empty'].sum())
  assert expected_without > 0
  assert report['sequences'] == frame['sequence_id'].n_unique()
  assert report['sequences_without_real_targets'] == expected_without
  assert report['num_classes'] == frame['gesture'].n_unique()
  assert report['num_folds'] == trained_cmi_run.config.data.num_folds
  assert report['imputer_test_fold'] == trained_cmi_run.config.data.fold
  roles = {fold['fold']: fold['imputer_role'] for fold in report['folds']}
  assert roles[trained_cmi_run.config.data.fold] == 'test'
  assert sorted(roles.values()) == ['test', 'train', 'validation']
  assert report['feature_counts'] == {'imu_only': 35, 'imu_imputed': 110, 'imu_real': 110}
  assert report['feature_values_without_data']['imu_real'] >= 75 * expected_without
  assert report['feature_values_without_data']['imu_imputed'] == 0

  assert set(report['settings']) == {'imu_only', 'imu_imputed', 'imu_real'}
  for setting in report['settings'].values():
    assert len(setting['folds']) == report['num_folds']
    for part in ('imputer_test_fold', 'mean_over_folds'):
      for metric in ('binary_f1', 'macro_f1', 'score'):
        assert 0.0 <= setting[part][metric] <= 1.0
    mean_score = np.mean([fold['score'] for fold in setting['folds']])
    assert setting['mean_over_folds']['score'] == pytest.approx(mean_score)

  with open(path, encoding='utf-8') as f:
    markdown = f.read()
  for setting in ('imu_only', 'imu_imputed', 'imu_real'):
    assert f'| {setting} |' in markdown
  assert f'Sequences without any real thm/tof value: {expected_without}.' in markdown


@pytest.mark.parametrize('column, message', [
    ('gesture', 'the data has no gesture labels'),
    ('sequence_type', 'no sequence_type'),
])
def test_run_rejects_data_without_labels(trained_cmi_run, tmp_path, column, message):
  csv = tmp_path / 'unlabelled.csv'
  trained_cmi_run.frame.drop(column).write_csv(csv)
  with open(os.path.join(trained_cmi_run.workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  config['data']['path'] = str(csv)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(config), encoding='utf-8')
  with pytest.raises(ValueError, match=re.escape(f'CMI file {csv}: ') + '.*' + message):
    downstream.run(str(workdir), stride=None)


def test_behaviour_segments_take_the_majority_label():
  labels = np.array([0, 2, 2, 2, 2, np.nan, np.nan, np.nan, 1, 1, 3, 3, 0])
  raw = {'acc': np.arange(13.0)[:, None]}
  sequence = recordings.Sequence('rec/0', 'p1', raw, {'acc': np.ones((13, 1), bool)},
                                 timestep_labels=labels)
  segments, left_out = downstream.behaviour_segments([sequence], 4)
  # Segments start at 0, 4 and 8. The second has one label in four timesteps, the third ties
  # 1 and 3 (the smaller wins), and the last
  # timestep does not fill a segment.
  assert [s.sequence_id for s in segments] == ['rec/0@0', 'rec/0@8']
  assert [s.label for s in segments] == ['behaviour 2', 'behaviour 1']
  assert [s.sequence_type for s in segments] == ['Target', 'Target']
  np.testing.assert_array_equal(segments[1].raw['acc'][:, 0], [8, 9, 10, 11])
  assert left_out == {'segments with labels on fewer than half their timesteps': 1,
                      'timesteps after the last whole segment of a sequence': 1}
  quiet = recordings.Sequence('rec/1', 'p1', raw, {'acc': np.ones((13, 1), bool)},
                              timestep_labels=np.zeros(13))
  segments, _ = downstream.behaviour_segments([quiet], 4)
  assert {s.label for s in segments} == {'none'}
  assert {s.sequence_type for s in segments} == {'Non-Target'}
