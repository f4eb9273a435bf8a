"""Train any model of this repository.

    python train.py --model ann                          # the toy preset, on CPU or one GPU, in minutes
    python train.py --model ann --context nl --out runs/ann_nl
    torchrun --nproc_per_node=8 train.py --model san --preset paper --data-root datasets
    python train.py --model san --resume                 # continue a killed run where it stopped
    python train.py --model san --fresh                  # start over; the earlier run is moved to runs/san.1

This file knows no model by name. The model file (`<model>.py`) gives its Config, PRESETS, build_model(cfg) and a
wrapper whose forward(batch, step) is the paper's training step, returning a dict of losses ("loss" is the total).
A Config holds only the fields that mean something to its model; TRAINER_DEFAULTS fills in the rest. A GAN's
configure_optimizers returns several optimizers; each iteration then calls forward(batch, step, optimizer=name) once
per optimizer, in order, and steps that one on its "loss". Here live the parts every paper shares: the command line
(made from the Config fields), device, mixed precision, DDP, the iteration schedule, logging, evaluation and the
run folder; checkpoint files are checkpoint.py's, metrics and plots eval.py's.

Contents, in reading order: trainer defaults -> command line -> distributed set-up -> data (an infinite, resumable
sampler) -> optimizers and schedule -> checkpoints and the run folder -> the training loop -> main.
"""
import argparse
import dataclasses
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
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import data
import eval as evaluation
from checkpoint import available_models, config_from_checkpoint, load_checkpoint, load_model_module, save_checkpoint

# What a model's Config may leave out because it means nothing to that model (momentum to AdamW, say): the trainer's
# defaults for every field it reads. eval_interval None = evaluate once, at the end.
TRAINER_DEFAULTS = dict(
    train_dataset=None, eval_datasets=(), data_root="datasets", batch_size=8, max_iters=1000, optimizer="adamw",
    lr=1e-3, momentum=0.9, weight_decay=0.0, schedule="poly", poly_power=0.9, lr_steps=(), lr_decay_from=0,
    warmup_iters=0, grad_clip=0.0, amp=True, sync_bn=False, eval_interval=None, log_interval=50, ckpt_interval=1000,
    num_workers=2, seed=0, warmup_ratio=0.0)


class RunError(Exception):
    """A mistake in how train.py was called (a run folder already in use, nothing to resume); printed as one line."""


def trainer_settings(cfg):
    """The trainer's view of a Config: its fields where it has them, TRAINER_DEFAULTS for the rest."""
    opts = SimpleNamespace(**{k: getattr(cfg, k, default) for k, default in TRAINER_DEFAULTS.items()})
    if opts.train_dataset is None:
        raise ValueError(f"{type(cfg).__module__}.Config needs a train_dataset field (a data.py dataset name)")
    opts.eval_interval = opts.eval_interval or opts.max_iters
    return opts


# ----------------------------------------------------------------------------------------------------------------------
# Command line: one flag per Config field, its comment as the help text
# ----------------------------------------------------------------------------------------------------------------------
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
    kind = (type(default[0]) if default else str) if isinstance(default, tuple) else type(default)
    try:
        if isinstance(default, tuple):
            return tuple(kind(v) for v in text.split(",") if v != "")
        return kind(text)
    except ValueError:
        what = f"comma-separated {kind.__name__}s" if isinstance(default, tuple) else f"an {kind.__name__}" \
            if kind.__name__[0] in "aeiou" else f"a {kind.__name__}"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def parse_args(argv=None):
    """Two passes: --model and --preset first (they decide which fields exist), then the fields themselves."""
    models = available_models()
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--model")
    first.add_argument("--preset", default="toy")
    known, _ = first.parse_known_args(argv)
    parser = argparse.ArgumentParser(
        prog="train.py", usage="%(prog)s --model MODEL [--preset PRESET] [--out OUT] [--resume | --fresh] "
                               "[--FIELD VALUE ...]",
        description="Train a model of this repository. Models: " + ", ".join(models),
        epilog="Every Config field of the model is a flag too; `--model X --help` lists them.")
    parser.add_argument("--model", required=True, help="model file to train: " + " | ".join(models))
    parser.add_argument("--preset", default="toy", help="a key of the model's PRESETS (default: toy)")
    parser.add_argument("--out", help="output folder (default: runs/<model>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its ckpt.pt, with the config stored in it (other flags "
                             "are ignored)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over in an --out that holds a run: the old run is moved to <out>.1 (or .2, ...), "
                             "never deleted")
    module = None
    if known.model:
        try:
            module = load_model_module(known.model)
        except ValueError as e:
            parser.error(str(e))
        if known.preset not in module.PRESETS:
            parser.error(f"model {known.model!r} has no preset {known.preset!r}; presets: {', '.join(module.PRESETS)}")
        defaults = module.PRESETS[known.preset]
        helps = field_help(module.Config)
        group = parser.add_argument_group(f"{known.model} Config fields (defaults of preset {known.preset!r})")
        for f in dataclasses.fields(defaults):
            default = getattr(defaults, f.name)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            group.add_argument(*names, dest=f.name, default=None, metavar=type(default).__name__.upper(),
                               type=lambda s, d=default: parse_value(s, d),
                               help=f"{helps.get(f.name, '')} (default: {shown})".replace("%", "%%"))
    args = parser.parse_args(argv)
    if args.resume and args.fresh:
        parser.error("--resume continues the run in --out, --fresh starts over: choose one")
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
    """(dataset index, stream position) pairs for this rank, forever, starting at a given step.

    Like DistributedSampler with set_epoch, but without epochs: the global sample stream is a new seeded permutation
    of the dataset every pass, global batch s is stream[s*B : (s+1)*B], and rank r takes its slice of each global
    batch. So the global batch does not depend on the number of processes, and a resumed run sees exactly the
    samples the killed run would have seen next. The position seeds the item's augmentation (SeededItems).
    """

    def __init__(self, size, global_batch, rank, world, seed, start_step=0):
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} (the global batch) must divide by the {world} processes")
        self.size, self.B, self.b, self.rank = size, global_batch, global_batch // world, rank
        self.seed, self.start_step = seed, start_step

    def __iter__(self):
        perm, perm_pass = None, -1
        step = self.start_step
        while True:
            for j in range(self.rank * self.b, (self.rank + 1) * self.b):
                position = step * self.B + j
                pass_index, i = divmod(position, self.size)
                if pass_index != perm_pass:
                    g = torch.Generator().manual_seed(self.seed * 100_003 + pass_index)
                    perm, perm_pass = torch.randperm(self.size, generator=g), pass_index
                yield int(perm[i]), position
            step += 1


class SeededItems(Dataset):
    """dataset[index] with torch's, numpy's and Python's generators seeded by the item's stream position, so its random
    augmentation depends on neither the loader worker, the number of processes nor a resume; the caller's generator
    states are left as they were."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, position = key
        seed = (self.seed * 1_000_003 + position) % 2**32
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator, as torch.manual_seed but 100x cheaper
            np.random.seed(seed)
            random.seed(seed)
            item = self.dataset[index]
        np.random.set_state(np_state)
        random.setstate(py_state)
        return item


def collate(items):
    """A batch from a list of dataset items: a dict is collated key by key (recursively, so a two-stream item
    {"sup": {...}, "unsup": {...}} gives batch["sup"]["image"]); tensors of one shape are stacked; everything else
    (images of different sizes, per-image boxes, captions, lists of items) stays a list, one entry per item."""
    first = items[0]
    if isinstance(first, dict):
        return {k: collate([it[k] for it in items]) for k in first}
    if torch.is_tensor(first) and all(torch.is_tensor(it) and it.shape == first.shape for it in items):
        return torch.stack(items)
    return list(items)


def to_device(x, device):
    """Tensors moved to `device`, inside dicts and lists too."""
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------------------------
def build_optimizers(wrapper, cfg, opts):
    """{name: optimizer}, in stepping order: the wrapper's own configure_optimizers(cfg) (a GAN: generator, then
    discriminators), else one SGD or AdamW over every trainable parameter."""
    if hasattr(wrapper, "configure_optimizers"):
        optimizers = wrapper.configure_optimizers(cfg)
    else:
        params = [p for p in wrapper.parameters() if p.requires_grad]
        if opts.optimizer == "sgd":
            optimizers = {"sgd": torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum,
                                                 weight_decay=opts.weight_decay)}
        elif opts.optimizer == "adamw":
            optimizers = {"adamw": torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)}
        else:
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {opts.optimizer!r}")
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])  # the schedule multiplies this
    return optimizers


def lr_factor(cfg, step):
    """Multiplier of each parameter group's base lr at `step`: linear warm-up, then poly / cosine / step / linear.

    The warm-up is mmcv's with cfg.warmup_ratio = r > 0: r + (1 - r) * step / warmup_iters, from r at step 0; with
    r = 0 (the default) it is (step + 1) / warmup_iters, from 1 / warmup_iters."""
    if step < cfg.warmup_iters:
        r = cfg.warmup_ratio
        return r + (1 - r) * step / cfg.warmup_iters if r > 0 else (step + 1) / cfg.warmup_iters
    progress = step / cfg.max_iters
    if cfg.schedule == "poly":
        return (1 - progress) ** cfg.poly_power
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":  # the detection papers: x0.1 at each milestone
        return 0.1 ** sum(step >= m for m in cfg.lr_steps)
    if cfg.schedule == "linear":  # pix2pix / PATN: constant until lr_decay_from, then linearly down to 0
        return min(1.0, (cfg.max_iters - step) / max(cfg.max_iters - cfg.lr_decay_from, 1))
    raise ValueError(f"schedule must be 'poly', 'cosine', 'step' or 'linear', got {cfg.schedule!r}")


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


RUN_FILES = ("ckpt.pt", "log.jsonl", "metrics.json")  # a folder holding any of these holds a run


def claim_run_folder(out, resume, fresh):
    """Make sure a new run never writes over an earlier one: a folder that holds a run is refused unless the run is
    resumed (--resume) or moved aside first (--fresh: to <out>.1, <out>.2, ..., never deleted)."""
    ckpt = out / "ckpt.pt"
    if resume:
        if not ckpt.is_file():
            raise RunError(f"--resume: no checkpoint at {ckpt} to continue (a run killed before its first checkpoint "
                           "has none); leave out --resume to start a new run, with --fresh if the folder holds one")
        return
    held = [name for name in RUN_FILES if (out / name).exists()]
    if not held:
        return
    n = 1
    while Path(f"{out}.{n}").exists():
        n += 1
    if not fresh:
        raise RunError(f"{out} already holds a run ({', '.join(held)}). Continue it with --resume, start over "
                       f"with --fresh (the old run is moved to {out}.{n}), or choose another --out.")
    os.replace(out, f"{out}.{n}")
    print(f"moved the earlier run in {out} to {out}.{n}")


def truncate_log(log_path, step):
    """Drop the log records written after `step` by a killed run, so a resumed run's curves do not repeat steps."""
    if log_path.exists():
        lines = [line for line in log_path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        tmp = Path(f"{log_path}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log_path)


# ----------------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------------
def train(model_name, cfg, out, resume=False, fresh=False):
    """Train `model_name` with Config `cfg` into folder `out`; returns the final metrics (every rank).

    With several optimizers (a GAN), each iteration calls model(batch, step, optimizer=name) once per optimizer, in
    the order configure_optimizers gave them, and steps that optimizer on the "loss" of its call."""
    module = load_model_module(model_name)
    rank, world, device = setup_distributed()
    master = rank == 0
    out = Path(out)
    for path, dependency in getattr(module, "prerequisites", lambda c: {})(cfg).items():
        if not Path(path).exists():  # e.g. SAN's toy loads the toy CLIP, which train.py pre-trains first
            folder = Path(path).parent
            again = (folder / "ckpt.pt").is_file()  # a killed pre-training resumes
            if master:
                print(f"{path} is missing: {'resuming' if again else 'training'} `{dependency}` first, in {folder}")
            train(dependency, load_model_module(dependency).PRESETS["toy"], folder, resume=again, fresh=not again)

    ckpt_path, start_step, ckpt = out / "ckpt.pt", 0, None
    if master:
        claim_run_folder(out, resume, fresh)
    if world > 1:
        dist.barrier()
    if resume:
        ckpt = load_checkpoint(ckpt_path, model_name)
        cfg, start_step = config_from_checkpoint(module, ckpt), ckpt["step"]
    opts = trainer_settings(cfg)
    torch.manual_seed(opts.seed + rank)
    np.random.seed(opts.seed + rank)
    random.seed(opts.seed + rank)

    train_set = data.build_dataset(opts.train_dataset, "train", cfg)
    if getattr(cfg, "class_names", None) == ():  # open-vocabulary models train on the training set's own names
        cfg = dataclasses.replace(cfg, class_names=tuple(train_set.class_names))
    wrapper = module.build_model(cfg, pretrained=ckpt is None).to(device)
    if world > 1 and opts.sync_bn and device.type == "cuda":
        wrapper = torch.nn.SyncBatchNorm.convert_sync_batchnorm(wrapper)
    optimizers = build_optimizers(wrapper, cfg, opts)
    several = len(optimizers) > 1  # a GAN: one call of the model per optimizer
    amp, use_scaler = autocast_for(device, opts.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)  # one scaler for every optimizer, updated per iteration
    if ckpt is not None:
        wrapper.load_state_dict(ckpt["model"])
        if set(ckpt["optimizers"]) != set(optimizers):
            raise ValueError(f"{ckpt_path} holds optimizers {sorted(ckpt['optimizers'])}, the model has "
                             f"{sorted(optimizers)}")
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(ckpt["optimizers"][name])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    model = DistributedDataParallel(wrapper, device_ids=[device.index] if device.type == "cuda" else None,
                                    find_unused_parameters=several or getattr(wrapper, "find_unused_parameters", False)) \
        if world > 1 else wrapper  # a wrapper whose stages train different parts (zsseg) says so
    params = {name: [p for group in opt.param_groups for p in group["params"]] for name, opt in optimizers.items()}

    sampler = InfiniteSampler(len(train_set), opts.batch_size, rank, world, opts.seed, start_step)
    loader = iter(DataLoader(SeededItems(train_set, opts.seed), batch_size=opts.batch_size // world, sampler=sampler,
                             collate_fn=collate, num_workers=opts.num_workers, pin_memory=device.type == "cuda",
                             persistent_workers=opts.num_workers > 0,
                             generator=torch.Generator().manual_seed(opts.seed)))  # leaves the global RNG alone
    eval_sets = [(name, data.build_dataset(name, "val", cfg)) for name in opts.eval_datasets]

    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"model": model_name, **dataclasses.asdict(cfg)}, indent=1))
        if resume:
            truncate_log(out / "log.jsonl", start_step)
        n_train = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in wrapper.parameters())
        print(f"{model_name}: {n_train / 1e6:.2f}M trainable / {n_total / 1e6:.2f}M parameters, device {device}"
              f"{f' x{world}' if world > 1 else ''}, {opts.max_iters} iterations at batch {opts.batch_size}"
              + (f", resuming at step {start_step}" if resume else ""))
    log_file = open(out / "log.jsonl", "a") if master else None
    metrics, sums, count, t_last = {}, {}, 0, time.time()
    bar = tqdm(range(start_step, opts.max_iters), initial=start_step, total=opts.max_iters, dynamic_ncols=True,
               desc=model_name, disable=not master or not sys.stderr.isatty())  # log files get the log lines only
    for step in bar:
        wrapper.train()
        batch = to_device(next(loader), device)
        logged = {}
        for name, optimizer in optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(opts, step)
            with amp:
                losses = model(batch, step, optimizer=name) if several else model(batch, step)
            if not all(torch.isfinite(v).all() for v in losses.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: "
                                         + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                                         + " (lower --lr, or set --grad_clip)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if opts.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params[name], opts.grad_clip)
            scaler.step(optimizer)
            logged.update({f"loss_{name}" if several and k == "loss" else k: v for k, v in losses.items()})
        scaler.update()
        if hasattr(wrapper, "on_step_end"):
            wrapper.on_step_end(step)

        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count, done = count + 1, step + 1
        if done % opts.log_interval == 0 or done == opts.max_iters:
            means = torch.stack(list(sums.values())) / count
            if world > 1:  # the loss of the global batch: mean over ranks
                dist.all_reduce(means)
                means /= world
            record = {"step": done, **{k: round(v, 6) for k, v in zip(sums, means.tolist())},
                      "lr": next(iter(optimizers.values())).param_groups[0]["lr"],
                      "s_per_it": (time.time() - t_last) / count}
            sums, count, t_last = {}, 0, time.time()
            if master:
                eta = record["s_per_it"] * (opts.max_iters - done)
                mem = f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f}G" if device.type == "cuda" else ""
                bar.write(f"step {done}/{opts.max_iters} | " + " ".join(f"{k} {record[k]:.4f}" for k in logged)
                          + f" | lr {record['lr']:.2e} | {record['s_per_it']:.2f} s/it | eta {eta / 60:.1f} min{mem}")
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
        if master and (done % opts.ckpt_interval == 0 or done == opts.max_iters):
            save_checkpoint(ckpt_path, model_name=model_name, config=dataclasses.asdict(cfg),
                            model=wrapper.state_dict(), optimizers={n: o.state_dict() for n, o in optimizers.items()},
                            scaler=scaler.state_dict(), step=done, rng=rng_state())
        if done % opts.eval_interval == 0 or done == opts.max_iters:
            with amp:
                metrics = evaluation.evaluate(wrapper, module.TASK, eval_sets, device, rank, world)
            if master and metrics:
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
        plotter = evaluation.PLOTTERS.get(module.TASK)
        if plotter and eval_sets:
            plotter(wrapper, eval_sets[0][1], out / "predictions.png", device)
            written.append(out / "predictions.png")
        if hasattr(module, "export"):
            written += module.export(wrapper, cfg, out) or []
        print(f"{model_name} done. Final metrics:\n  " + evaluation.format_metrics(metrics, "\n  "))
        print("wrote " + ", ".join(map(str, written)))
    if world > 1:
        dist.barrier()
    return metrics


def error_message(e):
    """The user's one line: a DataLoader worker's error arrives with the worker's traceback in its text; keep the
    original message only."""
    text = str(e.args[0]) if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    if "Original Traceback" in text:
        name = type(e).__name__
        i = text.rfind(f"\n{name}: ")
        text = text[i + len(name) + 3:] if i >= 0 else text.splitlines()[-1]
    return text


def fail(message):
    """A user's mistake: one message, no traceback, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


USER_ERRORS = (RunError, FileNotFoundError, ValueError, FloatingPointError)  # TRACEBACK=1 shows their traceback


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # log lines reach a redirected log file as they are printed
    args, module, overrides = parse_args(argv)
    cfg = dataclasses.replace(module.PRESETS[args.preset], **overrides)
    out = args.out or f"runs/{args.model}"
    try:
        train(args.model, cfg, out, resume=args.resume, fresh=args.fresh)
    except USER_ERRORS as e:
        if os.environ.get("TRACEBACK"):
            raise
        fail(error_message(e))
    except torch.cuda.OutOfMemoryError:
        fail("out of GPU memory; lower --batch_size (the global batch: torchrun over more GPUs keeps it) or "
             "--crop_size, and keep --amp true")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
