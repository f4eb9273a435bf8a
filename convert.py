"""Turn a paper's released checkpoint into an ordinary checkpoint of this project, then evaluate it with eval.py.

    python convert.py san san_vit_b_16.pth runs/san_b16/ckpt.pt
    python eval.py --ckpt runs/san_b16/ckpt.pt --data-root datasets
    python eval.py --ckpt runs/san_b16/ckpt.pt --image my.jpg --vocab "cat,dog,grass"
    python convert.py pose_transfer market_PATN/latest_net_netG.pth runs/patn_market/ckpt.pt

Models with a converter: san (SAN's released ViT-B/16 and ViT-L/14 models), ann (the Cityscapes model), zsseg (the
zero-shot and cross-dataset COCO-Stuff models, R101c) and pose_transfer (PATN's Market-1501 and DeepFashion
generators). The key mapping of each paper lives in its model file, as a readable table next to its builders
(san.OFFICIAL_KEYS, ann.OFFICIAL_KEYS, zsseg.OFFICIAL_KEYS, pose_transfer.OFFICIAL_KEYS); this script only finds the
preset, calls the model file's converter and writes the checkpoint (config = the matching paper preset, the model
name, the weights). A key that the table does not know, or a weight of ours that the file does not fill (named as in
the file, which the user holds, and as ours), is an error that lists them: nothing is written half-way. A file that
is no checkpoint at all is a one-line error, whatever torch.load raises on it.
"""
import argparse
import dataclasses
import re
import sys
from pathlib import Path

import torch

from checkpoint import load_model_module, save_checkpoint


def numpy_globals():
    """What a pickled numpy array or scalar needs: numpy's array reconstruction and scalar, ndarray, dtype and its
    classes. The reconstruction and the scalar are allowed under both module names, numpy 2's numpy._core and numpy
    1.x's numpy.core: the released files were pickled under numpy 1 (ANN's runner_state holds numpy scalars)."""
    import numpy as np
    core = np._core if hasattr(np, "_core") else np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [(getattr(core.multiarray, f), f"{package}.multiarray.{f}") for f in ("_reconstruct", "scalar")
            for package in ("numpy.core", "numpy._core")] + [np.ndarray, np.dtype, *dtypes]


def load_official(src):
    """The released file, read with weights_only=True: tensors and plain data, plus numpy arrays (the frameworks
    pickled some beside the weights, e.g. ANN's runner_state); any other object is refused, never run. Whatever
    the loader raises (a text file, random bytes, an empty file, a zip of something else) is one ValueError."""
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            official = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's advice (weights_only=False) must never be followed with a file of unknown origin
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ValueError(f"{src} holds objects other than tensors, numbers and numpy arrays ({found[1]}), so it "
                             "was not loaded (only weights_only=True reads are made)") from None
        raise ValueError(f"{src} is not a readable checkpoint: corrupt, truncated, or not a PyTorch file "
                         f"({type(e).__name__} from torch.load)") from None
    if not isinstance(official, dict):
        raise ValueError(f"{src} is not a checkpoint: it holds a {type(official).__name__}, not a dict of tensors")
    return official


def released_config(module, preset, **overrides):
    """The paper preset `preset` of `module`, with `overrides` replacing Config fields; an open-vocabulary model gets
    its training vocabulary stored in it (its default vocabulary, kept with the weights)."""
    cfg = dataclasses.replace(module.PRESETS[preset], **overrides)
    if getattr(cfg, "class_names", None) == ():
        import data
        cfg = dataclasses.replace(cfg, class_names=tuple(data.class_names(cfg.train_dataset)))
    return cfg


def convert_released(model_name, src, preset=None, **overrides):
    """Read `src` (an official checkpoint of `model_name`) and convert it -> (preset, config, our state dict), nothing
    written. The preset is told from the weights unless given; `overrides` replace Config fields (hubconf.py passes a
    user's inference settings, and the tests the sizes of their small released-format files)."""
    module = load_model_module(model_name)
    if not hasattr(module, "convert_official_state_dict"):
        raise ValueError(f"model {model_name!r} has no converter for official checkpoints")
    if not Path(src).is_file():
        raise FileNotFoundError(f"no official checkpoint at {src}")
    official = load_official(src)
    weights = module.official_weights(official)
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise ValueError(f"{src} is not a released {model_name} checkpoint: no state dict of tensors in it")
    preset = preset or module.official_preset(weights)
    if preset not in module.PRESETS:
        raise ValueError(f"cannot tell which {model_name} preset {src} is; pass --preset (one of "
                         f"{', '.join(module.PRESETS)})")
    cfg = released_config(module, preset, **overrides)
    return preset, cfg, module.convert_official_state_dict(official, cfg)


def convert(model_name, src, dst, preset=None, force=False):
    """Convert `src` (an official checkpoint of `model_name`) into our checkpoint `dst`; returns the preset used."""
    if Path(dst).exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    preset, cfg, state = convert_released(model_name, src, preset)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, model_name=model_name, config=dataclasses.asdict(cfg), model=state, step=0,
                    converted_from=str(src), preset=preset)  # atomic: a kill leaves no half-written checkpoint
    return preset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model file that the checkpoint is for (san, ann, zsseg, pose_transfer)")
    parser.add_argument("src", help="the released checkpoint, as downloaded")
    parser.add_argument("dst", help="our checkpoint to write (e.g. runs/san_b16/ckpt.pt)")
    parser.add_argument("--preset", help="the paper preset of the checkpoint (default: told from the weights)")
    parser.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    args = parser.parse_args(argv)
    try:
        preset = convert(args.model, args.src, args.dst, args.preset, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.dst} ({args.model}, preset {preset}); evaluate it with: python eval.py --ckpt {args.dst}")


if __name__ == "__main__":
    main()
