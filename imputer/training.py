"""Training state, optimizer and the pure train and evaluation steps."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from imputer import augment
from imputer import contrastive
from imputer import denoising
from imputer import interpolation
from imputer import losses
from imputer import masking


@flax.struct.dataclass
class TrainState:
  """Everything the next step depends on, so that a checkpoint of it is a resume point.

  `rng` is the run's base key. Each step folds its own key from it with `step`, so a resumed
  run draws the same masks and dropout as an uninterrupted one.

  With the contrastive loss on, `ema_params` is the momentum encoder: a separate copy
  of the trunk and projection-head entries of `params`, never the same buffers. `queue`
  (K, D) contains unit-length keys, `queue_ptr` is the next slot to write and
  `queue_filled` counts the slots that contain a key. Without it the four fields are None.

  With `nonfinite='skip'`, `skipped` counts the steps whose update was dropped because the
  loss or the gradient was not finite; otherwise it is None.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = None
  queue: Any = None
  queue_ptr: Any = None
  queue_filled: Any = None
  skipped: Any = None


def make_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak rate, then cosine decay to `end_learning_rate_factor` of it."""
  warmup = min(optim_config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=optim_config.learning_rate * optim_config.end_learning_rate_factor)


def make_optimizer(optim_config, schedule) -> optax.GradientTransformation:
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts.append(optax.adamw(schedule, weight_decay=optim_config.weight_decay))
  return optax.chain(*parts)


def model_inputs(batch, input_layouts, target_layouts, visible_raw, prior: bool):
  """Build the model's input pytree: target values are zero wherever not visible.

  With `prior`, 'targets_prior' adds the in-window linear interpolation of the visible raw
  target values, which the model both reads and corrects.
  """
  targets = {l.name: batch['values'][l.name][..., :l.num_raw] * visible_raw[l.name]
             for l in target_layouts}
  inputs = {
      'valid': batch['valid'],
      'inputs': {l.name: batch['values'][l.name] for l in input_layouts},
      'inputs_observed': {l.name: batch['observed'][l.name] for l in input_layouts},
      'targets': targets,
      'targets_visible': {l.name: visible_raw[l.name] for l in target_layouts},
  }
  if prior:
    inputs['targets_prior'] = {
        name: interpolation.interpolate_visible(value, visible_raw[name])
        for name, value in targets.items()}
  return inputs


def imu_only_inputs(valid, input_values, input_observed, target_layouts, prior: bool):
  """Build model inputs that hide every target group, as for an IMU-only recording.

  Equal to `model_inputs` with nothing visible, but built from zeros directly: the
  interpolation of an empty window is 0, and as a compile-time constant it would be folded
  slowly for wide groups.
  """
  zeros = {l.name: jnp.zeros(valid.shape + (l.num_raw,), jnp.float32) for l in target_layouts}
  inputs = {'valid': valid, 'inputs': input_values, 'inputs_observed': input_observed,
            'targets': zeros, 'targets_visible': zeros}
  if prior:
    inputs['targets_prior'] = zeros
  return inputs


def select(condition, on, off):
  """Return `on` where `condition` is true and `off` elsewhere, leaf by leaf.

  A Python bool picks one tree at trace time, so a single run's graph contains only what it
  uses. An array condition (one variant's setting in a side-by-side study) selects with
  jnp.where, so the unselected tree gets no gradient.
  """
  if isinstance(condition, (bool, np.bool_)):
    return on if condition else off
  return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on, off)


def with_scales(inputs, hyper):
  """Add the positional-embedding multiplier of a side-by-side variant to model inputs."""
  if 'positional_scale' in hyper:
    inputs = {**inputs, 'positional_scale': hyper['positional_scale']}
  return inputs


def masked_views(batch, target_layouts, hidden_raw):
  """Return (visible raw masks, scoring weights per feature) for a drawn hidden mask."""
  visible, weights = {}, {}
  for layout in target_layouts:
    name = layout.name
    observed = batch['observed'][name]
    hidden = hidden_raw[name]
    visible[name] = (observed[..., :layout.num_raw] & ~hidden).astype(jnp.float32)
    hidden_features = masking.expand_to_features(layout, hidden)
    weights[name] = hidden_features & observed & batch['valid'][..., None]
  return visible, weights


class Steps:
  """The model's pure functions, bound to its static configuration.

  `train_step(state, batch)` and `evaluate(params, batch, hidden_raw)` are plain functions of
  arrays; the caller compiles them with `jax.jit` and the shardings of its mesh.

  The loss weights and the other settings in `hyper_defaults` come from the config as Python
  numbers. A side-by-side study passes them instead as a `hyper` dict of arrays, one value per
  variant under `jax.vmap`, and may add 'positional_scale' (0 switches the positional
  embedding off). The config then only decides which terms are computed at all; a variant
  whose weight is 0 gets exactly the objective of a config without the term.
  """

  def __init__(self, model, tx, schedule, input_layouts, target_layouts, config,
               steps_per_epoch: int = 1, total_steps: int = 1, quaternions=None):
    self.model = model
    self.tx = tx
    self.schedule = schedule
    self.input_layouts = tuple(input_layouts)
    self.target_layouts = tuple(target_layouts)
    self.config = config
    self.mask_ramp_steps = config.mask_epochs * steps_per_epoch
    self.total_steps = total_steps
    # Input group name -> augment.QuaternionChannels or None, for the contrastive views.
    self.quaternions = dict(quaternions or {})
    self.group_weights = losses.parse_group_weights(
        config.loss.group_weights, [l.name for l in target_layouts])

  def hyper_defaults(self) -> dict:
    """Return the settings a side-by-side variant may override, as the config gives them."""
    c = self.config
    return {'lambda_cons': c.lambda_cons, 'lambda_denoise': c.lambda_denoise,
            'lambda_contrastive': c.lambda_contrastive, 'huber_delta': c.loss.huber_delta,
            'momentum': c.contrastive.momentum, 'mask_start': c.mask_start,
            'mask_end': c.mask_end, 'mask_ramp_steps': self.mask_ramp_steps}

  def _hyper(self, hyper):
    return {**self.hyper_defaults(), **(hyper or {})}

  def loss_and_outputs(self, params, batch, hidden_raw, dropout_rng, train, denoise_rng=None,
                       hyper=None):
    """Return (L_recon, (terms, outputs)) of one masked view.

    With `denoise_rng`, part of the input values are corrupted first (when lambda_denoise > 0),
    and the terms gain L_denoise of the auxiliary head (which L_recon does not include).
    """
    hyper = self._hyper(hyper)
    visible, weights = masked_views(batch, self.target_layouts, hidden_raw)
    inputs = with_scales(model_inputs(batch, self.input_layouts, self.target_layouts, visible,
                                      self.config.model.interpolation_prior), hyper)
    if denoise_rng is not None:
      d = self.config.denoise
      noisy, corrupted = denoising.corrupt(
          denoise_rng, inputs['inputs'], inputs['inputs_observed'], batch['valid'], d.ratio,
          d.sigma)
      inputs['inputs'] = select(hyper['lambda_denoise'] > 0, noisy, inputs['inputs'])
    rngs = {'dropout': dropout_rng} if train else {}
    outputs = self.model.apply({'params': params}, inputs, train=train, rngs=rngs)
    targets = {l.name: batch['values'][l.name] for l in self.target_layouts}
    total, terms = losses.reconstruction_loss(
        self.config.loss, outputs, targets, weights, self.group_weights, hyper['huber_delta'])
    terms['loss_recon'] = total
    if denoise_rng is not None:
      eligible = {name: inputs['inputs_observed'][name] & batch['valid'][..., None]
                  for name in corrupted}
      scored = corrupted if self.config.denoise.positions == 'corrupted' else eligible
      clean = {l.name: batch['values'][l.name] for l in self.input_layouts}
      terms['loss_denoise'], terms['count_denoise'] = denoising.denoise_loss(
          outputs['denoised'], clean, scored)
      terms['denoise_ratio_applied'] = (
          sum(jnp.sum(m) for m in corrupted.values())
          / jnp.maximum(sum(jnp.sum(m) for m in eligible.values()), 1)).astype(jnp.float32)
    return total, (terms, outputs)

  def two_view_loss(self, params, batch, hidden_views, dropout_rngs, train=True,
                    denoise_rngs=(None, None), hyper=None):
    """Return L_recon averaged over two masked views plus lambda_cons * L_cons.

    L_cons is the MSE between the two views' reconstructions on the positions that
    `consistency.positions` selects. With `consistency.stop_gradient` the second view is a
    fixed target, so only the first view is pulled towards it. A side-by-side variant with
    lambda_cons = 0 gets the first view's L_recon alone, as a one-view config would.
    """
    hyper = self._hyper(hyper)
    views = [self.loss_and_outputs(params, batch, hidden, rng, train, denoise, hyper)
             for hidden, rng, denoise in zip(hidden_views, dropout_rngs, denoise_rngs)]
    (loss_a, (terms_a, out_a)), (loss_b, (terms_b, out_b)) = views
    recon_b = out_b['recon']
    if self.config.consistency.stop_gradient:
      recon_b = jax.lax.stop_gradient(recon_b)
    positions = {}
    for layout in self.target_layouts:
      observed = batch['observed'][layout.name] & batch['valid'][..., None]
      positions[layout.name] = losses.consistency_positions(
          self.config.consistency.positions, observed,
          masking.expand_to_features(layout, hidden_views[0][layout.name]),
          masking.expand_to_features(layout, hidden_views[1][layout.name]))
    loss_cons, count_cons = losses.consistency_loss(out_a['recon'], recon_b, positions)
    terms = jax.tree.map(lambda a, b: 0.5 * (a + b), terms_a, terms_b)
    terms.update(loss_cons=loss_cons, count_cons=count_cons)
    total = 0.5 * (loss_a + loss_b) + hyper['lambda_cons'] * loss_cons
    on = hyper['lambda_cons'] > 0
    total = select(on, total, loss_a)
    terms = select(on, terms, {**terms_a, 'loss_cons': loss_cons, 'count_cons': count_cons})
    return total, (terms, out_a)

  def draw_hidden(self, rng, step, batch, hyper=None):
    hyper = self._hyper(hyper)
    batch_size, window = batch['valid'].shape
    ratio = masking.scheduled_ratio(step, hyper['mask_start'], hyper['mask_end'],
                                    hyper['mask_ramp_steps'])
    m = self.config.mask
    hidden = masking.sample_hidden(
        rng, self.target_layouts, batch_size, window, ratio, m.imu_only_prob,
        (m.element_weight, m.sensor_weight, m.span_weight), m.span_length)
    return hidden, ratio

  def reconstruction_objective(self, params, batch, step, mask_rng, dropout_rng,
                               denoise_rng=None, hyper=None):
    """Return (L_recon [+ lambda_cons * L_cons], (terms, hidden mask, scheduled ratio))."""
    hyper = self._hyper(hyper)
    if self.config.lambda_cons > 0:
      # Two views: independent masks, dropout and corruption, drawn from the step's keys. A
      # side-by-side variant with lambda_cons = 0 draws its first view with the one-view keys.
      one_view = hyper['lambda_cons'] <= 0
      def keys(rng):
        a, b = jax.random.split(rng)
        return select(one_view, rng, a), b
      hidden_views, ratios = zip(*(self.draw_hidden(k, step, batch, hyper)
                                   for k in keys(mask_rng)))
      denoise_rngs = (None, None) if denoise_rng is None else keys(denoise_rng)
      total, (terms, _) = self.two_view_loss(params, batch, hidden_views, keys(dropout_rng),
                                             True, denoise_rngs, hyper)
      return total, (terms, hidden_views[0], ratios[0])
    hidden, ratio = self.draw_hidden(mask_rng, step, batch, hyper)
    total, (terms, _) = self.loss_and_outputs(params, batch, hidden, dropout_rng, True,
                                              denoise_rng, hyper)
    return total, (terms, hidden, ratio)

  def augmented_view(self, rng, batch, hyper=None):
    a = self.config.augment
    view = augment.augment_inputs(rng, batch, self.input_layouts, self.quaternions,
                                  a.warp_strength, a.warp_knots, a.jitter_sigma)
    return with_scales(imu_only_inputs(batch['valid'], view['values'], view['observed'],
                                       self.target_layouts,
                                       self.config.model.interpolation_prior),
                       self._hyper(hyper))

  def contrastive_objective(self, params, state: TrainState, batch, rng, hyper=None):
    """Return (L_contrastive, (metrics, keys, kept rows)) for two augmented views.

    The online parameters encode view A into queries; the momentum parameters encode view B
    into keys, which carry no gradient. Windows without a valid timestep are left out of the
    loss and of the queue.
    """
    view_rng, dropout_rng = jax.random.split(rng)
    view_a, view_b = (self.augmented_view(k, batch, hyper) for k in jax.random.split(view_rng))
    queries = self.model.apply({'params': params}, view_a, train=True,
                               rngs={'dropout': dropout_rng}, output='projection')['projection']
    keys = self.model.apply({'params': state.ema_params}, view_b, train=False,
                            output='projection')['projection']
    keys = jax.lax.stop_gradient(keys)
    keep = batch['valid'].any(axis=-1)
    loss, metrics = contrastive.info_nce(queries, keys, state.queue, state.queue_filled,
                                         self.config.contrastive.temperature, keep)
    return loss, (metrics, keys, keep)

  def objective(self, params, state: TrainState, batch, step_rng, hyper=None):
    """Return L_recon + lambda_cons * L_cons + lambda_denoise * L_denoise
    + lambda_contrastive * L_contrastive, with the terms that are on.

    The reconstruction terms draw their keys exactly as before the contrastive loss existed,
    so phases without it keep their masks and dropout.
    """
    hyper = self._hyper(hyper)
    mask_rng, dropout_rng = jax.random.split(step_rng)
    denoise_rng = None
    if self.config.lambda_denoise > 0:
      denoise_rng = jax.random.fold_in(step_rng, 2)
    total, (terms, hidden, ratio) = self.reconstruction_objective(
        params, batch, state.step, mask_rng, dropout_rng, denoise_rng, hyper)
    if denoise_rng is not None:
      total = total + hyper['lambda_denoise'] * terms['loss_denoise']
    extra = {}
    if self.config.lambda_contrastive > 0:
      loss_c, (metrics_c, keys, keep) = self.contrastive_objective(
          params, state, batch, jax.random.fold_in(step_rng, 1), hyper)
      total = total + hyper['lambda_contrastive'] * loss_c
      terms = {**terms, 'loss_contrastive': loss_c, **metrics_c}
      extra = {'keys': keys, 'keep': keep}
    return total, (terms, hidden, ratio, extra)

  def update_momentum_and_queue(self, state: TrainState, params, extra, hyper=None):
    """Move the momentum encoder towards the updated online parameters, then enqueue keys."""
    c = self.config.contrastive
    m = contrastive.momentum_at(state.step, self._hyper(hyper)['momentum'], c.momentum_schedule,
                                self.total_steps)
    online = {name: params[name] for name in state.ema_params}
    ema_params = contrastive.ema_update(state.ema_params, online, m)
    queue, pointer, filled = contrastive.enqueue(
        state.queue, state.queue_ptr, state.queue_filled, extra['keys'], extra['keep'])
    metrics = {'momentum': m,
               'queue_fill': state.queue_filled.astype(jnp.float32) / state.queue.shape[0]}
    return dict(ema_params=ema_params, queue=queue, queue_ptr=pointer,
                queue_filled=filled), metrics

  def train_step(self, state: TrainState, batch, hyper=None):
    step_rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(self.objective, has_aux=True)
    (loss, (terms, hidden, ratio, extra)), grads = grad_fn(state.params, state, batch, step_rng,
                                                           hyper)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss, **terms, 'grad_norm': optax.tree.norm(grads),
        'learning_rate': self.schedule(state.step),
        'mask_ratio': ratio,
        'mask_ratio_applied': masking.applied_ratio(
            hidden, {l.name: batch['observed'][l.name][..., :l.num_raw]
                     for l in self.target_layouts}),
    }
    changes = {}
    if extra:
      changes, contrastive_metrics = self.update_momentum_and_queue(state, params, extra, hyper)
      metrics.update(contrastive_metrics)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              **changes)
    if self.config.nonfinite == 'skip':
      new_state, metrics = skip_if_not_finite(state, new_state, metrics)
    return new_state, metrics

  def represent(self, params, batch, hyper=None):
    """Return the (B, H) pooled representation of IMU-only inputs (every target hidden)."""
    inputs = imu_only_inputs(batch['valid'], {l.name: batch['values'][l.name]
                                              for l in self.input_layouts},
                             {l.name: batch['observed'][l.name] for l in self.input_layouts},
                             self.target_layouts, self.config.model.interpolation_prior)
    inputs = with_scales(inputs, self._hyper(hyper))
    return self.model.apply({'params': params}, inputs, train=False,
                            output='representation')['representation']

  def evaluate(self, params, batch, hidden_raw, hyper=None):
    """Return (loss terms, reconstructions, log-variances) for given hidden masks.

    Runs without dropout. The log-variances are {} without a conf_ loss; otherwise each
    group's (a scalar, or per value with a variance head) is broadcast to its reconstruction.
    """
    loss, (terms, outputs) = self.loss_and_outputs(params, batch, hidden_raw, None, False,
                                                   hyper=hyper)
    log_var = {name: jnp.broadcast_to(value, outputs['recon'][name].shape)
               for name, value in outputs.get('log_var', {}).items()}
    return {'loss': loss, **terms}, outputs['recon'], log_var


def skip_if_not_finite(state: TrainState, new_state: TrainState, metrics: dict):
  """Keep `state` (one step further) when the loss or the gradient norm is not finite.

  The kept step counts in `skipped`, so a resumed run keeps the count of skipped batches,
  and the metrics gain 'skipped' (1.0 for this step) for the training loop's log.
  """
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  kept = kept.replace(step=new_state.step,
                      skipped=state.skipped + (~finite).astype(jnp.int32))
  return kept, {**metrics, 'skipped': (~finite).astype(jnp.float32)}


def create_train_state(rng, example_batch, *, model, tx, input_layouts, target_layouts,
                       prior: bool, queue_size: int = 0, count_skipped: bool = False):
  """Initialise parameters from an example batch and return step-0 state.

  With `queue_size` > 0 the state also gets the projection head, a momentum copy of the
  trunk and projection head, and an empty queue of `queue_size` keys.
  """
  param_rng, state_rng = jax.random.split(rng)
  visible = {l.name: jnp.ones(example_batch['values'][l.name].shape[:2] + (l.num_raw,))
             for l in target_layouts}
  inputs = model_inputs(example_batch, input_layouts, target_layouts, visible, prior)
  params = model.init({'params': param_rng}, inputs, train=False)['params']
  extra = {}
  if queue_size > 0:
    trunk = model.init({'params': param_rng}, inputs, train=False, output='projection')['params']
    params = {**params, 'projection_head': trunk['projection_head']}
    # A copy: the momentum encoder must own its buffers, or an update of one would be
    # an update of the other (and donating the state would donate one buffer twice).
    extra = dict(
        ema_params=jax.tree.map(jnp.copy, {name: params[name] for name in trunk}),
        queue=jnp.zeros((queue_size, model.projection_dim), jnp.float32),
        queue_ptr=jnp.zeros((), jnp.int32), queue_filled=jnp.zeros((), jnp.int32))
  if count_skipped:
    extra['skipped'] = jnp.zeros((), jnp.int32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, **extra)
