"""TFDS builder for nuScenes lidarseg keyframes (TensorFlow-free, ArrayRecord).

A manual-download dataset: `--manual_dir` is a nuScenes dataroot. Each version
folder of it (`v1.0-mini`, `v1.0-trainval`, the synthetic world's
`v1.0-synthetic`, ...) is a builder config of the same name. One record per
keyframe:

  token          str      sample token (the record key)
  lidar_token    str      LIDAR_TOP sample_data token
  scene          str      scene name
  timestamp      int64    lidar timestamp (microseconds)
  points         (N, 5)   float32 x, y, z, intensity, ring in the lidar frame
  labels         (N,)     uint8 16-class training ids (0 = ignore)
  has_labels     bool     False where the sweep has no lidarseg file
  pairs_point    (M,)     int32 index into `points`
  pairs_camera   (M,)     uint8 index into `classes.NUSCENES_CAMERAS`
  pairs_uv       (M, 2)   float32 pixel (u = column, v = row), native image
  camera_tokens  (C,)     str camera sample_data tokens, camera order
  images         (C,)     bytes JPEG files, camera order
  intrinsics     (C, 3, 3) float32 camera matrices
  image_sizes    (C, 2)   int32 (height, width)

C is 6, or 0 for a version folder without cameras (a lidar-only synthetic
world, `python -m data_prep.synthetic --no-cameras`): its records have no
pairs (M = 0) and serve fine-tuning and evaluation only. Pairs keep points
with depth > 1 m strictly inside the image by one pixel (nuscenes-devkit's
`map_pointcloud_to_image` criterion), projected through the camera-time ego
pose (`data_prep.geometry`).

Splits (scene lists from `data_prep/resources/nuscenes_splits.json`): `train`,
`val`, `test`, `train_parametrize` (train minus SLidR's 100 held-out scenes),
`train_verify` (those 100), `train_1pct` (SLidR's scene-level 1%: the 100th,
200th, ..., 700th training scene of the real scene.json), `mini_train`,
`mini_val`. A split is written when at least one of its scenes is in the
version folder and omitted otherwise.
"""

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from data_prep import nuscenes, resources
from data_prep.builders import offline


# Scene lists behind every split, as set operations on the shipped lists.
def split_scene_names() -> dict[str, frozenset[str]]:
  """Scene names of every split this builder writes."""
  lists = {
    k: frozenset(v) for k, v in resources.load_json("nuscenes_splits").items() if k[0] != "_"
  }
  return {
    "train": lists["train"],
    "val": lists["val"],
    "test": lists["test"],
    "train_parametrize": lists["train"] - lists["slidr_verify_100"],
    "train_verify": lists["slidr_verify_100"],
    "train_1pct": lists["slidr_train_1pct"],
    "mini_train": lists["mini_train"],
    "mini_val": lists["mini_val"],
  }


class NuscenesLidarseg(offline.OfflineBuilder):
  """nuScenes lidarseg keyframes with point-to-pixel pairs for six cameras (or none)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Keyframes, 16-class labels, camera pairs, JPEGs."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name="v1.0-mini", description="nuScenes v1.0-mini."),
    tfds.core.BuilderConfig(name="v1.0-trainval", description="nuScenes v1.0-trainval."),
    tfds.core.BuilderConfig(
      name="v1.0-synthetic", description="The synthetic world of data_prep.synthetic."
    ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download nuScenes (https://www.nuscenes.org/download): the metadata and
  keyframe blobs of a version (v1.0-mini or v1.0-trainval) and the nuScenes-lidarseg
  archive, extracted into one dataroot holding `samples/`, `lidarseg/` and
  `v1.0-<version>/`. Pass that dataroot as --manual_dir and the version as
  --config. Any other version folder of the dataroot is a config of the same name.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "token": tfds.features.Text(),
          "lidar_token": tfds.features.Text(),
          "scene": tfds.features.Text(),
          "timestamp": tfds.features.Scalar(dtype=np.int64),
          "points": tfds.features.Tensor(shape=(None, nuscenes.POINT_DIMS), dtype=np.float32),
          "labels": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
          "has_labels": tfds.features.Scalar(dtype=np.bool_),
          "pairs_point": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "pairs_camera": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
          "pairs_uv": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
          # Strings and encoded images as raw bytes: readers that need only
          # the points never pay for JPEG decoding.
          # C = 6 cameras, or none (module docstring).
          "camera_tokens": tfds.features.Tensor(shape=(None,), dtype=np.object_),
          "images": tfds.features.Tensor(shape=(None,), dtype=np.object_),
          "intrinsics": tfds.features.Tensor(shape=(None, 3, 3), dtype=np.float32),
          "image_sizes": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
        }
      ),
      homepage="https://www.nuscenes.org/nuscenes#lidarseg",
      citation=_CITATION,
      # Records stay in scene and time order, not in key-hash order.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    dataset = nuscenes.NuScenes(pathlib.Path(dl_manager.manual_dir), self.builder_config.name)
    present = {scene["name"] for scene in dataset.scenes}
    generators = {}
    for split, names in split_scene_names().items():
      scenes = [s for s in dataset.scenes if s["name"] in names]
      if scenes:
        generators[split] = self._generate_examples(dataset, scenes, split)
    if not generators:
      raise nuscenes.DatarootError(
        f"{dataset.dataroot / dataset.version / 'scene.json'}: none of its "
        f"{len(present)} scenes belongs to a nuScenes split"
      )
    return generators

  def _generate_examples(self, dataset: nuscenes.NuScenes, scenes: list[dict], split: str):
    total = unlabelled = 0
    for scene in scenes:
      for sample_token in dataset.scene_samples(scene):
        record = dataset.keyframe(sample_token, scene["name"])
        total += 1
        unlabelled += not record["has_labels"]
        yield sample_token, record
    missing = (
      f"no lidarseg/{dataset.version}/<token>_lidarseg.bin in {dataset.dataroot}; extract the "
      "nuScenes-lidarseg archive into the dataroot"
    )
    self.warn_unlabelled(split, unlabelled, total, missing)


_CITATION = """\
@inproceedings{caesar2020nuscenes,
  title={nuScenes: A multimodal dataset for autonomous driving},
  author={Caesar, Holger and Bankiti, Varun and Lang, Alex H and Vora, Sourabh and
          Liong, Venice Erin and Xu, Qiang and Krishnan, Anush and Pan, Yu and
          Baldan, Giancarlo and Beijbom, Oscar},
  booktitle={CVPR},
  year={2020}
}
@article{fong2022panoptic,
  title={Panoptic nuScenes: A Large-Scale Benchmark for LiDAR Panoptic Segmentation and Tracking},
  author={Fong, Whye Kit and Mohan, Rohit and Hurtado, Juana Valeria and Zhou, Lubing and
          Caesar, Holger and Beijbom, Oscar and Valada, Abhinav},
  journal={IEEE Robotics and Automation Letters},
  year={2022}
}
"""
