"""Config range checks and the resume guard of a workdir."""

import importlib
import json

import pytest
from absl import flags
from ml_collections import config_flags

from configs import phase1
from imputer import run_config
from imputer import synthetic


def config_dict(**changes):
  config = phase1.get_config()
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return json.loads(config.to_json_best_effort())


@pytest.mark.parametrize('field,value,message', [
    ('batch_size', 0, 'batch_size=0 is invalid'),
    ('num_epochs', 0, 'num_epochs=0 is invalid'),
    ('data.window', 0, 'data.window=0 is invalid'),
    ('data.train_stride', 100, 'data.train_stride=100 is invalid: use 1 to data.window'),
    ('mask_start', 1.5, 'mask_start=1.5 is invalid: use 0 to 1'),
    ('mask_end', -0.1, 'mask_end=-0.1 is invalid: use 0 to 1'),
    ('mask_epochs', -1, 'mask_epochs=-1 is invalid: use 0 or more'),
    ('mask.element_weight', 0.0, 'use weights of 0 or more with a positive sum'),
    ('mask.span_weight', -1.0, 'use weights of 0 or more with a positive sum'),
    ('mask.span_length', 0, 'mask.span_length=0 is invalid'),
    ('mask.eval_ratio', 0.0, 'mask.eval_ratio=0.0 is invalid'),
    ('data.tof_far_value', -7.0, 'data.tof_far_value=-7.0 is invalid'),
    ('model.num_heads', 3, 'model.num_heads=3 is invalid: it must divide model.hidden_dim'),
])
def test_out_of_range_fields_are_rejected(field, value, message):
  config = phase1.get_config()
  *parents, leaf = field.split('.')
  target = config
  for parent in parents:
    target = target[parent]
  target[leaf] = value
  with pytest.raises(ValueError, match=message):
    run_config.validate(config)


@pytest.mark.parametrize('name', ['default', 'phase0', 'phase1', 'phase2', 'phase3',
                                  'phase4', 'phase5', 'phase6', 'phase7', 'bfrb_watch'])
def test_shipped_configs_are_valid(name):
  run_config.validate(importlib.import_module(f'configs.{name}').get_config())


def load_config_flag(argument):
  """Resolve --config=ARGUMENT exactly as launch.py does."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True)
  flag_values(['launch.py', f'--config={argument}'])
  return flag_values.config


EXPECTED_PLATFORM = {
    '': ('cpu', 'float32', 0, 'flat', 0),
    ':cpu': ('cpu', 'float32', 0, 'flat', 0),
    ':gpu': ('gpu', 'bfloat16', 64, 'topology', 4),
    ':tpu': ('tpu', 'bfloat16', 64, 'topology', 4),
}


@pytest.mark.parametrize('suffix', sorted(EXPECTED_PLATFORM))
@pytest.mark.parametrize('path', [f'configs/phase{n}.py' for n in range(8)]
                         + ['configs/default.py', 'configs/bfrb_watch.py'])
def test_every_config_resolves_for_every_platform(path, suffix):
  # The watch preset takes its phase first: configs/bfrb_watch.py:phase4:gpu.
  base = path + ':phase4' if path.endswith('bfrb_watch.py') else path
  config = load_config_flag(base + suffix)
  run_config.validate(config)
  got = (config.platform, config.model.compute_dtype, config.per_device_batch_size,
         config.mesh, config.prefetch_depth)
  assert got == EXPECTED_PLATFORM[suffix]
  # The platform changes only the fields it owns, never the model or the objective.
  flat = run_config.flatten(json.loads(config.to_json_best_effort()))
  cpu = run_config.flatten(json.loads(load_config_flag(base).to_json_best_effort()))
  owned = {'platform', 'per_device_batch_size', 'mesh', 'model.compute_dtype',
           'matmul_precision', 'prefetch_depth'}
  assert {k for k in flat if flat[k] != cpu.get(k)} <= owned
  assert set(flat) == set(cpu)


def test_unknown_platform_is_named():
  with pytest.raises(ValueError, match="unknown platform 'gpus'.*cpu, gpu, tpu"):
    importlib.import_module('configs.phase3').get_config('gpus')
  with pytest.raises(ValueError, match="'h100' is neither a phase"):
    importlib.import_module('configs.bfrb_watch').get_config('phase3:h100')


def test_per_device_batch_becomes_the_global_batch():
  config = importlib.import_module('configs.phase1').get_config('gpu')
  run_config.resolve_platform(config, device_count=8, backend='gpu')
  assert (config.batch_size, config.eval_batch_size) == (64 * 8, 4 * 64 * 8)
  explicit = importlib.import_module('configs.phase1').get_config('gpu')
  explicit.batch_size = 100
  with pytest.raises(ValueError, match=r'batch_size=100 is set while per_device_batch_size=64 '
                     r'makes it 512 on 8 devices; set --config.per_device_batch_size=0'):
    run_config.resolve_platform(explicit, device_count=8, backend='gpu')
  cpu = importlib.import_module('configs.phase1').get_config()
  run_config.resolve_platform(cpu, device_count=4, backend='cpu')
  assert (cpu.batch_size, cpu.eval_batch_size) == (32, 128)  # The global batch as given.


def test_resume_guard(tmp_path):
  workdir = str(tmp_path)
  run_config.check_resume(workdir, config_dict(), 'abc')  # Nothing saved yet.
  run_config.write_run_file(workdir, config_dict(), 'abc')
  run_config.check_resume(workdir, config_dict(), 'abc')
  run_config.check_resume(workdir, config_dict(log_every_steps=7, eval_batch_size=4), 'abc')
  with pytest.raises(ValueError, match="model.hidden_dim: 64 in the workdir, 32 now"):
    run_config.check_resume(workdir, config_dict(**{'model.hidden_dim': 32}), 'abc')
  with pytest.raises(ValueError, match='num_train_steps'):
    run_config.check_resume(workdir, config_dict(num_train_steps=10), 'abc')
  with pytest.raises(ValueError, match='trained on other data'):
    run_config.check_resume(workdir, config_dict(), 'abd')


def test_fingerprint_follows_values_and_masks():
  first = synthetic.load_synthetic(num_subjects=3, sequences_per_subject=2, seed=0)
  same = synthetic.load_synthetic(num_subjects=3, sequences_per_subject=2, seed=0)
  assert run_config.data_fingerprint(first) == run_config.data_fingerprint(same)
  same.sequences[1].raw['thm'][0, 0] += 1.0
  assert run_config.data_fingerprint(first) != run_config.data_fingerprint(same)
  other = synthetic.load_synthetic(num_subjects=3, sequences_per_subject=2, seed=0)
  other.sequences[0].observed['tof'][0, 0] ^= True
  assert run_config.data_fingerprint(first) != run_config.data_fingerprint(other)


def test_resume_accepts_added_field_at_default(tmp_path):
  workdir = str(tmp_path)
  older = config_dict()
  del older['lambda_contrastive']
  del older['contrastive']
  run_config.write_run_file(workdir, older, 'abc')
  run_config.check_resume(workdir, config_dict(), 'abc')
  with pytest.raises(ValueError, match='lambda_contrastive: None in the workdir, 0.5 now'):
    run_config.check_resume(workdir, config_dict(lambda_contrastive=0.5), 'abc')
  with pytest.raises(ValueError, match='contrastive.queue_size: None in the workdir, 64 now'):
    run_config.check_resume(workdir, config_dict(**{'contrastive.queue_size': 64}), 'abc')
