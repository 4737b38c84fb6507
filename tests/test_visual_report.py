"""The visual report: figure choice, PNG sizes and content, the HTML page and report mode."""

import json
import os
import re
import subprocess
import sys

import matplotlib.collections
import numpy as np
import polars as pl
import pytest
from PIL import Image

from imputer import cmi
from imputer import folds
from imputer import impute
from imputer import layout as layout_lib
from imputer import recordings
from imputer import visual_report as vr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_DISTINCT_COLOURS = 50
MIN_PIXEL_STD = 15.0


def png_pixels(path):
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def assert_png(path, width_inches, height_inches):
  """Check the size against figsize * DPI and that the image has drawn content."""
  pixels = png_pixels(path)
  assert pixels.shape[:2] == (round(height_inches * vr.DPI), round(width_inches * vr.DPI)), path
  packed = (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) | \
      pixels[..., 2]
  distinct = len(np.unique(packed))
  assert distinct >= MIN_DISTINCT_COLOURS, (path, distinct)
  assert pixels.std() > MIN_PIXEL_STD, (path, pixels.std())


def image_sources(page):
  return re.findall(r'<img src="([^"]+)"', page)


def png_files(folder):
  return sorted(name for name in os.listdir(folder) if name.endswith('.png'))


def read_page(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


# Sizes in inches, written out from the layout each figure documents.


def series_size(panels, panel_height):
  return vr.SERIES_WIDTH, panel_height * panels + vr.TITLE_HEIGHT


def frames_size(sensors, timesteps):
  return (max(vr.FRAME_PANEL_SIZE * sensors + vr.FRAME_LABEL_WIDTH, vr.FRAME_MIN_WIDTH),
          vr.FRAME_PANEL_SIZE * 2 * timesteps + vr.TITLE_HEIGHT + vr.FRAME_COLORBAR_HEIGHT)


def curves_size(terms):
  columns = min(terms, vr.CURVE_COLUMNS)
  rows = -(-terms // columns)
  return vr.CURVE_PANEL_WIDTH * columns, vr.CURVE_PANEL_HEIGHT * rows + vr.TITLE_HEIGHT


def loss_terms(metrics_path):
  terms = set()
  with open(metrics_path) as f:
    for line in f:
      for key in json.loads(line):
        if key.startswith(('train/loss', 'val/loss')):
          terms.add(key.split('/', 1)[1])
  return terms


# The CMI run of the session fixture.


def cmi_split(run):
  recording_set = cmi.load_cmi(run.csv)
  data = run.config.data
  return recording_set, folds.split_subjects(recording_set, data.num_folds, data.fold,
                                             data.split_seed)


def ids_with_truth(frame, subjects):
  """Sequence ids, in file order, of `subjects` with a THM value or a ToF reading other than -1."""
  thm = pl.any_horizontal(pl.col('^thm_.*$').is_not_null())
  tof = pl.any_horizontal([pl.col(c).is_not_null() & (pl.col(c) != -1)
                           for c in cmi.CMI_TOF_COLUMNS])
  rows = frame.filter(pl.col('subject').is_in(list(subjects)) & (thm | tof))
  return rows['sequence_id'].unique(maintain_order=True).to_list()


def observed_tof_rows(frame, sequence_id):
  rows = frame.filter(pl.col('sequence_id') == sequence_id).sort('sequence_counter')
  tof = rows.select(cmi.CMI_TOF_COLUMNS).to_numpy().astype(float)
  return int((np.isfinite(tof) & (tof != -1)).any(axis=1).sum())


def test_report_draws_default_test_sequences(trained_cmi_run):
  run = trained_cmi_run
  recording_set, split = cmi_split(run)
  expected_ids = ids_with_truth(run.frame, split.test)[:vr.DEFAULT_SEQUENCE_COUNT]
  assert expected_ids
  folder = os.path.join(run.workdir, vr.REPORT_FOLDER)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'stale.png'), 'wb') as f:
    f.write(b'not a png of this report')

  path = vr.write_visual_report(run.workdir, [], None)

  assert path == os.path.join(run.workdir, 'visual_report', 'index.html')
  page = read_page(path)
  sources = image_sources(page)
  assert sorted(sources) == png_files(folder)
  assert 'stale.png' not in png_files(folder)
  expected_files = {'training_curves.png'}
  for i, sequence_id in enumerate(expected_ids):
    expected_files |= {f'{i + 1:02d}_{sequence_id}_{kind}.png' for kind in ('inputs', 'thm', 'tof')}
  assert set(sources) == expected_files
  assert len(re.findall(r'<figcaption>[^<]+</figcaption>', page)) == len(sources)

  subjects = {seq.sequence_id: seq.subject for seq in recording_set.sequences}
  listed = re.findall(r'<li><a href="#[^"]+">([^<]+)</a>: subject ([^ ]+) \((\w+) subject\)',
                      page)
  assert listed == [(i, subjects[i], 'test') for i in expected_ids]
  assert f'CMI file {run.csv}' in page
  assert os.path.abspath(run.workdir) in page
  assert re.search(r'<dd>step \d+ \(best by validation loss\)</dd>', page)
  assert 'every 8 timesteps' in page  # Half of data.window=16.

  for i, sequence_id in enumerate(expected_ids):
    stem = os.path.join(folder, f'{i + 1:02d}_{sequence_id}')
    assert_png(f'{stem}_inputs.png', *series_size(1, vr.INPUT_PANEL_HEIGHT))
    assert_png(f'{stem}_thm.png', *series_size(5, vr.TARGET_PANEL_HEIGHT))
    timesteps = min(vr.FRAME_TIMESTEPS, observed_tof_rows(run.frame, sequence_id))
    assert_png(f'{stem}_tof.png', *frames_size(5, timesteps))
  terms = loss_terms(os.path.join(run.workdir, 'metrics.jsonl'))
  assert {'loss', 'loss_recon_thm', 'loss_recon_tof'} <= terms
  assert_png(os.path.join(folder, 'training_curves.png'), *curves_size(len(terms)))


def test_unknown_sequence_id_is_named(trained_cmi_run):
  recording_set, split = cmi_split(trained_cmi_run)
  first_default = ids_with_truth(trained_cmi_run.frame, split.test)[0]
  with pytest.raises(ValueError, match='SEQ_NOT_THERE') as error:
    vr.write_visual_report(trained_cmi_run.workdir, ['SEQ_NOT_THERE'], None)
  assert first_default in str(error.value)
  assert recording_set.source in str(error.value)


def test_repeated_sequence_id_is_rejected(trained_cmi_run):
  sequence_id = trained_cmi_run.frame['sequence_id'][0]
  with pytest.raises(ValueError, match=f'{sequence_id}.*more than once'):
    vr.write_visual_report(trained_cmi_run.workdir, [sequence_id, sequence_id], None)


def test_stride_longer_than_window_is_rejected(trained_cmi_run):
  with pytest.raises(ValueError, match='--stride=17.*data.window=16'):
    vr.write_visual_report(trained_cmi_run.workdir, [], 17)


def test_launch_report_mode_uses_chosen_sequence(trained_cmi_run):
  run = trained_cmi_run
  _, split = cmi_split(run)
  chosen = ids_with_truth(run.frame, split.train)[0]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, 'launch.py', '--mode=report', f'--workdir={run.workdir}',
       f'--sequences={chosen}', '--stride=4'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  index = os.path.join(run.workdir, 'visual_report', 'index.html')
  assert f'Wrote {index}' in result.stderr
  page = read_page(index)
  expected = {f'01_{chosen}_inputs.png', f'01_{chosen}_thm.png', f'01_{chosen}_tof.png',
              'training_curves.png'}
  assert set(image_sources(page)) == expected
  assert set(png_files(os.path.dirname(index))) == expected
  assert f'>{chosen}</a>' in page
  assert '(train subject)' in page
  assert f'The model trained on the subjects of {chosen}' in page
  assert 'every 4 timesteps' in page


def test_choose_sequences_default_and_chosen(trained_cmi_run):
  recording_set, split = cmi_split(trained_cmi_run)
  chosen = vr.choose_sequences(recording_set, split.test, [])
  expected = ids_with_truth(trained_cmi_run.frame, split.test)[:vr.DEFAULT_SEQUENCE_COUNT]
  assert [seq.sequence_id for seq in chosen] == expected
  picked = [recording_set.sequences[-1].sequence_id, recording_set.sequences[0].sequence_id]
  assert [seq.sequence_id for seq in vr.choose_sequences(recording_set, split.test, picked)] == \
      picked


def test_choose_sequences_without_test_truth():
  thm = recordings.single_sensor_group('thm', ('t',))
  acc = recordings.single_sensor_group('acc', ('x',))
  raw = {'acc': np.ones((3, 1)), 'thm': np.full((3, 1), np.nan)}
  observed = {'acc': np.ones((3, 1), bool), 'thm': np.zeros((3, 1), bool)}
  blank = recordings.Sequence('only', 's1', raw, observed)
  recording_set = recordings.RecordingSet('hand-made set', (acc,), (thm,), [blank])
  with pytest.raises(ValueError, match='hand-made set.*s1.*--sequences'):
    vr.choose_sequences(recording_set, ['s1'], [])


# Pure helpers.


def test_frame_timesteps_spread_over_observed_rows():
  observed = np.zeros((20, 3), bool)
  observed[5:15, 1] = True
  # Rows 5..14; linspace(0, 9, 4) rounds to positions 0, 3, 6, 9.
  np.testing.assert_array_equal(vr.frame_timesteps(observed), [5, 8, 11, 14])
  observed = np.zeros((10, 2), bool)
  observed[[2, 7], 0] = True
  np.testing.assert_array_equal(vr.frame_timesteps(observed), [2, 7])
  # No observed row: spread over the sequence, 0..9 at positions 0, 3, 6, 9.
  np.testing.assert_array_equal(vr.frame_timesteps(np.zeros((10, 2), bool)), [0, 3, 6, 9])


def test_read_loss_curves_skips_non_finite(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [
      {'step': 4, 'val/loss': 1.5, 'val/count_thm': 3.0},
      {'step': 6, 'train/loss': 1.7, 'train/loss_recon_thm': 'nan', 'train/grad_norm': 1.0},
      {'step': 8, 'train/loss': 'inf', 'train/loss_recon_thm': 0.5},
      {'step': 2, 'train/loss': 2.0},  # Written after a restart from an earlier step.
  ]
  path.write_text('\n'.join(json.dumps(line) for line in lines) + '\n\n')
  loss_curves = vr.read_loss_curves(str(path))
  assert set(loss_curves.curves) == {'loss', 'loss_recon_thm'}
  steps, values = loss_curves.curves['loss']['train']
  np.testing.assert_array_equal(steps, [2, 6])
  np.testing.assert_array_equal(values, [2.0, 1.7])
  steps, values = loss_curves.curves['loss']['val']
  np.testing.assert_array_equal(steps, [4])
  np.testing.assert_array_equal(values, [1.5])
  assert set(loss_curves.curves['loss_recon_thm']) == {'train'}
  assert dict(loss_curves.skipped) == {'train/loss_recon_thm': 1, 'train/loss': 1}


def test_read_loss_curves_names_bad_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/lo')
  with pytest.raises(ValueError, match=r'metrics.jsonl, line 2: invalid JSON'):
    vr.read_loss_curves(str(path))
  path.write_text('{"train/loss": 1.0}\n')
  with pytest.raises(ValueError, match=r'line 1: missing the "step" key'):
    vr.read_loss_curves(str(path))
  path.write_text('{"step": 1, "val/loss": [1.0]}\n')
  with pytest.raises(ValueError, match=r"line 1: val/loss=\[1.0\] is not a number"):
    vr.read_loss_curves(str(path))


def test_render_index_escapes_text():
  sequence = recordings.Sequence('a<b', 'subject&1', {'x': np.zeros((4, 1))},
                                 {'x': np.ones((4, 1), bool)}, label='"quoted"')
  figure = vr.ReportFigure('01_a_b_inputs.png', 'caption with <tag>')
  page = vr.render_index({'Data': 'file <1>.csv'}, [sequence], {'subject&1': 'test'},
                         {'a<b': [figure]}, ['note & more'], None)
  assert '<dd>file &lt;1&gt;.csv</dd>' in page
  assert 'a&lt;b' in page
  assert 'a<b' not in page
  assert 'subject&amp;1' in page
  assert '&quot;quoted&quot;' in page
  assert '<figcaption>caption with &lt;tag&gt;</figcaption>' in page
  assert '<p>note &amp; more</p>' in page
  assert '<img src="01_a_b_inputs.png"' in page


# Figures for groups other than the CMI ones: sensor streams with a frame group and a wide one.


def stream_layouts():
  inputs = layout_lib.build_layouts([
      recordings.single_sensor_group('acc', ('acc_x', 'acc_y', 'acc_z')),
      recordings.single_sensor_group('hr', ('bpm',))])
  depth_columns = tuple(f'd{s}_{p}' for s in range(2) for p in range(64))
  targets = layout_lib.build_layouts([
      recordings.single_sensor_group('gyro', ('gyro_x', 'gyro_y', 'gyro_z')),
      recordings.single_sensor_group('ppg', ('green',)),
      recordings.GroupSpec('depth', depth_columns, ('left', 'right'),
                           tuple(i // 64 for i in range(128))),
      recordings.single_sensor_group('wide', tuple(f'w{i}' for i in range(20)))])
  return inputs, targets


def stream_sequence(targets, length=20, seed=0):
  rng = np.random.default_rng(seed)
  sizes = {'acc': 3, 'hr': 1} | {layout.name: layout.num_raw for layout in targets}
  raw = {name: rng.normal(size=(length, size)) for name, size in sizes.items()}
  observed = {name: np.ones((length, size), bool) for name, size in sizes.items()}
  observed['gyro'][::3] = False
  observed['hr'][4:6] = False
  observed['depth'][:] = False
  observed['depth'][5:15] = True
  for name, mask in observed.items():
    raw[name][~mask] = np.nan
  return recordings.Sequence('watch/day 1', 'wearer', raw, observed)


def stream_prediction(sequence, targets, with_std, seed=1):
  rng = np.random.default_rng(seed)
  mean = {l.name: rng.normal(size=(sequence.length, l.num_raw)) for l in targets}
  std = {l.name: rng.uniform(0.1, 1.0, size=(sequence.length, l.num_raw)) for l in targets}
  return impute.Prediction(mean, std if with_std else None)


def test_figure_kinds_of_stream_groups():
  _, targets = stream_layouts()
  assert [vr.target_figure_kind(l) for l in targets] == ['columns', 'columns', 'frames', None]
  notes = vr.undrawn_groups(targets)
  assert len(notes) == 1
  assert notes[0].startswith('wide: 20 raw columns')


def test_stream_group_figures_are_written(tmp_path):
  inputs, targets = stream_layouts()
  sequence = stream_sequence(targets)
  prediction = stream_prediction(sequence, targets, with_std=False)
  written = vr.write_sequence_figures(str(tmp_path), 1, sequence, prediction, inputs, targets)
  names = [figure.file_name for figure in written]
  assert names == ['02_watch_day_1_inputs.png', '02_watch_day_1_gyro.png',
                   '02_watch_day_1_ppg.png', '02_watch_day_1_depth.png']
  assert png_files(tmp_path) == sorted(names)
  assert_png(tmp_path / names[0], *series_size(2, vr.INPUT_PANEL_HEIGHT))
  assert_png(tmp_path / names[1], *series_size(3, vr.TARGET_PANEL_HEIGHT))
  assert_png(tmp_path / names[2], *series_size(1, vr.TARGET_PANEL_HEIGHT))
  assert_png(tmp_path / names[3], *frames_size(2, 4))
  assert 'no band' in written[1].caption
  assert 'timesteps 5, 8, 11, 14, with observed truth' in written[3].caption


def test_target_columns_band_and_error():
  _, targets = stream_layouts()
  gyro = targets[0]
  sequence = stream_sequence(targets)
  for with_std in (True, False):
    prediction = stream_prediction(sequence, targets, with_std)
    figure = vr.plot_target_columns(sequence, gyro, prediction)
    axes = figure.get_axes()
    assert len(axes) == 3
    for column, axis in enumerate(axes):
      bands = [c for c in axis.collections
               if isinstance(c, matplotlib.collections.PolyCollection)]
      assert len(bands) == (1 if with_std else 0)
      observed = sequence.observed['gyro'][:, column]
      error = np.abs(sequence.raw['gyro'][observed, column]
                     - prediction.mean['gyro'][observed, column]).mean()
      assert axis.get_title(loc='left') == (
          f'gyro_{"xyz"[column]}: MAE {error:.3g} over {observed.sum()} observed values')
    vr.plt.close(figure)


def test_frames_share_one_colour_scale_per_sensor():
  _, targets = stream_layouts()
  depth = targets[2]
  sequence = stream_sequence(targets)
  prediction = stream_prediction(sequence, targets, with_std=True)
  figure = vr.plot_frames(sequence, depth, prediction)
  rows = [5, 8, 11, 14]  # frame_timesteps of observed rows 5..14.
  frame_axes = [axis for axis in figure.get_axes() if axis.images]
  assert len(frame_axes) == 2 * len(rows) * 2
  for sensor, pixels in enumerate((slice(0, 64), slice(64, 128))):
    shown = np.concatenate([sequence.raw['depth'][rows, pixels].ravel(),
                            prediction.mean['depth'][rows, pixels].ravel()])
    images = [axis.images[0] for axis in frame_axes[sensor::2]]
    for image in images:
      assert image.get_clim() == pytest.approx((shown.min(), shown.max()))
    np.testing.assert_allclose(images[0].get_array(),
                               sequence.raw['depth'][5, pixels].reshape(8, 8))
    np.testing.assert_allclose(images[1].get_array(),
                               prediction.mean['depth'][5, pixels].reshape(8, 8))
  vr.plt.close(figure)


def test_drawn_span_picks_the_most_active_timesteps():
  values = np.zeros((1000, 1))
  values[700:720, 0] = np.sin(np.arange(20))  # The only change in the sequence.
  observed = np.ones_like(values, bool)
  sequence = recordings.Sequence('long', 's1', {'ppg': values}, {'ppg': observed})
  layout = layout_lib.build_layouts((recordings.single_sensor_group('ppg', ('ppg',)),))[0]
  span = vr.drawn_span(sequence, [layout], length=100)
  assert span.stop - span.start == 100
  assert span.start <= 700
  assert span.stop >= 721
  short = recordings.Sequence('short', 's1', {'ppg': values[:50]}, {'ppg': observed[:50]})
  assert vr.drawn_span(short, [layout], length=100) == slice(0, 50)
