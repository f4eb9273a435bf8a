"""Efficiency of the papers' blocks: FLOPs, peak memory and time, measured next to the papers' claims.

    python bench.py --model ann                                  # NL vs APNB, 1x2048x128x256, the paper's setting
    python bench.py --model ann --device cuda --runs 20          # the paper measured on a GPU
    python bench.py --model ann --size 96x96 --with-fusion       # whole blocks, with the concat + fusion conv
    python bench.py --model ann --toy-table runs/ann_none runs/ann_nl runs/ann_apnb
    python bench.py --model san                                  # SAN's trainable parameters, 640 px inference
    python bench.py --model san --clip-probe                     # how well the toy CLIP names each region of a scene
    python bench.py --model pose_transfer                        # PATN generator: 41.37M, time/memory per image
    python bench.py --model zsseg                                # zsseg vs SAN at 640 px, ViT-B/16 (paper: up to 19x)
    python bench.py --model zsseg --compare                      # SAN and zsseg toys side by side (trained if missing)

What is measured, for one block at batch 1, in eval mode under torch.no_grad:
  - GFLOPs: torch.utils.flop_counter.FlopCounterMode, which counts matmul and convolution FLOPs as 2 x multiply-adds
    (so GFLOPs = 2 x GMACs); pooling, softmax, BatchNorm and element-wise ops are not counted. Attention is counted
    (count_flops): the counted pass runs nn.MultiheadAttention without its fused fast path, which the counter sees
    as 0 FLOPs, and the CPU fused attention kernel gets a rule.
  - peak memory: on CUDA, torch.cuda.max_memory_allocated during the forward minus what was allocated before it
    (input and weights). On CPU, the peak total size of the tensor storages created during the forward and alive at
    the same time, tracked at the dispatcher (LivePeak) in the counted pass (attention op by op); input and weights
    excluded, and so are allocator overhead and scratch memory used inside a kernel (oneDNN/MKL workspaces) -- a
    lower bound of what the process needs.
  - time: the median of --runs forward passes after a warm-up pass, synchronised on CUDA (default 20 runs on CUDA,
    1 on CPU, where the non-local block at 128x256 takes most of a minute).

Each model registers a function in BENCHES; `--model NAME` runs it with the parsed arguments.
"""
import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


# ----------------------------------------------------------------------------------------------------------------------
# Measurements shared by every model
# ----------------------------------------------------------------------------------------------------------------------
class LivePeak(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and alive together (CPU peak-memory measure).

    Storages that exist before (inputs, weights, and views of them) are never counted; a created storage is counted
    until Python frees it (weakref.finalize on the storage)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.known = {}  # data_ptr -> bytes counted (0 for storages that existed before)

    def _forget(self, key, nbytes):
        self.live -= nbytes
        self.known.pop(key, None)

    def _track(self, tensor, counted):
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self.known or nbytes == 0:
            return
        nbytes = nbytes if counted else 0
        self.known[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._forget, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, counted=False)  # made before the mode: not ours to count
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, counted=True)
        return out


def sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """FLOPs of the CPU fused attention kernel (uncounted by FlopCounterMode): q (..., L, d), k (..., S, d),
    v (..., S, dv) -> q k^T and the weighted sum of v, 2 x (L S d + L S dv) per batch and head."""
    (L, d), S, dv = query_shape[-2:], key_shape[-2], value_shape[-1]
    return 2 * math.prod(query_shape[:-2]) * L * S * (d + dv)


@contextlib.contextmanager
def count_flops():
    """A FlopCounterMode that counts attention. In eval mode under no_grad, nn.MultiheadAttention takes a fast path,
    one fused op the counter scores 0, so inside this block the fast path is off (torch.backends.mha): the same
    projections and attention run op by op, the counter sees them all, and the CPU fused kernel has a rule."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    rules = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops}
    try:
        with FlopCounterMode(display=False, custom_mapping=rules) as counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(fn, device, runs):
    """{"gflops", "peak_mib", "ms"} of `fn()` (a forward pass; inputs already on `device`)."""
    if device.type == "cuda":
        with count_flops() as counter:
            fn()
        fn()  # the warm-up pass, with the fast path the timed passes take
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:  # one pass counts both (and warms up): the CPU non-local block at 128x256 takes most of a minute
        with count_flops() as counter, LivePeak() as tracker:  # attention's memory: that of the op-by-op path
            fn()
        peak = tracker.peak
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"gflops": counter.get_total_flops() / 1e9, "peak_mib": peak / 2**20, "ms": 1e3 * statistics.median(times)}


def ratio(a, b):
    return f"{a / b:.1f}x" if b > 0 else "-"


# ----------------------------------------------------------------------------------------------------------------------
# ANN: the non-local block vs APNB (paper abstract: ~6x faster, ~28x less GPU memory at 128x256)
# ----------------------------------------------------------------------------------------------------------------------
def ann_analytic_gmacs(channels, key, value, out, n, s, fusion):
    """Multiply-adds of our block: key, value and W_o 1x1 convs, the N x S similarity and N x S context matmuls,
    and (with fusion) the 1x1 conv from the concatenation back to `out` channels."""
    convs = n * (channels * key + channels * value + value * out)
    return (convs + n * s * (key + value) + (n * (channels + out) * out if fusion else 0)) / 1e9


def ann_block_table(size="128x256", device=torch.device("cpu"), runs=0, with_fusion=False):
    """NL vs APNB at the official efficiency setting; prints a markdown table, returns {block: measurements}."""
    import ann
    h, w = map(int, size.lower().split("x"))
    C, Ck, Cv = 2048, 256, 256  # the official efficiency scripts: input 2048, key/value 256, out 2048, batch 1
    torch.manual_seed(0)
    x = torch.randn(1, C, h, w, device=device)
    runs = runs or (20 if device.type == "cuda" else 1)
    rows = {}
    for name, sizes in (("NL", None), ("APNB", (1, 3, 6, 8))):
        block = ann.APNB(C, Ck, Cv, dropout=0.05, pyramid_sizes=sizes).to(device).eval()
        fn = (lambda b=block: b(x)) if with_fusion else (lambda b=block: b.attention(x, x))
        rows[name] = measure(fn, device, runs)
        S = h * w if sizes is None else sum(s * s for s in sizes)
        rows[name]["analytic"] = 2 * ann_analytic_gmacs(C, Ck, Cv, C, h * w, S, with_fusion)
        del block
        if device.type == "cuda":
            torch.cuda.empty_cache()
    what = "whole blocks (attention + concat + fusion conv)" if with_fusion else \
        "bare attention blocks (no concat/fusion conv), as the official efficiency scripts time them"
    print(f"ANN, input 1x{C}x{h}x{w}, key/value {Ck}, out {C}, batch 1, eval, no_grad, {device.type}, "
          f"median of {runs} run(s); {what}.")
    print("GFLOPs = matmul + conv FLOPs = 2 x MACs (FlopCounterMode); analytic = 2 x our multiply-add count.")
    print("| block | GFLOPs | analytic GFLOPs | peak memory (MiB) | time (ms) |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['gflops']:.1f} | {r['analytic']:.1f} | {r['peak_mib']:.1f} | {r['ms']:.1f} |")
    nl, ap = rows["NL"], rows["APNB"]
    print(f"| NL / APNB | {ratio(nl['gflops'], ap['gflops'])} | {ratio(nl['analytic'], ap['analytic'])} | "
          f"{ratio(nl['peak_mib'], ap['peak_mib'])} | {ratio(nl['ms'], ap['ms'])} |")
    print("Paper (abstract, GPU, 128x256): APNB ~6x faster and ~28x less memory than NL.\nOfficial analytic count "
          "at 128x256: 618.5 vs 70.6 GMAC (its APNB applies the shared query/key conv twice; ours once: 601.3 vs "
          "53.4).")
    return rows


def context_cost(cfg, device=torch.device("cpu")):
    """GFLOPs and CPU/GPU peak MiB of the context blocks (AFNB + APNB, with fusion) at cfg.crop_size, batch 1."""
    import ann
    if cfg.context == "none":
        return {"gflops": 0.0, "peak_mib": 0.0, "ms": 0.0}
    torch.manual_seed(0)
    net = ann.ANNNet(cfg, pretrained=False).to(device).eval()
    with torch.no_grad():
        res4, res5 = net.backbone(torch.rand(1, 3, cfg.crop_size, cfg.crop_size, device=device))
        fused = net.conv(net.afnb(res4, res5))  # APNB's input
    return measure(lambda: (net.afnb(res4, res5), net.apnb(fused)), device, runs=5)


def run_json(run_dir, name):
    """config.json or metrics.json of a finished train.py run folder, or a FileNotFoundError that says so."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished train.py run (no {name}): train it first, or name "
                                "another folder")
    return json.loads(path.read_text())


def load_run(run_dir):
    """(Config, metrics) of a train.py run folder (config.json is the Config plus "model"; lists become tuples)."""
    import ann
    raw = run_json(run_dir, "config.json")
    names = {f.name for f in fields(ann.Config)}
    cfg = replace(ann.Config(), **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names})
    return cfg, run_json(run_dir, "metrics.json")


def ann_toy_table(run_dirs, device=torch.device("cpu")):
    """Markdown table: context | mIoU | context-block GFLOPs and peak memory, with NL / this ratios."""
    rows, sizes = [], set()
    for run_dir in run_dirs:
        cfg, metrics = load_run(run_dir)
        miou = metrics.get(f"{cfg.eval_datasets[0]}/mIoU", float("nan"))
        rows.append((cfg.context, miou, context_cost(cfg, device)))
        sizes.add(f"{cfg.crop_size}x{cfg.crop_size}")
    nl = next((cost for context, _, cost in rows if context == "nl"), None)
    lines = ["| context | mIoU | context-block GFLOPs | peak memory (MiB) | GFLOPs NL / this | memory NL / this |",
             "|---|---|---|---|---|---|"]
    for context, miou, cost in rows:
        r_f = ratio(nl["gflops"], cost["gflops"]) if nl else "-"
        r_m = ratio(nl["peak_mib"], cost["peak_mib"]) if nl else "-"
        lines.append(f"| {context} | {miou:.2f} | {cost['gflops']:.3f} | {cost['peak_mib']:.2f} | {r_f} | {r_m} |")
    table = "\n".join(lines)
    print(f"Context blocks = AFNB + APNB with fusion, batch 1, input {' / '.join(sorted(sizes))}, {device.type}.")
    print(table)
    return table


def bench_ann(args):
    if args.toy_table:
        return ann_toy_table(args.toy_table, torch.device(args.device))
    return ann_block_table(args.size, torch.device(args.device), args.runs, args.with_fusion)


# ----------------------------------------------------------------------------------------------------------------------
# SAN: trainable parameters of the paper presets (official logs: 8.37M ViT-B/16, 9.32M ViT-L/14) and inference cost
# ----------------------------------------------------------------------------------------------------------------------
def random_text_cache(wrapper, vocab):
    """Puts random unit vectors in the wrapper's text-embedding cache (SAN's and zsseg's `text_cache`, keyed by the
    stripped names) and freezes every weight. With random weights, text embeddings mean nothing either way; encoding
    171 x 14 prompts through a random ViT-B text tower takes minutes on a CPU and is not what is measured, since both
    models cache the vocabulary's text. Frozen weights: inference, and FlopCounterMode's module hooks refuse a
    trainable leaf (zsseg's query embeddings) passed into a submodule under no_grad."""
    owner = next(m for m in wrapper.modules() if hasattr(m, "text_cache"))  # SAN: wrapper.net; zsseg: the wrapper
    dim = owner.clip.text_projection.shape[1]
    owner.text_cache[tuple(n.strip() for n in vocab)] = F.normalize(torch.randn(len(vocab), dim), dim=-1)
    wrapper.requires_grad_(False)


def bench_san(args):
    """Parameters of `paper` and `paper_l14` (random weights), then one 640 px inference of each: GFLOPs, peak memory,
    time. The text embeddings of the 171 COCO-Stuff names are cached before measuring, as SAN caches them (random:
    random_text_cache)."""
    import san
    if args.clip_probe:
        if not Path(args.clip_probe, "toy_clip.pt").is_file():
            raise FileNotFoundError(f"no toy CLIP in {args.clip_probe}/ (toy_clip.json, toy_clip.pt): train one with "
                                    f"python train.py --model toy_clip --out {args.clip_probe}")
        results = clip_region_probe(args.clip_probe, n=args.images or 200)
        print(f"{args.clip_probe}: the regions of {args.images or 200} toy_shapes val scenes named by CLIP's blocks "
              f"after block k, with the ground-truth mask as attention bias (a perfect side network); the toy preset "
              f"recognises after block {san.PRESETS['toy'].clip_feature_layers[-1]}")
        print("| k | objects | named right in the scene (1 / 2 / 3 objects) | in the scene, all | alone | "
              "background named right |")
        print("|---|---|---|---|---|---|")
        for k, counts in results.items():
            share = {key: 100 * c[1] / c[0] for key, c in counts.items()}  # right in the scene, %
            per_size = " / ".join(f"{share[s]:.1f}%" if s in share else "-" for s in (1, 2, 3))
            total, _, alone = counts["all"]
            print(f"| {k} | {total} | {per_size} | {share['all']:.1f}% | {100 * alone / total:.1f}% | "
                  f"{share['background']:.1f}% |")
        return results
    device = torch.device(args.device)
    vocab = [n.strip() for n in (Path(__file__).parent / "class_names" / "coco_stuff_171.txt").open()]
    h, w = map(int, (args.size if args.size != "128x256" else "640x640").lower().split("x"))
    image = {"image": torch.rand(1, 3, h, w, device=device)}
    runs = args.runs or (20 if device.type == "cuda" else 1)
    print(f"SAN, random weights, one {h}x{w} image, vocabulary of {len(vocab)} COCO-Stuff names (text cached), "
          f"{device.type}, median of {runs} run(s).")
    print("| preset | CLIP | trainable params | total params | GFLOPs | peak memory (MiB) | time (ms) |")
    print("|---|---|---|---|---|---|---|")
    for preset, official in (("paper", "8.37M"), ("paper_l14", "9.32M")):
        cfg = san.PRESETS[preset]
        torch.manual_seed(0)
        wrapper = san.build_model(cfg, pretrained=False).to(device).eval()
        trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
        total = sum(p.numel() for p in wrapper.parameters())
        random_text_cache(wrapper, vocab)
        r = measure(lambda: wrapper.predict(image, vocab), device, runs)
        print(f"| {preset} | {cfg.clip_model} | {trainable / 1e6:.2f}M (official log {official}) | {total / 1e6:.1f}M "
              f"| {r['gflops']:.1f} | {r['peak_mib']:.0f} | {r['ms']:.0f} |")
        wrapper = None  # freed before the next model is built


@torch.no_grad()
def clip_region_probe(clip_dir, n=200, seed=0):
    """The ceiling that a frozen CLIP sets for SAN on the toy, at every place SAN could split it into feature extractor
    (blocks 1..k) and recognition (the blocks after k). Each region of n `toy_shapes` val scenes is named among the 13
    class names by san.recognize with the attention bias of a perfect side network:
      - an object: 0 on the CLIP patches its ground-truth mask covers for at least a quarter, -100 elsewhere; once in
        its scene and once alone (the other objects' pixels replaced by background pixels of the same image);
      - the background: 0 on the patches it fills entirely, so that no patch holding part of an object is seen.
    Returns {k: {objects per scene (1, 2, 3, "all"): (count, right in scene, right alone), "background": (count,
    right)}}, for k from 1 to the last block but one (block numbers from 1, as SAN's: k = 9 in ViT-B/16)."""
    import open_clip
    import data
    import san
    cfg = replace(san.PRESETS["toy"], clip_model=f"{clip_dir}/toy_clip.json", clip_pretrained=f"{clip_dir}/toy_clip.pt")
    clip, tokenizer = san.load_clip(cfg)
    visual = clip.eval().visual
    heads, blocks = visual.transformer.resblocks[0].attn.num_heads, len(visual.transformer.resblocks)
    names = data.SHAPE_CLASSES + ["background"]  # the 12 objects, then the background (label 12)
    background = len(names) - 1
    text = san.encode_vocabulary(clip, tokenizer, names)  # (13, D)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def name_regions(image, masks, k, cover_needed):  # (1, 3, H, W), (1, Q, H, W) -> Q predicted class indices
        x = F.interpolate((image - mean) / std, scale_factor=cfg.clip_resolution, mode="bilinear")
        feats, grid = san.clip_features(visual, x, (k,))
        cover = F.adaptive_avg_pool2d(masks, grid)  # (1, Q, h', w'): the share of each CLIP patch the mask covers
        bias = torch.where(cover >= cover_needed, 0.0, -100.0)  # (1, Q, h', w'): 0 where the region covers enough
        bias = bias[:, None].expand(-1, heads, -1, -1, -1)  # (1, heads, Q, h', w'), the same for every head
        return (san.recognize(visual, feats[-1], bias, k, grid)[0] @ text.T).argmax(-1).tolist()

    results = {}
    val = data.ToyShapes("val", cfg.crop_size, classes="all", length=n, seed=seed)
    for k in range(1, blocks):
        counts = {}
        for i in range(n):
            item = val[i]
            image, label = item["image"][None], item["label"]
            objects = [c for c in label.unique().tolist() if c < background]
            if (label == background).any():
                right = name_regions(image, (label == background).float()[None, None], k, 1.0)[0] == background
                total, correct = counts.get("background", (0, 0))
                counts["background"] = (total + 1, correct + right)
            if not objects:
                continue
            masks = torch.stack([(label == c).float() for c in objects])[None]  # (1, Q, H, W)
            in_scene = name_regions(image, masks, k, 0.25)
            pixels = image[0][:, label == background]  # (3, P) pixels to paint the other objects with
            for j, c in enumerate(objects):
                alone, others = image.clone(), (label < background) & (label != c)
                alone[0][:, others] = pixels[:, torch.randint(pixels.shape[1], (int(others.sum()),))]
                right_alone = name_regions(alone, masks[:, j:j + 1], k, 0.25)[0] == c
                for key in (len(objects), "all"):
                    total, scene, lone = counts.get(key, (0, 0, 0))
                    counts[key] = (total + 1, scene + (in_scene[j] == c), lone + right_alone)
        results[k] = dict(sorted(counts.items(), key=lambda kv: str(kv[0])))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# PATN: the generator's parameters (official Market generator: 41.37M), time and memory per image
# ----------------------------------------------------------------------------------------------------------------------
def bench_pose_transfer(args):
    """Generator parameters of PATB / APATB / ResNet-block generators at the official settings, then one image's
    forward at Market's 128x64 (BatchNorm) and DeepFashion's 256x176 (InstanceNorm). With --toy-table: the metrics of
    train.py runs (e.g. the three toy generators) as a markdown table."""
    import pose_transfer as pt
    if args.toy_table:
        lines = ["| block | generator params | SSIM | mask-SSIM | L1 |", "|---|---|---|---|---|"]
        for run_dir in args.toy_table:
            raw = run_json(run_dir, "config.json")
            cfg = replace(pt.PRESETS["toy"], **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()
                                                if k in {f.name for f in fields(pt.Config)}})
            m = run_json(run_dir, "metrics.json")
            n = sum(p.numel() for p in pt.PATNGenerator(cfg).parameters())
            get = lambda k: m.get(f"{cfg.eval_datasets[0]}/{k}", float("nan"))  # noqa: E731
            lines.append(f"| {cfg.block} | {n / 1e6:.2f}M | {get('SSIM'):.3f} | {get('mask-SSIM'):.3f} | "
                         f"{get('L1'):.3f} |")
        print("\n".join(lines))
        return lines
    device = torch.device(args.device)
    runs = args.runs or (20 if device.type == "cuda" else 3)
    print(f"PATN generator, random weights, batch 1, eval, no_grad, {device.type}, median of {runs} run(s).")
    print("| preset | block | input (H x W) | generator params | GFLOPs | peak memory (MiB) | time (ms) |")
    print("|---|---|---|---|---|---|---|")
    for preset in ("market", "deepfashion"):
        for block in ("patb", "apatb", "resnet"):
            cfg = replace(pt.PRESETS[preset], block=block)
            torch.manual_seed(0)
            g = pt.PATNGenerator(cfg).to(device).eval()
            n = sum(p.numel() for p in g.parameters())
            H, W = cfg.image_size
            x = (torch.rand(1, 3, H, W, device=device), torch.rand(1, 18, H, W, device=device),
                 torch.rand(1, 18, H, W, device=device))
            r = measure(lambda: g(*x), device, runs)
            note = " (official 41.37M)" if preset == "market" and block == "patb" else ""
            print(f"| {preset} | {block} | {H} x {W} | {n / 1e6:.2f}M{note} | {r['gflops']:.1f} | "
                  f"{r['peak_mib']:.0f} | {r['ms']:.0f} |")
            g = None  # freed before the next generator is built


# zsseg vs SAN: one CLIP pass per image (SAN) against one CLIP pass per proposal (zsseg); SAN paper: up to 19x faster
# ----------------------------------------------------------------------------------------------------------------------
def bench_zsseg(args):
    """Both paper models (ViT-B/16, random weights) on one 640 px image: params, GFLOPs, peak memory, time, ratio.
    Random masks are all non-empty, so zsseg classifies all 100 proposals: its worst case, the usual one in practice
    (official: every mask with a pixel above 0.5 is cropped)."""
    if args.compare is not None:
        runs = args.compare or ["runs/san", "runs/zsseg"]
        for model, run in zip(("san", "zsseg"), runs):
            if not args.compare and not (Path(run) / "metrics.json").is_file():  # the defaults: train what is missing
                resume = ["--resume"] if (Path(run) / "ckpt.pt").is_file() else []  # an interrupted run continues
                print(f"{run} holds no finished run: training it (python train.py --model {model} --out {run} "
                      f"{' '.join(resume)})")
                subprocess.run([sys.executable, str(Path(__file__).parent / "train.py"), "--model", model,
                                "--out", run, *resume], check=True)
        return compare_runs(*runs, device=torch.device(args.device), n=args.images or 16)
    import san
    import zsseg
    device = torch.device(args.device)
    vocab = [n.strip() for n in (Path(__file__).parent / "class_names" / "coco_stuff_171.txt").open()]
    h, w = map(int, (args.size if args.size != "128x256" else "640x640").lower().split("x"))
    image = {"image": torch.rand(1, 3, h, w, device=device)}
    runs = args.runs or (20 if device.type == "cuda" else 1)
    print(f"Random weights, one {h}x{w} image, {len(vocab)} COCO-Stuff names (text cached), {device.type}, "
          f"median of {runs} run(s).")
    print("| model | trainable params | GFLOPs | peak memory (MiB) | time (ms) |")
    print("|---|---|---|---|---|")
    rows = {}
    for name, module, cfg in (("SAN (ViT-B/16)", san, san.PRESETS["paper"]),
                              ("zsseg (R101 + ViT-B/16)", zsseg, zsseg.PRESETS["paper_coco"])):
        torch.manual_seed(0)
        wrapper = module.build_model(cfg, pretrained=False).to(device).eval()
        trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
        random_text_cache(wrapper, vocab)
        r = rows[name] = measure(lambda: wrapper.predict(image, vocab), device, runs)
        r["trainable"] = trainable
        print(f"| {name} | {r['trainable'] / 1e6:.2f}M | {r['gflops']:.0f} | {r['peak_mib']:.0f} | {r['ms']:.0f} |")
        wrapper = None  # freed before the next model is built
    s, z = rows.values()
    print(f"zsseg / SAN: {ratio(z['gflops'], s['gflops'])} GFLOPs, {ratio(z['ms'], s['ms'])} time, "
          f"{ratio(z['peak_mib'], s['peak_mib'])} memory (SAN paper: up to 19x faster)")
    return rows


def compare_runs(*run_dirs, device=torch.device("cpu"), n=16):
    """Markdown table of train.py runs on the same toy: seen / unseen / hIoU (from metrics.json), trainable
    parameters, and inference time per image on n validation images, measured here in one process."""
    import data
    from checkpoint import config_from_checkpoint, load_checkpoint, load_model_module
    lines = ["| model | seen mIoU | unseen mIoU | hIoU | trainable params | inference (ms / image) |",
             "|---|---|---|---|---|---|"]
    rows = []
    for run in map(Path, run_dirs):
        metrics = run_json(run, "metrics.json")
        ckpt = load_checkpoint(run / "ckpt.pt")
        module = load_model_module(ckpt["model_name"])
        cfg = config_from_checkpoint(module, ckpt)
        wrapper = module.build_model(cfg, pretrained=False)
        wrapper.load_state_dict(ckpt["model"])
        wrapper.to(device).eval()
        ds = data.build_dataset(cfg.eval_datasets[0], "val", cfg)
        images = [{"image": ds[i]["image"][None].to(device)} for i in range(n)]
        with torch.no_grad():
            wrapper.predict(images[0], ds.class_names)  # warm-up, text cache
            start = time.perf_counter()
            for b in images:
                wrapper.predict(b, ds.class_names)
            sync(device)
            ms = 1e3 * (time.perf_counter() - start) / n
        key = cfg.eval_datasets[0]
        rows.append((ckpt["model_name"], *(metrics.get(f"{key}/{m}", float("nan"))
                                           for m in ("mIoU_seen", "mIoU_unseen", "hIoU")),
                     sum(p.numel() for p in wrapper.parameters() if p.requires_grad), ms))
    for name, s, u, h, params, ms in rows:
        lines.append(f"| {name} | {s:.1f} | {u:.1f} | {h:.1f} | {params / 1e6:.2f}M | {ms:.1f} |")
    table = "\n".join(lines)
    print(f"{device.type}, {n} validation images at batch 1, one process; time ratio "
          + ", ".join(f"{r[0]} / {rows[0][0]} = {ratio(r[5], rows[0][5])}" for r in rows[1:]))
    print(table)
    return table


BENCHES = {"ann": bench_ann, "san": bench_san, "zsseg": bench_zsseg,
           "pose_transfer": bench_pose_transfer}  # model name -> function(args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(BENCHES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    parser.add_argument("--size", default="128x256", help="ann: feature map HxW (128x256 as in the paper); "
                        "san: image HxW (default 640x640)")
    parser.add_argument("--runs", type=int, default=0, help="timed runs (default: 20 on CUDA, 1 on CPU)")
    parser.add_argument("--with-fusion", action="store_true", help="ann: time whole blocks, with the fusion conv")
    parser.add_argument("--toy-table", nargs="+", metavar="RUN_DIR",
                        help="ann: mIoU of train.py runs beside their context blocks' cost; pose_transfer: SSIM, "
                             "mask-SSIM and L1 of train.py runs; as a markdown table")
    parser.add_argument("--compare", nargs="*", metavar="RUN_DIR",
                        help="zsseg: train.py runs side by side: accuracy, params, speed (default: runs/san and "
                             "runs/zsseg, each trained first with its toy preset if it holds no finished run)")
    parser.add_argument("--clip-probe", nargs="?", const="runs/toy_clip", metavar="CLIP_DIR",
                        help="san: name each region of the toy scenes with the ground-truth mask as attention bias, "
                             "at every split of the toy CLIP in CLIP_DIR (default runs/toy_clip)")
    parser.add_argument("--images", type=int, default=0,
                        help="--compare: validation images timed per model (default 16); --clip-probe: val scenes "
                             "(default 200)")
    args = parser.parse_args(argv)
    try:
        return BENCHES[args.model](args)
    except (FileNotFoundError, ValueError) as e:  # a missing run or checkpoint: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
