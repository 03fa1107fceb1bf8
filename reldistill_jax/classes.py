"""Class tables of the two datasets: raw ids -> training ids, and class names.

Training id 0 is `ignore` in both datasets; ids 1..C are the evaluated classes.
The tables restate PROTOCOLS.md sections 1 and 2 (the field's standard maps).
"""

import numpy as np

# The six nuScenes cameras in the order every camera axis of the project uses.
NUSCENES_CAMERAS = (
  "CAM_FRONT",
  "CAM_FRONT_RIGHT",
  "CAM_BACK_RIGHT",
  "CAM_BACK",
  "CAM_BACK_LEFT",
  "CAM_FRONT_LEFT",
)

# Names of training ids 1..16 (written as words, as the zero-shot prompts use them).
NUSCENES_CLASSES = (
  "barrier",
  "bicycle",
  "bus",
  "car",
  "construction vehicle",
  "motorcycle",
  "pedestrian",
  "traffic cone",
  "trailer",
  "truck",
  "driveable surface",
  "other flat",
  "sidewalk",
  "terrain",
  "manmade",
  "vegetation",
)

# The 32 lidarseg categories by raw id (the `index` field of category.json),
# each with its training id.
NUSCENES_LIDARSEG_CATEGORIES = (
  ("noise", 0),
  ("animal", 0),
  ("human.pedestrian.adult", 7),
  ("human.pedestrian.child", 7),
  ("human.pedestrian.construction_worker", 7),
  ("human.pedestrian.personal_mobility", 0),
  ("human.pedestrian.police_officer", 7),
  ("human.pedestrian.stroller", 0),
  ("human.pedestrian.wheelchair", 0),
  ("movable_object.barrier", 1),
  ("movable_object.debris", 0),
  ("movable_object.pushable_pullable", 0),
  ("movable_object.trafficcone", 8),
  ("static_object.bicycle_rack", 0),
  ("vehicle.bicycle", 2),
  ("vehicle.bus.bendy", 3),
  ("vehicle.bus.rigid", 3),
  ("vehicle.car", 4),
  ("vehicle.construction", 5),
  ("vehicle.emergency.ambulance", 0),
  ("vehicle.emergency.police", 0),
  ("vehicle.motorcycle", 6),
  ("vehicle.trailer", 9),
  ("vehicle.truck", 10),
  ("flat.driveable_surface", 11),
  ("flat.other", 12),
  ("flat.sidewalk", 13),
  ("flat.terrain", 14),
  ("static.manmade", 15),
  ("static.other", 0),
  ("static.vegetation", 16),
  ("vehicle.ego", 0),
)
NUSCENES_RAW_TO_TRAIN = np.array(
  [train_id for _, train_id in NUSCENES_LIDARSEG_CATEGORIES], dtype=np.uint8
)

SEMANTIC_KITTI_CLASSES = (
  "car",
  "bicycle",
  "motorcycle",
  "truck",
  "other-vehicle",
  "person",
  "bicyclist",
  "motorcyclist",
  "road",
  "parking",
  "sidewalk",
  "other-ground",
  "building",
  "fence",
  "vegetation",
  "trunk",
  "terrain",
  "pole",
  "traffic-sign",
)

# SemanticKITTI raw semantic id (low 16 bits of a .label entry) -> training id.
_SEMANTIC_KITTI_RAW_TO_TRAIN = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7,
    32: 8, 40: 9, 44: 10, 48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15,
    71: 16, 72: 17, 80: 18, 81: 19, 99: 0, 252: 1, 253: 7, 254: 6, 255: 8,
    256: 5, 257: 5, 258: 4, 259: 5,
}  # fmt: skip
SEMANTIC_KITTI_RAW_IDS = frozenset(_SEMANTIC_KITTI_RAW_TO_TRAIN)


def semantic_kitti_raw_to_train(raw: np.ndarray) -> np.ndarray:
  """Maps raw SemanticKITTI semantic ids to training ids (uint8).

  Args:
    raw: integer array of raw semantic ids (already stripped of the instance
      bits).

  Returns:
    uint8 array of training ids, same shape.

  Raises:
    ValueError: if an id is not in the SemanticKITTI label definition.
  """
  raw = np.asarray(raw)
  unknown = np.setdiff1d(np.unique(raw), sorted(SEMANTIC_KITTI_RAW_IDS))
  if unknown.size:
    raise ValueError(f"unknown SemanticKITTI raw ids: {unknown.tolist()}")
  lut = np.zeros(max(SEMANTIC_KITTI_RAW_IDS) + 1, dtype=np.uint8)
  for raw_id, train_id in _SEMANTIC_KITTI_RAW_TO_TRAIN.items():
    lut[raw_id] = train_id
  return lut[raw]


def nuscenes_raw_to_train(raw: np.ndarray) -> np.ndarray:
  """Maps raw nuScenes lidarseg ids (0..31) to training ids (uint8).

  Raises:
    ValueError: if an id is outside 0..31.
  """
  raw = np.asarray(raw)
  if raw.size and int(raw.max()) >= len(NUSCENES_RAW_TO_TRAIN):
    raise ValueError(f"lidarseg id {int(raw.max())} is outside 0..31")
  return NUSCENES_RAW_TO_TRAIN[raw]
