"""Checks on a run's resolved config: value ranges, the window against the loaded data, and
resuming a workdir with it.

A workdir belongs to one run. `run.json` in it records the resolved config and a fingerprint
of the loaded data, and a later launch in the same workdir resumes only when both match, so a
resumed run really continues the run that its checkpoints came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import jax
import numpy as np
from absl import logging

from configs import default as default_config
from configs import platforms
from imputer import contrastive
from imputer import denoising
from imputer import models
from imputer import sharding

# Fields that change only logging, evaluation batching, checkpoint cadence, how a study
# schedules its variants or the device layout, never the trained parameters or the figures
# beyond float rounding, so a resume may change them. (per_device_batch_size may change
# because the global batch_size that it resolves to is compared itself.)
RESUME_MAY_CHANGE = ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                     'max_checkpoints_to_keep', 'eval_batch_size', 'study.mode',
                     'study.group_size', 'prefetch_depth', 'mesh', 'per_device_batch_size')

RUN_FILE = 'run.json'


def _require(condition: bool, field: str, value, rule: str) -> None:
  if not condition:
    raise ValueError(f'{field}={value!r} is invalid: {rule}.')


def validate(config) -> None:
  """Raise ValueError naming the first field whose value is out of range."""
  _require(config.batch_size >= 1, 'batch_size', config.batch_size, 'use 1 or more')
  _require(config.eval_batch_size >= 1, 'eval_batch_size', config.eval_batch_size,
           'use 1 or more')
  _require(config.num_epochs >= 1, 'num_epochs', config.num_epochs, 'use 1 or more')
  for name in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'max_checkpoints_to_keep'):
    _require(config[name] >= 1, name, config[name], 'use 1 or more')
  _require(config.data.window >= 1, 'data.window', config.data.window, 'use 1 or more')
  _require(1 <= config.data.train_stride <= config.data.window, 'data.train_stride',
           config.data.train_stride, f'use 1 to data.window ({config.data.window})')
  _require(0.0 <= config.mask_start <= 1.0, 'mask_start', config.mask_start, 'use 0 to 1')
  _require(0.0 <= config.mask_end <= 1.0, 'mask_end', config.mask_end, 'use 0 to 1')
  _require(config.mask_epochs >= 0, 'mask_epochs', config.mask_epochs, 'use 0 or more')
  _require(0.0 <= config.mask.imu_only_prob <= 1.0, 'mask.imu_only_prob',
           config.mask.imu_only_prob, 'use 0 to 1')
  weights = (config.mask.element_weight, config.mask.sensor_weight, config.mask.span_weight)
  _require(min(weights) >= 0 and sum(weights) > 0, 'mask.element_weight/sensor_weight/'
           'span_weight', weights, 'use weights of 0 or more with a positive sum')
  _require(config.mask.span_length >= 1, 'mask.span_length', config.mask.span_length,
           'use 1 or more')
  _require(0.0 < config.mask.eval_ratio <= 1.0, 'mask.eval_ratio', config.mask.eval_ratio,
           'use a value above 0 and at most 1')
  _require(config.data.tof_far_value >= 0, 'data.tof_far_value', config.data.tof_far_value,
           'a distance cannot be negative')
  _require(config.lambda_cons >= 0, 'lambda_cons', config.lambda_cons, 'use 0 or more')
  _require(config.consistency.positions in ('both_visible', 'both_hidden', 'all'),
           'consistency.positions', config.consistency.positions,
           "use 'both_visible', 'both_hidden' or 'all'")
  _require(config.lambda_contrastive >= 0, 'lambda_contrastive', config.lambda_contrastive,
           'use 0 or more')
  c = config.contrastive
  _require(c.temperature > 0, 'contrastive.temperature', c.temperature, 'use a value above 0')
  _require(c.queue_size >= config.batch_size, 'contrastive.queue_size', c.queue_size,
           f'one step writes a whole batch into the queue, so use at least batch_size '
           f'({config.batch_size})')
  _require(0.0 <= c.momentum <= 1.0, 'contrastive.momentum', c.momentum, 'use 0 to 1')
  _require(c.momentum_schedule in contrastive.MOMENTUM_SCHEDULES,
           'contrastive.momentum_schedule', c.momentum_schedule,
           "use 'constant' or 'cosine'")
  _require(c.projection_dim >= 1, 'contrastive.projection_dim', c.projection_dim,
           'use 1 or more')
  a = config.augment
  _require(a.warp_strength >= 0, 'augment.warp_strength', a.warp_strength, 'use 0 or more')
  _require(a.warp_knots >= 1, 'augment.warp_knots', a.warp_knots, 'use 1 or more')
  _require(a.jitter_sigma >= 0, 'augment.jitter_sigma', a.jitter_sigma, 'use 0 or more')
  _require(config.lambda_denoise >= 0, 'lambda_denoise', config.lambda_denoise,
           'use 0 or more')
  d = config.denoise
  _require(0.0 < d.ratio <= 1.0, 'denoise.ratio', d.ratio, 'use a value above 0 and at most 1')
  _require(d.sigma > 0, 'denoise.sigma', d.sigma, 'use a value above 0')
  _require(d.positions in denoising.POSITIONS, 'denoise.positions', d.positions,
           "use 'corrupted' or 'all'")
  _require(config.study.seeds >= 1, 'study.seeds', config.study.seeds, 'use 1 or more')
  _require(config.study.mode in ('side_by_side', 'sequential'), 'study.mode',
           config.study.mode, "use 'side_by_side' or 'sequential'")
  _require(config.study.group_size >= 0, 'study.group_size', config.study.group_size,
           'use 0 (no limit) or more')
  m = config.model
  _require(m.hidden_dim >= 1 and m.hidden_dim % m.num_heads == 0, 'model.num_heads',
           m.num_heads, f'it must divide model.hidden_dim ({m.hidden_dim})')
  _require(m.log_var_bound > 0, 'model.log_var_bound', m.log_var_bound, 'use a value above 0')
  _require(not m.variance_head or config.loss.kind.startswith('conf_'), 'model.variance_head',
           m.variance_head, f'it needs a conf_ loss.kind (now {config.loss.kind!r}), which '
           'trains the variances; set --config.loss.kind=conf_mse or conf_mae')
  _require(m.compute_dtype in models.COMPUTE_DTYPES, 'model.compute_dtype', m.compute_dtype,
           "use 'float32' or 'bfloat16'")
  _require(config.platform in platforms.PLATFORMS, 'platform', config.platform,
           "use 'cpu', 'gpu' or 'tpu' after the config path, as in configs/phase3.py:gpu")
  _require(config.per_device_batch_size >= 0, 'per_device_batch_size',
           config.per_device_batch_size, 'use 0 (batch_size is the global batch) or more')
  _require(config.mesh in sharding.MESH_KINDS, 'mesh', config.mesh, "use 'flat' or 'topology'")
  _require(config.matmul_precision in MATMUL_PRECISIONS, 'matmul_precision',
           config.matmul_precision, "use 'default', 'high' or 'highest'")
  _require(config.nonfinite in ('stop', 'skip'), 'nonfinite', config.nonfinite,
           "use 'stop' or 'skip'")
  _require(config.prefetch_depth >= 0, 'prefetch_depth', config.prefetch_depth,
           'use 0 (off) or more batches')
  _require(config.optim.learning_rate > 0, 'optim.learning_rate', config.optim.learning_rate,
           'use a value above 0')


def check_window_fits(config, recording_set) -> None:
  """Raise ValueError when data.window is longer than every sequence of the loaded data.

  Every window would then end in padding, which costs compute and is never scored.
  """
  longest = max(seq.length for seq in recording_set.sequences)
  _require(config.data.window <= longest, 'data.window', config.data.window,
           f'the longest sequence of {recording_set.source} has {longest} timesteps, so set '
           f'--config.data.window to at most {longest}, and data.train_stride to at most the '
           'new window')


MATMUL_PRECISIONS = ('default', 'high', 'highest')


def resolve_platform(config, device_count: int, backend: str) -> None:
  """Turn a per-device batch into global batch sizes, and warn about another backend.

  With per_device_batch_size above 0, batch_size becomes it times `device_count` (every
  device of every process) and eval_batch_size 4 times that; config.json records the result.
  """
  if config.per_device_batch_size > 0:
    batch_size = config.per_device_batch_size * device_count
    defaults = default_config.get_config()
    for field, resolved in (('batch_size', batch_size), ('eval_batch_size', 4 * batch_size)):
      if config[field] not in (defaults[field], resolved):
        raise ValueError(
            f'{field}={config[field]} is set while per_device_batch_size='
            f'{config.per_device_batch_size} makes it {resolved} on {device_count} devices; '
            'set --config.per_device_batch_size=0 to give the global batch sizes yourself.')
    config.batch_size, config.eval_batch_size = batch_size, 4 * batch_size
    logging.info('per_device_batch_size=%d on %d devices: batch_size %d, eval_batch_size %d',
                 config.per_device_batch_size, device_count, config.batch_size,
                 config.eval_batch_size)
  if config.platform != backend:
    logging.warning(
        'The config is set up for platform %r but jax runs on %r; the run goes ahead with '
        'those settings. Add :%s after the config path for the matching variant.',
        config.platform, backend, backend if backend in platforms.PLATFORMS else 'cpu')


def matmul_precision(config):
  """Return a context that sets jax's default matmul precision to the config's."""
  if config.matmul_precision == 'default':
    return contextlib.nullcontext()
  return jax.default_matmul_precision(config.matmul_precision)


def data_fingerprint(recording_set) -> str:
  """Return a SHA-256 over every sequence's ids, raw values and observed masks."""
  digest = hashlib.sha256(recording_set.source.encode())
  for seq in recording_set.sequences:
    digest.update(f'{seq.sequence_id}\0{seq.subject}\0{seq.label}\0'.encode())
    for name in sorted(seq.raw):
      digest.update(np.ascontiguousarray(seq.raw[name]).tobytes())
      digest.update(np.ascontiguousarray(seq.observed[name]).tobytes())
  return digest.hexdigest()


def flatten(tree: dict, prefix: str = '') -> dict:
  """Return {'a.b.c': value} for a nested dict of config values."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _added_at_default(key: str, before: dict, now: dict, defaults: dict) -> bool:
  """Return whether `key` is a config field added after the run started, left at its default.

  Every field added to the config keeps the earlier behaviour at its default value, so a run
  that started before the field existed trained as with the default.
  """
  return key not in before and key in defaults and now.get(key) == defaults[key]


def check_resume(workdir: str, config_dict: dict, fingerprint: str) -> None:
  """Raise ValueError when `workdir` contains a run with another config or other data."""
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  before, now = flatten(saved['config']), flatten(config_dict)
  defaults = flatten(json.loads(default_config.get_config().to_json_best_effort()))
  changed = sorted(k for k in set(before) | set(now)
                   if before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE
                   and not _added_at_default(k, before, now, defaults))
  if changed:
    details = '; '.join(f'{k}: {before.get(k)!r} in the workdir, {now.get(k)!r} now'
                        for k in changed)
    raise ValueError(
        f'{workdir} contains a run with another config ({details}). Resuming would mix two '
        'runs; use a new --workdir, or set those fields back to resume.')
  if saved['data_fingerprint'] != fingerprint:
    raise ValueError(
        f'{workdir} contains a run trained on other data: the loaded recordings differ from '
        'the ones it started with. Use a new --workdir, or restore the original data.')


def write_run_file(workdir: str, config_dict: dict, fingerprint: str) -> None:
  with open(os.path.join(workdir, RUN_FILE), 'w', encoding='utf-8') as f:
    json.dump({'config': config_dict, 'data_fingerprint': fingerprint}, f, indent=2)
