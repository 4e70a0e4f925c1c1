"""A model given on the command line: a catalog name, or a Hugging Face config.json (P4)."""
from __future__ import annotations

from .catalog import get_model
from .specs import ModelSpec


def model_from_arg(arg: str | ModelSpec) -> ModelSpec:
    """``--model``: a catalog name."""
    return get_model(arg)
