"""PNG figures and an HTML page that show a trained run's imputations for chosen sequences.

The imputation drawn is the one an IMU-only recording gets: every target value is hidden from
the model, which receives only the input groups, so the curves show what the model infers from
the inputs alone. The observed truth is drawn next to it for comparison and is never shown to
the model.

`write_visual_report` writes `index.html` and PNG figures into `WORKDIR/visual_report/`.
Each sequence gets one figure of its input channels. Each target group of at most
`MAX_LINE_COLUMNS` raw columns gets one of truth against the imputed mean, with a ±1σ band
when the run learned a variance. Each group of 8x8 sensors gets true and imputed frames. One
more figure shows the training curves of every loss term in `metrics.jsonl`.

Every figure is saved at `DPI` without cropping, so its PNG is exactly its figure size in
inches times `DPI` pixels. The sizes are multiples of 1/4 inch, so that product is a whole
number of pixels.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import json
import math
import os
import re

import matplotlib

matplotlib.use('Agg')  # The report writes files only, so it needs no display.
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from imputer import folds  # noqa: E402
from imputer import impute  # noqa: E402

REPORT_FOLDER = 'visual_report'
INDEX_FILE = 'index.html'
METRICS_FILE = 'metrics.jsonl'
DEFAULT_SEQUENCE_COUNT = 3
MAX_LINE_COLUMNS = 16  # A target group with more raw columns gets no line figure.
FRAME_SIDE = 8  # A frame sensor is an 8x8 grid of pixels in row-major column order.
FRAME_PIXELS = FRAME_SIDE * FRAME_SIDE
FRAME_TIMESTEPS = 4
# A longer sequence is drawn over this many timesteps (see `drawn_span`), so lines stay legible.
MAX_DRAWN_TIMESTEPS = 600
CURVE_COLUMNS = 3  # Subplots per row of the training-curve figure.
LOSS_PREFIXES = ('train/loss', 'val/loss')

DPI = 100
# Figure sizes in inches.
TITLE_HEIGHT = 0.5
SERIES_WIDTH = 12.0
INPUT_PANEL_HEIGHT = 2.5
TARGET_PANEL_HEIGHT = 1.5
FRAME_PANEL_SIZE = 1.25
FRAME_LABEL_WIDTH = 0.75  # Room for the row labels left of the frames.
FRAME_MIN_WIDTH = 6.0  # Room for the title when a group has few sensors.
FRAME_COLORBAR_HEIGHT = 0.75
CURVE_PANEL_WIDTH = 4.0
CURVE_PANEL_HEIGHT = 3.0


@dataclasses.dataclass(frozen=True)
class ReportFigure:
  """A PNG written into the report folder, with its one-line caption."""

  file_name: str
  caption: str


@dataclasses.dataclass
class LossCurves:
  """Loss terms read from metrics.jsonl.

  `curves[term][split]` is a pair of arrays (steps, values) sorted by step, where split is
  'train' or 'val' and term is the key after the split, such as 'loss' or 'loss_recon_thm'.
  `skipped[key]` counts the non-finite values of each metric key that were left out.
  """

  curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
  skipped: collections.Counter


# Choosing what to draw.


def choose_sequences(recording_set, test_subjects, sequence_ids) -> list:
  """Return the sequences named by `sequence_ids`, or by default the first test sequences.

  The default is the first `DEFAULT_SEQUENCE_COUNT` sequences of `test_subjects`, in the
  order of `recording_set.sequences`, that have at least one observed target value.
  Raises ValueError for an unknown or repeated id, or when no default sequence exists.
  """
  test = set(test_subjects)
  candidates = [seq for seq in recording_set.sequences
                if seq.subject in test and seq.has_target_truth(recording_set.target_names)]
  if not sequence_ids:
    if not candidates:
      raise ValueError(
          f'{recording_set.source}: none of the sequences of the test subjects '
          f'{", ".join(sorted(test))} has an observed target value, so there is no default '
          'sequence to draw; choose sequences with --sequences=ID1,ID2.')
    return candidates[:DEFAULT_SEQUENCE_COUNT]

  repeated = sorted({i for i in sequence_ids if sequence_ids.count(i) > 1})
  if repeated:
    raise ValueError(f'--sequences lists {", ".join(map(repr, repeated))} more than once; give '
                     'each sequence_id once.')
  by_id = {seq.sequence_id: seq for seq in recording_set.sequences}
  unknown = [i for i in sequence_ids if i not in by_id]
  if unknown:
    examples = [seq.sequence_id for seq in (candidates or recording_set.sequences)][:5]
    raise ValueError(
        f'--sequences: unknown sequence_id {", ".join(map(repr, unknown))} in '
        f'{recording_set.source}; valid ids include {", ".join(examples)}.')
  return [by_id[i] for i in sequence_ids]


def subject_role(split, subject: str) -> str:
  """Return 'train', 'validation' or 'test' for a subject of `split` (folds.Split)."""
  for role in ('train', 'validation', 'test'):
    if subject in getattr(split, role):
      return role
  raise ValueError(f'subject {subject!r} is in no part of the split; the fold assignment '
                   'covers every subject of the data, so check that the data is unchanged.')


def frame_sensor_columns(layout) -> list[np.ndarray] | None:
  """Return each sensor's 64 raw column indices when `layout` is a group of 8x8 sensors.

  A group is one when it has 64 raw columns per sensor and every sensor owns exactly 64 of
  them, such as the CMI ToF group. Returns None for any other group.
  """
  if layout.num_raw != FRAME_PIXELS * layout.num_sensors:
    return None
  columns = [np.flatnonzero(layout.sensor_of_raw == s) for s in range(layout.num_sensors)]
  if any(len(c) != FRAME_PIXELS for c in columns):
    return None
  return columns


def target_figure_kind(layout) -> str | None:
  """Return 'frames', 'columns' or None (no figure) for a target group's layout."""
  if frame_sensor_columns(layout) is not None:
    return 'frames'
  if layout.num_raw <= MAX_LINE_COLUMNS:
    return 'columns'
  return None


def frame_timesteps(observed: np.ndarray, count: int = FRAME_TIMESTEPS) -> np.ndarray:
  """Pick up to `count` timesteps, evenly spread, among the rows with an observed value.

  `observed` is a (T, C) mask. Without any observed row the picks spread over the whole
  sequence, so the imputed frames are still drawn.
  """
  rows = np.flatnonzero(observed.any(axis=1))
  if len(rows) == 0:
    rows = np.arange(observed.shape[0])
  picks = np.unique(np.round(np.linspace(0, len(rows) - 1, min(count, len(rows)))).astype(int))
  return rows[picks]


# Training curves.


def _metric_value(value, path: str, line_number: int, key: str) -> float:
  """Convert a metrics.jsonl value; non-finite values are written as strings such as 'nan'."""
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(
        f'{path}, line {line_number}: {key}={value!r} is not a number; metrics.jsonl contains one '
        'JSON object of scalars per line, so check that the file was written by training.'
    ) from None


def read_loss_curves(path: str) -> LossCurves:
  """Read every key starting with train/loss or val/loss from a metrics.jsonl file.

  Raises ValueError, naming the line, for a line that is not a JSON object with a 'step'.
  """
  points = collections.defaultdict(list)
  skipped = collections.Counter()
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f'{path}, line {line_number}: invalid JSON ({error}); the file may '
                         'have been cut off, so delete that line or rerun training.') from None
      if not isinstance(record, dict) or 'step' not in record:
        raise ValueError(f'{path}, line {line_number}: missing the "step" key; each line must be '
                         'a JSON object with "step" and scalar metrics.')
      step = int(record['step'])
      for key, value in record.items():
        if not key.startswith(LOSS_PREFIXES):
          continue
        value = _metric_value(value, path, line_number, key)
        if math.isfinite(value):
          points[key].append((step, value))
        else:
          skipped[key] += 1
  curves = collections.defaultdict(dict)
  for key, pairs in points.items():
    split, term = key.split('/', 1)
    # A resumed run appends to the file, so its steps can repeat or go back.
    pairs.sort(key=lambda pair: pair[0])
    steps, values = zip(*pairs)
    curves[term][split] = (np.asarray(steps), np.asarray(values))
  return LossCurves(dict(curves), skipped)


def _ordered_terms(curves: dict) -> list[str]:
  """Sort the terms: the total 'loss' first, then the others alphabetically."""
  return sorted(curves, key=lambda term: (term != 'loss', term))


def plot_loss_curves(loss_curves: LossCurves) -> plt.Figure:
  """Draw one subplot per loss term, with its train and validation curves."""
  terms = _ordered_terms(loss_curves.curves)
  columns = min(CURVE_COLUMNS, len(terms))
  rows = math.ceil(len(terms) / columns)
  figure, axes = plt.subplots(
      rows, columns, squeeze=False, layout='constrained',
      figsize=(CURVE_PANEL_WIDTH * columns, CURVE_PANEL_HEIGHT * rows + TITLE_HEIGHT))
  for axis, term in zip(axes.flat, terms):
    for split, (steps, values) in sorted(loss_curves.curves[term].items()):
      axis.plot(steps, values, marker='.', label=split)
      skipped = loss_curves.skipped[f'{split}/{term}']
      if skipped:
        axis.plot([], [], ' ', label=f'{split}: {skipped} non-finite values left out')
    axis.set_title(term, fontsize='medium')
    axis.set_xlabel('step')
    axis.legend(fontsize='small')
  for axis in axes.flat[len(terms):]:
    axis.set_axis_off()
  figure.suptitle('Training curves')
  return figure


# Figures of one sequence.


def _timesteps(sequence, first_timestep: int = 0) -> np.ndarray:
  return first_timestep + np.arange(sequence.length)


def _label_timesteps(axis) -> None:
  axis.set_xlabel('timestep')
  axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))


def plot_inputs(sequence, input_layouts, first_timestep: int = 0) -> plt.Figure:
  """Draw every raw input column over time, one subplot per input group."""
  figure, axes = plt.subplots(
      len(input_layouts), 1, squeeze=False, sharex=True, layout='constrained',
      figsize=(SERIES_WIDTH, INPUT_PANEL_HEIGHT * len(input_layouts) + TITLE_HEIGHT))
  t = _timesteps(sequence, first_timestep)
  for axis, layout in zip(axes[:, 0], input_layouts):
    values = np.where(sequence.observed[layout.name], sequence.raw[layout.name], np.nan)
    for column, name in enumerate(layout.spec.columns):
      axis.plot(t, values[:, column], linewidth=1.0, label=name)
    missing = int((~sequence.observed[layout.name]).sum())
    axis.set_title(f'{layout.name}: {missing} missing values (gaps)' if missing else layout.name,
                   fontsize='medium')
    axis.legend(fontsize='small', ncol=math.ceil(layout.num_raw / 8), loc='upper left',
                bbox_to_anchor=(1.0, 1.0))
  _label_timesteps(axes[-1, 0])
  figure.suptitle(f'{sequence.sequence_id} (subject {sequence.subject}): input channels')
  return figure


def _column_title(name: str, truth: np.ndarray, mean: np.ndarray) -> str:
  observed = np.isfinite(truth)
  if not observed.any():
    return f'{name}: no observed value'
  error = float(np.abs(truth[observed] - mean[observed]).mean())
  return f'{name}: MAE {error:.3g} over {int(observed.sum())} observed values'


def plot_target_columns(sequence, layout, prediction, first_timestep: int = 0) -> plt.Figure:
  """Draw each raw column of a target group: observed truth against the imputed mean.

  The shaded band is mean ± 1 predicted standard deviation, drawn only when
  `prediction.std` exists.
  """
  name = layout.name
  figure, axes = plt.subplots(
      layout.num_raw, 1, squeeze=False, sharex=True, layout='constrained',
      figsize=(SERIES_WIDTH, TARGET_PANEL_HEIGHT * layout.num_raw + TITLE_HEIGHT))
  t = _timesteps(sequence, first_timestep)
  truth = np.where(sequence.observed[name], sequence.raw[name], np.nan)
  mean = prediction.mean[name]
  for column, axis in enumerate(axes[:, 0]):
    if prediction.std is not None:
      std = prediction.std[name][:, column]
      axis.fill_between(t, mean[:, column] - std, mean[:, column] + std, alpha=0.3,
                        color='tab:blue', linewidth=0, label='±1σ')
    axis.plot(t, mean[:, column], color='tab:blue', linewidth=1.0, label='imputed mean')
    axis.plot(t, truth[:, column], '.', color='black', markersize=3, label='observed truth')
    axis.set_title(_column_title(layout.spec.columns[column], truth[:, column], mean[:, column]),
                   fontsize='small', loc='left')
  axes[0, 0].legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.0, 1.0))
  _label_timesteps(axes[-1, 0])
  figure.suptitle(f'{sequence.sequence_id} (subject {sequence.subject}): {name}, imputed from '
                  'the inputs alone')
  return figure


def _frame_colormap():
  return plt.get_cmap('viridis').with_extremes(bad='lightgrey')  # Grey: missing truth pixels.


def plot_frames(sequence, layout, prediction, count: int = FRAME_TIMESTEPS,
                first_timestep: int = 0) -> plt.Figure:
  """Draw true and imputed 8x8 frames of every sensor at up to `count` timesteps.

  Each timestep takes two rows: the truth, with missing pixels in grey, and the imputed mean
  below it. Each sensor (a column of subplots) has one colour scale, shared by all its frames.
  """
  name = layout.name
  sensor_columns = frame_sensor_columns(layout)
  timesteps = frame_timesteps(sequence.observed[name], count)
  truth = np.where(sequence.observed[name], sequence.raw[name], np.nan)[timesteps]
  imputed = prediction.mean[name][timesteps]
  rows, columns = 2 * len(timesteps), layout.num_sensors
  figure, axes = plt.subplots(
      rows, columns, squeeze=False, layout='constrained',
      figsize=(max(FRAME_PANEL_SIZE * columns + FRAME_LABEL_WIDTH, FRAME_MIN_WIDTH),
               FRAME_PANEL_SIZE * rows + TITLE_HEIGHT + FRAME_COLORBAR_HEIGHT))
  colormap = _frame_colormap()
  for s, pixels in enumerate(sensor_columns):
    shown = np.concatenate([truth[:, pixels].ravel(), imputed[:, pixels].ravel()])
    low, high = float(np.nanmin(shown)), float(np.nanmax(shown))
    for i, t in enumerate(timesteps):
      for row, values, kind in ((2 * i, truth, 'true'), (2 * i + 1, imputed, 'imputed')):
        axis = axes[row, s]
        image = axis.imshow(values[i, pixels].reshape(FRAME_SIDE, FRAME_SIDE), cmap=colormap,
                            vmin=low, vmax=high)
        axis.set_xticks([])
        axis.set_yticks([])
        if s == 0:
          axis.set_ylabel(f't={first_timestep + t}\n{kind}', fontsize='small')
    axes[0, s].set_title(layout.spec.sensors[s], fontsize='small')
    figure.colorbar(image, ax=axes[:, s], location='bottom', shrink=0.9)
  figure.suptitle(f'{sequence.sequence_id} (subject {sequence.subject}): {name} frames')
  return figure


# Writing the report.


def drawn_span(sequence, target_layouts, length: int = MAX_DRAWN_TIMESTEPS) -> slice:
  """Return the `length` timesteps of a long sequence where the observed targets change most.

  A timestep's activity is the sum over target columns of |change from the previous
  timestep| divided by the column's standard deviation in the sequence, with missing values
  counting 0. The span with the largest total wins (the earliest on a tie). A sequence of at
  most `length` timesteps is drawn whole.
  """
  if sequence.length <= length:
    return slice(0, sequence.length)
  activity = np.zeros(sequence.length)
  for layout in target_layouts:
    truth = np.where(sequence.observed[layout.name], sequence.raw[layout.name], np.nan)
    if not np.isfinite(truth).any():
      continue
    scale = np.nanstd(truth, axis=0)
    change = np.abs(np.diff(truth, axis=0)) / np.where(scale > 0, scale, np.inf)
    activity[1:] += np.nansum(np.nan_to_num(change, nan=0.0), axis=1)
  totals = np.convolve(activity, np.ones(length), mode='valid')
  start = int(np.argmax(totals))
  return slice(start, start + length)


def crop_sequence(sequence, span: slice):
  """Return the rows `span` of a sequence, for drawing."""
  return dataclasses.replace(
      sequence, raw={name: values[span] for name, values in sequence.raw.items()},
      observed={name: mask[span] for name, mask in sequence.observed.items()},
      timestep_labels=None if sequence.timestep_labels is None
      else sequence.timestep_labels[span])


def crop_prediction(prediction, span: slice):
  """Return the rows `span` of an `impute.Prediction`."""
  std = None if prediction.std is None else {n: v[span] for n, v in prediction.std.items()}
  return dataclasses.replace(prediction, mean={n: v[span] for n, v in prediction.mean.items()},
                             std=std)


def _file_stem(index: int, sequence_id: str) -> str:
  """Build a file-name prefix from the position and the id, with unsafe characters replaced."""
  return f'{index + 1:02d}_{re.sub(r"[^A-Za-z0-9_.-]", "_", sequence_id)}'


def _save(figure: plt.Figure, folder: str, file_name: str, caption: str) -> ReportFigure:
  figure.savefig(os.path.join(folder, file_name), dpi=DPI)
  plt.close(figure)
  return ReportFigure(file_name, caption)


def _frames_caption(sequence, layout, first_timestep: int = 0) -> str:
  observed = sequence.observed[layout.name]
  timesteps = ', '.join(str(first_timestep + t) for t in frame_timesteps(observed))
  where = ('with observed truth' if observed.any()
           else 'spread over the sequence, which has no observed value of the group')
  return (f'{layout.name}: true frames (missing pixels grey) above imputed frames at timesteps '
          f'{timesteps}, {where}. Each sensor has one colour scale.')


def write_sequence_figures(folder: str, index: int, sequence, prediction, input_layouts,
                           target_layouts, first_timestep: int = 0) -> list[ReportFigure]:
  """Write the figures of the `index`-th sequence of the report and return them in page order.

  A target group whose `target_figure_kind` is None gets no figure. `first_timestep` is the
  position of the sequence's first row in its recording, for the time axis.
  """
  stem = _file_stem(index, sequence.sequence_id)
  written = [_save(plot_inputs(sequence, input_layouts, first_timestep), folder, f'{stem}_inputs.png',
                   'Input channels, the only values the model saw (gaps are missing values).')]
  band = ('shaded band: ±1 predicted standard deviation' if prediction.std is not None
          else 'no band: the run learned no variance')
  for layout in target_layouts:
    kind = target_figure_kind(layout)
    if kind == 'columns':
      figure = plot_target_columns(sequence, layout, prediction, first_timestep)
      caption = (f'{layout.name}: observed truth (dots) against the imputed mean (line); '
                 f'{band}.')
    elif kind == 'frames':
      figure = plot_frames(sequence, layout, prediction, first_timestep=first_timestep)
      caption = _frames_caption(sequence, layout, first_timestep)
    else:
      continue
    written.append(_save(figure, folder, f'{stem}_{layout.name}.png', caption))
  return written


def undrawn_groups(target_layouts) -> list[str]:
  """Return a sentence per target group that gets no figure, with the reason."""
  return [f'{layout.name}: {layout.num_raw} raw columns, more than {MAX_LINE_COLUMNS} for line '
          f'plots, and not {FRAME_PIXELS} per sensor for 8x8 frames.'
          for layout in target_layouts if target_figure_kind(layout) is None]


def write_curve_figure(folder: str, workdir: str) -> tuple[ReportFigure | None, str]:
  """Write the training-curve figure and return it with a note for the page.

  Without a metrics file or a finite loss value, nothing is written and the figure is None.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return None, f'No training curves: {path} does not exist.'
  loss_curves = read_loss_curves(path)
  if not loss_curves.curves:
    return None, (f'No training curves: {path} has no finite value of a key starting with '
                  f'{" or ".join(LOSS_PREFIXES)}.')
  skipped = sum(loss_curves.skipped.values())
  note = f'{skipped} non-finite values left out.' if skipped else 'Every loss value is finite.'
  caption = (f'Training curves of every loss term in {METRICS_FILE} (train and validation). '
             f'{note}')
  return _save(plot_loss_curves(loss_curves), folder, 'training_curves.png', caption), note


def _clear_folder(folder: str) -> None:
  """Delete the PNGs and page of an earlier report, so the folder contains only the new one."""
  old = [name for name in os.listdir(folder) if name.endswith('.png') or name == INDEX_FILE]
  for name in old:
    os.remove(os.path.join(folder, name))
  if old:
    logging.info('Deleted %d files of an earlier report in %s.', len(old), folder)


def _figure_html(figure: ReportFigure) -> str:
  source = html.escape(figure.file_name, quote=True)
  caption = html.escape(figure.caption)
  return (f'<figure><img src="{source}" alt="{caption}">'
          f'<figcaption>{caption}</figcaption></figure>')


def render_index(facts: dict, sequences, roles: dict, sections: dict, notes: list[str],
                 curves: ReportFigure | None) -> str:
  """Return the HTML page.

  `facts` maps a label to its text (workdir, checkpoint, data...). `sections` maps a
  sequence_id to its figures, and `roles` maps a subject to its part of the split.
  """
  escape = html.escape
  lines = ['<!DOCTYPE html>', '<html lang="en">', '<head><meta charset="utf-8">',
           '<title>Imputation report</title>',
           '<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}'
           'figure{margin:1em 0}figcaption{color:#444}</style>', '</head>', '<body>',
           '<h1>Imputation report</h1>', '<dl>']
  for label, text in facts.items():
    lines.append(f'<dt>{escape(label)}</dt><dd>{escape(text)}</dd>')
  lines += ['</dl>', '<h2>Sequences</h2>', '<ul>']
  for i, seq in enumerate(sequences):
    label = f', gesture {seq.label}' if seq.label else ''
    lines.append(
        f'<li><a href="#{_file_stem(i, seq.sequence_id)}">{escape(seq.sequence_id)}</a>: '
        f'subject {escape(seq.subject)} ({escape(roles[seq.subject])} subject), '
        f'{seq.length} timesteps{escape(label)}</li>')
  lines.append('</ul>')
  for note in notes:
    lines.append(f'<p>{escape(note)}</p>')
  for i, seq in enumerate(sequences):
    lines.append(f'<h2 id="{_file_stem(i, seq.sequence_id)}">{escape(seq.sequence_id)} '
                 f'(subject {escape(seq.subject)})</h2>')
    lines += [_figure_html(figure) for figure in sections[seq.sequence_id]]
  if curves is not None:
    lines += ['<h2>Training curves</h2>', _figure_html(curves)]
  lines += ['</body>', '</html>', '']
  return '\n'.join(lines)


def _check_stride(stride: int | None, window: int) -> None:
  if stride is not None and not 1 <= stride <= window:
    raise ValueError(f'--stride={stride} is invalid for data.window={window}; use 1..{window} '
                     'timesteps, or 0 for half a window, so that every timestep is predicted.')


def write_visual_report(workdir: str, sequence_ids: list[str], stride: int | None) -> str:
  """Write figures and `index.html` for chosen sequences of the run in `workdir`.

  `sequence_ids` empty means the default sequences (see `choose_sequences`). `stride` is the
  step between window starts (None: half a window). Returns the path of index.html.
  """
  config = impute.read_workdir_config(workdir)
  _check_stride(stride, config.data.window)
  recording_set = impute.load_workdir_data(workdir, config)
  split = folds.split_subjects(recording_set, config.data.num_folds, config.data.fold,
                               config.data.split_seed)
  sequences = choose_sequences(recording_set, split.test, list(sequence_ids or []))
  roles = {seq.subject: subject_role(split, seq.subject) for seq in sequences}

  imputer = impute.load_imputer(workdir, recording_set)
  predictions = impute.predict_sequences(imputer, sequences, stride, show_targets=False)

  spans = [drawn_span(seq, imputer.target_layouts) for seq in sequences]
  folder = os.path.join(workdir, REPORT_FOLDER)
  os.makedirs(folder, exist_ok=True)
  _clear_folder(folder)
  sections = {
      seq.sequence_id: write_sequence_figures(
          folder, i, crop_sequence(seq, span), crop_prediction(prediction, span),
          imputer.input_layouts, imputer.target_layouts, span.start)
      for i, (seq, prediction, span) in enumerate(zip(sequences, predictions, spans))}
  curves, curve_note = write_curve_figure(folder, workdir)

  notes = undrawn_groups(imputer.target_layouts)
  notes += [f'{seq.sequence_id} has {seq.length} timesteps, so the figures show timesteps '
            f'{span.start}..{span.stop - 1}, the {MAX_DRAWN_TIMESTEPS} where the observed '
            'targets change most.'
            for seq, span in zip(sequences, spans) if span.stop - span.start < seq.length]
  for note in notes:
    logging.warning('Visual report: no figure for target group %s', note)
  if curves is None:
    notes.append(curve_note)
    logging.warning('Visual report: %s', curve_note)
  trained_on = sorted({seq.sequence_id for seq in sequences if roles[seq.subject] == 'train'})
  if trained_on:
    notes.append(f'The model trained on the subjects of {", ".join(trained_on)}, so their '
                 'imputations can look better than those of unseen subjects would.')
  checkpoint = imputer.checkpoint
  facts = {
      'Workdir': os.path.abspath(workdir),
      'Checkpoint': f'step {checkpoint["step"]} ({checkpoint["kind"]})',
      'Data': recording_set.source,
      'Imputation': ('every target value hidden from the model, as for a recording of the '
                     f'inputs alone; windows of {imputer.window} timesteps every '
                     f'{stride or max(imputer.window // 2, 1)} timesteps, overlaps averaged'),
      'Uncertainty': ('±1 predicted standard deviation' if imputer.has_variance else
                      f'none: loss.kind={config.loss.kind!r} learns no variance'),
  }
  path = os.path.join(folder, INDEX_FILE)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(render_index(facts, sequences, roles, sections, notes, curves))
  return path
