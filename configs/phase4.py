"""Phase 4: phase 3 plus contrastive alignment with a momentum encoder and a key queue.

  python launch.py --config=configs/phase4.py --workdir=runs/phase4

Two augmented IMU-only views of each window (time warp and jitter) are encoded. The online
model gives the query, and an EMA copy of its encoder and projection head gives the key.
InfoNCE against a queue of earlier keys aligns them. The momentum rises towards 1 on a cosine
schedule, so the keys change more and more slowly as training settles.
"""

from configs import phase3


def get_config(platform: str = ''):
  config = phase3.get_config(platform)
  config.lambda_contrastive = 0.1
  config.contrastive.momentum = 0.99
  config.contrastive.momentum_schedule = 'cosine'
  return config
