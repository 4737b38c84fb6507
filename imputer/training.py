"""Training state, optimizer and the pure train and evaluation steps."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from imputer import interpolation
from imputer import losses
from imputer import masking


@flax.struct.dataclass
class TrainState:
  """Everything the next step depends on, so that a checkpoint of it is a resume point.

  `rng` is the run's base key. Each step folds its own key from it with `step`, so a resumed
  run draws the same masks and dropout as an uninterrupted one.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


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
  """

  def __init__(self, model, tx, schedule, input_layouts, target_layouts, config,
               steps_per_epoch: int = 1):
    self.model = model
    self.tx = tx
    self.schedule = schedule
    self.input_layouts = tuple(input_layouts)
    self.target_layouts = tuple(target_layouts)
    self.config = config
    self.mask_ramp_steps = config.mask_epochs * steps_per_epoch
    self.group_weights = losses.parse_group_weights(
        config.loss.group_weights, [l.name for l in target_layouts])

  def loss_and_outputs(self, params, batch, hidden_raw, dropout_rng, train):
    visible, weights = masked_views(batch, self.target_layouts, hidden_raw)
    inputs = model_inputs(batch, self.input_layouts, self.target_layouts, visible,
                          self.config.model.interpolation_prior)
    rngs = {'dropout': dropout_rng} if train else {}
    outputs = self.model.apply({'params': params}, inputs, train=train, rngs=rngs)
    targets = {l.name: batch['values'][l.name] for l in self.target_layouts}
    total, terms = losses.reconstruction_loss(
        self.config.loss, outputs, targets, weights, self.group_weights)
    return total, (terms, outputs)

  def two_view_loss(self, params, batch, hidden_views, dropout_rngs, train=True):
    """Return L_recon averaged over two masked views plus lambda_cons * L_cons.

    L_cons is the MSE between the two views' reconstructions on the positions that
    `consistency.positions` selects. With `consistency.stop_gradient` the second view is a
    fixed target, so only the first view is pulled towards it.
    """
    views = [self.loss_and_outputs(params, batch, hidden, rng, train)
             for hidden, rng in zip(hidden_views, dropout_rngs)]
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
    total = 0.5 * (loss_a + loss_b) + self.config.lambda_cons * loss_cons
    return total, (terms, out_a)

  def draw_hidden(self, rng, step, batch):
    batch_size, window = batch['valid'].shape
    ratio = masking.scheduled_ratio(step, self.config.mask_start, self.config.mask_end,
                                    self.mask_ramp_steps)
    m = self.config.mask
    hidden = masking.sample_hidden(
        rng, self.target_layouts, batch_size, window, ratio, m.imu_only_prob,
        (m.element_weight, m.sensor_weight, m.span_weight), m.span_length)
    return hidden, ratio

  def train_step(self, state: TrainState, batch):
    mask_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    if self.config.lambda_cons > 0:
      # Two views: independent masks and dropout, drawn from the step's keys.
      mask_rngs = jax.random.split(mask_rng)
      hidden_views, ratio = zip(*(self.draw_hidden(k, state.step, batch) for k in mask_rngs))
      hidden, ratio = hidden_views[0], ratio[0]
      grad_fn = jax.value_and_grad(self.two_view_loss, has_aux=True)
      (loss, (terms, _)), grads = grad_fn(state.params, batch, hidden_views,
                                          jax.random.split(dropout_rng))
    else:
      hidden, ratio = self.draw_hidden(mask_rng, state.step, batch)
      grad_fn = jax.value_and_grad(self.loss_and_outputs, has_aux=True)
      (loss, (terms, _)), grads = grad_fn(state.params, batch, hidden, dropout_rng, True)
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
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def evaluate(self, params, batch, hidden_raw):
    """Return (loss terms, reconstructions) for given hidden masks, without dropout."""
    loss, (terms, outputs) = self.loss_and_outputs(params, batch, hidden_raw, None, False)
    return {'loss': loss, **terms}, outputs['recon']


def create_train_state(rng, example_batch, *, model, tx, input_layouts, target_layouts,
                       prior: bool):
  """Initialise parameters from an example batch and return step-0 state."""
  param_rng, state_rng = jax.random.split(rng)
  visible = {l.name: jnp.ones(example_batch['values'][l.name].shape[:2] + (l.num_raw,))
             for l in target_layouts}
  inputs = model_inputs(example_batch, input_layouts, target_layouts, visible, prior)
  params = model.init({'params': param_rng}, inputs, train=False)['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)
