"""The training loop: data, model, restore, train, evaluate and report."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from absl import logging

from imputer import augment
from imputer import checkpointing
from imputer import evaluation
from imputer import folds
from imputer import layout as layout_lib
from imputer import metric_writer
from imputer import models
from imputer import preemption
from imputer import prefetch
from imputer import probe
from imputer import recordings
from imputer import report as report_lib
from imputer import run_config
from imputer import scaling
from imputer import sharding
from imputer import sources
from imputer import training
from imputer import windows as windows_lib


@dataclasses.dataclass
class RunData:
  """Everything the loop needs from the data: layouts, scalers and windows per split."""

  recording_set: recordings.RecordingSet
  split: folds.Split
  input_layouts: tuple
  target_layouts: tuple
  scalers: dict
  train: windows_lib.Windows
  validation: windows_lib.Windows
  test: windows_lib.Windows
  sequences: dict  # Split name -> the sequences with target truth that were windowed.
  skipped: dict  # Split name -> sequences without any observed target value.
  # Training windows of every process together. With several processes, `train` contains only
  # this process's share (see `prepare_data`), and steps and epochs count from the total.
  num_train_windows: int

  @property
  def tag(self) -> str:
    return data_tag(self.recording_set)


def data_tag(recording_set) -> str:
  """Return the suffix of every log line, which makes synthetic data impossible to miss."""
  synthetic = 'synthetic' in recording_set.source
  return 'data: SYNTHETIC' if synthetic else f'data: {recording_set.source}'


def _with_truth(recording_set, subjects):
  sequences = recording_set.select_subjects(subjects)
  kept = [s for s in sequences if s.has_target_truth(recording_set.target_names)]
  return kept, len(sequences) - len(kept)


def prepare_data(config) -> RunData:
  """Load, split, engineer, scale and window the recordings named by the config."""
  recording_set = sources.load_recordings(config.data)
  logging.info('Loaded %d sequences from %s.', len(recording_set.sequences),
               recording_set.source)
  for reason, count in sorted(recording_set.excluded.items()):
    logging.warning('Left out or treated as missing by the data source: %d x %s', count,
                    reason)
  unobserved = [group for group in recording_set.target_groups
                if not any(s.observed[group.name].any() for s in recording_set.sequences)]
  if unobserved:
    described = []
    for group in unobserved:
      first, last = group.columns[0], group.columns[-1]
      described.append(f'{group.name} ({first}..{last})' if last != first else group.name)
    raise ValueError(
        f'{recording_set.source}: no sequence has an observed value of the target group(s) '
        f'{", ".join(described)}, so there is nothing to learn or score for them; check those '
        'columns, or use data in which they are recorded.')
  run_config.check_window_fits(config, recording_set)
  tag = data_tag(recording_set)
  split = folds.split_subjects(recording_set, config.data.num_folds, config.data.fold,
                               config.data.split_seed)
  logging.info('Subjects: train %s | validation %s | test %s | %s', split.train,
               split.validation, split.test, tag)
  input_layouts = layout_lib.build_layouts(recording_set.input_groups)
  target_layouts = layout_lib.build_layouts(recording_set.target_groups)
  layouts = input_layouts + target_layouts

  per_split, skipped = {}, {}
  for name, subjects in dataclasses.asdict(split).items():
    per_split[name], skipped[name] = _with_truth(recording_set, subjects)
    if skipped[name]:
      logging.info('%s: %d sequences carry no observed target value (IMU-only in the file); '
                   'they have nothing to reconstruct or score and are left out | %s', name,
                   skipped[name], tag)
    if not per_split[name]:
      raise ValueError(
          f'the {name} subjects {subjects} have no sequence with an observed target value; '
          'change data.fold or data.split_seed, or check the target columns of the data.')
  engineered = {n: windows_lib.engineer_sequences(s, layouts) for n, s in per_split.items()}
  scalers = windows_lib.fit_scalers(engineered['train'], layouts)
  window, stride = config.data.window, config.data.train_stride
  counts = [len(windows_lib.window_starts(s.length, window, stride))
            for s in engineered['train']]
  num_train_windows = sum(counts)
  # Every process fits the scalers on all training sequences, so that they agree, but keeps
  # the windows of its own share of them only.
  process, processes = jax.process_index(), jax.process_count()
  if len(counts) < processes:
    raise ValueError(
        f'there are {len(counts)} training sequences for {processes} processes, so some process '
        'would get none; use fewer processes, or more data.')
  mine = training_share(counts, processes)[process]
  engineered['train'] = [engineered['train'][i] for i in mine]
  per_split['train'] = [per_split['train'][i] for i in mine]
  made = {n: windows_lib.make_windows(engineered[n], layouts, scalers, window,
                                      stride if n == 'train' else window) for n in engineered}
  logging.info('Windows of %d timesteps: train %d (of %d, in process %d of %d) | validation %d '
               '| test %d | %s', window, len(made['train']), num_train_windows, process,
               processes, len(made['validation']), len(made['test']), tag)
  return RunData(recording_set, split, input_layouts, target_layouts, scalers, made['train'],
                 made['validation'], made['test'], per_split, skipped, num_train_windows)


def training_share(window_counts: list[int], processes: int) -> list[list[int]]:
  """Split training sequences between processes so that their window counts nearly agree.

  Sequences go in order to the process with the fewest windows so far (the lowest index on
  ties), so the shares differ by at most one sequence's windows. Each process draws the same
  number of rows per step from its share, so equal shares keep every window about equally
  likely to be drawn. Returns the sequence indices of each process, in order.
  """
  shares, totals = [[] for _ in range(processes)], [0] * processes
  for index, count in enumerate(window_counts):
    smallest = totals.index(min(totals))
    shares[smallest].append(index)
    totals[smallest] += count
  return shares


def batch_rows(step: int, num_windows: int, batch_size: int, seed: int, shard: int = 0,
               num_shards: int = 1) -> np.ndarray:
  """Return the window rows of `step`: a fresh seeded permutation every epoch.

  A function of the step alone, so a resumed run gets the same batches. The last partial
  batch of an epoch is left for the next epoch's permutation. With fewer windows than the
  batch size, windows repeat within a batch. With several shards (processes), each draws
  from its own windows with its own permutations.
  """
  steps_per_epoch = max(num_windows // batch_size, 1)
  epoch, position = divmod(step, steps_per_epoch)
  key = [seed, epoch] if num_shards == 1 else [seed, epoch, shard]
  permutation = np.random.default_rng(key).permutation(num_windows)
  if num_windows < batch_size:
    return np.resize(permutation, batch_size)
  return permutation[position * batch_size:(position + 1) * batch_size]


def train_batches(config, data: RunData, mesh, first_step: int, num_steps: int):
  """Yield the device batches of steps first_step .. num_steps - 1, in order.

  Each process draws batch_size / P rows from its own training windows (`batch_rows`), and
  the pieces of the P processes form one array split along the mesh's `data` axis.
  """
  process, processes = jax.process_index(), jax.process_count()
  for step in range(first_step, num_steps):
    rows = batch_rows(step, len(data.train), config.batch_size // processes, config.seed,
                      process, processes)
    yield sharding.to_global(data.train.take(rows), mesh)


def total_steps(config, num_windows: int) -> int:
  steps = config.num_epochs * max(num_windows // config.batch_size, 1)
  return min(steps, config.num_train_steps) if config.num_train_steps > 0 else steps


def check_finite(fetched: list, first_step: int, last_good: int | None) -> None:
  """Raise FloatingPointError naming the first step and loss terms that are not finite.

  `fetched` contains the host copies of the metrics of steps first_step + 1, first_step + 2,
  ... Steps that the step itself skipped (config.nonfinite='skip') are left out. The message
  lists the loss terms first (such as loss_recon), then the total loss and the gradient norm.
  """
  for offset, metrics in enumerate(fetched):
    if float(metrics.get('skipped', 0.0)) > 0:
      continue
    names = sorted(metrics, key=lambda n: (not n.startswith('loss_'), n != 'loss', n))
    bad = [f'{name} = {float(metrics[name])}' for name in names
           if name.startswith(('loss', 'grad_norm')) and not math.isfinite(float(metrics[name]))]
    if bad:
      kept = 'none yet' if last_good is None else f'step {last_good}'
      raise FloatingPointError(
          f'training stopped: {", ".join(bad)} at step {first_step + offset + 1}. The last '
          f'good checkpoint ({kept}) is kept. Check the data for extreme values, then train in '
          'a new --workdir with a lower optim.learning_rate, or with --config.nonfinite=skip to '
          "drop such steps' updates (a resume must keep the config).")


def mean_metrics(fetched: list) -> dict[str, float]:
  """Average each metric over the steps, leaving out skipped steps, and sum 'skipped'."""
  kept = [m for m in fetched if not float(m.get('skipped', 0.0))] or fetched
  means = {k: float(np.mean([m[k] for m in kept])) for k in fetched[0]}
  if 'skipped' in fetched[0]:
    means['skipped'] = float(sum(float(m['skipped']) for m in fetched))
  return means


def tof_images(data: RunData, recon: dict, hidden: dict) -> dict[str, np.ndarray]:
  """Return one target-vs-reconstruction image of the validation window with most ToF scored."""
  tof = next((l for l in data.target_layouts if l.name == 'tof' and l.num_raw == 320), None)
  if tof is None:
    return {}
  observed = data.validation.batch['observed']['tof'][..., :320]
  scored = (hidden['tof'] & observed).sum(-1)
  row, t = np.unravel_index(int(np.argmax(scored)), scored.shape)
  scaler = data.scalers['tof']
  target = scaler.inverse(data.validation.batch['values']['tof'][row, t, :320], slice(0, 320))
  target = np.where(observed[row, t], target, 0.0)
  prediction = scaler.inverse(recon['tof'][row, t, :320], slice(0, 320))
  return {'val/tof_target_vs_recon': evaluation.tof_comparison_image(target, prediction)}


def evaluate_report(data: RunData, split: str, predict_fns, params, config, mesh,
                    checkpoint: dict) -> dict:
  """Score the subjects of `split` in both scenarios and return the report dictionary."""
  windows, sequences = getattr(data, split), data.sequences[split]
  lengths = [s.length for s in sequences]
  key = jax.random.PRNGKey(config.seed + 1)
  scenarios = {}
  for name in evaluation.SCENARIOS:
    _, recon, hidden, log_var = evaluation.predict_windows(
        predict_fns[name], params, windows, config.eval_batch_size, mesh, key)
    per_seq = {kind: {g: evaluation.stitch(windows.index, arrays[g], lengths) for g in arrays}
               for kind, arrays in (('recon', recon), ('hidden', hidden), ('log_var', log_var))}
    scenarios[name] = evaluation.score_scenario(
        name, sequences, per_seq['recon'], per_seq['hidden'], data.target_layouts,
        data.scalers)
    if log_var:
      scenarios[name]['calibration'] = evaluation.calibration(
          config.loss.kind, sequences, per_seq['recon'], per_seq['log_var'], per_seq['hidden'],
          data.target_layouts, data.scalers)
    if name == 'random_mask':
      scenarios[name]['mask_ratio'] = config.mask.eval_ratio
  return {
      'source': data.recording_set.source,
      'synthetic': 'synthetic' in data.recording_set.source,
      'evaluated_split': split,
      'split': dataclasses.asdict(data.split),
      'checkpoint': checkpoint,
      'sequences': {'evaluated': len(sequences),
                    'skipped_without_ground_truth': data.skipped[split]},
      'left_out_by_source': dict(sorted(data.recording_set.excluded.items())),
      'scenarios': scenarios,
  }


def representation_description(config) -> str:
  trunk = 'h_shared' if config.model.decoder == 'shared' else 'the encoder output'
  text = (f'mean over valid timesteps of {trunk}, from IMU-only inputs (every target group '
          'hidden), with the parameters that the report scores')
  if jax.process_count() > 1:
    text += (f', and probes trained on the training windows of process 0 (about 1/'
             f'{jax.process_count()} of them)')
  return text


def representations(data: RunData, compiled, params, config, mesh):
  """Return (representations, windows, per-window labels) of the train, validation and test
  windows, the inputs of `probe.probe_report`.

  With several processes each one holds only its share of the training windows, so the probe
  of each process trains on its own share, and process 0's is the one reported.
  """
  features, windows, labels = {}, {}, {}
  for split in ('train', 'validation', 'test'):
    windows[split] = getattr(data, split)
    if split == 'train' and jax.process_count() > 1:
      # One device takes the batch that eval_batch_size gives each device.
      features[split] = evaluation.represent_local_windows(
          compiled.represent_local, params, windows[split],
          max(config.eval_batch_size // jax.device_count(), 1))
    else:
      features[split] = evaluation.represent_windows(compiled.represent_fn, params,
                                                     windows[split], config.eval_batch_size,
                                                     mesh)
    sequences = data.sequences[split]
    labels[split] = [sequences[i].label for i in windows[split].index[:, 0]]
  return features, windows, labels


@dataclasses.dataclass
class CompiledSteps:
  """Initial state and jitted steps of a run, with the run's length in steps."""

  state: training.TrainState
  train_step: Any
  predict_fns: dict
  represent_fn: Any
  num_steps: int
  represent_local: Any = None  # `represent` jitted without shardings, for local windows.


def make_steps(config, data: RunData) -> tuple[training.Steps, int]:
  """Return the model's Steps for `config` on `data`, and the run's length in steps."""
  num_steps = total_steps(config, data.num_train_windows)
  model = models.build_model(config, data.input_layouts, data.target_layouts)
  schedule = training.make_schedule(config.optim, num_steps)
  tx = training.make_optimizer(config.optim, schedule)
  quaternions = {l.name: augment.quaternion_channels(l, data.scalers[l.name])
                 for l in data.input_layouts}
  steps = training.Steps(model, tx, schedule, data.input_layouts, data.target_layouts, config,
                         steps_per_epoch=max(data.num_train_windows // config.batch_size, 1),
                         total_steps=num_steps, quaternions=quaternions)
  return steps, num_steps


def warn_about_queue(config, data: RunData) -> None:
  queue_size = config.contrastive.queue_size if config.lambda_contrastive > 0 else 0
  if queue_size > data.num_train_windows:
    logging.warning(
        'contrastive.queue_size=%d is larger than the %d training windows, so the queue holds '
        "older keys of a query's own window as negatives; lower contrastive.queue_size.",
        queue_size, data.num_train_windows)


def state_initializer(steps: training.Steps, data: RunData):
  """Return (init(key, example) -> step-0 TrainState, a one-window example batch)."""
  config = steps.config
  queue_size = config.contrastive.queue_size if config.lambda_contrastive > 0 else 0
  example = jax.tree.map(lambda x: x[:1], data.train.take(np.arange(1)))
  init = functools.partial(training.create_train_state, model=steps.model, tx=steps.tx,
                           input_layouts=data.input_layouts, target_layouts=data.target_layouts,
                           prior=config.model.interpolation_prior, queue_size=queue_size,
                           count_skipped=config.nonfinite == 'skip')
  return init, example


def build_steps(config, data: RunData, mesh) -> CompiledSteps:
  """Build the model, optimizer and initial state, and jit the steps over `mesh`.

  The state is replicated and batches are split along the `data` axis; the train step
  donates its input state.
  """
  sharding.check_batch_size(config.batch_size, mesh)
  steps, num_steps = make_steps(config, data)
  replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  warn_about_queue(config, data)
  init, example = state_initializer(steps, data)
  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.seed), example)
  train_step = jax.jit(steps.train_step, in_shardings=(replicated, batched),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  predict_fns = {name: jax.jit(fn, in_shardings=(replicated, batched, None))
                 for name, fn in evaluation.make_predict_fns(steps, config).items()}
  represent_fn = jax.jit(steps.represent, in_shardings=(replicated, batched))
  return CompiledSteps(state, train_step, predict_fns, represent_fn, num_steps,
                       jax.jit(steps.represent))


SOURCE_SUFFIX = '_partial_source'


def set_aside_source_checkpoints(checkpoints, workdir: str, config):
  """Rename the checkpoint folders that a partial restore read, and return new managers.

  The new run saves its own steps from 0. Left in place, the source's later steps would stay
  the latest ones, and every resume would restore them again instead of the new run's.
  """
  checkpoints.close()
  if jax.process_index() == 0:
    for name in ('checkpoints', 'checkpoints_best'):
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        target = path + SOURCE_SUFFIX
        if os.path.exists(target):
          raise ValueError(f'{target} exists already; move it away to restore partially again.')
        os.rename(path, target)
  multihost_utils.sync_global_devices('imputer_partial_restore')
  logging.warning('Partial restore: training starts at step 0 from the restored parameters. '
                  'The source checkpoints were renamed to checkpoints%s/.', SOURCE_SUFFIX)
  return checkpointing.Checkpoints(workdir, config.max_checkpoints_to_keep)


def open_workdir(config, workdir: str, data: RunData) -> dict:
  """Check that `workdir` contains no other run, write its run files and return the scalers.

  run.json (config and data fingerprint, checked on resume), config.json and scalers.json are
  written by process 0 only.
  """
  os.makedirs(workdir, exist_ok=True)
  config_dict = json.loads(config.to_json_best_effort())
  fingerprint = run_config.data_fingerprint(data.recording_set)
  run_config.check_resume(workdir, config_dict, fingerprint)
  scalers_json = scaling.scalers_to_json(data.scalers)
  if jax.process_index() == 0:
    run_config.write_run_file(workdir, config_dict, fingerprint)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, 'scalers.json'), 'w', encoding='utf-8') as f:
      json.dump(scalers_json, f)
  return scalers_json


def train_and_evaluate(config, workdir: str) -> dict:
  """Train on the configured data, checkpointing into `workdir`, and write the report."""
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  # Data, and the check that this workdir contains no other run.
  run_config.validate(config)
  data = prepare_data(config)
  scalers_json = open_workdir(config, workdir, data)

  # Model, optimizer and compiled steps.
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  compiled = build_steps(config, data, mesh)
  state, train_step, predict_fns = compiled.state, compiled.train_step, compiled.predict_fns
  num_steps = compiled.num_steps

  # Restore.
  checkpoints = checkpointing.Checkpoints(workdir, config.max_checkpoints_to_keep)
  abstract = checkpointing.abstract_like(state)
  # A checkpoint with another state tree is an error unless restore_partial is on. Then the
  # entries that differ keep their values from `state`, and restore_latest logs a warning that
  # lists them. NOTE: an older best checkpoint in checkpoints_best/ keeps its tree, so the
  # restore_best below still raises for it.
  restored = checkpoints.restore_latest(abstract, partial=config.restore_partial,
                                        fallback=state)
  if restored is not None and checkpoints.restored_partially:
    # A partial restore starts a new run from the matching parameters: the step, the
    # optimizer state, the schedules and the key queue start over from the initial state.
    partial_state, saved_scalers = restored
    restored = state.replace(params=partial_state.params,
                             ema_params=partial_state.ema_params), saved_scalers
    checkpoints = set_aside_source_checkpoints(checkpoints, workdir, config)
  if restored is not None:
    state, saved_scalers = restored
    if saved_scalers != json.loads(json.dumps(scalers_json)):
      raise ValueError(
          f'the checkpoint in {workdir} was trained with other scaling statistics, so the data '
          'or its split changed since; use a new --workdir or restore the original data.')
    logging.info('Resumed from step %d of %d in %s.', int(state.step), num_steps, workdir)
    if int(state.step) >= num_steps:
      logging.info('Training is already complete; only the evaluation runs again.')
  start_step = int(state.step)
  writer = metric_writer.MetricWriter(workdir, enabled=is_main)
  best_loss = checkpoints.best_val_loss()
  last_saved = checkpoints.latest.latest_step()

  # Training loop.
  logging.info('Training steps %d..%d (%d windows, batch %d) | %s', start_step, num_steps,
               data.num_train_windows, config.batch_size, data.tag)
  pending, pending_start, window_start = [], start_step, time.perf_counter()
  batches = prefetch.prefetch(train_batches(config, data, mesh, start_step, num_steps),
                              config.prefetch_depth)
  with preemption.Watch() as watch:
    try:
      for step, batch in zip(range(start_step, num_steps), batches):
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        done = step + 1
        is_last = done == num_steps

        if done % config.log_every_steps == 0 or is_last:
          fetched = jax.device_get(pending)
          check_finite(fetched, pending_start, last_saved)
          elapsed = time.perf_counter() - window_start
          rate = len(pending) / max(elapsed, 1e-9)
          scalars = {f'train/{k}': v for k, v in mean_metrics(fetched).items()}
          scalars['train/steps_per_second'] = rate
          writer.write_scalars(done, scalars)
          logging.info('step %d/%d | loss %.4f | %.2f steps/s | ETA %.0f s | %s', done, num_steps,
                       scalars['train/loss'], rate, (num_steps - done) / rate, data.tag)
          if scalars.get('train/skipped'):
            logging.warning('%d of the last %d steps had a non-finite loss or gradient and were '
                            'skipped (%d in the run so far) | %s', scalars['train/skipped'],
                            len(fetched), int(state.skipped), data.tag)
          pending, pending_start, window_start = [], done, time.perf_counter()

        if done % config.eval_every_steps == 0 or is_last:
          val_metrics, recon, hidden, _ = evaluation.predict_windows(
              predict_fns['random_mask'], state.params, data.validation, config.eval_batch_size,
              mesh, jax.random.PRNGKey(config.seed + 2))
          writer.write_scalars(done, {f'val/{k}': v for k, v in val_metrics.items()})
          writer.write_images(done, tof_images(data, recon, hidden))
          logging.info('step %d | validation loss %.4f | %s', done, val_metrics['loss'], data.tag)
          if math.isfinite(val_metrics['loss']) and (best_loss is None
                                                     or val_metrics['loss'] < best_loss):
            best_loss = val_metrics['loss']
            # A run killed between this save and the periodic one reaches `done` again.
            if done not in checkpoints.best.all_steps():
              checkpoints.save_best(done, state, scalers_json, best_loss)

        if done % config.checkpoint_every_steps == 0 or is_last:
          check_finite(jax.device_get(pending), pending_start, last_saved)
          checkpoints.save(done, state, scalers_json)
          last_saved = done
        writer.flush()

        if watch.should_stop(done):
          # SIGTERM or SIGINT: save this step (unless the cadence just did) and stop. After the
          # last step that skips the final evaluation, which the next launch runs.
          check_finite(jax.device_get(pending), pending_start, last_saved)
          if last_saved != done:
            checkpoints.save(done, state, scalers_json)
          checkpoints.wait()
          writer.close()
          checkpoints.close()
          raise preemption.Preempted(done, watch.received, workdir)
    except FloatingPointError:
      checkpoints.wait()  # The last good checkpoint may still be being written.
      raise
    finally:
      batches.close()  # Stops the prefetch thread on any exit.
  checkpoints.wait()

  # Evaluation with the best-by-validation parameters: the test subjects give the report, and
  # the same figures on the validation subjects are for choosing settings without the test.
  best = checkpoints.restore_best(abstract)
  params, checkpoint = state.params, {'step': int(state.step), 'kind': 'final'}
  if best is not None:
    params = best[0].params
    checkpoint = {'step': int(best[0].step), 'kind': 'best by validation loss'}
  report = evaluate_report(data, 'test', predict_fns, params, config, mesh, checkpoint)
  validation = evaluate_report(data, 'validation', predict_fns, params, config, mesh,
                               checkpoint)
  probe_inputs = representations(data, compiled, params, config, mesh)
  for split, result in (('test', report), ('validation', validation)):
    result['probe'] = probe.probe_report(
        *probe_inputs, data.input_layouts, data.target_layouts, data.scalers, split,
        representation_description(config))
  if is_main:
    report_lib.write_report(report, workdir, 'eval_report')
    report_lib.write_report(validation, workdir, 'validation_report')
  logging.info('Wrote %s | %s', os.path.join(workdir, 'eval_report.md'), data.tag)
  writer.close()
  checkpoints.close()
  return report
