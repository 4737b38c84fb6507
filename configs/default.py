"""Base configuration: every field, with its meaning and unit.

  python launch.py --config=configs/default.py --workdir=runs/default

Phase configs import this one and change only what their phase adds. Any field can be set on
the command line, for example `--config.data.path=train.csv --config.batch_size=64`. The config
is locked, so a misspelt field is an error instead of a silent no-op.
"""

import ml_collections

from configs import platforms


def get_data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  # Source. An empty path uses the synthetic generator (CMI schema). A .csv or .parquet file is
  # read as the CMI table; a folder is read as sensor streams described by `streams`.
  data.path = ''
  # Model window in timesteps. Shorter sequences are padded; padding is never scored.
  data.window = 64
  # Step between training windows of a long sequence, in timesteps. Evaluation always uses
  # non-overlapping windows so that every timestep is scored once.
  data.train_stride = 32
  # CMI ToF pixel value -1 ("no return"): 'missing' leaves it unobserved, 'far' makes it an
  # observed reading with value `tof_far_value` (in the ToF's own distance units).
  data.tof_no_return = 'missing'
  data.tof_far_value = 255.0
  # Subject-grouped folds, stratified by gesture when labels exist. Fold `fold` is the test
  # fold reported in the evaluation, fold `fold + 1` (mod num_folds) is the validation fold
  # that picks the best checkpoint, and the rest is trained on.
  data.num_folds = 5
  data.fold = 0
  # Seed of the fold assignment, kept apart from `seed` so that model seeds share one split.
  data.split_seed = 0
  # Synthetic generator settings, used only when `path` is empty.
  data.synthetic = ml_collections.ConfigDict()
  data.synthetic.num_subjects = 12
  data.synthetic.sequences_per_subject = 100
  data.synthetic.min_length = 40
  data.synthetic.max_length = 120
  data.synthetic.imu_only_fraction = 0.4
  data.synthetic.seed = 0
  # Sensor streams, used only when `path` is a folder. `streams` maps a group name to
  # {file, columns (comma list), role ('input' or 'target'), features, missing_values
  # (comma list of values that mean "no reading"), max_gap_ms}; see configs/bfrb_watch.py.
  data.streams = ml_collections.ConfigDict()
  data.stream_rate_hz = 10.0  # Common clock that all streams are aligned to.
  data.stream_split_gap_s = 5.0  # A gap longer than this in every stream splits a recording.
  return data


def get_config(platform: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, masks and batch order.
  config.data = get_data_config()

  config.model = ml_collections.ConfigDict()
  config.model.hidden_dim = 64  # Width H of the encoder and of h_shared.
  config.model.encoder_layers = 2  # Transformer blocks in the encoder.
  config.model.decoder = 'shared'  # 'shared' (one trunk, one light head per group) or 'dual'.
  config.model.decoder_type = 'transformer'  # 'transformer' or 'mlp'.
  config.model.decoder_layers = 2  # Blocks in the shared decoder (and in each dual decoder).
  config.model.num_heads = 4  # Attention heads; must divide hidden_dim.
  config.model.mlp_ratio = 4  # Feed-forward width as a multiple of hidden_dim.
  # Dropout in training only. Off by default: the training masks already regularise, and on
  # a CPU the random bits of dropout cost about a third of the step time.
  config.model.dropout = 0.0
  # Width in timesteps of the depthwise convolution in front of the encoder. It gives the
  # transformer local order without position embeddings; 1 turns it off.
  config.model.conv_kernel = 5
  # Give the model the in-window linear interpolation of each target's visible values and
  # let its heads predict a correction to it. Where a sensor is partly visible, the model then
  # starts from the interpolation baseline; with nothing visible the prior is the median.
  config.model.interpolation_prior = True
  config.model.log_var_bound = 6.0  # Learned log-variances s are kept in [-bound, bound].
  # With a conf_ loss: a Dense head per target group that gives every value its own
  # log-variance (the per-group one plus a learned offset), trained by the same negative
  # log-likelihood. Impute mode then reports a standard deviation per value.
  config.model.variance_head = False
  # A learned vector per timestep of the window, added to the time tokens.
  config.model.positional_embedding = False
  # A sensor stage after the encoder: one token per IMU channel and per target sensor at each
  # timestep, with a learned ID embedding each and attention across the sensors of a timestep.
  config.model.sensor_embedding = False
  # Compute dtype of the trunk's matmuls: 'float32', or 'bfloat16' on accelerators with bfloat16
  # matmul units (TPU, recent GPUs). Parameters, heads and losses stay float32 either way. On
  # a CPU bfloat16 is slower, because XLA's CPU backend emulates it.
  config.model.compute_dtype = 'float32'

  # Training mask ratio: the fraction of (timestep, sensor) units of every target group that
  # is hidden. It ramps linearly from mask_start to mask_end over the first mask_epochs epochs
  # and then stays at mask_end. With mask_epochs = 0 it is mask_end from the first step.
  config.mask_start = 0.5
  config.mask_end = 0.5
  config.mask_epochs = 0

  config.mask = ml_collections.ConfigDict()
  # Mixture of mask kinds: each training window draws one kind with probability proportional
  # to its weight. 'element' hides each (timestep, sensor) unit on its own; 'sensor' hides a
  # sensor for the whole window (one ToF sensor's 64 pixels, one thermopile); 'span' hides
  # runs of span_length timesteps per sensor. Element masks alone are the default.
  config.mask.element_weight = 1.0
  config.mask.sensor_weight = 0.0
  config.mask.span_weight = 0.0
  config.mask.span_length = 8  # Timesteps per hidden run of the 'span' kind.
  # Probability that a training window hides every target group, the IMU-only case (a whole-
  # group drop, as in real recordings), on top of the kind drawn above.
  config.mask.imu_only_prob = 0.25
  config.mask.eval_ratio = 0.5  # Hidden fraction in the `random_mask` evaluation scenario.

  # Weight of the two-view consistency loss; 0 turns the second view off entirely.
  config.lambda_cons = 0.0
  config.consistency = ml_collections.ConfigDict()
  # Positions of the consistency MSE: 'both_visible' (observed and unmasked in both views'
  # inputs), 'both_hidden' (hidden in both views) or 'all' (every observed position).
  config.consistency.positions = 'both_visible'
  # Stop the gradient through the second view, making it a fixed target for the first.
  config.consistency.stop_gradient = False

  # Weight of the contrastive loss (InfoNCE against a queue of momentum-encoder keys); 0
  # turns the momentum encoder, the queue and the augmented views off entirely.
  config.lambda_contrastive = 0.0
  config.contrastive = ml_collections.ConfigDict()
  config.contrastive.temperature = 0.1  # InfoNCE temperature t: logits are cosines / t.
  # Keys kept as negatives. It must be at least batch_size, because one batch is written per
  # step. Keep it well below the number of training windows: a queue that spans more than an
  # epoch contains an older key of the query's own window, which then counts as a negative.
  config.contrastive.queue_size = 1024
  # EMA momentum m of the momentum encoder: theta_k <- m * theta_k + (1 - m) * theta_q.
  # 'constant' keeps m; 'cosine' raises it from m at the first step towards 1, which it
  # reaches at step num_steps (so the last update still moves the momentum encoder a little).
  config.contrastive.momentum = 0.99
  config.contrastive.momentum_schedule = 'constant'
  config.contrastive.projection_dim = 64  # Width D of the queue keys and queries.

  # Augmentations of the two contrastive views, applied to the input groups (the IMU) only;
  # the views hide every target group, like an IMU-only recording.
  config.augment = ml_collections.ConfigDict()
  # Standard deviation of the log playback speed at the warp's knots: 0 is no warp, 0.2 lets
  # a stretch of the window run about 20% faster or slower than real time.
  config.augment.warp_strength = 0.2
  config.augment.warp_knots = 4  # Knots of the piecewise-linear log-speed curve per window.
  config.augment.jitter_sigma = 0.05  # Gaussian noise added to observed inputs, scaled units.

  # Weight of the auxiliary denoising loss; 0 turns the corruption and the head off entirely.
  config.lambda_denoise = 0.0
  config.denoise = ml_collections.ConfigDict()
  config.denoise.ratio = 0.1  # Fraction of observed input values corrupted in each pass.
  config.denoise.sigma = 0.5  # Standard deviation of the added noise, in scaled units.
  # Values that L_denoise scores: 'corrupted' (only the corrupted ones) or 'all' observed
  # input values, which also teaches the head to pass clean values through.
  config.denoise.positions = 'corrupted'

  config.loss = ml_collections.ConfigDict()
  # One of mse, mae, huber, conf_mse (Gaussian), conf_mae (Laplace), conf_huber (heuristic).
  config.loss.kind = 'mse'
  config.loss.huber_delta = 1.0  # In scaled units (interquartile ranges).
  # Per-group weights as 'group=weight' pairs, for example 'thm=1,tof=0.5'; unset groups get 1.
  config.loss.group_weights = ''

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3  # Peak learning rate after warmup.
  config.optim.warmup_steps = 100
  config.optim.end_learning_rate_factor = 0.05  # Final rate as a fraction of the peak.
  config.optim.weight_decay = 1e-4  # AdamW decoupled weight decay.
  config.optim.grad_clip_norm = 1.0  # Global gradient norm clip; 0 turns it off.

  # A study trains variants of this config and compares them (see imputer/study.py). With
  # no ablations and no grid, the launch is a single ordinary run.
  config.study = ml_collections.ConfigDict()
  # Components removed one at a time, comma-separated: uncertainty, curriculum, consistency,
  # contrastive, positional_embedding, sensor_embedding, denoise, shared_decoder.
  config.study.ablations = ''
  # Grid points as 'field=v1,v2;field=v1,v2', for example 'lambda_cons=0.05,0.2'.
  config.study.grid = ''
  config.study.seeds = 1  # Seeds per variant: seed, seed + 1, ...
  # 'side_by_side' trains the variants that differ only in loss weights, the Huber delta, the
  # momentum, the mask schedule or the positional embedding together, one compiled step per
  # seed (see imputer/side_by_side.py); 'sequential' trains one variant after the other.
  config.study.mode = 'side_by_side'
  config.study.group_size = 0  # Maximum variants per side-by-side group; 0 means no limit.

  config.num_epochs = 50  # Passes over the training windows.
  config.num_train_steps = -1  # When positive, stops at min(this, num_epochs worth of steps).
  config.batch_size = 32  # Global batch; must be divisible by the number of devices.
  config.eval_batch_size = 128
  # Training batches built ahead on a background thread while the device runs a step. With 0
  # each batch is built on the loop thread when its step starts, which still overlaps the
  # previous step because jax dispatches steps asynchronously. The platform sets it.
  config.prefetch_depth = 0
  # The hardware the run is set up for: 'cpu', 'gpu' or 'tpu', chosen after the config path
  # (configs/phase3.py:gpu). configs/platforms.py sets the fields below, the compute dtype and
  # the prefetch depth from it.
  config.platform = 'cpu'
  # With a value above 0, launch sets batch_size to this times the number of devices.
  config.per_device_batch_size = 0
  config.mesh = 'flat'  # Device order of the `data` axis: 'flat' or 'topology'.
  # jax's default precision of float32 matmuls: 'default', 'high' or 'highest'.
  config.matmul_precision = 'default'

  # A step whose loss or gradient is not finite: 'stop' ends the run with an error that names
  # the step and the loss term, keeping the last good checkpoint. 'skip' drops that step's
  # update on the device, counts it (train/skipped in the log) and trains on.
  config.nonfinite = 'stop'

  config.log_every_steps = 50  # Train scalars, progress line and finiteness check.
  config.eval_every_steps = 250  # Validation loss, ToF images and best-checkpoint choice.
  config.checkpoint_every_steps = 500
  config.max_checkpoints_to_keep = 2  # Periodic checkpoints kept (the best one is extra).
  # Resume from a checkpoint whose state tree differs from the model's (an entry added,
  # missing, or with another shape or dtype): the matching entries are restored, the others
  # keep their initial values, and a warning lists them. When False, such a checkpoint is an
  # error that lists the differences. It changes what is trained, so a resume may not switch
  # it: a workdir whose run.json has it off (or predates it) rejects a launch with it on.
  # Turn it on from the first launch in a new workdir that contains a copy of another run's
  # checkpoints/ folder.
  config.restore_partial = False
  return platforms.apply(config, platform)
