"""A procedural street world written as a real nuScenes dataroot.

`python -m data_prep.synthetic --out DIR` writes JSON tables, HDL-32E-like
LIDAR_TOP sweeps with lidarseg labels, and six camera JPEGs per keyframe
rendered from the same geometry with the real calibration of one nuScenes car,
plus per-camera class maps for the synthetic teacher. `--sensor hdl64
--no-cameras` writes a lidar-only world seen by KITTI's HDL-64E instead (the
synthetic stand-in for SemanticKITTI). See `writer` for the layout, `lidar`
for the sensor profiles and `world` for the scene content.
"""

from data_prep.synthetic.writer import generate, make_meta

__all__ = ["generate", "make_meta"]
