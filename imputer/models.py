"""The masked imputer: encoder, shared decoder and one light head per target group.

Shapes: B batch, W window timesteps, H hidden width, F_g features of target group g.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# model.compute_dtype -> the dtype of the trunk's computation.
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class TransformerBlock(nn.Module):
  """Pre-norm self-attention over time followed by a feed-forward layer."""

  num_heads: int
  mlp_ratio: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, *, train: bool):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    # The softmax runs in float32 whatever the compute dtype: in bfloat16 its normaliser
    # loses the small weights.
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train,
        dtype=self.dtype, force_fp32_for_softmax=True)(y, y, mask=attention_mask)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    return MlpBlock(self.mlp_ratio, self.dropout, self.dtype)(x, attention_mask, train=train)


class MlpBlock(nn.Module):
  """Pre-norm per-timestep feed-forward layer with a residual connection."""

  mlp_ratio: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask=None, *, train: bool):
    # Each timestep is transformed on its own, so padded timesteps cannot reach valid ones.
    del attention_mask
    width = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.gelu(nn.Dense(width * self.mlp_ratio, dtype=self.dtype)(y))
    y = nn.Dense(width, dtype=self.dtype)(y)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class DepthwiseConv1D(nn.Module):
  """A per-channel convolution over time with 'SAME' zero padding, as shifted sums.

  Equal to `nn.Conv(H, (k,), padding='SAME', feature_group_count=H)`, with the same parameter
  names, shapes and initialisation, so checkpoints of either load into the other. XLA's CPU
  backend runs a grouped convolution as a general one: in the train step of the default model
  it took 9 % of the step time (forward and backward). As k shifted multiply-adds it fuses
  into one elementwise pass.
  """

  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.kernel_size, 1, width), jnp.float32).astype(self.dtype)
    bias = self.param('bias', nn.initializers.zeros, (width,), jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    left = (self.kernel_size - 1) // 2
    right = self.kernel_size - 1 - left
    padded = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    length = x.shape[1]
    out = sum(padded[:, k:k + length] * kernel[k, 0] for k in range(self.kernel_size))
    return out + bias


class Decoder(nn.Module):
  """A stack of transformer or MLP blocks ending in a LayerNorm; returns (B, W, H)."""

  kind: str
  num_layers: int
  num_heads: int
  mlp_ratio: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, *, train: bool):
    for _ in range(self.num_layers):
      if self.kind == 'transformer':
        x = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, self.dtype)(
            x, attention_mask, train=train)
      elif self.kind == 'mlp':
        x = MlpBlock(self.mlp_ratio, self.dropout, self.dtype)(x, train=train)
      else:
        raise ValueError(
            f"model.decoder_type={self.kind!r} is unknown; use 'transformer' or 'mlp'.")
    return nn.LayerNorm(dtype=self.dtype)(x)


class ProjectionHead(nn.Module):
  """Two-layer MLP from a pooled representation to the unit-length contrastive space."""

  hidden_dim: int
  output_dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden_dim)(x))
    x = nn.Dense(self.output_dim)(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


class SensorMixer(nn.Module):
  """Attention across sensors within each timestep, with a learned ID embedding per sensor.

  Token layout: the encoder works on time tokens (one per timestep, every channel
  concatenated), which is cheap and covers the whole window. This stage adds sensor tokens.
  At every timestep there is one token per raw input channel (each IMU channel) and one per
  target sensor (each thermopile, each ToF sensor). That makes W x S tokens, but attention
  runs only over the S tokens of one timestep. Tokens of one group share a value projection,
  so without the ID embedding two thermopiles with the same reading would be the same token.
  The ID embedding is what tells them apart inside the attention. Each token also gets the
  encoder's output at its timestep as context. The tokens are concatenated in their fixed
  order and projected back to one vector per timestep, which is added to the time token, so
  the rest of the model is unchanged.

  `sensors` lists (role, group, raw column indices) per token, with role 'input' or
  'target', in a fixed order.
  """

  sensors: Sequence[tuple[str, str, tuple[int, ...]]]
  num_heads: int
  mlp_ratio: int
  dropout: float
  dtype: Any = jnp.float32

  def token_values(self, role, group, columns, model_inputs, size):
    """Return the (B, W, 3 * size) content of one token, zero-padded to the group's size."""
    if role == 'input':
      parts = [model_inputs['inputs'][group], model_inputs['inputs_observed'][group]]
    else:
      parts = [model_inputs['targets'][group], model_inputs['targets_visible'][group]]
      if 'targets_prior' in model_inputs:
        parts.append(model_inputs['targets_prior'][group])
    padded = []
    for part in parts:
      picked = part[..., jnp.asarray(columns)].astype(jnp.float32)
      padded.append(jnp.pad(picked, [(0, 0)] * (picked.ndim - 1) + [(0, size - len(columns))]))
    return jnp.concatenate(padded, axis=-1)

  @nn.compact
  def __call__(self, context, model_inputs, *, train: bool):
    batch, window, width = context.shape
    sizes = {}
    for role, group, columns in self.sensors:
      sizes[(role, group)] = max(sizes.get((role, group), 0), len(columns))
    projections = {key: nn.Dense(width, dtype=self.dtype, name=f'sensor_value_{key[0]}_{key[1]}')
                   for key in sizes}
    tokens = jnp.stack([
        projections[(role, group)](self.token_values(role, group, columns, model_inputs,
                                                     sizes[(role, group)]))
        for role, group, columns in self.sensors], axis=2)  # (B, W, S, H)
    identity = self.param('sensor_id_embedding', nn.initializers.normal(0.02),
                          (len(self.sensors), width), jnp.float32)
    tokens = (tokens + identity.astype(self.dtype) + context[:, :, None, :]).astype(self.dtype)
    flat = tokens.reshape(batch * window, len(self.sensors), width)
    flat = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, self.dtype)(
        flat, None, train=train)
    mixed = nn.LayerNorm(dtype=self.dtype)(flat).reshape(batch, window, len(self.sensors) * width)
    return nn.Dense(width, dtype=self.dtype, name='sensor_output')(mixed)


def sensor_tokens(input_layouts, target_layouts) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
  """List the tokens of `SensorMixer`: one per raw input channel, one per target sensor."""
  tokens = [('input', l.name, (c,)) for l in input_layouts for c in range(l.num_raw)]
  for layout in target_layouts:
    for sensor in range(layout.num_sensors):
      columns = tuple(int(c) for c in np.flatnonzero(layout.sensor_of_raw == sensor))
      tokens.append(('target', layout.name, columns))
  return tuple(tokens)


def masked_time_mean(x, valid):
  """Mean of (B, W, H) `x` over the valid timesteps of each window; 0 for an empty window."""
  weight = valid.astype(x.dtype)[..., None]
  return (x * weight).sum(axis=1) / jnp.maximum(weight.sum(axis=1), 1.0)


class MaskedImputer(nn.Module):
  """Reconstruct hidden target values from the inputs and the visible target values.

  `targets` lists (group name, number of features) in a fixed order. `decoder` is 'shared'
  (one trunk producing h_shared and a Dense head per group) or 'dual' (a deep decoder per
  group and no shared trunk, kept to compare against). When the inputs carry
  'targets_prior', each head's raw channels are a correction on top of that prior (see
  `gated_prior`). With `learn_log_var` the model owns
  one float32 log-variance per group, bounded to [-log_var_bound, log_var_bound]. With
  `variance_head` as well, a Dense head per group adds a per-value offset to it from the
  group's features, so each timestep and channel gets its own log-variance, of shape
  (B, W, F_g) and under the same bound.

  `output` selects what a call returns:

  * 'recon': {'recon': {group: (B, W, F_g)}} and, with learn_log_var, {'log_var': ...};
  * 'representation': {'representation': (B, H)}, the mean over valid timesteps of h_shared
    (of the encoder output with dual decoders, which have no shared trunk);
  * 'projection': the representation and {'projection': (B, projection_dim)}, its unit-length
    image under the projection head of the contrastive loss.

  The last two stop before the heads, so they run with a parameter tree that contains only the
  trunk (and the projection head), as the momentum encoder's does.

  `dtype` is the compute dtype of the trunk: the input projection, the local convolution,
  the encoder, the sensor stage and the decoders. With bfloat16 their matmuls run in bfloat16
  (attention softmax and LayerNorm statistics stay float32), while the parameters, the heads,
  the prior gate, the log-variances and the projection head stay float32.
  """

  targets: Sequence[tuple[str, int]]
  hidden_dim: int = 64
  encoder_layers: int = 2
  decoder: str = 'shared'
  decoder_type: str = 'transformer'
  decoder_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  dropout: float = 0.1
  conv_kernel: int = 5
  learn_log_var: bool = False
  log_var_bound: float = 6.0
  variance_head: bool = False
  projection_dim: int = 64
  window: int = 64
  positional_embedding: bool = False
  sensors: Sequence[tuple[str, str, tuple[int, ...]]] = ()
  inputs: Sequence[tuple[str, int]] = ()
  denoise_head: bool = False
  dtype: Any = jnp.float32

  def embed(self, model_inputs, *, train: bool):
    """Concatenate values and mask indicators per timestep and project them to H."""
    parts = []
    for key in ('inputs', 'inputs_observed', 'targets', 'targets_visible', 'targets_prior'):
      parts.extend(model_inputs[key][name].astype(jnp.float32)
                   for name in sorted(model_inputs.get(key, {})))
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name='input_projection')(
        jnp.concatenate(parts, axis=-1))
    if self.positional_embedding:
      # One learned vector per timestep of the window, so attention can tell where in the
      # window a token sits beyond what the local convolution conveys.
      position = self.param('positional_embedding', nn.initializers.normal(0.02),
                            (self.window, self.hidden_dim), jnp.float32)
      # A side-by-side study switches the embedding off for some variants with a 0 multiplier.
      scale = model_inputs.get('positional_scale')
      position = position[:x.shape[1]] if scale is None else scale * position[:x.shape[1]]
      x = x + position.astype(x.dtype)
    # Padding becomes exact zeros, so the convolution treats it like the zero padding at the
    # window's edges, whatever the padded rows contain.
    x = x * model_inputs['valid'][..., None]
    if self.conv_kernel > 1:
      x = x + DepthwiseConv1D(self.conv_kernel, self.dtype, name='local_conv')(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)

  def gated_prior(self, name, features, prior, model_inputs):
    """Return reference + gate * (prior - reference) for the raw channels of group `name`.

    The reference is the mean of the channel's visible values in the window (0, the training
    median, when none is visible), so a recording's level passes through unscaled. A learned
    gate per timestep and channel decides how much of the interpolation's shape around it to
    keep: near 1 for smooth signals, near 0 for spiky ones.
    """
    values = model_inputs['targets'][name]
    visible = model_inputs['targets_visible'][name].astype(jnp.float32)
    count = visible.sum(axis=1, keepdims=True)
    reference = (values * visible).sum(axis=1, keepdims=True) / jnp.maximum(count, 1.0)
    gate = nn.sigmoid(nn.Dense(prior.shape[-1], name=f'prior_gate_{name}')(features))
    return reference + gate * (prior - reference)

  def make_decoder(self, name: str, layers: int | None = None) -> Decoder:
    return Decoder(self.decoder_type, layers or self.decoder_layers, self.num_heads,
                   self.mlp_ratio, self.dropout, self.dtype, name=name)

  @nn.compact
  def __call__(self, model_inputs, *, train: bool = False, output: str = 'recon'):
    valid = model_inputs['valid']
    attention_mask = nn.make_attention_mask(valid, valid)
    x = self.embed(model_inputs, train=train)
    encoder = Decoder('transformer', self.encoder_layers, self.num_heads, self.mlp_ratio,
                      self.dropout, self.dtype, name='encoder')
    x = encoder(x, attention_mask, train=train)
    if self.sensors:
      mixer = SensorMixer(self.sensors, self.num_heads, self.mlp_ratio, self.dropout,
                          self.dtype, name='sensor_mixer')
      x = x + mixer(x, model_inputs, train=train) * valid[..., None]

    if output not in ('recon', 'representation', 'projection'):
      raise ValueError(f"output={output!r} is unknown; use 'recon', 'representation' or "
                       "'projection'.")
    if self.decoder == 'shared':
      h_shared = self.make_decoder('shared_decoder')(x, attention_mask, train=train)
      trunk = h_shared.astype(jnp.float32)
      features = {name: trunk for name, _ in self.targets}
    elif self.decoder == 'dual':
      trunk = x.astype(jnp.float32)
      if output == 'recon':
        features = {name: self.make_decoder(f'decoder_{name}')(
            x, attention_mask, train=train).astype(jnp.float32) for name, _ in self.targets}
    else:
      raise ValueError(f"model.decoder={self.decoder!r} is unknown; use 'shared' or 'dual'.")
    if output != 'recon':
      represented = {'representation': masked_time_mean(trunk, valid)}
      if output == 'projection':
        represented['projection'] = ProjectionHead(
            self.hidden_dim, self.projection_dim, name='projection_head')(
                represented['representation'])
      return represented

    recon = {}
    priors = model_inputs.get('targets_prior', {})
    for name, size in self.targets:
      recon[name] = nn.Dense(size, name=f'head_{name}')(features[name])
      if name in priors:
        recon[name] = recon[name].at[..., :priors[name].shape[-1]].add(
            self.gated_prior(name, features[name], priors[name], model_inputs))
    outputs = {'recon': recon}
    if self.denoise_head:
      outputs['denoised'] = {name: nn.Dense(size, name=f'denoise_head_{name}')(trunk)
                             for name, size in self.inputs}
    if self.learn_log_var:
      outputs['log_var'] = {}
      for name, size in self.targets:
        s = self.param(f'log_var_{name}', nn.initializers.zeros, (), jnp.float32)
        if self.variance_head:
          # Zero kernel and bias: training starts from the per-group log-variance.
          s = s + nn.Dense(size, kernel_init=nn.initializers.zeros,
                           name=f'log_var_head_{name}')(features[name]).astype(jnp.float32)
        outputs['log_var'][name] = self.log_var_bound * jnp.tanh(s / self.log_var_bound)
    return outputs


def build_model(config, input_layouts, target_layouts) -> MaskedImputer:
  m = config.model
  return MaskedImputer(
      targets=tuple((l.name, l.num_features) for l in target_layouts),
      hidden_dim=m.hidden_dim, encoder_layers=m.encoder_layers, decoder=m.decoder,
      decoder_type=m.decoder_type, decoder_layers=m.decoder_layers, num_heads=m.num_heads,
      mlp_ratio=m.mlp_ratio, dropout=m.dropout, conv_kernel=m.conv_kernel,
      learn_log_var=config.loss.kind.startswith('conf_'), log_var_bound=m.log_var_bound,
      variance_head=m.variance_head,
      projection_dim=config.contrastive.projection_dim, window=config.data.window,
      positional_embedding=m.positional_embedding,
      sensors=sensor_tokens(input_layouts, target_layouts) if m.sensor_embedding else (),
      inputs=tuple((l.name, l.num_features) for l in input_layouts),
      denoise_head=config.lambda_denoise > 0,
      # The config.json of a workdir trained before the field existed lacks it.
      dtype=COMPUTE_DTYPES[m.get('compute_dtype', 'float32')])
