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

  `rng` is the run's base key; the step's own key is folded from it with `step`, so a resumed
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

  def __init__(self, model, tx, schedule, input_layouts, target_layouts, config):
    self.model = model
    self.tx = tx
    self.schedule = schedule
    self.input_layouts = tuple(input_layouts)
    self.target_layouts = tuple(target_layouts)
    self.config = config
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

  def train_step(self, state: TrainState, batch):
    mask_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    batch_size, window = batch['valid'].shape
    hidden = masking.sample_hidden(
        mask_rng, self.target_layouts, batch_size, window, self.config.mask.ratio,
        self.config.mask.imu_only_prob)
    grad_fn = jax.value_and_grad(self.loss_and_outputs, has_aux=True)
    (loss, (terms, _)), grads = grad_fn(state.params, batch, hidden, dropout_rng, True)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss, **terms, 'grad_norm': optax.tree.norm(grads),
        'learning_rate': self.schedule(state.step),
        'mask_ratio': jnp.asarray(self.config.mask.ratio, jnp.float32),
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
