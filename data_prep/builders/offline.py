"""The base of this project's TFDS builders: built from local files, never downloaded.

TFDS announces every build as "Downloading and preparing dataset Unknown size
(download: Unknown size, ...)", which reads as a download during a fully
offline build; these builders say what they do instead.
"""

import tensorflow_datasets as tfds
from absl import logging


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A manual-download builder that logs its build in its own words."""

  def _log_download_bytes(self) -> None:
    logging.info("building %s from local files into %s", self.info.full_name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("built %s in %s", self.info.full_name, self.data_dir)

  def warn_unlabelled(self, split: str, unlabelled: int, total: int, missing: str) -> None:
    """Warns that `unlabelled` of the `total` records of `split` have no label file."""
    if unlabelled:
      logging.warning(
        "%s split %s: %d of %d scans have no labels (%s); their records get has_labels=False "
        "and all-ignore labels: they serve pretraining, not fine-tuning or evaluation",
        self.info.full_name, split, unlabelled, total, missing,
      )  # fmt: skip
