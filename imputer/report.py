"""Evaluation reports as JSON with a markdown twin.

`eval_report` scores the test subjects; `validation_report` scores the validation subjects the
same way, for choosing settings without looking at the test subjects.
"""

from __future__ import annotations

import json
import os

from imputer import probe


def _fmt(value) -> str:
  if value is None:
    return 'n/a'
  if isinstance(value, int):
    return str(value)
  return f'{value:.4g}'


def _rows(scenario: dict):
  methods = [('model', scenario['model'])] + list(scenario['baselines'].items())
  groups = list(scenario['model'])
  for group in groups:
    for method, results in methods:
      entry = results[group]
      yield group, method, entry
    for sensor in scenario['model'][group].get('per_sensor', {}):
      for method, results in methods:
        yield f'{group}/{sensor}', method, results[group]['per_sensor'][sensor]


def to_markdown(report: dict) -> str:
  lines = [
      f"# Evaluation report: {report['evaluated_split']} subjects", '',
      f"Data: {report['source']}", '',
      f"Scored subjects ({report['evaluated_split']}, "
      f"{len(report['split'][report['evaluated_split']])}): "
      f"{', '.join(report['split'][report['evaluated_split']])}",
      f"Checkpoint: step {report['checkpoint']['step']} ({report['checkpoint']['kind']})",
      f"Sequences scored: {report['sequences']['evaluated']}; skipped without ground truth "
      f"(no observed target value in the file): {report['sequences']['skipped_without_ground_truth']}",
      '', 'All errors are in the channels\' original units, on hidden values that the '
      'recording observed. R² is variance-weighted: each channel is centred on its own mean.',
  ]
  left_out = report.get('left_out_by_source', {})
  if left_out:
    lines += ['', 'Left out or treated as missing by the data source (all subjects):']
    lines += [f'- {count} x {reason}' for reason, count in left_out.items()]
  for name, scenario in report['scenarios'].items():
    lines += ['', f'## {name}', '']
    if 'mask_ratio' in scenario:
      lines += [f"Hidden fraction of (timestep, sensor) units: {scenario['mask_ratio']}", '']
    fallback = scenario.get('interpolation_fallback_values', {})
    if any(fallback.values()):
      lines += ['Scored values where interpolation fell back to the median because the channel '
                'had no visible value in its sequence: '
                + ', '.join(f'{g} {n}' for g, n in fallback.items()), '']
    lines += ['| group | method | MAE | RMSE | R² | count |', '|---|---|---|---|---|---|']
    for group, method, entry in _rows(scenario):
      lines.append(f"| {group} | {method} | {_fmt(entry['mae'])} | {_fmt(entry['rmse'])} | "
                   f"{_fmt(entry['r2'])} | {entry['count']} |")
  for name, scenario in report['scenarios'].items():
    if 'calibration' in scenario:
      lines += [''] + calibration_lines(name, scenario['calibration'])
  if report.get('probe'):
    lines += [''] + probe.markdown_lines(report['probe'])
  return '\n'.join(lines) + '\n'


def calibration_lines(scenario: str, calibration: dict) -> list[str]:
  """Return the markdown table of a scenario's interval coverage and NLL per target group."""
  lines = [f'## Calibration, {scenario}', '',
           f"Predicted spread: {calibration['distribution']}, σ in original units. Coverage is "
           'the fraction of scored values within ±kσ of the prediction; the expected column is '
           'what the distribution implies. NLL is the mean negative log-likelihood per value.',
           '', '| group | within ±1σ | expected | within ±2σ | expected | NLL | mean σ | count |',
           '|---|---|---|---|---|---|---|---|']
  for group, entry in calibration.items():
    if group == 'distribution':
      continue
    if not entry['count']:
      lines.append(f'| {group} | n/a | n/a | n/a | n/a | n/a | n/a | 0 |')
      continue
    lines.append(
        f"| {group} | {_fmt(entry['coverage_1sigma'])} | {_fmt(entry['expected_1sigma'])} | "
        f"{_fmt(entry['coverage_2sigma'])} | {_fmt(entry['expected_2sigma'])} | "
        f"{_fmt(entry['nll'])} | {_fmt(entry['mean_std'])} | {entry['count']} |")
  return lines


def write_report(report: dict, workdir: str, name: str) -> None:
  """Write `name`.json and `name`.md into `workdir`."""
  with open(os.path.join(workdir, f'{name}.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(workdir, f'{name}.md'), 'w', encoding='utf-8') as f:
    f.write(to_markdown(report))
