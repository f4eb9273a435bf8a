"""Model files and checkpoints: what train.py writes and eval.py (and convert.py) read.

A model is a .py file of this folder that declares `TASK = ...`; its file name is the model name. A checkpoint is a
dict {model_name, config, model, optimizers, scaler, step, rng} written by train.py; `model` and `config` are enough
to evaluate. Files are written atomically and read with torch.load(weights_only=True): tensors and plain data only,
never code, so a checkpoint from an untrusted source cannot run anything.
"""
import dataclasses
import importlib
import os
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent


def available_models():
    """The .py files of this folder that declare a TASK; the file name is the model name."""
    return sorted(p.stem for p in REPO.glob("*.py") if re.search(r"^TASK = ", p.read_text(), re.M))


def load_model_module(name):
    """Import the model file `name`; a name that is not a model is a ValueError listing the models."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        module = None
    if module is None or not hasattr(module, "build_model") or not hasattr(module, "TASK"):
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
    return module


def save_checkpoint(path, **state):
    """torch.save to <path>.tmp, then rename: a kill leaves the old checkpoint or the new one, never half of one."""
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, model_name=None):
    """A checkpoint of this project, or a clear ValueError / FileNotFoundError for a missing, corrupt or foreign
    file, or one of another model than `model_name`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own message advises weights_only=False, which must never be done with such a file
        raise ValueError(f"{path} is not a readable checkpoint: corrupt, truncated, or not a file of tensors and "
                         "plain data (it was not loaded; this project only reads checkpoints with weights_only=True)"
                         ) from None
    if not isinstance(ckpt, dict) or not {"model_name", "config", "model"} <= ckpt.keys():
        raise ValueError(f"{path} is not a checkpoint written by this project's train.py "
                         "(expected keys model_name, config, model)")
    if model_name is not None and ckpt["model_name"] != model_name:
        raise ValueError(f"{path} is a checkpoint of model {ckpt['model_name']!r}, not {model_name!r}")
    return ckpt


def config_from_checkpoint(module, ckpt):
    """The model's Config rebuilt from the checkpoint's stored fields."""
    names = {f.name for f in dataclasses.fields(module.Config)}
    unknown = set(ckpt["config"]) - names
    if unknown:
        raise ValueError(f"the checkpoint's config has fields {sorted(unknown)} that {module.__name__}.Config lacks "
                         "(written by another version of the model file?)")
    return module.Config(**ckpt["config"])
