r"""How well can a student fit its teacher at all? A linear probe of its frozen decoder.

  python benchmarks/capacity.py --out capacity.json --run WORKDIR [--run WORKDIR ...]
      [--max_pairs 20000] [--ridge 1e-3]

Reads finished pretraining runs (a default-pipeline workdir holding
`pretrain/config.json` and its checkpoints, with `eval.val_*` set, as the
default and the loss study set them). On the pairs of the training store and
of the validation store it gathers, per pair, the student's output K, its
decoder output before the head (`aux["backbone"]`, the features the head can
only project), the teacher's feature Q and the voxel's label. Then:

  cosine_student        mean cos(K, Q) on the validation pairs;
  cosine_probe          mean cos(Q_hat, Q), Q_hat a ridge regression from the
                        decoder output to Q fitted on the training pairs: the
                        best any linear head on this decoder could do;
  rank95_student        singular values of the centred K needed for 95% of its
                        energy (how many dimensions the student spans);
  rank95_teacher        the same for Q;
  miou_student, miou_probe, miou_teacher
                        zero-shot mIoU on the validation pairs of K, Q_hat and
                        Q with the run's text embeddings (the last is the
                        ceiling).

A probe well above the student says the head or the loss leaves capacity
unused; a probe near the student and far from the ceiling says the decoder
itself cannot carry the teacher's features. Writes JSON and prints a table.
"""

import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from reldistill_jax import (
  classes,
  cli,
  evaluate,
  evaluation_runs,
  feature_store,
  hardware,
  input_pipeline,
  pairs,
  records,
  runtime,
)
from reldistill_jax.evaluators import segmentation, zeroshot

_OUT = flags.DEFINE_string("out", "capacity.json", "JSON output file.")
_RUNS = flags.DEFINE_multi_string("run", [], "A finished default-pipeline workdir.")
_MAX_PAIRS = flags.DEFINE_integer("max_pairs", 20000, "Pairs kept per split (uniform sample).")
_RIDGE = flags.DEFINE_float("ridge", 1e-3, "Ridge penalty, relative to the mean feature energy.")


def collect(config, model, params, buckets_path, store_path, max_pairs: int) -> dict:
  """K, backbone, Q and labels of (a uniform sample of) every pair of a split."""
  buckets = records.ShardedReader(buckets_path)
  store = feature_store.FeatureStore(store_path)
  transform = input_pipeline.Transform(
    config.input.num_pairs, config.input.intensity_scale, grid=tuple(store.config["grid"])
  )
  budgets = runtime.pack_budgets(config, buckets, config.eval.batch_size, "evaluation")

  def apply_fn(params, batch):
    features, aux = model.apply(params, batch)
    return {
      "k": pairs.gather_voxels(features, batch["pairs_voxel"]),
      "b": pairs.gather_voxels(aux["backbone"].astype(jnp.float32), batch["pairs_voxel"]),
      "q": pairs.sample_teacher(batch["teacher"], batch["pairs_camera"], batch["pairs_grid"]),
      "label": jnp.take_along_axis(batch["labels"], batch["pairs_voxel"], axis=1),
      "mask": batch["pairs_mask"],
    }

  parts = {key: [] for key in ("k", "b", "q", "label")}
  source = input_pipeline.JoinedSource(buckets, store)
  for _, out in evaluate.predict_voxels(
    apply_fn, params, source, transform, budgets, None, rows="pairs", desc="capacity"
  ):
    for key in parts:
      parts[key].append(out[key][out["mask"]])
  data = {key: np.concatenate(value) for key, value in parts.items()}
  keep = np.random.default_rng(0).permutation(len(data["k"]))[:max_pairs]
  return {key: value[keep] for key, value in data.items()}


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rank95(x: np.ndarray) -> int:
  """Singular values of the centred rows needed for 95% of the energy."""
  s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
  return int(np.searchsorted(np.cumsum(s) / s.sum(), 0.95) + 1)


def ridge(b: np.ndarray, q: np.ndarray, penalty: float) -> np.ndarray:
  """(c + 1, D) weights of q ~ [b, 1] @ W, the penalty relative to the mean energy of b."""
  x = np.concatenate([b, np.ones((len(b), 1))], axis=1).astype(np.float64)
  gram = x.T @ x
  lam = penalty * np.trace(gram) / len(gram)
  return np.linalg.solve(gram + lam * np.eye(len(gram)), x.T @ q.astype(np.float64))


def miou(features: np.ndarray, labels: np.ndarray, text: np.ndarray) -> float:
  pred = zeroshot.zero_shot_predict(features, text)
  names = classes.NUSCENES_CLASSES
  confusion = segmentation.confusion_matrix(pred, labels, len(names))
  return segmentation.segmentation_metrics(confusion, names)["miou"]


def probe(run: pathlib.Path, max_pairs: int, penalty: float) -> dict:
  """The capacity measures of one run (module docstring)."""
  config = ml_collections.ConfigDict(json.loads((run / "pretrain" / "config.json").read_text()))
  model = runtime.make_model(config)
  params = runtime.load_params(run / "pretrain")
  train = collect(config, model, params, config.input.buckets, config.input.features, max_pairs)
  val = collect(config, model, params, config.eval.val_buckets, config.eval.val_features, max_pairs)
  weights = ridge(train["b"], train["q"], penalty)
  q_hat = np.concatenate([val["b"], np.ones((len(val["b"]), 1))], axis=1) @ weights
  text = evaluation_runs.load_text_embeddings(config.eval.text_embeddings)
  cos = lambda a, b: float((_unit(a) * _unit(b)).sum(-1).mean())
  return {
    "run": str(run),
    "model": config.model.to_dict(),
    "loss": config.loss.name,
    "steps": config.num_steps,
    "decoder_channels": int(train["b"].shape[1]),
    "pairs": {"train": len(train["k"]), "val": len(val["k"])},
    "cosine_student": cos(val["k"], val["q"]),
    "cosine_probe": cos(q_hat, val["q"]),
    "rank95_student": rank95(val["k"]),
    "rank95_teacher": rank95(val["q"]),
    "miou_student": miou(val["k"], val["label"], text),
    "miou_probe": miou(q_hat, val["label"], text),
    "miou_teacher": miou(val["q"], val["label"], text),
  }


def main(argv):
  del argv
  with jax.default_matmul_precision("float32"):
    results = [probe(pathlib.Path(r), _MAX_PAIRS.value, _RIDGE.value) for r in _RUNS.value]
  report = {
    "benchmark": "student capacity (linear probe of the frozen decoder)",
    "machine": hardware.machine(),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(["benchmarks/capacity.py", *sys.argv[1:]]),
    "results": results,
  }
  pathlib.Path(_OUT.value).write_text(json.dumps(report, indent=2))
  print(
    "| run | decoder ch | cos student | cos probe | rank95 K / Q | mIoU student / probe / teacher |"
  )
  print("|---|---|---|---|---|---|")
  for r in results:
    print(
      f"| {r['run']} | {r['decoder_channels']} | {r['cosine_student']:.3f} | "
      f"{r['cosine_probe']:.3f} | {r['rank95_student']} / {r['rank95_teacher']} | "
      f"{100 * r['miou_student']:.1f} / {100 * r['miou_probe']:.1f} / "
      f"{100 * r['miou_teacher']:.1f} |"
    )


if __name__ == "__main__":
  cli.run(main)
