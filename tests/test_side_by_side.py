"""Side-by-side studies: grouping, zero weights against ablated configs, and agreement with
sequential training."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phase7
from imputer import checkpointing
from imputer import preemption
from imputer import side_by_side
from imputer import study
from imputer import train
from tests import test_train


def assert_trees_close(a, b, label, rtol=1e-5, atol=1e-6):
  """Compare two parameter trees leaf by leaf, naming the leaf that differs.

  The attention key bias is left out: it adds the same amount to every logit of a query, so
  softmax cancels it and its true gradient is exactly 0. What reaches it is rounding noise,
  which Adam scales up to full-size steps, so its values follow the summation order of the
  compiled step. Every other leaf must match.
  """
  flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(a)[0]}
  flat_b = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(b)[0]}
  assert flat_a.keys() == flat_b.keys(), label
  compared = [k for k in flat_a if "['key']['bias']" not in k]
  assert len(compared) > 10
  for key in compared:
    np.testing.assert_allclose(np.asarray(flat_a[key]), np.asarray(flat_b[key]), rtol=rtol,
                               atol=atol, err_msg=f'{label} {key}')


def test_phase7_groups():
  config = phase7.get_config()
  groups = side_by_side.plan_groups(config, study.plan(config), '/unused')
  names = [[m.variant.name for m in g.members] for g in groups]
  alone = ['no_uncertainty', 'no_sensor_embedding', 'no_shared_decoder']
  shared = [v.name for v in study.plan(config) if v.name not in alone]
  # Per seed: one group for everything that differs only in weights, the mask schedule or the
  # positional embedding, and one group for each variant whose model or loss kind differs.
  assert names == [shared, ['no_uncertainty'], ['no_sensor_embedding'],
                   ['no_shared_decoder']] * 2
  assert [g.members[0].seed_offset for g in groups] == [0, 0, 0, 0, 1, 1, 1, 1]
  assert len(shared) == 1 + 5 + 16
  structure = groups[0].structure
  assert (structure.lambda_cons, structure.lambda_denoise, structure.lambda_contrastive) == (
      0.2, 0.2, 0.2)  # The largest weight of any member: every term is computed.
  assert structure.model.positional_embedding
  config.study.group_size = 10
  sized = side_by_side.plan_groups(config, study.plan(config), '/unused')
  assert [len(g.members) for g in sized[:4]] == [10, 10, 2, 1]


def test_hyper_values_follow_configs():
  base = test_train.tiny_config(mask_start=0.3, mask_end=0.75, mask_epochs=2, lambda_cons=0.1)
  other = test_train.tiny_config(mask_end=0.6, **{'model.positional_embedding': True,
                                                  'contrastive.momentum': 0.9})
  hyper = side_by_side.stack_hyper([base, other], steps_per_epoch=7)
  np.testing.assert_array_equal(hyper['mask_ramp_steps'], [14, 0])
  np.testing.assert_allclose(hyper['mask_start'], [0.3, 0.5])
  np.testing.assert_allclose(hyper['mask_end'], [0.75, 0.6])
  np.testing.assert_allclose(hyper['lambda_cons'], [0.1, 0.0])
  np.testing.assert_allclose(hyper['momentum'], [0.99, 0.9])
  np.testing.assert_array_equal(hyper['positional_scale'], [0.0, 1.0])
  assert hyper['mask_ramp_steps'].dtype == jnp.int32


def phase6_like(**overrides):
  settings = {'lambda_cons': 0.1, 'lambda_contrastive': 0.3, 'lambda_denoise': 0.7,
              'contrastive.queue_size': 16, 'model.positional_embedding': True,
              'mask_start': 0.3, 'mask_end': 0.75, 'mask_epochs': 1, 'loss.kind': 'conf_mae'}
  settings.update(overrides)
  return test_train.tiny_config(**settings)


def test_zero_weight_variants_equal_ablated_configs():
  """Two vmapped steps of a model with the contrastive and denoising losses and two
  ablations, each ablation against its own config. The consistency weight and the positional
  multiplier are checked against their own runs in the agreement test below."""
  full = phase6_like(lambda_cons=0.0)
  ablated = [phase6_like(lambda_cons=0.0, lambda_contrastive=0.0),
             phase6_like(lambda_cons=0.0, lambda_denoise=0.0, mask_start=0.75,
                         mask_epochs=0)]
  configs = [full] + ablated
  data = train.prepare_data(full)
  structure = side_by_side.structure_config(configs)
  steps, _ = train.make_steps(structure, data)
  init, example = train.state_initializer(steps, data)
  state = jax.tree.map(lambda x: jnp.stack([x] * len(configs)),
                       jax.jit(init)(jax.random.PRNGKey(0), example))
  hyper = side_by_side.stack_hyper(configs, max(len(data.train) // full.batch_size, 1))
  batches = [data.train.take(train.batch_rows(s, len(data.train), 8, full.seed))
             for s in range(2)]
  group_step = jax.jit(jax.vmap(steps.train_step, in_axes=(0, None, 0)))
  group_states, group_metrics = [state], []
  for batch in batches:  # Two steps, so the second contrastive step has a non-empty queue.
    state, metrics = group_step(state, batch, hyper)
    group_states.append(state)
    group_metrics.append(metrics)
  assert float(group_metrics[1]['loss_contrastive'][0]) > 0

  for index, config in enumerate(configs[1:], 1):
    own_steps, _ = train.make_steps(config, data)
    own_init, _ = train.state_initializer(own_steps, data)
    own = jax.jit(own_init)(jax.random.PRNGKey(0), example)
    abstract = jax.eval_shape(own_init, jax.random.PRNGKey(0), example)
    member = lambda tree: side_by_side.project_state(
        jax.tree.map(lambda x: x[index], tree), abstract)
    # The group's initial parameters, cut to the member's tree, are the config's own.
    for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(member(group_states[0]))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    own_step = jax.jit(own_steps.train_step)
    for step, batch in enumerate(batches):
      own, metrics = own_step(own, batch)
      np.testing.assert_allclose(float(metrics['loss']),
                                 float(group_metrics[step]['loss'][index]), rtol=1e-6)
      np.testing.assert_allclose(float(metrics['grad_norm']),
                                 float(group_metrics[step]['grad_norm'][index]), rtol=1e-6)
    assert_trees_close(checkpointing.state_tree(own),
                       checkpointing.state_tree(member(group_states[-1])), f'variant {index}')


def study_config(mode):
  # Every schedule and piece of state that a resume must carry over: the curriculum ramp, the
  # warmup and cosine decay, the contrastive queue and the cosine momentum of its encoder.
  config = test_train.tiny_config(
      lambda_cons=0.1, num_train_steps=8, eval_every_steps=4, checkpoint_every_steps=4,
      log_every_steps=4, lambda_contrastive=0.1, mask_start=0.3, mask_end=0.6, mask_epochs=1,
      **{'model.positional_embedding': True, 'contrastive.queue_size': 16,
         'contrastive.momentum_schedule': 'cosine'})
  config.study.ablations = 'consistency,positional_embedding'
  config.study.mode = mode
  return config


def final_params(path):
  manager = checkpointing.Checkpoints(path, 5)
  step = manager.latest.latest_step()
  restored = manager.latest.restore(step)
  manager.close()
  return step, restored['state']['params']


@pytest.fixture(scope='module')
def side_by_side_study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('side_by_side'))
  return workdir, side_by_side.run(study_config('side_by_side'), workdir)


def test_side_by_side_agrees_with_sequential(side_by_side_study, tmp_path):
  workdir, variants = side_by_side_study
  assert [v.name for v in variants] == ['full', 'no_consistency', 'no_positional_embedding']
  assert os.listdir(os.path.join(workdir, 'groups')) == ['full+2']
  sequential = str(tmp_path / 'sequential')
  study.run_sequential(study_config('sequential'), sequential, train.train_and_evaluate)
  for variant in variants:
    paths = [study.run_dir(root, variant, 0) for root in (workdir, sequential)]
    (step_a, params_a), (step_b, params_b) = map(final_params, paths)
    assert step_a == step_b == 8
    # Each member saved its own tree, and it matches the sequential run's.
    assert_trees_close(params_a, params_b, variant.name, rtol=1e-4, atol=1e-5)
    reports = []
    for path in paths:
      with open(os.path.join(path, 'eval_report.json'), encoding='utf-8') as f:
        reports.append(json.load(f))
    assert reports[0]['checkpoint'] == reports[1]['checkpoint']
    for scenario in ('random_mask', 'imu_only'):
      for group, figures in reports[0]['scenarios'][scenario]['model'].items():
        np.testing.assert_allclose(
            figures['mae'], reports[1]['scenarios'][scenario]['model'][group]['mae'],
            rtol=1e-4, err_msg=f'{variant.name} {scenario} {group}')
  # The member without the positional embedding saved no positional table.
  _, params = final_params(study.run_dir(workdir, variants[2], 0))
  assert 'positional_embedding' not in json.dumps(jax.tree.map(lambda x: 0, params))
  _, params = final_params(study.run_dir(workdir, variants[0], 0))
  assert 'positional_embedding' in json.dumps(jax.tree.map(lambda x: 0, params))


def test_side_by_side_resume_evaluates_only_unfinished(side_by_side_study):
  workdir, variants = side_by_side_study
  path = study.run_dir(workdir, variants[1], 0)
  report = os.path.join(path, 'eval_report.json')
  with open(report, encoding='utf-8') as f:
    before = json.load(f)
  others = [os.path.join(study.run_dir(workdir, v, 0), 'eval_report.json')
            for v in variants if v is not variants[1]]
  stamps = [os.stat(p).st_mtime_ns for p in others]
  os.remove(report)
  side_by_side.run(study_config('side_by_side'), workdir)
  with open(report, encoding='utf-8') as f:
    assert json.load(f)['scenarios'] == before['scenarios']
  assert [os.stat(p).st_mtime_ns for p in others] == stamps


def test_preempted_group_resumes_bit_exact(side_by_side_study, tmp_path, monkeypatch):
  workdir, variants = side_by_side_study
  config = study_config('side_by_side')
  stopped = str(tmp_path / 'stopped')
  [group] = side_by_side.plan_groups(config, variants, stopped)
  real_rows = train.batch_rows

  def sigint_at_step_5(step, *args):
    if step == 5:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, on the prefetch thread.
    return real_rows(step, *args)

  monkeypatch.setattr(train, 'batch_rows', sigint_at_step_5)
  with pytest.raises(preemption.Preempted, match='SIGINT received') as preempted:
    side_by_side.train_group(group)
  step = preempted.value.step
  assert 2 <= step <= 6
  assert step != 4  # Not a step that the cadence saves anyway.
  saved = checkpointing.Checkpoints(group.path, 5)
  assert saved.latest.latest_step() == step
  saved.close()
  monkeypatch.setattr(train, 'batch_rows', real_rows)
  side_by_side.train_group(group)  # Resumes from the group checkpoint of `step`.
  for member in group.members:
    restored = [checkpointing.Checkpoints(study.run_dir(root, member.variant, 0), 5)
                for root in (workdir, stopped)]
    states = [r.latest.restore(8)['state'] for r in restored]
    for r in restored:
      r.close()
    leaves = [jax.tree_util.tree_leaves_with_path(s) for s in states]
    assert [jax.tree_util.keystr(p) for p, _ in leaves[0]] == [
        jax.tree_util.keystr(p) for p, _ in leaves[1]]
    assert any('queue' in jax.tree_util.keystr(p) for p, _ in leaves[0])
    assert any('ema_params' in jax.tree_util.keystr(p) for p, _ in leaves[0])
    for (path, a), (_, b) in zip(*leaves):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                    err_msg=f'{member.variant.name} {jax.tree_util.keystr(path)}')
