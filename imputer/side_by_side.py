"""Study variants trained side by side: several configs in one compiled train step.

Variants whose configs differ only in the fields of `HYPER_FIELDS` and share a seed form a
group. The group trains one stacked state with `jax.vmap` over the variants' parameters and
their settings, passed as arrays (`training.Steps` reads them from its `hyper` argument), so
the whole group costs one compile and every step reads each batch once.

* The group's model and objective cover every member: a loss term is computed when any
  member weights it above 0, and the positional embedding exists when any member uses it.
  A member with weight 0 (or positional multiplier 0) gets exactly the objective of its own
  config: the term adds 0, the term's random draws do not touch the other terms, and a second
  consistency view, or the denoising corruption, is left out of that member's loss.
* Parameters that a member's own model lacks (a denoising head, a projection head, the
  positional table) are still carried for it. They get zero gradients, and saving its state
  drops them.
* Variants that differ in anything else (the decoder, the sensor stage, the loss kind, the
  seed, ...) train in separate groups. `study.group_size` caps the members per group.

Every member keeps an ordinary run workdir under `variants/NAME/seed_S`: run files, metrics,
periodic checkpoints and the best-by-validation checkpoint, each of its own parameter tree.
After training, each member is evaluated by `train.train_and_evaluate`, which finds its
training complete, so its reports come from the same code as a single run's. The stacked
group state is checkpointed under `groups/`, and a killed study resumes from it.

The side-by-side loop writes no ToF comparison images during training; evaluation is
otherwise that of a single run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from imputer import checkpointing
from imputer import evaluation
from imputer import metric_writer
from imputer import preemption
from imputer import prefetch
from imputer import run_config
from imputer import sharding
from imputer import study
from imputer import train
from imputer import training

# Config field -> key of the `hyper` dict of training.Steps. These may differ inside a group.
HYPER_FIELDS = {
    'lambda_cons': 'lambda_cons',
    'lambda_denoise': 'lambda_denoise',
    'lambda_contrastive': 'lambda_contrastive',
    'loss.huber_delta': 'huber_delta',
    'contrastive.momentum': 'momentum',
    'mask_start': 'mask_start',
    'mask_end': 'mask_end',
    'mask_epochs': 'mask_ramp_steps',
    'model.positional_embedding': 'positional_scale',
}
# Loss weights that decide whether a term is computed at all.
WEIGHTS = ('lambda_cons', 'lambda_denoise', 'lambda_contrastive')


@dataclasses.dataclass
class Member:
  """One variant and seed of a group, with its own run config and workdir."""

  variant: study.Variant
  seed_offset: int
  config: ml_collections.ConfigDict
  path: str


@dataclasses.dataclass
class Group:
  """Variants trained together, and the config whose model and objective cover them all."""

  name: str
  members: list[Member]
  structure: ml_collections.ConfigDict
  path: str  # The stacked state's checkpoints.


def group_key(config) -> str:
  """Return what members of one group share: the config without the HYPER_FIELDS."""
  flat = run_config.flatten(json.loads(config.to_json_best_effort()))
  shared = {k: v for k, v in flat.items() if k not in HYPER_FIELDS}
  return json.dumps(shared, sort_keys=True)


def structure_config(configs):
  """Return the first config with every loss on that any config weights above 0, and the
  positional embedding on when any config uses it."""
  structure = ml_collections.ConfigDict(configs[0].to_dict())
  for field in WEIGHTS:
    structure[field] = max(c[field] for c in configs)
  structure.model.positional_embedding = any(c.model.positional_embedding for c in configs)
  return structure


def plan_groups(config, variants, workdir: str) -> list[Group]:
  """Split the study's variants and seeds into groups, in plan order."""
  by_key: dict[str, list[Member]] = {}
  for seed_offset in range(config.study.seeds):
    for variant in variants:
      member_config = study.variant_config(config, variant.changes, seed_offset)
      member = Member(variant, seed_offset, member_config,
                      study.run_dir(workdir, variant, seed_offset))
      by_key.setdefault(group_key(member_config), []).append(member)
  size = config.study.group_size or max(len(m) for m in by_key.values())
  groups = []
  for members in by_key.values():
    for start in range(0, len(members), size):
      chunk = members[start:start + size]
      first = chunk[0]
      name = f'{first.variant.name}+{len(chunk) - 1}/seed_{first.seed_offset}'
      groups.append(Group(name, chunk, structure_config([m.config for m in chunk]),
                          os.path.join(workdir, 'groups', name)))
  return groups


def hyper_values(config, steps_per_epoch: int) -> dict:
  """Return one member's `hyper` dict as Python numbers."""
  values = {}
  for field, key in HYPER_FIELDS.items():
    value = config
    for name in field.split('.'):
      value = value[name]
    values[key] = value
  values['mask_ramp_steps'] = config.mask_epochs * steps_per_epoch
  values['positional_scale'] = 1.0 if config.model.positional_embedding else 0.0
  return values


def stack_hyper(configs, steps_per_epoch: int) -> dict:
  """Return the members' settings as arrays with one entry per member."""
  rows = [hyper_values(c, steps_per_epoch) for c in configs]
  return {key: jnp.asarray([row[key] for row in rows],
                           jnp.int32 if key == 'mask_ramp_steps' else jnp.float32)
          for key in rows[0]}


def _leaves_by_path(tree) -> dict:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def project_state(state, abstract):
  """Return the entries of `state` (one member's slice) that the `abstract` state has.

  The result has the member's own tree, as its config alone would build it, so its workdir
  restores and evaluates like any run's.
  """
  leaves = _leaves_by_path(checkpointing.state_tree(state))
  wanted = checkpointing.state_tree(abstract)
  paths, treedef = jax.tree_util.tree_flatten_with_path(wanted)
  missing = [jax.tree_util.keystr(p) for p, _ in paths if jax.tree_util.keystr(p) not in leaves]
  if missing:
    raise ValueError(f'the group state lacks entries of a member: {missing}')
  picked = [leaves[jax.tree_util.keystr(p)] for p, _ in paths]
  return type(abstract)(**jax.tree_util.tree_unflatten(treedef, picked))


def member_abstract_state(config, data):
  """Return the shapes of the step-0 state that a member's own config builds."""
  steps, _ = train.make_steps(config, data)
  init, example = train.state_initializer(steps, data)
  return jax.eval_shape(init, jax.random.PRNGKey(config.seed), example)


def _member_metrics(fetched: list, index: int) -> list:
  return [{k: v[index] for k, v in metrics.items()} for metrics in fetched]


def _validation_losses(predict, params, hyper, windows, batch_size: int, mesh, key):
  """Return each member's validation loss, averaged over batches as a single run does."""
  totals, seen = None, 0
  for batch_index, batch, real in evaluation.global_batches(windows, batch_size, mesh):
    losses = np.asarray(jax.device_get(
        predict(params, batch, jax.random.fold_in(key, batch_index), hyper)), np.float64)
    totals = losses * real if totals is None else totals + losses * real
    seen += real
  return totals / max(seen, 1)


@dataclasses.dataclass
class GroupSteps:
  """A group's stacked step-0 state and its jitted functions, one call for all members.

  `train_step(state, batch, hyper)` donates the state; `validation_loss(params, batch, key,
  hyper)` returns each member's random_mask validation loss of one batch.
  """

  state: training.TrainState
  hyper: dict
  train_step: object
  validation_loss: object
  num_steps: int


def build_group(group: Group, data: train.RunData, mesh) -> GroupSteps:
  """Build the group's model and stacked state, and jit its steps over `mesh`.

  Every member starts from the parameters that its own config would initialise, because all
  share the seed and Flax derives each parameter's key from its module path.
  """
  structure = group.structure
  sharding.check_batch_size(structure.batch_size, mesh)
  steps, num_steps = train.make_steps(structure, data)
  count = len(group.members)
  replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  steps_per_epoch = max(data.num_train_windows // structure.batch_size, 1)
  hyper = jax.device_put(stack_hyper([m.config for m in group.members], steps_per_epoch),
                         replicated)
  train.warn_about_queue(structure, data)
  init, example = train.state_initializer(steps, data)

  def stacked_init(key, example):
    one = init(key, example)
    return jax.tree.map(lambda x: jnp.stack([x] * count), one)

  state = jax.jit(stacked_init, out_shardings=replicated)(
      jax.random.PRNGKey(structure.seed), example)
  train_step = jax.jit(jax.vmap(steps.train_step, in_axes=(0, None, 0)),
                       in_shardings=(replicated, batched, replicated),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  random_mask = evaluation.make_predict_fns(steps, structure)['random_mask']
  validation_loss = jax.jit(
      jax.vmap(lambda p, b, k, h: random_mask(p, b, k, h)[0]['loss'],
               in_axes=(0, None, None, 0)),
      in_shardings=(replicated, batched, None, replicated))
  return GroupSteps(state, hyper, train_step, validation_loss, num_steps)


def train_group(group: Group) -> None:
  """Train every member of `group` to the end, saving checkpoints into their workdirs."""
  structure = group.structure
  data = train.prepare_data(structure)
  scalers_json = None
  for member in group.members:
    scalers_json = train.open_workdir(member.config, member.path, data)
  mesh = sharding.make_mesh(structure.mesh)
  built = build_group(group, data, mesh)
  state, hyper, train_step, num_steps = (built.state, built.hyper, built.train_step,
                                         built.num_steps)
  count = len(group.members)

  group_checkpoints = checkpointing.Checkpoints(group.path, structure.max_checkpoints_to_keep)
  restored = group_checkpoints.restore_latest(checkpointing.abstract_like(state))
  if restored is not None:
    state = restored[0]
    logging.info('Group %s resumed from step %d of %d.', group.name, int(state.step[0]),
                 num_steps)
  abstracts = [member_abstract_state(m.config, data) for m in group.members]
  checkpoints = [checkpointing.Checkpoints(m.path, m.config.max_checkpoints_to_keep)
                 for m in group.members]
  writers = [metric_writer.MetricWriter(m.path, enabled=jax.process_index() == 0)
             for m in group.members]
  best = [c.best_val_loss() for c in checkpoints]
  last_saved = [c.latest.latest_step() for c in checkpoints]
  names = ', '.join(m.variant.name for m in group.members)
  start_step = int(state.step[0])
  logging.info('Group %s: %d variants (%s) side by side, steps %d..%d | %s', group.name, count,
               names, start_step, num_steps, data.tag)

  def member_state(index):
    one = jax.tree.map(lambda x: x[index], state)
    return project_state(one, abstracts[index])

  pending, pending_start, window_start = [], start_step, time.perf_counter()
  batches = prefetch.prefetch(train.train_batches(structure, data, mesh, start_step, num_steps),
                              structure.prefetch_depth)
  with preemption.Watch() as watch:
    try:
      for step, batch in zip(range(start_step, num_steps), batches):
        state, metrics = train_step(state, batch, hyper)
        pending.append(metrics)
        done = step + 1
        is_last = done == num_steps

        if done % structure.log_every_steps == 0 or is_last:
          fetched = jax.device_get(pending)
          rate = len(pending) / max(time.perf_counter() - window_start, 1e-9)
          _check_members_finite(group, fetched, pending_start, last_saved)
          for index in range(count):
            own = _member_metrics(fetched, index)
            scalars = {f'train/{k}': v for k, v in train.mean_metrics(own).items()}
            scalars['train/steps_per_second'] = rate
            writers[index].write_scalars(done, scalars)
          losses = np.mean([m['loss'] for m in fetched], axis=0)
          logging.info('step %d/%d | loss %s | %.2f steps/s for %d variants | ETA %.0f s | %s',
                       done, num_steps, ' '.join(f'{v:.4f}' for v in losses), rate, count,
                       (num_steps - done) / rate, data.tag)
          pending, pending_start, window_start = [], done, time.perf_counter()

        if done % structure.eval_every_steps == 0 or is_last:
          val = _validation_losses(built.validation_loss, state.params, hyper, data.validation,
                                   structure.eval_batch_size, mesh,
                                   jax.random.PRNGKey(structure.seed + 2))
          for index, loss in enumerate(val):
            writers[index].write_scalars(done, {'val/loss': loss})
            if math.isfinite(loss) and (best[index] is None or loss < best[index]):
              best[index] = float(loss)
              if done not in checkpoints[index].best.all_steps():
                checkpoints[index].save_best(done, member_state(index), scalers_json, loss)
          logging.info('step %d | validation loss %s | %s', done,
                       ' '.join(f'{v:.4f}' for v in val), data.tag)

        if done % structure.checkpoint_every_steps == 0 or is_last:
          # The group state first: a kill between the saves leaves members behind it, never ahead.
          _check_members_finite(group, jax.device_get(pending), pending_start, last_saved)
          group_checkpoints.save(done, state, scalers_json)
          group_checkpoints.wait()
          for index, manager in enumerate(checkpoints):
            if done not in manager.latest.all_steps():
              manager.save(done, member_state(index), scalers_json)
            last_saved[index] = done
        for writer in writers:
          writer.flush()

        if watch.should_stop(done):
          # SIGTERM or SIGINT: save the group at this step (unless the cadence just did), then
          # stop. The members' own checkpoints follow at the next cadence or at the end.
          _check_members_finite(group, jax.device_get(pending), pending_start, last_saved)
          if done not in group_checkpoints.latest.all_steps():
            group_checkpoints.save(done, state, scalers_json)
          for manager in checkpoints + [group_checkpoints]:
            manager.wait()
            manager.close()
          for writer in writers:
            writer.close()
          raise preemption.Preempted(done, watch.received, group.path)
    except FloatingPointError:
      for manager in checkpoints + [group_checkpoints]:
        manager.wait()  # The last good checkpoints may still be being written.
      raise
    finally:
      batches.close()  # Stops the prefetch thread on any exit.
  # A study killed between the group's final save and its members' gets them written now.
  for index, manager in enumerate(checkpoints):
    if manager.latest.latest_step() != num_steps and int(state.step[0]) == num_steps:
      manager.save(num_steps, member_state(index), scalers_json)
  for manager in checkpoints + [group_checkpoints]:
    manager.wait()
    manager.close()
  for writer in writers:
    writer.close()


def _check_members_finite(group: Group, fetched: list, first_step: int, last_saved) -> None:
  """Raise FloatingPointError, naming the variant, if a member's metrics are not finite."""
  for index, member in enumerate(group.members):
    try:
      train.check_finite(_member_metrics(fetched, index), first_step, last_saved[index])
    except FloatingPointError as error:
      raise FloatingPointError(f'study variant {member.variant.name} seed '
                               f'{member.seed_offset}: {error}') from None


def run(config, workdir: str) -> list[study.Variant]:
  """Train the study's unfinished variants group by group, evaluate them; return the plan."""
  variants = study.checked_plan(config, workdir)
  groups = plan_groups(config, variants, workdir)
  logging.info('Study: %d variants x %d seeds in %d side-by-side groups.', len(variants),
               config.study.seeds, len(groups))
  for number, group in enumerate(groups, 1):
    unfinished = [m for m in group.members if not study.is_finished(m.path)]
    if not unfinished:
      logging.info('Group %d/%d (%s) is finished, skipped.', number, len(groups), group.name)
      continue
    logging.info('Group %d/%d: %s', number, len(groups), group.name)
    train_group(group)
    for member in unfinished:
      logging.info('Evaluating %s seed %d in %s', member.variant.name, member.seed_offset,
                   member.path)
      train.train_and_evaluate(member.config, member.path)
  return variants
