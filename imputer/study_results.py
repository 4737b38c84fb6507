"""The outputs of a finished study: results tables, plots and the best configuration.

Figures come from each run's `eval_report.json` (test subjects) and are averaged over seeds.
The best configuration is chosen on the validation subjects alone (`validation_report.json`):
the variant with the highest mean validation R² over every target group in both scenarios,
averaged over seeds. R² is unitless, so groups in different units weigh the same.
"""

from __future__ import annotations

import csv
import itertools
import json
import os

import matplotlib

matplotlib.use('Agg')  # Files only; no display is needed or assumed.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imputer import study  # noqa: E402


def run_metrics(report: dict) -> dict[str, float | None]:
  """Return the flat figures of one report: scenario/group/mae|r2 and probe/group/r2."""
  out = {}
  for scenario in study.SCENARIOS:
    for group, entry in report['scenarios'][scenario]['model'].items():
      out[f'{scenario}/{group}/mae'] = entry['mae']
      out[f'{scenario}/{group}/r2'] = entry['r2']
  for group, entry in report.get('probe', {}).get('groups', {}).items():
    out[f'probe/{group}/r2'] = entry['model']['r2']
  return out


def _read(path: str) -> dict:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def collect(workdir: str, variants, seeds: int, report: str = 'eval_report') -> dict:
  """Return {variant name: [figures per seed]} read from `report`.json of every run."""
  return {v.name: [run_metrics(_read(os.path.join(study.run_dir(workdir, v, s),
                                                  f'{report}.json')))
                   for s in range(seeds)] for v in variants}


def _mean_std(values):
  """Return (mean, population std) of the values that exist; std is None for one value."""
  kept = [v for v in values if v is not None]
  if not kept:
    return None, None
  return float(np.mean(kept)), (float(np.std(kept)) if len(kept) > 1 else None)


def summarise(per_seed: dict) -> dict:
  """Return {variant: {metric: (mean, std, delta against 'full')}}, with None where absent."""
  metrics = sorted({k for runs in per_seed.values() for run in runs for k in run})
  full = {m: _mean_std([run.get(m) for run in per_seed['full']])[0] for m in metrics}
  table = {}
  for name, runs in per_seed.items():
    row = {}
    for metric in metrics:
      mean, std = _mean_std([run.get(metric) for run in runs])
      delta = None if mean is None or full[metric] is None else mean - full[metric]
      row[metric] = (mean, std, delta)
    table[name] = row
  return table


def selection_score(runs: list) -> float | None:
  """Return the mean over seeds, scenarios and groups of the validation R² of the model."""
  values = [v for run in runs for k, v in run.items()
            if k.split('/')[0] in study.SCENARIOS and k.endswith('/r2') and v is not None]
  return float(np.mean(values)) if values else None


def best_variant(validation: dict) -> tuple[str, float]:
  scores = {name: selection_score(runs) for name, runs in validation.items()}
  scored = {n: s for n, s in scores.items() if s is not None}
  if not scored:
    raise ValueError('no variant has a validation R², so no best configuration can be chosen; '
                     'check that the target groups have variance on the validation subjects.')
  name = max(scored, key=lambda n: (scored[n], n == 'full'))
  return name, scored[name]


def _fmt(value) -> str:
  return 'n/a' if value is None else f'{value:.4g}'


def write_tables(workdir: str, variants, table: dict, seeds: int) -> None:
  """Write results.csv (every figure) and results.md (one table per scenario and the probe)."""
  metrics = sorted(next(iter(table.values())))
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['variant', 'kind', 'changes', 'seeds'] + [
        f'{m}_{part}' for m in metrics for part in ('mean', 'std', 'delta')])
    for v in variants:
      cells = [x for m in metrics for x in table[v.name][m]]
      writer.writerow([v.name, v.kind, json.dumps(dict(v.changes)), seeds]
                      + ['' if x is None else x for x in cells])
  lines = ['# Study results (test subjects)', '',
           f'Mean ± standard deviation over {seeds} seed(s); Δ is the mean minus the full '
           'model\'s mean. MAE is in each group\'s original units.']
  sections = [(s, [m for m in metrics if m.startswith(s + '/')]) for s in study.SCENARIOS]
  sections.append(('probe', [m for m in metrics if m.startswith('probe/')]))
  for title, columns in sections:
    if not columns:
      continue
    lines += ['', f'## {title}', '',
              '| variant | ' + ' | '.join(c.split('/', 1)[1] for c in columns) + ' |',
              '|---|' + '---|' * len(columns)]
    for v in variants:
      cells = []
      for column in columns:
        mean, std, delta = table[v.name][column]
        cell = f'{_fmt(mean)} ± {_fmt(std)}'
        cells.append(cell if v.name == 'full' else f'{cell} (Δ {_fmt(delta)})')
      lines.append(f'| {v.name} | ' + ' | '.join(cells) + ' |')
  with open(os.path.join(workdir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def plot_ablations(path: str, variants, table: dict) -> bool:
  """Bar chart of each ablation's change in test MAE, in % of the full model; False if none."""
  ablations = [v for v in variants if v.kind == 'ablation']
  columns = [m for m in next(iter(table.values()))
             if m.split('/')[0] in study.SCENARIOS and m.endswith('/mae')]
  if not ablations or not columns:
    return False
  figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(ablations) * len(columns) / 2), 4))
  width = 0.8 / len(columns)
  for i, column in enumerate(columns):
    full = table['full'][column][0]
    changes = [100.0 * table[v.name][column][2] / full
               if full and table[v.name][column][2] is not None else 0.0 for v in ablations]
    axis.bar(np.arange(len(ablations)) + i * width, changes, width, label=column[:-4])
  axis.axhline(0.0, color='black', linewidth=0.8)
  axis.set_xticks(np.arange(len(ablations)) + 0.4 - width / 2)
  axis.set_xticklabels([v.name for v in ablations], rotation=30, ha='right')
  axis.set_ylabel('test MAE change against full (%)')
  axis.set_title('Ablations: positive means the component helped')
  axis.legend(fontsize='small')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return True


def plot_grid(workdir: str, variants, table: dict, axes: list) -> list[str]:
  """Heatmaps of mean test R² (groups and both scenarios) for each pair of grid fields.

  Each cell averages the grid points that share its two values, over the other fields.
  """
  grid = [v for v in variants if v.kind == 'grid']
  written = []
  for (i, (field_a, values_a)), (j, (field_b, values_b)) in itertools.combinations(
      enumerate(axes), 2):
    cells = np.full((len(values_a), len(values_b)), np.nan)
    for a, value_a in enumerate(values_a):
      for b, value_b in enumerate(values_b):
        scores = [_mean_r2(table[v.name]) for v in grid
                  if v.changes[i][1] == value_a and v.changes[j][1] == value_b]
        scores = [s for s in scores if s is not None]
        if scores:
          cells[a, b] = np.mean(scores)
    figure, axis = plt.subplots(figsize=(4 + len(values_b), 3 + 0.5 * len(values_a)))
    image = axis.imshow(cells, cmap='viridis')
    for a, b in itertools.product(range(len(values_a)), range(len(values_b))):
      axis.text(b, a, _fmt(cells[a, b]), ha='center', va='center', color='white')
    axis.set_xticks(range(len(values_b)), [str(v) for v in values_b])
    axis.set_yticks(range(len(values_a)), [str(v) for v in values_a])
    axis.set_xlabel(field_b)
    axis.set_ylabel(field_a)
    axis.set_title('mean test R² of the model')
    figure.colorbar(image)
    figure.tight_layout()
    name = f'grid_{field_a}_vs_{field_b}.png'
    figure.savefig(os.path.join(workdir, name), dpi=100)
    plt.close(figure)
    written.append(name)
  return written


def _mean_r2(row: dict) -> float | None:
  values = [mean for key, (mean, _, _) in row.items()
            if key.split('/')[0] in study.SCENARIOS and key.endswith('/r2') and mean is not None]
  return float(np.mean(values)) if values else None


def write_best_config(workdir: str, config, variant, score: float) -> str:
  """Write best_config.py: the chosen variant's full config, loadable by launch.py."""
  chosen = study.variant_config(config, variant.changes)
  path = os.path.join(workdir, 'best_config.py')
  text = chosen.to_json(indent=2)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f'"""Best configuration of the study in this folder: variant {variant.name!r}.\n\n'
            f'Chosen on the validation subjects by the mean validation R² of the model over '
            f'every target group\nin both scenarios, averaged over seeds: {score:.4f}.\n\n'
            f'  python launch.py --config={path} --workdir=DIR\n"""\n\n'
            'import json\n\nimport ml_collections\n\nfrom configs import platforms\n\n'
            f'CONFIG = r"""\n{text}\n"""\n\n\n'
            "def get_config(platform: str = ''):\n"
            '  config = ml_collections.ConfigDict(json.loads(CONFIG))\n'
            '  # Without a platform after the path, the study\'s own platform settings stay.\n'
            '  return platforms.apply(config, platform) if platform else config\n')
  return path


def write_outputs(workdir: str, config, variants) -> dict:
  """Write every output of a finished study and return a summary for the log."""
  seeds = config.study.seeds
  table = summarise(collect(workdir, variants, seeds))
  write_tables(workdir, variants, table, seeds)
  plots = []
  if plot_ablations(os.path.join(workdir, 'ablations.png'), variants, table):
    plots.append('ablations.png')
  plots += plot_grid(workdir, variants, table, study.parse_grid(config.study.grid, config))
  name, score = best_variant(collect(workdir, variants, seeds, 'validation_report'))
  chosen = next(v for v in variants if v.name == name)
  best_path = write_best_config(workdir, config, chosen, score)
  return {'best': name, 'score': score, 'plots': plots, 'best_config': best_path}
