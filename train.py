"""Train any model of this repository.

    python train.py --model ann                          # the toy preset, on CPU or one GPU, in minutes
    python train.py --model ann --context nl --out runs/ann_nl
    torchrun --nproc_per_node=8 train.py --model san --preset paper --data-root datasets
    python train.py --model san --resume                 # continue a killed run where it stopped

This file knows no model by name. The model file (`<model>.py`) gives its Config, PRESETS, build_model(cfg) and a
wrapper whose forward(batch, step) is the paper's training step, returning a dict of losses ("loss" is the total).
Here live the parts every paper shares: the command line (made from the Config fields), device, mixed precision,
DDP, the iteration schedule, logging, evaluation and checkpoints.

Contents, in reading order: command line -> distributed set-up -> data (an infinite, resumable sampler) ->
optimizer and schedule -> checkpoints -> the training loop -> main.
"""
import argparse
import dataclasses
import importlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import data
import eval as evaluation

REPO = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------------------
# Command line: one flag per Config field, its comment as the help text
# ----------------------------------------------------------------------------------------------------------------------
def available_models():
    """Model files are the .py files of this folder that declare a TASK; the file name is the model name."""
    return sorted(p.stem for p in REPO.glob("*.py") if re.search(r"^TASK = ", p.read_text(), re.M))


def load_model_module(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        module = None
    if module is None or not hasattr(module, "build_model"):
        sys.exit(f"error: unknown model {name!r}; available models: {', '.join(available_models())}")
    return module


def field_help(config_cls):
    """{field: help} from the `# comment` that follows each field in the Config's source."""
    source = inspect.getsource(config_cls)
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.M))


def parse_value(text, default):
    """Turn a command-line string into the type of the field's default (tuples are comma-separated)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(default, tuple):
        kind = type(default[0]) if default else str
        return tuple(kind(v) for v in text.split(",") if v != "")
    return type(default)(text)


def parse_args(argv=None):
    """Two passes: --model and --preset first (they decide which fields exist), then the fields themselves."""
    models = available_models()
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--model")
    first.add_argument("--preset", default="toy")
    known, _ = first.parse_known_args(argv)
    parser = argparse.ArgumentParser(
        description="Train a model of this repository. Models: " + ", ".join(models),
        epilog="Every Config field of the model is a flag too; `--model X --help` lists them.")
    parser.add_argument("--model", required=True, help="model file to train: " + " | ".join(models))
    parser.add_argument("--preset", default="toy", help="a key of the model's PRESETS (default: toy)")
    parser.add_argument("--out", help="output folder (default: runs/<model>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt, with the config stored in it")
    module = None
    if known.model:
        module = load_model_module(known.model)
        if known.preset not in module.PRESETS:
            sys.exit(f"error: model {known.model!r} has no preset {known.preset!r}; presets: {', '.join(module.PRESETS)}")
        defaults = module.PRESETS[known.preset]
        helps = field_help(module.Config)
        group = parser.add_argument_group(f"{known.model} Config fields (defaults of preset {known.preset!r})")
        for f in dataclasses.fields(defaults):
            default = getattr(defaults, f.name)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            group.add_argument(*names, dest=f.name, default=None, metavar=type(default).__name__.upper(),
                               type=lambda s, d=default: parse_value(s, d),
                               help=f"{helps.get(f.name, '')} (default: {shown})")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(module.Config)
                 if getattr(args, f.name, None) is not None}
    return args, module, overrides


# ----------------------------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE), as nanoGPT does it
# ----------------------------------------------------------------------------------------------------------------------
def setup_distributed():
    """Returns (rank, world_size, device). One process per GPU under torchrun; gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def autocast_for(device, enabled):
    """bf16 autocast where the GPU supports it, fp16 (with a GradScaler) otherwise, nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return nullcontext(), False
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype == torch.float16


# ----------------------------------------------------------------------------------------------------------------------
# Data: an infinite sampler that can resume mid-epoch
# ----------------------------------------------------------------------------------------------------------------------
class InfiniteSampler(Sampler):
    """Indices for this rank, forever, starting at a given step.

    Like DistributedSampler with set_epoch, but without epochs: the global sample stream is a new seeded permutation
    of the dataset every pass, global batch s is stream[s*B : (s+1)*B], and rank r takes its slice of each global
    batch. So the global batch does not depend on the number of processes, and a resumed run sees exactly the
    samples the killed run would have seen next.
    """

    def __init__(self, size, global_batch, rank, world, seed, start_step=0):
        assert global_batch % world == 0, f"batch_size {global_batch} must divide by the {world} processes"
        self.size, self.B, self.b, self.rank = size, global_batch, global_batch // world, rank
        self.seed, self.start_step = seed, start_step

    def __iter__(self):
        perm, perm_pass = None, -1
        step = self.start_step
        while True:
            for j in range(self.rank * self.b, (self.rank + 1) * self.b):
                pass_index, i = divmod(step * self.B + j, self.size)
                if pass_index != perm_pass:
                    g = torch.Generator().manual_seed(self.seed * 100_003 + pass_index)
                    perm, perm_pass = torch.randperm(self.size, generator=g), pass_index
                yield int(perm[i])
            step += 1


def collate(items):
    """Stack tensors; keep everything else (captions, per-image box lists) as lists."""
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else [it[k] for it in items]
            for k in items[0]}


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------------------------
def build_optimizers(wrapper, cfg):
    if hasattr(wrapper, "configure_optimizers"):
        return wrapper.configure_optimizers(cfg)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return {"sgd": torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)}
    if cfg.optimizer == "adamw":
        return {"adamw": torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)}
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def lr_factor(cfg, step):
    """Multiplier of each parameter group's base lr at `step`: linear warm-up, then poly / cosine / step decay."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = step / cfg.max_iters
    if cfg.schedule == "poly":
        return (1 - progress) ** cfg.poly_power
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":  # the detection papers: x0.1 at each milestone
        return 0.1 ** sum(step >= m for m in cfg.lr_steps)
    raise ValueError(f"schedule must be 'poly', 'cosine' or 'step', got {cfg.schedule!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: everything to resume and to evaluate, written atomically, read with weights_only=True
# ----------------------------------------------------------------------------------------------------------------------
def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))


def save_checkpoint(path, **state):
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old checkpoint or the new one, never half of one


def load_checkpoint(path, model_name=None):
    """Load a checkpoint of this project, with clear errors for a missing, corrupt or foreign file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint (corrupt or truncated?): {e}") from e
    if not isinstance(ckpt, dict) or not {"model_name", "config", "model"} <= ckpt.keys():
        raise ValueError(f"{path} is not a checkpoint written by this project's train.py "
                         "(expected keys model_name, config, model)")
    if model_name is not None and ckpt["model_name"] != model_name:
        raise ValueError(f"{path} is a checkpoint of model {ckpt['model_name']!r}, not {model_name!r}")
    return ckpt


def config_from_checkpoint(module, ckpt):
    names = {f.name for f in dataclasses.fields(module.Config)}
    unknown = set(ckpt["config"]) - names
    if unknown:
        raise ValueError(f"checkpoint config has fields {sorted(unknown)} that {module.__name__}.Config lacks")
    return module.Config(**ckpt["config"])


# ----------------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------------
def train(model_name, cfg, out, resume=False):
    """Train `model_name` with Config `cfg` into folder `out`; returns the final metrics (every rank)."""
    module = load_model_module(model_name)
    rank, world, device = setup_distributed()
    master = rank == 0
    out = Path(out)
    for path, dependency in getattr(module, "prerequisites", lambda c: {})(cfg).items():
        if not Path(path).exists():  # e.g. SAN's toy loads the toy CLIP, which train.py pre-trains first
            if master:
                print(f"{path} is missing: training `{dependency}` first")
            train(dependency, load_model_module(dependency).PRESETS["toy"], Path(path).parent)

    ckpt_path, start_step, ckpt = out / "ckpt.pt", 0, None
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, model_name)
        cfg, start_step = config_from_checkpoint(module, ckpt), ckpt["step"]
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    train_set = data.build_dataset(cfg.train_dataset, "train", cfg)
    if getattr(cfg, "class_names", None) == ():  # open-vocabulary models train on the training set's own names
        cfg = dataclasses.replace(cfg, class_names=tuple(train_set.class_names))
    wrapper = module.build_model(cfg, pretrained=ckpt is None).to(device)
    if world > 1 and getattr(cfg, "sync_bn", False) and device.type == "cuda":
        wrapper = torch.nn.SyncBatchNorm.convert_sync_batchnorm(wrapper)
    optimizers = build_optimizers(wrapper, cfg)
    if len(optimizers) != 1:
        raise NotImplementedError("train.py steps one optimizer; this model asks for " + ", ".join(optimizers))
    (opt_name, optimizer), = optimizers.items()
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    amp, use_scaler = autocast_for(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if ckpt is not None:
        wrapper.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizers"][opt_name])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    model = DistributedDataParallel(wrapper, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else wrapper
    params = [p for group in optimizer.param_groups for p in group["params"]]

    sampler = InfiniteSampler(len(train_set), cfg.batch_size, rank, world, cfg.seed, start_step)
    loader = iter(DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler, collate_fn=collate,
                             num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                             worker_init_fn=lambda w: np.random.seed(cfg.seed * 1000 + rank * 100 + w),
                             persistent_workers=cfg.num_workers > 0))
    eval_sets = [(name, data.build_dataset(name, "val", cfg)) for name in cfg.eval_datasets]

    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"model": model_name, **dataclasses.asdict(cfg)}, indent=1))
        n_train = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in wrapper.parameters())
        print(f"{model_name}: {n_train / 1e6:.2f}M trainable / {n_total / 1e6:.2f}M parameters, device {device}"
              f"{f' x{world}' if world > 1 else ''}, {cfg.max_iters} iterations at batch {cfg.batch_size}")
    log_file = open(out / "log.jsonl", "a") if master else None
    metrics, sums, count, t_last = {}, {}, 0, time.time()
    bar = tqdm(range(start_step, cfg.max_iters), initial=start_step, total=cfg.max_iters, dynamic_ncols=True,
               desc=model_name, disable=not master or not sys.stderr.isatty())  # log files get the log lines only
    for step in bar:
        wrapper.train()
        batch = to_device(next(loader), device)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(cfg, step)
        with amp:
            losses = model(batch, step)
        if not all(torch.isfinite(v).all() for v in losses.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: "
                                     + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if hasattr(wrapper, "on_step_end"):
            wrapper.on_step_end(step)

        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count, done = count + 1, step + 1
        if done % cfg.log_interval == 0 or done == cfg.max_iters:
            means = torch.stack(list(sums.values())) / count
            if world > 1:  # the loss of the global batch: mean over ranks
                dist.all_reduce(means)
                means /= world
            record = {"step": done, **{k: round(v, 6) for k, v in zip(sums, means.tolist())},
                      "lr": optimizer.param_groups[0]["lr"], "s_per_it": (time.time() - t_last) / count}
            sums, count, t_last = {}, 0, time.time()
            if master:
                eta = record["s_per_it"] * (cfg.max_iters - done)
                mem = f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f}G" if device.type == "cuda" else ""
                bar.write(f"step {done}/{cfg.max_iters} | " + " ".join(f"{k} {record[k]:.4f}" for k in losses)
                          + f" | lr {record['lr']:.2e} | {record['s_per_it']:.2f} s/it | eta {eta / 60:.1f} min{mem}")
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
        if master and (done % cfg.ckpt_interval == 0 or done == cfg.max_iters):
            save_checkpoint(ckpt_path, model_name=model_name, config=dataclasses.asdict(cfg),
                            model=wrapper.state_dict(), optimizers={opt_name: optimizer.state_dict()},
                            scaler=scaler.state_dict(), step=done, rng=rng_state())
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            with amp:
                metrics = evaluation.evaluate(wrapper, module.TASK, eval_sets, device, rank, world)
            if master:
                bar.write(f"step {done} eval | " + evaluation.format_metrics(metrics))
                log_file.write(json.dumps({"step": done, **metrics}) + "\n")
                log_file.flush()
    bar.close()
    if not metrics:  # resumed after the last iteration, before its evaluation
        with amp:
            metrics = evaluation.evaluate(wrapper, module.TASK, eval_sets, device, rank, world)

    if master:
        log_file.close()
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        evaluation.plot_losses(out / "log.jsonl", out / "loss.png")
        written = [ckpt_path, out / "metrics.json", out / "loss.png"]
        if module.TASK == "semseg" and eval_sets:
            name, dataset = eval_sets[0]
            evaluation.plot_predictions(wrapper, dataset, out / "predictions.png", device)
            written.append(out / "predictions.png")
        if hasattr(module, "export"):
            written += module.export(wrapper, cfg, out) or []
        print(f"{model_name} done. Final metrics:\n  " + evaluation.format_metrics(metrics, "\n  "))
        print("wrote " + ", ".join(map(str, written)))
    if world > 1:
        dist.barrier()
    return metrics


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # log lines reach a redirected log file as they are printed
    args, module, overrides = parse_args(argv)
    cfg = dataclasses.replace(module.PRESETS[args.preset], **overrides)
    out = args.out or f"runs/{args.model}"
    try:
        train(args.model, cfg, out, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
