"""Pipelines: what `simjax.main` runs for a config, chosen by `config.pipeline`."""
import importlib

from simjax.errors import UserError

PIPELINES = {"gmm": "simjax.pipelines.gmm", "image": "simjax.pipelines.image",
             "text_to_image": "simjax.pipelines.text_to_image"}


def get(config):
  name = config.pipeline
  if name not in PIPELINES:
    raise UserError(f"unknown pipeline {name!r}; set config.pipeline to one of {sorted(PIPELINES)}.")
  return importlib.import_module(PIPELINES[name])
