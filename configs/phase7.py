"""Phase 7: ablation study and grid search around the full phase 6 model.

  python launch.py --config=configs/phase7.py --workdir=runs/phase7

The study trains the full model, one variant per removed component and one variant per grid
point, each with `study.seeds` seeds on the same folds. It then writes results.csv,
results.md, ablations.png, a heatmap per pair of grid fields and best_config.py into the
workdir (see imputer/study.py). Launching it again skips the finished runs.

By default the variants that differ only in loss weights, the mask schedule or the
positional embedding train side by side, one compiled step per seed (imputer/side_by_side.py):
here the full model, five ablations and the 16 grid points. The uncertainty, sensor-embedding
and shared-decoder ablations change the model or the loss kind and train in groups of their
own. --config.study.mode=sequential trains every run on its own instead.

A smaller study, for example:

  python launch.py --config=configs/phase7.py --workdir=runs/small \\
      --config.study.ablations=consistency,contrastive,denoise \\
      --config.study.grid='lambda_cons=0.05,0.2;lambda_denoise=0.05,0.2'

The Huber delta acts only with a Huber loss, so the default grid leaves it out. To search it,
set --config.loss.kind=conf_huber and add 'loss.huber_delta=0.5,1,2' to the grid.
"""

from configs import phase6


def get_config(platform: str = ''):
  config = phase6.get_config(platform)
  config.study.seeds = 2
  config.study.ablations = ('uncertainty,curriculum,consistency,contrastive,'
                            'positional_embedding,sensor_embedding,denoise,shared_decoder')
  config.study.grid = ('lambda_cons=0.05,0.2;lambda_denoise=0.05,0.2;'
                       'lambda_contrastive=0.05,0.2;contrastive.momentum=0.99,0.999')
  return config
