"""Fill the target values that a CMI-schema table lacks, with the model of a trained workdir.

`load_imputer` restores the best-by-validation checkpoint of a workdir (the latest one when no
validation ran), with the scaling statistics saved in it and the workdir's config.
`predict_sequences` runs the model over recordings. `impute_file` streams a table through it.

How a sequence is covered: it is cut into windows of `data.window` timesteps that start every
`stride` timesteps (half a window by default), and the last window is padded. The model gets
every observed value of the window as input (nothing is hidden on purpose) and predicts every
target value. Each timestep's prediction is the mean over the windows that contain it. With learned
variances, its variance is the variance of that equal mixture: the mean of the windows'
predicted variances plus the spread of their means around the averaged mean.

What impute_file writes:

* Every input row, in the input order, with every column. A target value that the file lacks
  (an empty cell or NaN) is replaced by the model's prediction in original units. Every other
  value is kept as read. ToF -1 ("no return") is a reading, so it stays.
* `<group>_imputed` per target group: True in a row where at least one of the group's values
  was filled.
* With `uncertainty`, `<column>_std` per target column: the predicted standard deviation of a
  filled value, and 0.0 for a kept one.

The table is read in chunks of whole sequences, so memory grows with the chunk, not with the
file. The rows of a sequence must therefore be contiguous in the file. The output is written
to a temporary file beside it and renamed at the end, so a file that fails validation part
way leaves no partial output.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import tqdm
from absl import logging

from imputer import checkpointing
from imputer import cmi
from imputer import evaluation
from imputer import layout as layout_lib
from imputer import losses
from imputer import models
from imputer import scaling
from imputer import sharding
from imputer import sources
from imputer import training
from imputer import windows as windows_lib

IMPUTED_SUFFIX = '_imputed'
STD_SUFFIX = '_std'


@dataclasses.dataclass
class Imputer:
  """A restored model with what it needs to predict: layouts, scalers and a jitted function."""

  config: Any
  input_layouts: tuple
  target_layouts: tuple
  scalers: dict
  params: Any
  predict_fn: Any  # (params, batch, show_targets) -> (recon, log_var), raw channels only.
  checkpoint: dict  # {'step': int, 'kind': str}

  @property
  def has_variance(self) -> bool:
    return self.config.loss.kind in losses.CONF_KINDS

  @property
  def window(self) -> int:
    return self.config.data.window


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """Return the resolved config that a training run wrote into `workdir`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(
        f'{path} does not exist, so {workdir!r} contains no trained run; give the --workdir of a '
        'finished training run (python launch.py --config=... --workdir=DIR trains one).')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def _check_cmi_schema(config, workdir: str) -> None:
  if config.data.streams:
    raise ValueError(
        f'{workdir} was trained on sensor streams (data.path={config.data.path!r}), whose '
        'groups are not the CMI columns; impute mode reads CMI-schema tables, so give the '
        'workdir of a run trained on a CMI file or on the synthetic CMI-schema data.')


def _dummy_batch(window: int, layouts) -> dict:
  return {'valid': np.ones((1, window), bool),
          'values': {l.name: np.zeros((1, window, l.num_features), np.float32) for l in layouts},
          'observed': {l.name: np.ones((1, window, l.num_features), bool) for l in layouts}}


def _restore(workdir: str, config, model, input_layouts, target_layouts):
  """Return (train state, scalers json, checkpoint description) of the workdir's best step."""
  found = [name for name in ('checkpoints_best', 'checkpoints')
           if os.path.isdir(os.path.join(workdir, name)) and os.listdir(os.path.join(workdir, name))]
  if not found:
    raise ValueError(
        f'{workdir} has no checkpoint (checkpoints_best/ and checkpoints/ are missing or empty); '
        'train the run to at least its first checkpoint, or give another --workdir.')

  # Only the optimizer state's structure matters here, so any run length past warmup does.
  schedule = training.make_schedule(config.optim, config.optim.warmup_steps + 2)
  tx = training.make_optimizer(config.optim, schedule)
  queue_size = config.contrastive.queue_size if config.lambda_contrastive > 0 else 0
  state = jax.jit(lambda key, example: training.create_train_state(
      key, example, model=model, tx=tx, input_layouts=input_layouts,
      target_layouts=target_layouts, prior=config.model.interpolation_prior,
      queue_size=queue_size))(jax.random.PRNGKey(0),
                              _dummy_batch(config.data.window, input_layouts + target_layouts))

  abstract = checkpointing.abstract_like(state)
  checkpoints = checkpointing.Checkpoints(workdir, config.max_checkpoints_to_keep)
  try:
    restored = checkpoints.restore_best(abstract)
    kind = 'best by validation loss'
    if restored is None:
      restored, kind = checkpoints.restore_latest(abstract), 'latest'
  except checkpointing.CheckpointMismatchError as error:
    # Impute mode has no partial restore: parameters left at their initial values would
    # give meaningless predictions.
    raise ValueError(
        f'{error.summary()}\n{workdir}/config.json describes another model than the one in '
        'the checkpoint: the file was changed after training, or this version of imputer '
        'builds the model differently. Restore the original config.json of the run, or '
        'impute with the version of imputer that trained it.') from error
  except (KeyError, FileNotFoundError, ValueError) as error:
    raise ValueError(
        f'{workdir}: the checkpoint could not be read ({error}); it may be incomplete, for '
        'example from a run stopped while saving. Resume the training run to write a new '
        'one, or give another --workdir.') from error
  finally:
    checkpoints.close()

  if restored is None:
    raise ValueError(f'{workdir} has no complete checkpoint; train the run further or give '
                     'another --workdir.')
  state, scalers_json = restored
  return state, scalers_json, {'step': int(state.step), 'kind': kind}


def make_predict_fn(model, config, input_layouts, target_layouts):
  """Return a jitted (params, batch, show_targets) -> (recon, log_var) on raw channels.

  `show_targets` is a boolean scalar: True shows the model every observed target value,
  False hides them all, as for a recording that carries only the inputs. It is an argument
  rather than a constant so that one compiled program serves both.
  """
  def predict(params, batch, show_targets):
    visible = {l.name: (batch['observed'][l.name][..., :l.num_raw] & show_targets).astype(
        jnp.float32) for l in target_layouts}
    inputs = training.model_inputs(batch, input_layouts, target_layouts, visible,
                                   config.model.interpolation_prior)
    outputs = model.apply({'params': params}, inputs, train=False)
    recon = {l.name: outputs['recon'][l.name][..., :l.num_raw] for l in target_layouts}
    log_var = {l.name: jnp.broadcast_to(outputs['log_var'][l.name],
                                        outputs['recon'][l.name].shape)[..., :l.num_raw]
               for l in target_layouts} if 'log_var' in outputs else {}
    return recon, log_var
  return jax.jit(predict)


def load_imputer(workdir: str, recording_set=None) -> Imputer:
  """Restore the model, scalers and config of the trained run in `workdir`.

  The groups come from `recording_set` (the workdir's own data, loaded by the caller) or,
  without it, are the CMI table's, and the run must then have been trained on CMI-schema data.
  """
  config = read_workdir_config(workdir)
  if recording_set is None:
    _check_cmi_schema(config, workdir)
    input_groups, target_groups = cmi.cmi_groups()
  else:
    input_groups, target_groups = recording_set.input_groups, recording_set.target_groups
  input_layouts = layout_lib.build_layouts(input_groups)
  target_layouts = layout_lib.build_layouts(target_groups)
  model = models.build_model(config, input_layouts, target_layouts)
  state, scalers_json, checkpoint = _restore(workdir, config, model, input_layouts,
                                             target_layouts)
  scalers = scaling.scalers_from_json(scalers_json)
  logging.info('Restored step %d (%s) from %s.', checkpoint['step'], checkpoint['kind'],
               workdir)
  return Imputer(config, input_layouts, target_layouts, scalers, state.params,
                 make_predict_fn(model, config, input_layouts, target_layouts), checkpoint)


@dataclasses.dataclass
class Prediction:
  """Per-sequence predictions in original units: {group: (T, C_raw)} means and std (or None)."""

  mean: dict[str, np.ndarray]
  std: dict[str, np.ndarray] | None


def predict_sequences(imputer: Imputer, sequences, stride: int | None = None,
                      show_targets: bool = True) -> list[Prediction]:
  """Predict every target value of `sequences` (recordings.Sequence), averaging overlaps.

  `stride` is the step between window starts (default: half a window). With `show_targets`
  False every target value is hidden from the model, as for an IMU-only recording.
  """
  window = imputer.window
  stride = stride or max(window // 2, 1)
  if not 1 <= stride <= window:
    raise ValueError(f'--stride={stride} is invalid: use 1 to data.window ({window}) timesteps '
                     'between window starts, or 0 for half a window.')
  layouts = imputer.input_layouts + imputer.target_layouts
  engineered = windows_lib.engineer_sequences(sequences, layouts)
  windows = windows_lib.make_windows(engineered, layouts, imputer.scalers, window, stride)
  sums = [{l.name: np.zeros((4, s.length, l.num_raw)) for l in imputer.target_layouts}
          for s in sequences]
  mesh = sharding.make_mesh(imputer.config.get('mesh', 'flat'))
  # The run's evaluation batch, rounded up to a multiple of this machine's devices, which may
  # be fewer or more than the training run had.
  devices = mesh.devices.size
  batch_size = -(-imputer.config.eval_batch_size // devices) * devices
  sharding.check_batch_size(batch_size, mesh, 'eval_batch_size')
  params = jax.device_put(imputer.params, sharding.replicated(mesh))
  for batch_index, batch, real in evaluation.global_batches(windows, batch_size, mesh):
    recon, log_var = jax.device_get(imputer.predict_fn(params, batch, np.bool_(show_targets)))
    for k in range(real):
      i, start, size = windows.index[batch_index * batch_size + k]
      for name, mean in recon.items():
        mu = mean[k, :size].astype(np.float64)
        part = sums[i][name][:, start:start + size]
        part[0] += mu
        part[1] += mu * mu
        part[2] += 1.0
        if log_var:
          part[3] += losses.predictive_std(imputer.config.loss.kind, log_var[name][k, :size]) ** 2
  return [_combine(imputer, s) for s in sums]


def _combine(imputer: Imputer, sums: dict) -> Prediction:
  """Turn per-timestep window sums (scaled units) into a mixture mean and std in original units."""
  means, stds = {}, {}
  for layout in imputer.target_layouts:
    total, squares, count, variance = sums[layout.name]
    count = np.maximum(count, 1.0)
    mean = total / count
    spread = np.maximum(squares / count - mean * mean, 0.0)
    scaler = imputer.scalers[layout.name]
    raw = slice(0, layout.num_raw)
    means[layout.name] = scaler.inverse(mean, raw)
    stds[layout.name] = np.sqrt(variance / count + spread) * scaler.scale[raw]
  return Prediction(means, stds if imputer.has_variance else None)


# Reading and writing tables in chunks of whole sequences.


def _scan(path: str, source: str) -> pl.LazyFrame:
  suffix = pathlib.Path(path).suffix.lower()
  if suffix == '.csv':
    return pl.scan_csv(path, schema_overrides=cmi.csv_schema_overrides(cmi.read_csv_header(path)))
  if suffix == '.parquet':
    return pl.scan_parquet(path)
  raise ValueError(f'{source}: unknown file type {pathlib.Path(path).suffix!r}; give a .csv or '
                   '.parquet file.')


def _check_input(path: str) -> int:
  """Check that `path` is a readable CMI table with data rows; return its number of rows."""
  cmi.check_table_path(path)
  kind = 'CSV' if path.lower().endswith('.csv') else 'parquet'
  try:
    columns = _scan(path, path).collect_schema().names()
    rows = _scan(path, path).select(pl.len()).collect().item()
  except pl.exceptions.PolarsError as error:
    raise ValueError(f'{path}: could not be read ({error}); check that the file is a complete '
                     f'{kind} table.') from error
  cmi.check_columns(columns, path)
  if rows == 0:
    raise ValueError(f'{path}: the table has a header but no data rows; check that the export '
                     'wrote the rows.')
  if kind == 'CSV':
    cmi.check_csv_field_counts(path, len(columns))
  target_columns = [c for _, cols in _target_columns() for c in cols]
  produced = [f'{g}{IMPUTED_SUFFIX}' for g, _ in _target_columns()]
  produced += [f'{c}{STD_SUFFIX}' for c in target_columns]
  clash = [c for c in produced if c in columns]
  if clash:
    raise ValueError(
        f'{path}: already has the column(s) {", ".join(clash[:5])}, which impute mode writes; '
        'rename or drop them, or impute the original table.')
  return rows


def _target_columns():
  _, target_groups = cmi.cmi_groups()
  return [(g.name, g.columns) for g in target_groups]


def _chunks(path: str, chunk_rows: int) -> Iterator[tuple[int, pl.DataFrame]]:
  """Yield (first data row, frame) chunks of whole sequences, in file order.

  Raises ValueError when a sequence's rows are not contiguous in the file.
  """
  finished: set[str] = set()
  pending, first_row = None, 1
  batches = _scan(path, path).collect_batches(chunk_size=chunk_rows, lazy=True)
  for batch in batches:
    pending = batch if pending is None else pl.concat([pending, batch], how='vertical_relaxed')
    ids = pending['sequence_id'].cast(pl.String)
    last = ids[-1]
    # The trailing run of the last sequence may continue in the next batch.
    change = (ids != last).arg_true()
    cut = int(change[-1]) + 1 if len(change) else 0
    if cut == 0:
      continue  # One sequence so far: it stays whole, however long.
    chunk, pending = pending.slice(0, cut), pending.slice(cut)
    _check_contiguous(chunk, finished, path, first_row)
    yield first_row, chunk
    first_row += chunk.height
    if pending.height == 0:
      pending = None
  if pending is not None and pending.height:
    _check_contiguous(pending, finished, path, first_row)
    yield first_row, pending


def _check_contiguous(chunk: pl.DataFrame, finished: set, path: str, first_row: int) -> None:
  ids = chunk['sequence_id'].cast(pl.String)
  if ids.null_count():
    row = first_row + int(ids.is_null().arg_true()[0])
    raise ValueError(f'{path}: column \'sequence_id\' is empty at data row {row}; every row '
                     'needs a sequence_id, so fill it in or remove the row.')
  runs = ids.rle()
  values = runs.struct.field('value').to_list()
  lengths = runs.struct.field('len').to_list()
  position = first_row
  for value, length in zip(values, lengths):
    if value in finished:
      raise ValueError(
          f'{path}: sequence_id {value!r} appears again at data row {position} after rows of '
          'other sequences; impute mode reads whole sequences in file order, so write the rows '
          'of each sequence together (for example sorted by sequence_id, keeping their order).')
    finished.add(value)
    position += length


def _output_dtype(dtype) -> pl.DataType:
  """Float columns keep their width; any other type becomes Float64 to hold predictions."""
  return dtype if dtype in (pl.Float32, pl.Float64) else pl.Float64


def fill_chunk(imputer: Imputer, frame: pl.DataFrame, source: str, first_row: int,
               uncertainty: bool, stride: int | None = None) -> tuple[pl.DataFrame, dict]:
  """Return `frame` with its missing target values filled, and counts of what was filled."""
  data = imputer.config.data
  recording_set = cmi.from_cmi_frame(frame, source, data.tof_no_return, data.tof_far_value,
                                     first_row)
  sequences = recording_set.sequences
  predictions = predict_sequences(imputer, sequences, stride)

  # Each row's place in the stacked per-sequence predictions.
  index_of = {s.sequence_id: i for i, s in enumerate(sequences)}
  ids = frame['sequence_id'].cast(pl.String)
  sequence_index = ids.replace_strict(index_of, return_dtype=pl.Int64).to_numpy()
  counter = pl.col('sequence_counter').cast(pl.Float64)
  position = frame.select(counter - counter.min().over(pl.col('sequence_id').cast(pl.String))
                          ).to_series().to_numpy()
  offsets = np.concatenate([[0], np.cumsum([s.length for s in sequences])[:-1]])
  rows = offsets[sequence_index] + position.astype(np.int64)

  replaced, extra, counts = [], [], {'excluded': recording_set.excluded}
  for name, columns in _target_columns():
    original = frame.select(pl.col(c).cast(pl.Float64) for c in columns).to_numpy()
    missing = np.isnan(original)
    mean = np.concatenate([p.mean[name] for p in predictions])[rows]
    filled = np.where(missing, mean, original)
    for k, column in enumerate(columns):
      dtype = _output_dtype(frame.schema[column])
      replaced.append(pl.Series(column, filled[:, k]).cast(dtype))
    extra.append(pl.Series(f'{name}{IMPUTED_SUFFIX}', missing.any(axis=1)))
    if uncertainty:
      std = np.concatenate([p.std[name] for p in predictions])[rows]
      std = np.where(missing, std, 0.0)
      extra.extend(pl.Series(f'{c}{STD_SUFFIX}', std[:, k]) for k, c in enumerate(columns))
    counts[name] = int(missing.sum())
    counts[f'{name}_rows'] = int(missing.any(axis=1).sum())
  counts['sequences'] = len(sequences)
  counts['sequences_without_targets'] = sum(
      not s.has_target_truth(recording_set.target_names) for s in sequences)
  return frame.with_columns(replaced).hstack(extra), counts


class _CsvWriter:

  def __init__(self, path: str):
    self.file = open(path, 'wb')
    self.header = True

  def write(self, frame: pl.DataFrame) -> None:
    frame.write_csv(self.file, include_header=self.header)
    self.header = False

  def close(self) -> None:
    self.file.close()


class _ParquetWriter:

  def __init__(self, path: str):
    self.path, self.writer = path, None

  def write(self, frame: pl.DataFrame) -> None:
    table = frame.to_arrow()
    if self.writer is None:
      self.writer = pq.ParquetWriter(self.path, table.schema)
    self.writer.write_table(table)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
    elif not os.path.exists(self.path):
      open(self.path, 'wb').close()


def _open_writer(path: str, output_path: str):
  """Open a writer at `path` in the format that the suffix of `output_path` names."""
  csv = output_path.lower().endswith('.csv')
  return _CsvWriter(path) if csv else _ParquetWriter(path)


def _locate_bad_cell(path: str, chunk_rows: int, error: Exception) -> ValueError:
  """Find the first cell of a CSV that is not a number, for an error naming row and value."""
  for first_row, chunk in _chunks_as_text(path, chunk_rows):
    for name in chunk.columns:
      if name in cmi.NUMERIC_COLUMNS:
        cmi.float_column(chunk[name], path, first_row)  # Raises at the first bad cell.
  return ValueError(f'{path}: could not be parsed ({error}); check the quoting and the number '
                    'of fields in each row.')


def _chunks_as_text(path: str, chunk_rows: int):
  first_row = 1
  for batch in pl.scan_csv(path, infer_schema=False).collect_batches(chunk_size=chunk_rows,
                                                                      lazy=True):
    yield first_row, batch
    first_row += batch.height


def _check_output(input_path: str, output_path: str) -> None:
  if pathlib.Path(output_path).suffix.lower() not in ('.csv', '.parquet'):
    raise ValueError(f'--output={output_path!r}: give a .csv or .parquet path.')
  if os.path.isdir(output_path):
    raise ValueError(f'--output={output_path!r} is a folder; give a file path inside it.')
  folder = os.path.dirname(os.path.abspath(output_path))
  if not os.path.isdir(folder):
    raise ValueError(f'--output={output_path!r}: the folder {folder} does not exist; create it '
                     'first.')
  if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
    raise ValueError(f'--output={output_path!r} is the input file; write to another path.')


def load_workdir_data(workdir: str, config):
  """Load the recordings that trained the run in `workdir`, naming config.json on failure."""
  try:
    return sources.load_recordings(config.data)
  except ValueError as error:
    raise ValueError(
        f'{workdir}: the training data named in config.json could not be loaded: {error} '
        f'Restore the data at data.path={config.data.path!r}, or edit data.path in '
        f'{os.path.join(workdir, "config.json")} to where it now lives.') from error


def impute_file(workdir: str, input_path: str, output_path: str, uncertainty: bool = False,
                chunk_rows: int = 50_000, stride: int | None = None,
                progress: bool = True) -> dict:
  """Fill the missing THM/ToF values of a CMI-schema table and write the result.

  Returns the counts that are also logged: rows, sequences and filled values per group.
  """
  _check_output(input_path, output_path)
  if chunk_rows < 1:
    raise ValueError(f'--chunk_rows={chunk_rows} is invalid; use 1 or more rows.')
  total_rows = _check_input(input_path)
  imputer = load_imputer(workdir)
  if uncertainty and not imputer.has_variance:
    raise ValueError(
        f'{workdir} was trained with loss.kind={imputer.config.loss.kind!r}, which predicts no '
        'variance, so there is no standard deviation to write; drop --uncertainty, or train '
        'with a conf_ loss (configs/phase1.py and later), ideally with '
        '--config.model.variance_head=True.')
  source = f'CMI file {input_path}'
  partial = f'{output_path}.partial'
  writer = _open_writer(partial, output_path)
  totals = collections.Counter()
  excluded = collections.Counter()
  try:
    with tqdm.tqdm(total=total_rows, unit='rows', disable=not progress,
                   desc='impute') as bar:
      try:
        for first_row, chunk in _chunks(input_path, chunk_rows):
          out, counts = fill_chunk(imputer, chunk, source, first_row, uncertainty, stride)
          excluded.update(counts.pop('excluded'))
          totals.update(counts)
          totals['rows'] += chunk.height
          writer.write(out)
          bar.update(chunk.height)
      except pl.exceptions.PolarsError as error:
        if not input_path.lower().endswith('.csv'):
          raise ValueError(f'{input_path}: could not be read ({error}); check that the parquet '
                           'file is complete.') from error
        raise _locate_bad_cell(input_path, chunk_rows, error) from error
    writer.close()
    filled = sum(totals[name] for name, _ in _target_columns())
    if filled == 0:
      raise ValueError(
          f'{input_path}: every THM and ToF value is present, so there is nothing to impute and '
          'no output was written; impute mode fills the empty or NaN cells of the target '
          'columns.')
    os.replace(partial, output_path)
  except BaseException:
    writer.close()
    if os.path.exists(partial):
      os.remove(partial)
    raise
  summary = {'rows': totals['rows'], 'sequences': totals['sequences'],
             'sequences_without_targets': totals['sequences_without_targets'],
             'filled_values': {name: totals[name] for name, _ in _target_columns()},
             'filled_rows': {name: totals[f'{name}_rows'] for name, _ in _target_columns()},
             'read_as_missing': dict(excluded), 'checkpoint': imputer.checkpoint,
             'output': output_path}
  logging.info('Imputed %s: %d rows, %d sequences (%d without any THM/ToF value); filled %s '
               'with step %d (%s); wrote %s.', input_path, summary['rows'],
               summary['sequences'], summary['sequences_without_targets'],
               ', '.join(f'{n} {v} values' for n, v in summary['filled_values'].items()),
               imputer.checkpoint['step'], imputer.checkpoint['kind'], output_path)
  return summary
