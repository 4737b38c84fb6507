"""Ablation studies and grid searches: variants of one base config, trained and compared.

A study is a base config (for phase 7, the full phase 6 model) with a `study` section:

* `study.ablations`: components to remove one at a time, each giving one variant (see
  `ABLATIONS` for what removing each one means);
* `study.grid`: 'field=v1,v2;field=v1,v2', the product of which gives one variant per point;
* `study.seeds`: every variant runs with seeds `seed`, `seed + 1`, ... on the same folds.

The workdir contains `study.json` (the plan) and one ordinary run workdir per variant and seed
under `variants/NAME/seed_S`, so a run can be inspected, resumed or re-evaluated on its own.
A variant and seed whose `eval_report.json` exists is finished; launching the study again
skips it and resumes or starts the rest. When all are finished the study writes
`results.csv`, `results.md`, the plots and `best_config.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Callable

import ml_collections
from absl import logging

from imputer import run_config

SCENARIOS = ('random_mask', 'imu_only')


def _remove_uncertainty(config) -> None:
  config.loss.kind = config.loss.kind.removeprefix('conf_')


def _remove_curriculum(config) -> None:
  config.mask_start = config.mask_end
  config.mask_epochs = 0


def _set(field: str, value) -> Callable:
  def apply(config) -> None:
    *parents, leaf = field.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return apply


# Name -> what removing the component means, as a change of the base config. A removed loss
# is a zero weight and a removed embedding is switched off. Without the shared decoder, each
# target group gets its own decoder.
ABLATIONS = {
    'uncertainty': _remove_uncertainty,
    'curriculum': _remove_curriculum,
    'consistency': _set('lambda_cons', 0.0),
    'contrastive': _set('lambda_contrastive', 0.0),
    'positional_embedding': _set('model.positional_embedding', False),
    'sensor_embedding': _set('model.sensor_embedding', False),
    'denoise': _set('lambda_denoise', 0.0),
    'shared_decoder': _set('model.decoder', 'dual'),
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One configuration of a study: its name, kind and the fields it changes."""

  name: str
  kind: str  # 'full', 'ablation' or 'grid'.
  changes: tuple[tuple[str, object], ...]


def _parse_value(text: str, field: str, current):
  """Parse one grid value to the type of the field's current value."""
  text = text.strip()
  try:
    if isinstance(current, bool):
      if text.lower() not in ('true', 'false'):
        raise ValueError(text)
      return text.lower() == 'true'
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
  except ValueError:
    raise ValueError(
        f'study.grid: value {text!r} of {field} is not of type {type(current).__name__}; '
        f'write values like {current!r}.') from None
  return text


def parse_grid(text: str, config) -> list[tuple[str, list]]:
  """Parse 'field=v1,v2;field=v1,v2' into [(field, values)], checking each field exists."""
  axes = []
  for part in filter(None, (p.strip() for p in text.split(';'))):
    field, sep, values = part.partition('=')
    field = field.strip()
    if field == 'seed' or field.startswith('study.'):
      raise ValueError(f'study.grid: {field!r} cannot be a grid field, because the study sets '
                       'it; use study.seeds for more seeds.')
    if not sep or not values.strip():
      raise ValueError(f'study.grid: {part!r} is not field=v1,v2; for example '
                       "'lambda_cons=0.05,0.2;lambda_denoise=0.05,0.2'.")
    target = config
    for name in field.split('.'):
      if not isinstance(target, ml_collections.ConfigDict) or name not in target:
        raise ValueError(f'study.grid: field {field!r} is not in the config; use a field of '
                         'configs/default.py such as lambda_cons or contrastive.momentum.')
      target = target[name]
    if isinstance(target, ml_collections.ConfigDict):
      raise ValueError(f'study.grid: {field!r} is a section, not a field.')
    parsed = [_parse_value(v, field, target) for v in values.split(',')]
    if len(set(map(repr, parsed))) != len(parsed):
      raise ValueError(f'study.grid: {field} lists a value twice: {values!r}.')
    axes.append((field, parsed))
  fields = [field for field, _ in axes]
  if len(set(fields)) != len(fields):
    raise ValueError(f'study.grid names a field twice: {fields}.')
  return axes


def _ablation_names(text: str) -> list[str]:
  names = [n.strip() for n in text.split(',') if n.strip()]
  unknown = [n for n in names if n not in ABLATIONS]
  if unknown:
    raise ValueError(f'study.ablations: {unknown} unknown. Use any of {", ".join(ABLATIONS)}.')
  if len(set(names)) != len(names):
    raise ValueError(f'study.ablations lists a component twice: {text!r}.')
  return names


def _format_value(value) -> str:
  return f'{value:g}' if isinstance(value, float) else str(value)


def plan(config) -> list[Variant]:
  """Return the study's variants: the full config, each ablation, then each grid point."""
  variants = [Variant('full', 'full', ())]
  full = variant_config(config, ())
  for name in _ablation_names(config.study.ablations):
    changed = variant_config(config, ())
    ABLATIONS[name](changed)
    variants.append(Variant(f'no_{name}', 'ablation', _differences(full, changed)))
  axes = parse_grid(config.study.grid, config)
  if not axes:
    return variants
  for point in itertools.product(*(values for _, values in axes)):
    changes = tuple((field, value) for (field, _), value in zip(axes, point))
    name = 'grid_' + '_'.join(f'{field}={_format_value(value)}' for field, value in changes)
    variants.append(Variant(name, 'grid', changes))
  return variants


def _differences(base, changed) -> tuple[tuple[str, object], ...]:
  before = run_config.flatten(base.to_dict())
  after = run_config.flatten(changed.to_dict())
  return tuple((k, after[k]) for k in sorted(after) if before.get(k) != after[k])


def variant_config(config, changes, seed_offset: int = 0):
  """Return a copy of the study's base config with `changes` applied and no study section.

  The copy is an ordinary run config: its `study` section is emptied, so its workdir is a
  plain run that `launch.py` can resume or re-evaluate on its own.
  """
  copy = ml_collections.ConfigDict(config.to_dict())
  for field, value in changes:
    _set(field, value)(copy)
  copy.seed = config.seed + seed_offset
  copy.study.ablations = ''
  copy.study.grid = ''
  copy.study.seeds = 1
  return copy


def run_dir(workdir: str, variant: Variant, seed_offset: int) -> str:
  return os.path.join(workdir, 'variants', variant.name, f'seed_{seed_offset}')


def is_finished(path: str) -> bool:
  return os.path.exists(os.path.join(path, 'eval_report.json'))


def _describe(config, variants) -> dict:
  base = run_config.flatten(json.loads(variant_config(config, ()).to_json_best_effort()))
  return {'seeds': config.study.seeds,
          'base_config': {k: v for k, v in base.items()
                          if k not in run_config.RESUME_MAY_CHANGE},
          'variants': [{'name': v.name, 'kind': v.kind,
                        'changes': [[k, value] for k, value in v.changes]} for v in variants]}


def check_plan(workdir: str, config, variants) -> None:
  """Write `study.json`, or check that an existing one describes the same study.

  The plan covers the seeds, the variants and the base config, so a relaunch with other
  settings cannot skip runs that were trained with the old ones.
  """
  described = json.loads(json.dumps(_describe(config, variants)))
  path = os.path.join(workdir, 'study.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
    differences = []
    if saved.get('seeds') != described['seeds']:
      differences.append(f"study.seeds: {saved.get('seeds')} in the workdir, "
                         f"{described['seeds']} now")
    names = lambda plan: [v['name'] for v in plan.get('variants', [])]
    if saved.get('variants') != described['variants']:
      differences.append(f'variants: {names(saved)} in the workdir, {names(described)} now')
    before, now = saved.get('base_config', {}), described['base_config']
    differences += [f'{k}: {before.get(k)!r} in the workdir, {now.get(k)!r} now'
                    for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if differences:
      raise ValueError(
          f'{path} describes another study ({"; ".join(differences)}). Use a new --workdir, '
          'or set those fields back to continue this study.')
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(described, f, indent=2)


def checked_plan(config, workdir: str) -> list[Variant]:
  """Return the study's variants after validating each and checking the workdir's plan.

  Every variant is checked before anything is trained, so a bad grid value fails in seconds
  instead of after the runs before it.
  """
  run_config.validate(config)
  variants = plan(config)
  for variant in variants:
    try:
      run_config.validate(variant_config(config, variant.changes))
    except ValueError as error:
      raise ValueError(f'study variant {variant.name}: {error}') from None
  check_plan(workdir, config, variants)
  return variants


def run_sequential(config, workdir: str, train_fn) -> list[Variant]:
  """Train every unfinished variant and seed one after the other; return the variants."""
  variants = checked_plan(config, workdir)
  total = len(variants) * config.study.seeds
  done = 0
  for variant in variants:
    for seed_offset in range(config.study.seeds):
      done += 1
      path = run_dir(workdir, variant, seed_offset)
      if is_finished(path):
        logging.info('Study %d/%d: %s seed %d is finished, skipped.', done, total,
                     variant.name, seed_offset)
        continue
      logging.info('Study %d/%d: training %s seed %d in %s', done, total, variant.name,
                   seed_offset, path)
      train_fn(variant_config(config, variant.changes, seed_offset), path)
  return variants
