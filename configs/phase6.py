"""Phase 6: phase 5 plus auxiliary denoising of the IMU.

  python launch.py --config=configs/phase6.py --workdir=runs/phase6

In every reconstruction pass, a random 10% of the observed IMU values get Gaussian noise, and
an auxiliary head predicts the clean values from the trunk. L_denoise is its MSE at the
corrupted values (`denoise.positions='all'` scores every observed value), and the total is
L = L_recon + lambda_cons * L_cons + lambda_denoise * L_denoise
  + lambda_contrastive * L_contrastive.
"""

from configs import phase5


def get_config(platform: str = ''):
  config = phase5.get_config(platform)
  config.lambda_denoise = 0.1
  config.denoise.ratio = 0.1
  config.denoise.sigma = 0.5
  return config
