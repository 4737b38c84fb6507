"""Subject-grouped folds: no subject in two splits, labels spread across folds."""

import collections

import pytest

from imputer import folds

from tests import helpers


def test_splits_share_no_subject_in_any_fold():
  recording_set = helpers.make_recording_set(subjects=10)
  for fold in range(5):
    split = folds.split_subjects(recording_set, 5, fold, seed=3)
    parts = [set(split.train), set(split.validation), set(split.test)]
    assert not parts[0] & parts[1]
    assert not parts[0] & parts[2]
    assert not parts[1] & parts[2]
    assert set.union(*parts) == set(recording_set.subjects)
    assert len(split.test) == 2
    assert len(split.validation) == 2


def test_test_folds_partition_subjects():
  recording_set = helpers.make_recording_set(subjects=7)
  tests = [folds.split_subjects(recording_set, 3, k, seed=0).test for k in range(3)]
  flat = [s for t in tests for s in t]
  assert sorted(flat) == recording_set.subjects


def test_labels_are_stratified_across_folds():
  recording_set = helpers.make_recording_set(subjects=8, per_subject=4)
  # Subjects 0-3 only have label 'a', subjects 4-7 only 'b'.
  for seq in recording_set.sequences:
    seq.label = 'a' if int(seq.subject.split('_')[1]) < 4 else 'b'
  assignment = folds.assign_folds(recording_set.sequences, 4, seed=0)
  per_fold = collections.defaultdict(collections.Counter)
  for seq in recording_set.sequences:
    per_fold[assignment[seq.subject]][seq.label] += 1
  for counts in per_fold.values():
    assert counts['a'] == 4
    assert counts['b'] == 4


def test_too_few_subjects_is_an_error():
  recording_set = helpers.make_recording_set(subjects=2)
  with pytest.raises(ValueError, match='num_folds'):
    folds.split_subjects(recording_set, 3, 0, seed=0)


def test_fold_out_of_range_is_an_error():
  recording_set = helpers.make_recording_set(subjects=6)
  with pytest.raises(ValueError, match='data.fold=5'):
    folds.split_subjects(recording_set, 5, 5, seed=0)
