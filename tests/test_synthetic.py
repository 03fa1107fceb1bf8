"""Tests of the synthetic nuScenes-format world (data_prep.synthetic).

A small world (2 scenes x 2 keyframes) is generated once per module and read
back as an independent nuScenes reader would: JSON tables, .pcd.bin sweeps,
lidarseg files, JPEGs and class maps.
"""

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from data_prep import geometry, nuscenes, resources
from data_prep.synthetic import __main__ as cli
from data_prep.synthetic import lidar, tables, world, writer
from reldistill_jax.classes import NUSCENES_CAMERAS, NUSCENES_RAW_TO_TRAIN

SEED, SCENES, SAMPLES = 7, 2, 2
VERSION = "v1.0-synthetic"
TABLES = (
    "scene", "sample", "sample_data", "ego_pose", "calibrated_sensor", "sensor", "log",
    "category", "lidarseg", "instance", "sample_annotation", "attribute", "visibility", "map",
)  # fmt: skip


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("synthetic") / "world"
  stats = writer.generate(out, SCENES, SAMPLES, SEED, VERSION, workers=2)
  assert stats is not None and len(stats) == SCENES * SAMPLES
  return out


@pytest.fixture(scope="module")
def db(world_dir):
  """Tables as {name: {token: record}} plus the parsed lists."""
  lists = {n: json.loads((world_dir / VERSION / f"{n}.json").read_text()) for n in TABLES}
  index = {n: {r["token"]: r for r in rows} for n, rows in lists.items() if rows}
  return lists, index


def _channel(index, sample_data) -> str:
  calib = index["calibrated_sensor"][sample_data["calibrated_sensor_token"]]
  return index["sensor"][calib["sensor_token"]]["channel"]


def _by_sample(db):
  """{sample token: {channel: sample_data record}}."""
  lists, index = db
  out = {}
  for sd in lists["sample_data"]:
    out.setdefault(sd["sample_token"], {})[_channel(index, sd)] = sd
  return out


def _sweep(world_dir, db, lidar_sd):
  _, index = db
  seg = next(r for r in db[0]["lidarseg"] if r["sample_data_token"] == lidar_sd["token"])
  points = np.fromfile(world_dir / lidar_sd["filename"], dtype="<f4").reshape(-1, 5)
  labels = np.fromfile(world_dir / seg["filename"], dtype=np.uint8)
  return points, labels


def test_every_token_reference_resolves(world_dir, db):
  lists, index = db
  assert all(lists[n] == [] for n in ("instance", "sample_annotation", "attribute", "visibility"))
  assert len(lists["scene"]) == SCENES and len(lists["log"]) == SCENES
  assert len(lists["sample"]) == SCENES * SAMPLES
  assert len(lists["sample_data"]) == len(lists["ego_pose"]) == SCENES * SAMPLES * 7
  assert {r["token"] for r in lists["log"]} == set(lists["map"][0]["log_tokens"])
  assert (world_dir / lists["map"][0]["filename"]).is_file()
  for scene in lists["scene"]:
    assert scene["log_token"] in index["log"]
    # Walk the sample chain from first to last.
    chain, token, prev = [], scene["first_sample_token"], ""
    while token:
      sample = index["sample"][token]
      assert sample["scene_token"] == scene["token"] and sample["prev"] == prev
      chain.append(token)
      prev, token = token, sample["next"]
    assert len(chain) == scene["nbr_samples"] == SAMPLES
    assert chain[-1] == scene["last_sample_token"]
  for sd in lists["sample_data"]:
    assert sd["sample_token"] in index["sample"]
    assert sd["calibrated_sensor_token"] in index["calibrated_sensor"]
    assert index["ego_pose"][sd["ego_pose_token"]]["timestamp"] == sd["timestamp"]
    assert sd["is_key_frame"] is True
    assert (world_dir / sd["filename"]).is_file()
    for link in (sd["prev"], sd["next"]):  # per-channel chains stay within a scene
      if link:
        other = index["sample_data"][link]
        assert _channel(index, other) == _channel(index, sd)
        scene_of = index["sample"][other["sample_token"]]["scene_token"]
        assert scene_of == index["sample"][sd["sample_token"]]["scene_token"]
  for calib in lists["calibrated_sensor"]:
    assert calib["sensor_token"] in index["sensor"]
  for seg in lists["lidarseg"]:
    sd = index["sample_data"][seg["sample_data_token"]]
    assert _channel(index, sd) == "LIDAR_TOP"
    assert seg["filename"] == f"lidarseg/{VERSION}/{sd['token']}_lidarseg.bin"
  for channels in _by_sample(db).values():
    assert sorted(channels) == sorted(("LIDAR_TOP", *NUSCENES_CAMERAS))
  categories = resources.load_json("nuscenes_category")
  assert lists["category"] == categories


def test_scene_names_follow_the_split_rules(db):
  splits = resources.load_json("nuscenes_splits")
  names = [s["name"] for s in db[0]["scene"]]
  assert names == sorted(names)
  assert sum(n in splits["val"] for n in names) == 1
  assert sum(n in splits["slidr_train_1pct"] for n in names) == 1
  big = tables.scene_names(SEED, 30)  # 6 val; 24 train: 3 from 1%, 2 held out, 19 others
  assert sum(n in splits["val"] for n in big) == 6
  assert sum(n in splits["slidr_train_1pct"] for n in big) == 3
  assert sum(n in splits["slidr_verify_100"] for n in big) == 2
  assert sum(n in splits["train"] for n in big) == 24
  assert big == tables.scene_names(SEED, 30) and big != tables.scene_names(SEED + 1, 30)


def test_sweeps_and_lidarseg_files(world_dir, db):
  for seg in db[0]["lidarseg"]:
    lidar_sd = db[1]["sample_data"][seg["sample_data_token"]]
    size = (world_dir / lidar_sd["filename"]).stat().st_size
    assert size % 20 == 0
    points, labels = _sweep(world_dir, db, lidar_sd)
    assert 25_000 <= len(points) <= 36_000
    assert len(labels) == len(points)
    assert labels.max() <= 31
    assert np.isfinite(points).all()
    ring, intensity = points[:, 4], points[:, 3]
    assert ring.min() >= 0 and ring.max() <= 31 and np.all(ring == np.round(ring))
    assert intensity.min() >= 0 and intensity.max() <= 255
    # The ego's own body is not in the sweep: nothing within 1 m of the sensor.
    assert np.linalg.norm(points[:, :3], axis=1).min() > 1.0
    # Low beams see the ground ~1.84 m below the sensor.
    low = (ring < 8) & (labels == 24)
    assert abs(np.median(points[low, 2]) + 1.84) < 0.1


def test_class_imbalance_is_realistic(world_dir, db):
  counts = np.zeros(32)
  for seg in db[0]["lidarseg"]:
    counts += np.bincount(np.fromfile(world_dir / seg["filename"], dtype=np.uint8), minlength=32)
  share = counts / counts.sum()
  assert share[24] + share[28] + share[30] > 0.5  # driveable, manmade, vegetation
  assert share[12] < 0.02 and share[14] < 0.02  # cones and bicycles are rare


def test_every_evaluation_class_reaches_the_lidar():
  # One sweep per scene of a default-sized world suffices; every scene places
  # each class near the ego's path.
  _, calib = tables.rig()
  seen = set()
  for index in range(10):
    scene = world.build_scene(0, index, 8)
    rng = np.random.default_rng(index)
    _, labels = lidar.sweep(scene, calib["LIDAR_TOP"], int(scene.lidar_us[4]), rng)
    seen |= set(NUSCENES_RAW_TO_TRAIN[np.unique(labels)].tolist())
  assert seen - {0} == set(range(1, 17))


def test_images_and_class_maps(world_dir, db):
  meta = json.loads((world_dir / "synthetic" / "meta.json").read_text())
  width, height = meta["classmap"]["width"], meta["classmap"]["height"]
  assert (width, height, meta["classmap"]["scale"]) == (400, 225, 0.25)
  seen = set()
  for sd in db[0]["sample_data"]:
    if sd["fileformat"] != "jpg":
      continue
    assert (sd["width"], sd["height"]) == (1600, 900)
    with Image.open(world_dir / sd["filename"]) as image:
      assert image.format == "JPEG" and image.size == (1600, 900) and image.mode == "RGB"
    with Image.open(world_dir / "synthetic" / "classmaps" / f"{sd['token']}.png") as cm:
      assert cm.format == "PNG" and cm.mode == "L" and cm.size == (width, height)
      values = np.unique(np.asarray(cm))
    assert np.all((values <= 31) | (values == 255))
    assert len(values) >= 3  # never a blank view
    seen |= set(values.tolist())
  assert {24, 26, 28, 255} <= seen


def test_cameras_fire_before_the_lidar_while_the_ego_moves(db):
  _, index = db
  for channels in _by_sample(db).values():
    lidar_sd = channels["LIDAR_TOP"]
    lidar_xyz = np.array(index["ego_pose"][lidar_sd["ego_pose_token"]]["translation"])
    for cam in NUSCENES_CAMERAS:
      sd = channels[cam]
      dt = sd["timestamp"] - lidar_sd["timestamp"]
      assert -46_000 < dt < 0
      moved = np.linalg.norm(
        np.array(index["ego_pose"][sd["ego_pose_token"]]["translation"]) - lidar_xyz
      )
      assert moved > 0
      if dt < -30_000:  # CAM_FRONT, CAM_FRONT_LEFT at 5-10 m/s
        assert 0.15 < moved < 0.5


def _agreement(world_dir, db, camera_time: bool) -> float:
  """Fraction of lidar-camera pairs whose class-map pixel has the point's label."""
  _, index = db
  hits = total = 0
  for channels in _by_sample(db).values():
    lidar_sd = channels["LIDAR_TOP"]
    points, labels = _sweep(world_dir, db, lidar_sd)
    lidar_calib = index["calibrated_sensor"][lidar_sd["calibrated_sensor_token"]]
    lidar_pose = index["ego_pose"][lidar_sd["ego_pose_token"]]
    for cam in NUSCENES_CAMERAS:
      sd = channels[cam]
      cam_calib = index["calibrated_sensor"][sd["calibrated_sensor_token"]]
      cam_pose = index["ego_pose"][sd["ego_pose_token"]] if camera_time else lidar_pose
      transform = geometry.lidar_to_camera(lidar_calib, lidar_pose, cam_pose, cam_calib)
      k = np.asarray(cam_calib["camera_intrinsic"])
      idx, uv = geometry.project_points(points[:, :3], transform, k, sd["width"], sd["height"])
      classmap = np.asarray(
        Image.open(world_dir / "synthetic" / "classmaps" / f"{sd['token']}.png")
      )
      looked_up = classmap[(uv[:, 1] * 0.25).astype(int), (uv[:, 0] * 0.25).astype(int)]
      hits += int(np.sum(looked_up == labels[idx]))
      total += len(idx)
  assert total > 10_000
  return hits / total


def test_projection_matches_class_maps_only_with_camera_time_poses(world_dir, db):
  right = _agreement(world_dir, db, camera_time=True)
  wrong = _agreement(world_dir, db, camera_time=False)
  assert right >= 0.92
  assert right - wrong >= 0.008


def test_same_seed_same_bytes_other_seed_differs(world_dir, db, tmp_path):
  again = tmp_path / "again"
  writer.generate(again, SCENES, SAMPLES, SEED, VERSION, workers=1)
  for name in TABLES:
    path = pathlib.Path(VERSION) / f"{name}.json"
    assert (again / path).read_bytes() == (world_dir / path).read_bytes(), name
  first_cam = next(sd for sd in db[0]["sample_data"] if sd["fileformat"] == "jpg")
  lidar_sd = next(sd for sd in db[0]["sample_data"] if sd["fileformat"] == "pcd")
  for rel in (
    lidar_sd["filename"],
    first_cam["filename"],
    f"synthetic/classmaps/{first_cam['token']}.png",
    "synthetic/meta.json",
  ):
    assert (again / rel).read_bytes() == (world_dir / rel).read_bytes(), rel

  other = tmp_path / "other"
  writer.generate(other, SCENES, 1, SEED + 1, VERSION, workers=1)
  other_sd = json.loads((other / VERSION / "sample_data.json").read_text())
  other_sweep = (other / other_sd[0]["filename"]).read_bytes()
  assert other_sweep != (world_dir / lidar_sd["filename"]).read_bytes()
  assert {r["token"] for r in other_sd}.isdisjoint(db[1]["sample_data"])


def test_existing_folders_are_left_alone(world_dir, tmp_path):
  before = (world_dir / VERSION / "sample.json").stat().st_mtime_ns
  assert writer.generate(world_dir, SCENES, SAMPLES, SEED, VERSION, workers=1) is None
  assert (world_dir / VERSION / "sample.json").stat().st_mtime_ns == before
  with pytest.raises(FileExistsError, match="different synthetic world"):
    writer.generate(world_dir, SCENES, SAMPLES, SEED + 1, VERSION)
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=str(busy)):
    writer.generate(busy, SCENES, 1, SEED, VERSION)
  assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
  # No partial folder is left beside the worlds.
  assert not [p for p in world_dir.parent.iterdir() if ".partial-" in p.name]


def test_arguments_are_validated(tmp_path, capsys):
  for kwargs in (
    {"scenes": 1},
    {"samples_per_scene": 0},
    {"seed": -1},
    {"workers": 0},
    {"scenes": 5000},
  ):
    args = {
      "scenes": 2,
      "samples_per_scene": 1,
      "seed": 0,
      "version": VERSION,
      "workers": 1,
    } | kwargs
    with pytest.raises(ValueError):
      writer.generate(tmp_path / "w", **args)
  with pytest.raises(SystemExit):
    cli.main(["--out", str(tmp_path / "w"), "--samples-per-scene", "0"])
  assert "--samples-per-scene must be positive" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  help_text = capsys.readouterr().out
  assert "pcd.bin" in help_text and "lidarseg" in help_text and "classmaps" in help_text
  assert not (tmp_path / "w").exists()


def test_cli_reports_an_existing_world(world_dir, capsys):
  argv = ["--out", str(world_dir), "--scenes", str(SCENES), "--samples-per-scene", str(SAMPLES)]
  assert cli.main([*argv, "--seed", str(SEED), "--workers", "1"]) == 0
  assert "nothing to do" in capsys.readouterr().out
  assert cli.main([*argv, "--seed", str(SEED + 1), "--workers", "1"]) == 2  # a user error
  assert str(world_dir) in capsys.readouterr().err


def test_jpeg_colours_follow_the_class_map(world_dir, db):
  # Where the class map says sky the JPEG is bright and bluish; the road is darker.
  cams = [sd for sd in db[0]["sample_data"] if sd["fileformat"] == "jpg"]

  def classmap(sd):
    return np.asarray(Image.open(world_dir / "synthetic" / "classmaps" / f"{sd['token']}.png"))

  sd = max(cams, key=lambda sd: np.sum(classmap(sd) == 255) * np.sum(classmap(sd) == 24))
  image = np.asarray(Image.open(io.BytesIO((world_dir / sd["filename"]).read_bytes())), dtype=float)
  classmap = classmap(sd)
  road = np.kron(classmap == 24, np.ones((4, 4), dtype=bool))
  sky = np.kron(classmap == 255, np.ones((4, 4), dtype=bool))
  assert road.any() and sky.any()
  road_rgb, sky_rgb = image[road].mean(0), image[sky].mean(0)
  assert sky_rgb[2] > sky_rgb[0] and sky_rgb.mean() > road_rgb.mean() + 40


def test_the_project_reader_loads_the_world(world_dir, db):
  dataset = nuscenes.NuScenes(world_dir, VERSION)
  scene = dataset.scenes[0]
  record = dataset.keyframe(next(iter(dataset.scene_samples(scene))), scene["name"])
  assert record["has_labels"] and len(record["labels"]) == len(record["points"])
  assert set(np.unique(record["pairs_camera"]).tolist()) == set(range(6))
  assert len(record["pairs_point"]) > 15_000


# A lidar-only world through KITTI's sensor: the few-shot target out of distribution.
KITTI_ELEVATIONS = (-24.9, 2.0)  # HDL-64E, degrees (KITTI's setup), restated
KITTI_HEIGHT = 1.73  # metres above the ground


@pytest.fixture(scope="module")
def lidar_only_dir(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("synthetic") / "hdl64"
  stats = writer.generate(out, SCENES, 1, SEED, VERSION, workers=1, sensor="hdl64", cameras=False)
  assert stats is not None and len(stats) == SCENES
  return out


def test_hdl64_sweeps_have_64_rings_in_kitti_elevations(lidar_only_dir):
  """Ring and elevation restated from the point coordinates, not from the profile."""
  dataset = nuscenes.NuScenes(lidar_only_dir, VERSION)
  lidarseg = json.loads((lidar_only_dir / VERSION / "lidarseg.json").read_text())
  seg_of = {r["sample_data_token"]: r for r in lidarseg}
  for scene in dataset.scenes:
    for token in dataset.scene_samples(scene):
      record = dataset.keyframe(token, scene["name"])
      points = record["points"]
      assert 100_000 <= len(points) <= 125_000  # KITTI: ~120k a scan
      raw = np.fromfile(lidar_only_dir / seg_of[record["lidar_token"]]["filename"], np.uint8)
      ring = points[:, 4].astype(int)
      assert np.array_equal(np.unique(ring), np.arange(64))
      xyz = points[:, :3].astype(np.float64)
      elevation = np.degrees(np.arctan2(xyz[:, 2], np.linalg.norm(xyz[:, :2], axis=1)))
      per_ring = np.array([np.median(elevation[ring == r]) for r in range(64)])
      assert np.all(np.diff(per_ring) > 0.2)  # ring 0 lowest, distinct beams
      assert abs(per_ring[0] - KITTI_ELEVATIONS[0]) < 0.05
      assert abs(per_ring[-1] - KITTI_ELEVATIONS[1]) < 0.05
      # Every point lies on its ring's beam (spurious returns included).
      assert np.max(np.abs(elevation - per_ring[ring])) < 0.01
      # Mounted at KITTI's height: the road is 1.73 m below the sensor.
      low = (ring < 16) & (raw == 24)
      assert abs(np.median(points[low, 2]) + KITTI_HEIGHT) < 0.1


def test_a_world_without_cameras_is_lidar_only(lidar_only_dir, world_dir):
  files = {p.relative_to(lidar_only_dir).as_posix() for p in lidar_only_dir.rglob("*")}
  assert not [f for f in files if f.startswith("samples/CAM_") or "classmaps" in f]
  assert {f.split("/")[1] for f in files if f.startswith("samples/")} == {"LIDAR_TOP"}
  lists = {n: json.loads((lidar_only_dir / VERSION / f"{n}.json").read_text()) for n in TABLES}
  assert [s["channel"] for s in lists["sensor"]] == ["LIDAR_TOP"]
  assert len(lists["calibrated_sensor"]) == 1
  assert lists["calibrated_sensor"][0]["translation"][2] == KITTI_HEIGHT
  assert len(lists["sample_data"]) == len(lists["ego_pose"]) == len(lists["lidarseg"]) == SCENES
  poses = {p["token"]: p for p in lists["ego_pose"]}
  samples = {s["token"] for s in lists["sample"]}
  for sd in lists["sample_data"]:
    assert sd["fileformat"] == "pcd" and (lidar_only_dir / sd["filename"]).is_file()
    assert sd["sample_token"] in samples
    assert poses[sd["ego_pose_token"]]["timestamp"] == sd["timestamp"]
  meta = json.loads((lidar_only_dir / "synthetic" / "meta.json").read_text())
  assert meta["cameras"] == [] and "classmap" not in meta
  assert (meta["lidar"]["model"], meta["lidar"]["beams"]) == ("Velodyne HDL-64E", 64)
  # The project reader: no cameras, no pairs, labels present.
  dataset = nuscenes.NuScenes(lidar_only_dir, VERSION)
  assert dataset.cameras == ()
  scene = dataset.scenes[0]
  record = dataset.keyframe(next(iter(dataset.scene_samples(scene))), scene["name"])
  assert record["has_labels"] and len(record["labels"]) == len(record["points"])
  assert record["pairs_point"].shape == (0,) and record["pairs_uv"].shape == (0, 2)
  assert record["image_sizes"].shape == (0, 2) and record["images"].shape == (0,)
  # The lidar of a seed does not depend on the cameras: an HDL-32E world without
  # cameras has the camera world's sweeps and tokens.
  plain = lidar_only_dir.parent / "hdl32-lidar-only"
  writer.generate(plain, SCENES, SAMPLES, SEED, VERSION, cameras=False)
  sweeps = json.loads((plain / VERSION / "sample_data.json").read_text())
  for sd in sweeps:
    assert (plain / sd["filename"]).read_bytes() == (world_dir / sd["filename"]).read_bytes()
  with_cameras = json.loads((world_dir / VERSION / "sample_data.json").read_text())
  lidar_tokens = {sd["token"] for sd in with_cameras if sd["fileformat"] == "pcd"}
  assert {sd["token"] for sd in sweeps} == lidar_tokens


def test_a_world_of_other_sensors_is_refused_in_one_line(world_dir, lidar_only_dir, capsys):
  for out, kwargs in (
    (world_dir, {"samples_per_scene": SAMPLES, "sensor": "hdl64", "cameras": False}),
    (world_dir, {"samples_per_scene": SAMPLES, "cameras": False}),
    (lidar_only_dir, {"samples_per_scene": 1}),
  ):
    with pytest.raises(FileExistsError, match="other sensors") as error:
      writer.generate(out, SCENES, seed=SEED, **kwargs)
    assert "\n" not in str(error.value)
  # The CLI: the same lidar-only world again is nothing to do; the default refuses it.
  argv = ["--out", str(lidar_only_dir), "--scenes", str(SCENES), "--samples-per-scene", "1"]
  argv += ["--seed", str(SEED), "--workers", "1"]
  assert cli.main([*argv, "--sensor", "hdl64", "--no-cameras"]) == 0
  assert "nothing to do" in capsys.readouterr().out
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "Velodyne HDL-64E without cameras, not Velodyne HDL-32E with 6 cameras" in err
  with pytest.raises(SystemExit):
    cli.main([*argv, "--sensor", "hdl16"])
  assert "invalid choice: 'hdl16'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="--sensor must be one of hdl32, hdl64"):
    writer.generate(lidar_only_dir.parent / "never", SCENES, 1, SEED, sensor="hdl16")
