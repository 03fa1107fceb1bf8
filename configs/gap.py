r"""The structural-gap study across finished runs (PROTOCOLS.md section 4).

  python -m reldistill_jax.main --config configs/gap.py \
    --config.runs=/runs/relational_s0,/runs/contrastive_s0,/runs/similarity_s0 \
    --workdir /runs/gap_study

`runs` is a comma-separated list of run folders (ml_collections cannot set a
list from the command line), each holding the metrics.json of a default-style
run: `zeroshot/miou` and `gap/G` are required, `fewshot_1pct/miou` is used
when present. The study correlates G with each mIoU across the runs (Pearson
and Spearman with p-values; at least 3 runs) and draws the scatter plot.

Expected: workdir/metrics.json (`runs`, `gap_study`), workdir/report.md and
workdir/plots/gap_vs_miou.png, in seconds. The only argument is `runlocal`,
which changes nothing (the study reads finished runs).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  common.parse_arg(arg, {})
  config = ml_collections.ConfigDict()
  config.kind = "gap"

  # Input: the run folders, comma-separated.
  config.runs = common.optional_str()
  return config
