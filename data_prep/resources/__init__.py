"""Data files shipped with the package (a user's clone has no `../shared`).

- `nuscenes_splits.json`: scene names of the official nuScenes splits and of
  SLidR's held-out 100 training scenes and scene-level 1% subset.
- `nuscenes_category.json`: the 32 lidarseg categories with their `index`.
- `nuscenes_rig.json`: `sensor` and `calibrated_sensor` records of one real
  nuScenes car (LIDAR_TOP and the six cameras).
"""

import functools
import importlib.resources
import json
from typing import Any


@functools.cache
def load_json(name: str) -> Any:
  """Parsed content of one of the shipped JSON files, e.g. `nuscenes_splits`."""
  return json.loads((importlib.resources.files(__name__) / f"{name}.json").read_text())
