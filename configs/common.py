"""Helpers shared by the config files."""

import ml_collections


def parse_arg(arg: str | None, defaults: dict[str, str]) -> dict[str, str | bool]:
  """'loss=relational,runlocal' -> {'loss': 'relational', 'runlocal': True, ...defaults}.

  Raises:
    ValueError: naming an unknown key or value.
  """
  out: dict[str, str | bool] = dict(defaults)
  out["runlocal"] = False
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key == "runlocal" and not value:
      out["runlocal"] = True
      continue
    if key not in defaults:
      raise ValueError(
        f"unknown config argument {key!r}; choose from {sorted(defaults) + ['runlocal']}"
      )
    out[key] = value
  return out


def optional_str() -> ml_collections.FieldReference:
  """An optional string field (None until set from the command line)."""
  return ml_collections.FieldReference(None, field_type=str)


# The `model=` argument of the pretraining and fine-tuning configs:
# name -> (config.model.name, config.model.variant, the recipe it comes with).
MODELS = {
  "ptv3_base": ("point_encoder", "base", "scalr"),
  "ptv3_small": ("point_encoder", "small", "scalr"),
  "minkunet34c": ("minkunet", "34c", "slidr"),
  "minkunet18a": ("minkunet", "18a", "slidr"),
  "minkunet14a": ("minkunet", "14a", "slidr"),
  "waffleiron48_256": ("waffleiron", "48_256", "scalr"),
  "waffleiron48_384": ("waffleiron", "48_384", "scalr"),
  "waffleiron48_768": ("waffleiron", "48_768", "scalr"),
  "waffleiron12_64": ("waffleiron", "12_64", "scalr"),  # CPU runs on the synthetic world
}
# The k of the kNN map a student reads from its buckets (data_prep.voxelise --knn).
KNN = {"waffleiron": 16}
# The `recipe=` argument: "scalr" (AdamW, the attention student's), "slidr" (SGD with
# momentum 0.9 and dampening 0.1, BatchNorm momentum 0.05: SLidR's and ST-SLidR's MinkUNet).
RECIPES = ("scalr", "slidr")


def model_and_recipe(args: dict) -> tuple[str, str, str]:
  """(model name, variant, recipe) of the `model=` and `recipe=` arguments ("" = the model's).

  Raises:
    ValueError: naming an unknown model or recipe.
  """
  if args["model"] not in MODELS:
    raise ValueError(f"model={args['model']}: choose from {', '.join(MODELS)}")
  name, variant, recipe = MODELS[args["model"]]
  recipe = args["recipe"] or recipe
  if recipe not in RECIPES:
    raise ValueError(f"recipe={recipe}: choose from {', '.join(RECIPES)}")
  return name, variant, recipe


def set_model(config: ml_collections.ConfigDict, args: dict, out_dim: int) -> str:
  """Sets `config.model` from the `model=` argument; returns the recipe.

  `runlocal` shrinks the attention student to its `tiny` variant; a MinkUNet or
  a WaffleIron keeps its variant (waffleiron12_64 is the CPU-sized one) and
  computes in float32 like every runlocal model.
  """
  name, variant, recipe = model_and_recipe(args)
  config.model = ml_collections.ConfigDict()
  config.model.name = name
  config.model.variant = "tiny" if args["runlocal"] and name == "point_encoder" else variant
  config.model.out_dim = out_dim
  config.model.patch_size = 1024  # the attention patch; buckets are packed to multiples of it
  config.model.num_curves = 4
  config.model.dtype = "float32" if args["runlocal"] else "bfloat16"
  if name == "minkunet":
    # PyTorch's convention: the batch's weight in the running statistics.
    config.model.bn_momentum = 0.05 if recipe == "slidr" else 0.1
  if name == "waffleiron":
    # ScaLR's recipe normalises with LayerNorm (BatchNorm gave NaNs in half precision at width
    # 768); SLidR's keeps WaffleIron's own BatchNorm.
    config.model.norm = "layer" if recipe == "scalr" else "batch"
    config.model.bn_momentum = 0.1
  return recipe
