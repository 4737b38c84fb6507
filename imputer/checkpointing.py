"""Orbax checkpoints of the training state together with the run's scaling statistics.

Two managers share the workdir. `checkpoints/` keeps the latest periodic checkpoints and the
final one, and training resumes from it. `checkpoints_best/` keeps the single checkpoint with
the lowest validation loss, which the evaluation report uses.

A restore first compares the saved state tree (read from the checkpoint's metadata, without
loading any array) with the restore target. A checkpoint with another tree is a
`CheckpointMismatchError` that lists every differing entry, unless the caller asks for a
partial restore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

# A leaf's (shape, dtype name), as saved or as the restore target expects it.
LeafSpec = tuple[tuple[int, ...], str]

# train_and_evaluate writes run.json before it restores, so after this error the workdir
# records restore_partial as off, and run_config.check_resume rejects switching it on there.
RESUME_ADVICE = (
    'The run that wrote it had another model config (for example model.hidden_dim), or an '
    'older version of imputer built the model differently. Resume with that config, or use '
    'a new --workdir. To start from the entries that match instead, with the others at their '
    'initial values, copy the checkpoints/ folder of this workdir into a new --workdir and '
    'launch there with --config.restore_partial=True. This workdir records restore_partial '
    'as off, and a resume may not change it.')


def _options(directory: str, **kwargs) -> ocp.CheckpointManagerOptions:
  """Return manager options whose cross-process barriers are named after `directory`.

  With several processes, orbax names the barrier of a save after its step alone. The latest
  and the best manager both save the final step, as do a study group and its members, and
  with the same names their barriers would clash ("Barrier _async_write_complete.N is already
  ongoing"). The name comes from the last three parts of the path, which every process
  shares even where hosts mount the workdir under different roots.
  """
  tail = os.path.join(*os.path.abspath(directory).split(os.sep)[-3:])
  prefix = hashlib.sha256(tail.encode()).hexdigest()[:16]
  return ocp.CheckpointManagerOptions(
      create=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=prefix), **kwargs)


@dataclasses.dataclass(frozen=True)
class TreeMismatch:
  """The entries, by path, in which a saved state tree and a restore target differ."""

  only_saved: dict[str, LeafSpec]
  only_expected: dict[str, LeafSpec]
  differing: dict[str, tuple[LeafSpec, LeafSpec]]  # Path -> (saved, expected).

  def __bool__(self) -> bool:
    return bool(self.only_saved or self.only_expected or self.differing)

  def not_restored(self) -> list[str]:
    """Return the target's paths that a partial restore leaves at their fallback values."""
    return sorted([*self.only_expected, *self.differing])

  def describe(self) -> str:
    """Return one line per differing entry, grouped by kind, with shapes and dtypes."""
    lines = []
    if self.only_saved:
      lines.append(f'  only in the checkpoint ({len(self.only_saved)}):')
      lines += [f'    {path}: saved {_format(spec)}' for path, spec in self.only_saved.items()]
    if self.only_expected:
      lines.append(f'  only in the model ({len(self.only_expected)}):')
      lines += [f'    {path}: expected {_format(spec)}'
                for path, spec in self.only_expected.items()]
    if self.differing:
      lines.append(f'  shape or dtype differs ({len(self.differing)}):')
      lines += [f'    {path}: saved {_format(saved)}, expected {_format(expected)}'
                for path, (saved, expected) in self.differing.items()]
    return '\n'.join(lines)


class CheckpointMismatchError(ValueError):
  """A checkpoint whose state tree differs from the tree that the restore expects."""

  def __init__(self, directory: str, step: int, mismatch: TreeMismatch, advice: str):
    self.directory, self.step, self.mismatch = directory, step, mismatch
    super().__init__(f'{self.summary()}\n{advice}')

  def summary(self) -> str:
    """Return the message without its advice: the checkpoint and the differing entries."""
    return (f'checkpoint {self.directory} step {self.step} does not match the model: its '
            f'state tree differs in these entries\n{self.mismatch.describe()}')


class Checkpoints:
  """Periodic and best-by-validation checkpoint managers for one workdir."""

  def __init__(self, workdir: str, max_to_keep: int):
    root = os.path.abspath(workdir)
    # Whether the last restore took only the matching entries of a differing tree.
    self.restored_partially = False
    latest, best = os.path.join(root, 'checkpoints'), os.path.join(root, 'checkpoints_best')
    self.latest = ocp.CheckpointManager(latest, options=_options(latest, max_to_keep=max_to_keep))
    self.best = ocp.CheckpointManager(
        best, options=_options(best, max_to_keep=1, best_fn=lambda m: m['val_loss'],
                               best_mode='min'))

  @staticmethod
  def _save_args(state, scalers_json):
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state_tree(state)),
        scalers=ocp.args.JsonSave(scalers_json))

  def save(self, step: int, state, scalers_json: dict) -> None:
    self.latest.save(step, args=self._save_args(state, scalers_json))

  def save_best(self, step: int, state, scalers_json: dict, val_loss: float) -> None:
    self.best.save(step, args=self._save_args(state, scalers_json),
                   metrics={'val_loss': float(val_loss)})

  def best_val_loss(self) -> float | None:
    """Return the lowest validation loss saved so far, or None before the first one."""
    step = self.best.best_step()
    if step is None:
      return None
    metrics = self.best.metrics(step)
    return None if not metrics else float(metrics['val_loss'])

  def _restore(self, manager, step, abstract_state, partial, fallback):
    self.restored_partially = False
    directory = str(manager.directory)
    target = state_tree(abstract_state)
    with _reader(directory) as reader:
      saved_tree = _saved_state_tree(reader, directory, step)
      mismatch = compare_trees(saved_tree, target)
      if mismatch and partial:
        state, scalers_json = _restore_partial(reader, step, saved_tree, abstract_state,
                                               fallback, mismatch)
    if not mismatch:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), scalers=ocp.args.JsonRestore()))
      return type(abstract_state)(**restored['state']), restored['scalers']
    if not partial:
      raise CheckpointMismatchError(directory, step, mismatch, RESUME_ADVICE)
    self.restored_partially = True
    logging.warning(
        'Partial restore of checkpoint %s step %d: %d entries of the model (only in the model, '
        'or with another shape or dtype) were not restored and keep their initial values, '
        'and the entries only in the checkpoint were ignored:\n%s', directory, step,
        len(mismatch.not_restored()), mismatch.describe())
    return state, scalers_json

  def restore_latest(self, abstract_state, *, partial: bool = False, fallback=None):
    """Return (state, scalers json) of the latest checkpoint, or None when there is none.

    Raises CheckpointMismatchError when the saved state tree differs from `abstract_state`'s.
    With `partial`, the entries present in both with equal shape and dtype are restored, the
    others take their values from `fallback` (a concrete state with the tree of
    `abstract_state`, usually the freshly initialised one), and a warning lists them.
    """
    step = self.latest.latest_step()
    if step is None:
      return None
    return self._restore(self.latest, step, abstract_state, partial, fallback)

  def restore_best(self, abstract_state, *, partial: bool = False, fallback=None):
    """Return (state, scalers json) of the best checkpoint, or None; see `restore_latest`."""
    step = self.best.best_step()
    if step is None:
      return None
    return self._restore(self.best, step, abstract_state, partial, fallback)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def state_tree(state) -> dict:
  """Return the fields of a train state dataclass as a dict, leaving out those that are None.

  A run without the contrastive loss has no momentum encoder or queue. Leaving those fields
  out keeps its checkpoints identical in layout to those written before the fields existed,
  so older workdirs still resume and re-evaluate.
  """
  return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
          if getattr(state, field.name) is not None}


def abstract_like(state):
  """Return a ShapeDtypeStruct tree with the shardings of `state`, as restore targets."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def path_name(path) -> str:
  """Return a key path as 'params/encoder/Dense_0/kernel': dict keys, attributes, indices."""
  parts = []
  for entry in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
    else:
      parts.append(str(entry))
  return '/'.join(parts)


def leaves_by_path(tree) -> dict:
  """Return {path name: leaf} of `tree`, in the tree's order."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _dtype_name(dtype) -> str:
  try:
    return str(np.dtype(dtype))
  except TypeError:  # Dtypes that numpy does not know, such as JAX's PRNG key types.
    return str(dtype)


def leaf_spec(leaf) -> LeafSpec:
  """Return (shape, dtype name) of an array, a ShapeDtypeStruct or an orbax ArrayMetadata."""
  if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
    return tuple(leaf.shape), _dtype_name(leaf.dtype)
  value = np.asarray(leaf)
  return value.shape, _dtype_name(value.dtype)


def _format(spec: LeafSpec) -> str:
  shape, dtype = spec
  return f'{shape} {dtype}'


def compare_trees(saved_tree, expected_tree) -> TreeMismatch:
  """Return the entries in which two trees differ, by leaf path, shape and dtype.

  A namedtuple field and a dict key with the same name count as the same path, because orbax
  saves namedtuples as dicts.
  """
  saved = {path: leaf_spec(leaf) for path, leaf in leaves_by_path(saved_tree).items()}
  expected = {path: leaf_spec(leaf) for path, leaf in leaves_by_path(expected_tree).items()}
  return TreeMismatch(
      only_saved={path: spec for path, spec in saved.items() if path not in expected},
      only_expected={path: spec for path, spec in expected.items() if path not in saved},
      differing={path: (saved[path], spec) for path, spec in expected.items()
                 if path in saved and saved[path] != spec})


def _reader(directory: str) -> ocp.CheckpointManager:
  """Open `directory` read-only with the item handlers registered, which `item_metadata`
  needs, and with the PyTree handler, whose restore can skip leaves (`ocp.PLACEHOLDER`)."""
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'scalers': ocp.JsonCheckpointHandler()})


def _saved_state_tree(reader, directory: str, step: int):
  """Return the saved state tree of `step` with orbax ArrayMetadata leaves (no array data)."""
  metadata = reader.item_metadata(step)
  state = None if metadata is None else metadata.get('state')
  if state is None:
    raise ValueError(f'checkpoint {directory} step {step} has no readable state metadata, so '
                     'the checkpoint may be incomplete.')
  return state.tree  # orbax-checkpoint 0.12: a TreeMetadata whose `tree` is the saved tree.


def _restore_partial(reader, step: int, saved_tree, abstract_state, fallback,
                     mismatch: TreeMismatch):
  """Restore the entries outside `mismatch` and take the others from `fallback`."""
  if fallback is None:
    raise ValueError('a partial restore needs `fallback`, the state whose values the entries '
                     'that are not restored keep.')
  target = state_tree(abstract_state)
  fallback_tree = state_tree(fallback)
  fallback_mismatch = compare_trees(fallback_tree, target)
  if fallback_mismatch:
    raise ValueError('the fallback state of a partial restore must have the tree of the '
                     f'restore target. It differs in these entries:\n'
                     f'{fallback_mismatch.describe()}')

  expected_leaves = leaves_by_path(target)
  skipped = set(mismatch.only_saved) | set(mismatch.differing)

  def restore_target(path, _):
    name = path_name(path)
    return ocp.PLACEHOLDER if name in skipped else expected_leaves[name]

  # The item follows the saved tree, in which orbax wrote tuples as lists and namedtuples as
  # dicts. Leaves set to ocp.PLACEHOLDER are not read from disk.
  item = jax.tree_util.tree_map_with_path(restore_target, saved_tree)
  restore_args = jax.tree.map(
      lambda leaf: ocp.RestoreArgs() if leaf is ocp.PLACEHOLDER
      else ocp.checkpoint_utils.construct_restore_args(leaf), item)
  restored = reader.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item, restore_args=restore_args),
      scalers=ocp.args.JsonRestore()))
  values = {name: leaf for name, leaf in leaves_by_path(restored['state']).items()
            if name not in skipped}
  merged = jax.tree_util.tree_map_with_path(
      lambda path, leaf: values.get(path_name(path), leaf), fallback_tree)
  return type(fallback)(**merged), restored['scalers']
