"""Orbax checkpoints of the training state together with the run's scaling statistics.

Two managers share the workdir. `checkpoints/` keeps the latest periodic checkpoints and the
final one, and training resumes from it. `checkpoints_best/` keeps the single checkpoint with
the lowest validation loss, which the evaluation report uses.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp


def _options(**kwargs) -> ocp.CheckpointManagerOptions:
  return ocp.CheckpointManagerOptions(create=True, **kwargs)


class Checkpoints:
  """Periodic and best-by-validation checkpoint managers for one workdir."""

  def __init__(self, workdir: str, max_to_keep: int):
    root = os.path.abspath(workdir)
    self.latest = ocp.CheckpointManager(
        os.path.join(root, 'checkpoints'), options=_options(max_to_keep=max_to_keep))
    self.best = ocp.CheckpointManager(
        os.path.join(root, 'checkpoints_best'),
        options=_options(max_to_keep=1, best_fn=lambda m: m['val_loss'], best_mode='min'))

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

  @staticmethod
  def _restore(manager, step, abstract_state):
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state_tree(abstract_state)),
        scalers=ocp.args.JsonRestore()))
    return type(abstract_state)(**restored['state']), restored['scalers']

  def restore_latest(self, abstract_state):
    """Return (state, scalers json) of the latest checkpoint, or None when there is none."""
    step = self.latest.latest_step()
    return None if step is None else self._restore(self.latest, step, abstract_state)

  def restore_best(self, abstract_state):
    step = self.best.best_step()
    return None if step is None else self._restore(self.best, step, abstract_state)

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
