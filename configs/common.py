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
