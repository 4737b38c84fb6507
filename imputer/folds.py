"""Subject-grouped folds, stratified by gesture when the recordings carry labels.

Every subject lands in exactly one fold, so no subject is ever both trained on and
evaluated. Fold `fold` is the test fold whose figures the report gives, fold `fold + 1` picks
the best checkpoint, and the remaining folds are trained on.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from imputer import recordings


@dataclasses.dataclass(frozen=True)
class Split:
  train: tuple[str, ...]
  validation: tuple[str, ...]
  test: tuple[str, ...]


def _label_counts(sequences, subjects, labels) -> np.ndarray:
  """Return a (subjects, labels + 1) count matrix; the last column counts sequences."""
  row = {s: i for i, s in enumerate(subjects)}
  column = {label: j for j, label in enumerate(labels)}
  counts = np.zeros((len(subjects), len(labels) + 1))
  for seq in sequences:
    if seq.label is not None:
      counts[row[seq.subject], column[seq.label]] += 1
    counts[row[seq.subject], -1] += 1
  return counts


def assign_folds(sequences, num_folds: int, seed: int) -> dict[str, int]:
  """Assign each subject to a fold, balancing label proportions and fold sizes.

  Subjects are placed largest first (ties broken by a seeded shuffle), so fold sizes differ
  by at most one subject. Each subject goes to the fold, among those with the fewest
  subjects, whose label distribution with it added stays closest to the overall one. With no
  labels the fold with the fewest sequences wins.
  """
  subjects = sorted({seq.subject for seq in sequences})
  if len(subjects) < num_folds:
    raise ValueError(
        f'data.num_folds={num_folds} needs at least that many subjects, but the data has '
        f'{len(subjects)} ({", ".join(subjects)}); lower data.num_folds.')
  labels = sorted({seq.label for seq in sequences if seq.label is not None})
  counts = _label_counts(sequences, subjects, labels)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(subjects))
  order = order[np.argsort(-counts[order, -1], kind='stable')]
  overall = counts[:, :-1].sum(0) / max(counts[:, :-1].sum(), 1.0)
  fold_counts = np.zeros((num_folds, counts.shape[1]))
  fold_subjects = np.zeros(num_folds, int)
  assignment = {}
  for i in order:
    # Among the folds with the fewest subjects, take the one whose label distribution stays
    # closest to the overall one, then the one with the fewest sequences.
    candidates = np.flatnonzero(fold_subjects == fold_subjects.min())

    def cost(k):
      trial = fold_counts[k] + counts[i]
      share = trial[:-1] / max(trial[:-1].sum(), 1.0)
      return (float(np.abs(share - overall).sum()) if labels else 0.0, trial[-1])

    best = min(candidates, key=cost)
    fold_counts[best] += counts[i]
    fold_subjects[best] += 1
    assignment[subjects[i]] = int(best)
  return assignment


def split_subjects(recording_set: recordings.RecordingSet, num_folds: int, fold: int,
                   seed: int) -> Split:
  """Return the train, validation and test subjects for `fold`."""
  if num_folds < 3:
    raise ValueError(
        f'data.num_folds={num_folds}: at least 3 folds are needed (test, validation and '
        'training subjects); set data.num_folds to 3 or more.')
  if not 0 <= fold < num_folds:
    raise ValueError(f'data.fold={fold} is outside 0..{num_folds - 1}; pick a fold in range.')
  assignment = assign_folds(recording_set.sequences, num_folds, seed)
  by_fold = collections.defaultdict(list)
  for subject, k in assignment.items():
    by_fold[k].append(subject)
  validation_fold = (fold + 1) % num_folds
  train = [s for k, group in by_fold.items() if k not in (fold, validation_fold) for s in group]
  return Split(tuple(sorted(train)), tuple(sorted(by_fold[validation_fold])),
               tuple(sorted(by_fold[fold])))
