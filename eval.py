"""Evaluate a checkpoint, or segment one image with any vocabulary; the metrics and plots train.py uses.

    python eval.py --ckpt runs/ann/ckpt.pt                              # the config's evaluation sets
    python eval.py --ckpt runs/san/ckpt.pt --data-root datasets           # real data in another folder
    python eval.py --ckpt runs/san/ckpt.pt --image my.jpg --vocab "cat,dog,grass"
    python eval.py --ckpt runs/pose_transfer/ckpt.pt --source person.jpg --target-pose keypoints.json
    python eval.py --ckpt runs/soft_teacher/ckpt.pt --image my.jpg         # draws the detections

The model is rebuilt from the configuration stored in the checkpoint (checkpoint.py); no other flag is needed. What
is measured and drawn follows the model file's TASK: EVALUATORS[task] computes the metrics, PLOTTERS[task] draws
train.py's predictions.png.

Contents: semantic-segmentation metrics (detectron2's SemSegEvaluator definitions, plus the generalized zero-shot
seen / unseen / harmonic split of zsseg) -> evaluation loops, top-1 accuracy for classification (pre-training), the
pose-transfer metrics (SSIM, mask-SSIM, L1, IS as the official Pose-Transfer scripts compute them), COCO box mAP with
pycocotools for detection, and EVALUATORS -> plots and PLOTTERS -> command line.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

IGNORE = 255


# ----------------------------------------------------------------------------------------------------------------------
# Semantic-segmentation metrics, from one confusion matrix
# ----------------------------------------------------------------------------------------------------------------------
def confusion_matrix(pred, label, num_classes, ignore=IGNORE):
    """(K, K) int64 counts, rows = ground truth, columns = prediction; pixels labelled `ignore` are skipped."""
    keep = label != ignore
    index = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(conf, class_names=None, seen=None):
    """mIoU, fwIoU, mACC, pACC (in %) as detectron2's SemSegEvaluator defines them, and per-class IoU.

    A class absent from the ground truth but predicted somewhere counts as IoU 0 in mIoU; a class neither present
    nor predicted is left out. With `seen` (indices of the classes seen in training), also mIoU over seen and unseen
    classes and their harmonic mean hIoU = 2 s u / (s + u), zsseg's generalized zero-shot protocol.
    """
    conf = conf.double()
    tp, pos_gt, pos_pred = conf.diag(), conf.sum(1), conf.sum(0)
    acc_valid, iou_valid = pos_gt > 0, (pos_gt + pos_pred) > 0
    iou = tp / (pos_gt + pos_pred - tp).clamp(min=1)
    acc = tp / pos_gt.clamp(min=1)
    freq = pos_gt / pos_gt.sum().clamp(min=1)

    def mean_iou(mask):
        return (100 * iou[acc_valid & mask].sum() / (iou_valid & mask).sum().clamp(min=1)).item()

    everything = torch.ones_like(acc_valid)
    out = {"mIoU": mean_iou(everything), "fwIoU": (100 * (iou * freq)[acc_valid].sum()).item(),
           "mACC": (100 * acc[acc_valid].mean()).item() if acc_valid.any() else 0.0,
           "pACC": (100 * tp.sum() / pos_gt.sum().clamp(min=1)).item()}
    if seen is not None:
        is_seen = torch.zeros_like(acc_valid)
        is_seen[list(seen)] = True
        s, u = mean_iou(is_seen), mean_iou(~is_seen)
        out.update({"mIoU_seen": s, "mIoU_unseen": u, "hIoU": 2 * s * u / (s + u) if s + u > 0 else 0.0})
    names = class_names or [str(i) for i in range(len(iou))]
    out.update({f"IoU/{n}": 100 * iou[i].item() for i, n in enumerate(names) if iou_valid[i]})
    return out


def format_metrics(metrics, sep=" | "):
    """The headline numbers on one line (per-class IoUs stay in metrics.json)."""
    return sep.join(f"{k} {v:.3f}" if abs(v) <= 1 else f"{k} {v:.2f}" for k, v in metrics.items() if "/IoU/" not in k) \
        or "(no evaluation datasets)"  # SSIM-like scores in [0, 1] get 3 decimals


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation loops
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_semseg(wrapper, dataset, device, rank=0, world=1):
    """Whole-image inference, one image at a time; images are split over DDP ranks, the confusion matrix summed."""
    names = dataset.class_names
    conf = torch.zeros(len(names), len(names), dtype=torch.int64)
    for i in tqdm(range(rank, len(dataset), world), desc="eval", leave=False,
                  disable=rank != 0 or not sys.stderr.isatty()):
        item = dataset[i]
        batch = {"image": item["image"][None].to(device), "label": item["label"][None].to(device)}
        pred = wrapper.predict(batch, vocab=names).argmax(1)  # (1, H, W)
        conf += confusion_matrix(pred, batch["label"], len(names), getattr(dataset, "ignore_index", IGNORE))
    if world > 1:
        conf = conf.to(device)
        dist.all_reduce(conf)
    return segmentation_metrics(conf.cpu(), names, dataset.seen_classes)


@torch.no_grad()
def evaluate_clip(wrapper, dataset, device, rank=0, world=1):
    """Zero-shot top-1 accuracy of a CLIP on the single-object images of a captioned dataset."""
    correct = total = 0
    for i in range(rank, len(dataset), world):
        item = dataset[i]
        if len(set(item["classes"])) != 1:
            continue
        logits = wrapper.zero_shot_logits(item["image"][None].to(device), dataset.class_names)
        correct += int(logits.argmax(1).item() == item["classes"][0])
        total += 1
    counts = torch.tensor([correct, total], device=device)
    if world > 1:
        dist.all_reduce(counts)
    return {"zero_shot_acc": 100 * counts[0].item() / max(counts[1].item(), 1)}


@torch.no_grad()
def evaluate_classification(wrapper, dataset, device, rank=0, world=1, batch_size=128):
    """Top-1 accuracy (%) of wrapper.predict's (B, K) logits against each item's "label" (a pre-training such as
    toy_backbone's toy ImageNet); images are split over DDP ranks, the counts summed."""
    correct = total = 0
    indices = list(range(rank, len(dataset), world))
    for j in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[j:j + batch_size]]
        logits = wrapper.predict({"image": torch.stack([it["image"] for it in items]).to(device)})  # (B, K)
        correct += (logits.argmax(1).cpu() == torch.stack([it["label"] for it in items])).sum().item()
        total += len(items)
    counts = torch.tensor([correct, total], device=device)
    if world > 1:
        dist.all_reduce(counts)
    return {"top1": 100 * counts[0].item() / max(counts[1].item(), 1)}


# ----------------------------------------------------------------------------------------------------------------------
# Pose-transfer metrics, as the official tool/getMetrics_{market,fashion}.py compute them
# ----------------------------------------------------------------------------------------------------------------------
LIMB_SEQ = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
            (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))  # tool/pose_utils.py, for drawing
# produce_ma_mask's 23 segments (0-based): the skeleton plus the torso box (hips and shoulders cross-linked)
MASK_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
              (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (1, 16), (1, 17), (8, 11), (11, 5), (8, 2), (16, 17))


def to_uint8(image):
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, as the official test.py saves its outputs."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def repad(image, columns):
    """DeepFashion's re-padding: `columns` white columns on each side (176 -> 256 wide) before SSIM and IS."""
    return np.pad(image, ((0, 0), (columns, columns), (0, 0)), constant_values=255) if columns else image


def pose_ssim(generated, target):
    """SSIM of two (H, W, 3) uint8 images with the official arguments: Gaussian window sigma 1.5, population
    covariance, RGB channels, and data_range = the GENERATED image's max - min (the official quirk)."""
    from skimage.metrics import structural_similarity
    data_range = max(int(generated.max()) - int(generated.min()), 1)  # a flat image: 1 (officially a division by 0)
    return structural_similarity(target, generated, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 channel_axis=2, data_range=data_range)


def limb_mask(keypoints, height, width, radius=4):
    """(H, W) bool mask of the target person for mask-SSIM (official produce_ma_mask): each of the 23 segments as a
    quadrilateral of half-width `radius`, a disk of `radius` at every joint, then a 5x5 dilation and a 5x5 erosion.
    keypoints: (18, 2) (y, x), -1 = missing."""
    from skimage.draw import disk, polygon
    from skimage.morphology import dilation, erosion
    kp = np.asarray(keypoints, np.float64)
    missing = (kp == -1).any(1)
    mask = np.zeros((height, width), bool)
    for f, t in MASK_LIMBS:
        if missing[f] or missing[t]:
            continue
        d = kp[f] - kp[t]
        if not d.any():
            continue
        normal = radius * np.array([-d[1], d[0]]) / np.linalg.norm(d)
        corners = np.stack([kp[f] + normal, kp[f] - normal, kp[t] - normal, kp[t] + normal])
        mask[polygon(corners[:, 0], corners[:, 1], shape=(height, width))] = True
    for y, x in kp[~missing]:
        mask[disk((y, x), radius, shape=(height, width))] = True
    return erosion(dilation(mask, np.ones((5, 5), bool)), np.ones((5, 5), bool))


def inception_score(images, device):
    """(mean, std) Inception Score of a list of (H, W, 3) uint8 images with torch-fidelity (10 splits; its Inception
    is the TensorFlow inception-2015-12-05 graph the papers used, ported); None when its weights cannot be had."""
    try:
        import torch_fidelity
        stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
        m = torch_fidelity.calculate_metrics(input1=_Images(stacked),
                                             isc=True, isc_splits=10, batch_size=64, cuda=device.type == "cuda",
                                             verbose=False, save_cpu_ram=True)
        return m["inception_score_mean"], m["inception_score_std"]
    except Exception as e:  # offline: torch.hub cannot download the weights
        print(f"note: Inception Score skipped: torch-fidelity could not load its Inception weights ({type(e).__name__}"
              f": {str(e)[:120]}); put weights-inception-2015-12-05-6726825d.pth (from the torch-fidelity v0.2.0 "
              "release) in $TORCH_HOME/hub/checkpoints/ to compute it", file=sys.stderr)
        return None


class _Images(torch.utils.data.Dataset):
    """uint8 (3, H, W) images, the input torch-fidelity takes."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@torch.no_grad()
def evaluate_pose(wrapper, dataset, device, rank=0, world=1, batch_size=16):
    """SSIM, mask-SSIM (on datasets with `masked_metrics`, Market), L1 (on the [-1, 1] scale), and the Inception
    Score / mask-IS (on datasets with `inception_score`), averaged over the pairs; pairs are split over ranks."""
    sums, generated, masked = torch.zeros(4, dtype=torch.float64), [], []
    indices = list(range(rank, len(dataset), world))
    for start in tqdm(range(0, len(indices), batch_size), desc="eval", leave=False,
                      disable=rank != 0 or not sys.stderr.isatty()):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        batch = {k: torch.stack([it[k] for it in items]).to(device) for k in ("source", "source_pose", "target_pose")}
        for item, fake in zip(items, wrapper.predict(batch).float().cpu()):
            gen, tgt = to_uint8(fake), to_uint8(item["target"])
            l1 = np.abs(gen / 127.5 - tgt / 127.5).mean()  # 2 (x / 255 - 0.5) on both sides
            mssim = 0.0
            if dataset.masked_metrics:  # Market (never re-padded)
                m = limb_mask(item["target_keypoints"].numpy(), *item["target"].shape[1:])[..., None]  # (H, W, 1)
                mssim = pose_ssim(gen * m, tgt * m)
                masked.append(gen * m)
            gen, tgt = repad(gen, dataset.repad), repad(tgt, dataset.repad)
            sums += torch.tensor([pose_ssim(gen, tgt), mssim, l1, 1.0], dtype=torch.float64)
            generated.append(gen)
    if world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        gathered = [None] * world
        dist.all_gather_object(gathered, (generated, masked) if dataset.inception_score else ([], []))
        generated, masked = sum((g for g, _ in gathered), []), sum((m for _, m in gathered), [])
    n = max(sums[3].item(), 1)
    out = {"SSIM": sums[0].item() / n, "L1": sums[2].item() / n}
    if dataset.masked_metrics:
        out["mask-SSIM"] = sums[1].item() / n
    if dataset.inception_score and rank == 0:
        score = inception_score(generated, device)
        if score is not None:
            out["IS"] = score[0]
            if masked:
                out["mask-IS"] = inception_score(masked, device)[0]
    return out


def coco_box_metrics(coco_gt, detections, image_ids):
    """COCO box AP, AP50, AP75, APs, APm, APl in % (pycocotools COCOeval, as mmdet's CocoDataset.evaluate) of
    `detections` ([{"image_id", "category_id", "bbox": xywh, "score"}]) against the pycocotools COCO `coco_gt`,
    over `image_ids`. No detection at all scores 0; a size with no ground-truth box is -1, as pycocotools has it."""
    import contextlib
    import io
    from pycocotools.cocoeval import COCOeval
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not detections:
        return {n: 0.0 for n in names}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {n: 100 * s if s >= 0 else -1.0 for n, s in zip(names, evaluator.stats[:6].tolist())}


def coco_from_boxes(images, annotations, num_classes):
    """A pycocotools COCO built in memory from image records and xywh box annotations (category ids 1..K)."""
    import contextlib
    import io
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = {"images": images, "annotations": [{**a, "id": i + 1} for i, a in enumerate(annotations)],
                    "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _xywh(boxes):
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()


@torch.no_grad()
def evaluate_detection(wrapper, dataset, device, rank=0, world=1):
    """COCO box mAP of wrapper.predict, one image at a time, the images split over DDP ranks.

    predict({"image": (1, 3, H, W)}) returns [{"boxes": (N, 4) xyxy in the image's pixels, "labels": (N,) 0..K-1,
    "scores": (N,)}]. A wrapper with `eval_variants` (e.g. ("student", "teacher")) is scored once per variant through
    predict(batch, variant=v); the first gives the plain metric names, the others are prefixed ("teacher_AP").
    A dataset with a `.coco` (real COCO) is scored against its own annotation file (crowd regions ignored, areas from
    the masks); the toy's ground truth is built from its items' boxes."""
    variants = getattr(wrapper, "eval_variants", (None,))
    cat_ids = list(getattr(dataset, "cat_ids", range(1, len(dataset.class_names) + 1)))
    images, truths, found = [], [], {v: [] for v in variants}
    for i in tqdm(range(rank, len(dataset), world), desc="eval", leave=False,
                  disable=rank != 0 or not sys.stderr.isatty()):
        item = dataset[i]
        image_id = int(item["image_id"])
        images.append({"id": image_id, "height": item["image"].shape[1], "width": item["image"].shape[2]})
        for (x, y, w, h), label in zip(_xywh(item["boxes"]), item["labels"].tolist()):
            truths.append({"image_id": image_id, "category_id": cat_ids[label], "bbox": [x, y, w, h], "area": w * h,
                           "iscrowd": 0})
        batch = {"image": item["image"][None].to(device)}
        for v in variants:
            pred = (wrapper.predict(batch) if v is None else wrapper.predict(batch, variant=v))[0]
            found[v] += [{"image_id": image_id, "category_id": cat_ids[label], "bbox": box, "score": score}
                         for box, label, score in zip(_xywh(pred["boxes"].float().cpu()), pred["labels"].tolist(),
                                                      pred["scores"].float().tolist())]
    if world > 1:  # every rank gathers everything and scores it (the same numbers on every rank)
        gathered = [None] * world
        dist.all_gather_object(gathered, (images, truths, found))
        images = [x for g in gathered for x in g[0]]
        truths = [x for g in gathered for x in g[1]]
        found = {v: [x for g in gathered for x in g[2][v]] for v in variants}
    coco = getattr(dataset, "coco", None) or coco_from_boxes(images, truths, len(cat_ids))
    metrics = {}
    for j, v in enumerate(variants):
        prefix = "" if j == 0 else f"{v}_"
        metrics.update({prefix + k: m for k, m in coco_box_metrics(coco, found[v], [im["id"] for im in images])
                        .items()})
    return metrics


# TASK -> fn(wrapper, dataset, device, rank, world)
EVALUATORS = {"semseg": evaluate_semseg, "clip": evaluate_clip, "pose": evaluate_pose, "detection": evaluate_detection,
              "classification": evaluate_classification}


def evaluate(wrapper, task, eval_sets, device, rank=0, world=1):
    """{"<dataset>/<metric>": value} over every (name, dataset) pair, with the metric the model's TASK calls for."""
    if eval_sets and task not in EVALUATORS:
        raise NotImplementedError(f"no evaluation for task {task!r}")
    was_training = wrapper.training
    wrapper.eval()
    metrics = {}
    for name, dataset in eval_sets:
        metrics.update({f"{name}/{k}": v for k, v in EVALUATORS[task](wrapper, dataset, device, rank, world).items()})
    wrapper.train(was_training)
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------
def palette(num_classes):
    """A fixed colour per class (tab20, then a seeded random tail); IGNORE is black."""
    import matplotlib
    colours = np.array([matplotlib.colormaps["tab20"](i)[:3] for i in range(20)])
    if num_classes > 20:
        colours = np.concatenate([colours, np.random.default_rng(0).uniform(0, 1, (num_classes - 20, 3))])
    out = np.zeros((256 if num_classes <= 256 else num_classes + 1, 3))
    out[:num_classes] = colours[:num_classes]
    return out


def colourise(label, num_classes, colours=None):
    """(H, W) label -> (H, W, 3) RGB with `colours` (K, 3), palette(num_classes) by default; IGNORE is black."""
    label = np.asarray(label).astype(np.int64)
    colours = palette(num_classes) if colours is None else np.concatenate([colours, np.zeros((1, 3))])
    return colours[np.where((label >= 0) & (label < num_classes), label, len(colours) - 1)]


SHAPE_SHADES = {"square": (1.0, 0.0), "circle": (0.45, 0.55), "triangle": (0.55, 0.0)}  # colour x a + b
SHAPE_MARKERS = {"square": "s", "circle": "o", "triangle": "^"}


def class_colours(names):
    """(K, 3) a colour per class name, so that a reader can map a region to the object it names: a "<colour> <shape>"
    name of the shape toys ("blue square") gets the toy's own colour, as drawn, lighter for circles and darker for
    triangles (as notebooks/san_attention_bias.ipynb draws them), "background" dark grey; any other name keeps its
    palette() colour."""
    import data
    colours = palette(len(names))[:len(names)].copy()
    for k, name in enumerate(names):
        colour, _, shape = name.partition(" ")
        if colour in data.COLOURS and shape in SHAPE_SHADES:
            a, b = SHAPE_SHADES[shape]
            colours[k] = a * np.asarray(data.COLOURS[colour]) + b
        elif name == data.BACKGROUND:
            colours[k] = 0.3
    return colours


def legend_handles(names, colours):
    """Legend patches in `colours`, each with its shape's marker for the shape toys' names (a square, circle or
    triangle), else a plain rectangle."""
    from matplotlib.lines import Line2D
    plt = _pyplot()
    shapes = [n.partition(" ")[2] for n in names]
    return [Line2D([], [], ls="", marker=SHAPE_MARKERS[s], markersize=8, color=c, markeredgecolor="k",
                   markeredgewidth=0.5) if s in SHAPE_MARKERS else plt.Rectangle((0, 0), 1, 1, color=c)
            for s, c in zip(shapes, colours)]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(log_jsonl, png):
    """Every logged loss over the iterations, and the headline metrics at each evaluation."""
    plt = _pyplot()
    records = [json.loads(line) for line in Path(log_jsonl).read_text().splitlines() if line.strip()]
    losses = [r for r in records if any(k.startswith("loss") for k in r)]
    evals = [r for r in records if not any(k.startswith("loss") for k in r)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in dict.fromkeys(k for r in losses for k in r if k.startswith("loss")):  # a key may start later (stages)
        axes[0].plot([r["step"] for r in losses if key in r], [r[key] for r in losses if key in r], label=key)
    axes[0].set(xlabel="iteration", ylabel="loss", yscale="log", title="training losses")
    for key in [k for k in (evals[0] if evals else {}) if k.rsplit("/", 1)[-1] in
                ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "zero_shot_acc", "SSIM", "mask-SSIM", "AP", "AP50",
                 "teacher_AP")]:
        axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
    axes[1].set(xlabel="iteration", ylabel="% (SSIM: 0-1)", title="evaluation")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_semseg(wrapper, dataset, png, device, n=4):
    """Image, ground truth and prediction side by side for the first n images of `dataset`."""
    plt = _pyplot()
    wrapper.eval()
    names, K = dataset.class_names, len(dataset.class_names)
    seen = getattr(dataset, "seen_classes", None)
    pal = class_colours(names)
    fig, axes = plt.subplots(n, 3, figsize=(11, 3 * n), squeeze=False)
    for row in range(min(n, len(dataset))):
        item = dataset[row]
        pred = wrapper.predict({"image": item["image"][None].to(device)}, vocab=names).argmax(1)[0].cpu()
        for ax, img, title in zip(axes[row], [item["image"].permute(1, 2, 0).numpy(), colourise(item["label"], K, pal),
                                              colourise(pred, K, pal)], ["image", "ground truth", "prediction"]):
            ax.imshow(img)
            ax.set_title(title)
            ax.axis("off")
        present = sorted(set(item["label"].unique().tolist()) | set(pred.unique().tolist()))
        handles = legend_handles([names[k] for k in present if k < K], [pal[k] for k in present if k < K])
        labels = [names[k] + (" *" if seen is not None and k not in seen else "") for k in present if k < K]
        axes[row, 2].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False,
                            title="* unseen" if seen is not None else None, title_fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def draw_skeleton(keypoints, height, width):
    """(H, W, 3) float image of the pose: the 19 OpenPose limbs in hues on black, joints as white pixels."""
    import matplotlib
    image = np.zeros((height, width, 3))
    kp = np.asarray(keypoints, np.float64)
    ok = ~(kp == -1).any(1)
    colours = [matplotlib.colormaps["hsv"](i / len(LIMB_SEQ))[:3] for i in range(len(LIMB_SEQ))]
    for (f, t), colour in zip(LIMB_SEQ, colours):
        if ok[f] and ok[t]:
            for a in np.linspace(0, 1, 2 * int(np.hypot(*(kp[t] - kp[f]))) + 2):
                y, x = np.round(kp[f] + a * (kp[t] - kp[f])).astype(int)
                if 0 <= y < height and 0 <= x < width:
                    image[y, x] = colour
    for y, x in kp[ok].astype(int):
        if 0 <= y < height and 0 <= x < width:
            image[y, x] = 1.0
    return image


@torch.no_grad()
def plot_pose(wrapper, dataset, png, device, n=6):
    """Rows of (source, target pose, generated, ground truth) for the first n pairs of `dataset`, two per row."""
    plt = _pyplot()
    wrapper.eval()
    n = min(n, len(dataset))
    items = [dataset[i] for i in range(n)]
    batch = {k: torch.stack([it[k] for it in items]).to(device) for k in ("source", "source_pose", "target_pose")}
    fakes = wrapper.predict(batch).float().cpu()
    H, W = items[0]["target"].shape[1:]
    cols = 2
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, 4 * cols, figsize=(4 * cols * 1.3 * W / H * 2, rows * 2.6), squeeze=False)
    titles = ("source", "target pose", "generated", "ground truth")
    for i, (item, fake) in enumerate(zip(items, fakes)):
        panels = (item["source"].permute(1, 2, 0).numpy(), draw_skeleton(item["target_keypoints"].numpy(), H, W),
                  fake.permute(1, 2, 0).numpy(), item["target"].permute(1, 2, 0).numpy())
        for j, (panel, title) in enumerate(zip(panels, titles)):
            ax = axes[i // cols, 4 * (i % cols) + j]
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def draw_boxes(ax, boxes, labels, names, scores=None, colours=None):
    """Boxes on a matplotlib axis, each with its class name (and score), coloured by class unless `colours`."""
    plt = _pyplot()
    pal = palette(len(names))
    for i, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        colour = pal[label] if colours is None else colours[i]
        ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color=colour, lw=1.5))
        text = names[label] if scores is None else f"{names[label]} {scores[i]:.2f}"
        ax.text(box[0], box[1], text, fontsize=6, color="white", va="bottom",
                bbox=dict(facecolor=colour, alpha=0.7, pad=0.5, lw=0))


@torch.no_grad()
def plot_detection(wrapper, dataset, png, device, n=4, threshold=0.5):
    """Ground-truth boxes above, detections with score >= threshold below, for the first n images of `dataset`."""
    plt = _pyplot()
    wrapper.eval()
    n = min(n, len(dataset))
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.6), squeeze=False)
    for col in range(n):
        item = dataset[col]
        pred = wrapper.predict({"image": item["image"][None].to(device)})[0]
        keep = pred["scores"] >= threshold
        rgb = item["image"].permute(1, 2, 0).numpy()
        for ax, title in zip(axes[:, col], ["ground truth", f"detections (score >= {threshold})"]):
            ax.imshow(rgb)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        draw_boxes(axes[0, col], item["boxes"], item["labels"], dataset.class_names)
        draw_boxes(axes[1, col], pred["boxes"][keep].cpu(), pred["labels"][keep].cpu(), dataset.class_names,
                   pred["scores"][keep].cpu().tolist())
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


@torch.no_grad()
def detect_image(wrapper, image_path, names, out_dir, device, threshold=0.5):
    """Detections with score >= threshold drawn on one image; returns the path of the PNG written."""
    plt = _pyplot()
    image = read_image(image_path)
    wrapper.eval()
    pred = wrapper.predict({"image": image[None].to(device)})[0]
    keep = pred["scores"] >= threshold
    fig, ax = plt.subplots(figsize=(8, 8 * image.shape[1] / image.shape[2]))
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.axis("off")
    draw_boxes(ax, pred["boxes"][keep].cpu(), pred["labels"][keep].cpu(), names, pred["scores"][keep].cpu().tolist())
    path = Path(out_dir) / f"{Path(image_path).stem}_detections.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# TASK -> fn(wrapper, dataset, png, device): train.py's predictions.png
PLOTTERS = {"semseg": plot_semseg, "pose": plot_pose, "detection": plot_detection}


def read_image(path):
    """float32 (3, H, W) RGB in [0, 1]; a missing or unreadable file is a clear error."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    except FileNotFoundError:
        raise FileNotFoundError(f"no image at {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image (expected a PNG, JPEG or other file PIL opens): {e}") \
            from None


@torch.no_grad()
def segment_image(wrapper, image_path, vocab, out_dir, device, top=6):
    """Segment one image with a free vocabulary: an overlay PNG and, for models with mask proposals, the top
    proposals beside their attention-bias maps (SAN) or the masked crop with the class CLIP gave it (zsseg).
    Returns the paths written."""
    plt = _pyplot()
    image = read_image(image_path)
    batch = {"image": image[None].to(device)}
    wrapper.eval()
    scores = wrapper.predict(batch, vocab=vocab)  # (1, K, H, W)
    if scores.shape[1] != len(vocab):
        raise ValueError(f"this model predicts a fixed set of {scores.shape[1]} classes, so --vocab cannot change "
                         f"them (it gave {len(vocab)} names); leave out --vocab, or use an open-vocabulary model "
                         "(san, zsseg)")
    pred = scores.argmax(1)[0].cpu().numpy()  # (H, W)
    rgb = image.permute(1, 2, 0).numpy()
    colours = class_colours(vocab)
    overlay = 0.5 * rgb + 0.5 * colourise(pred, len(vocab), colours)
    fig, ax = plt.subplots(figsize=(8, 8 * rgb.shape[0] / rgb.shape[1]))
    ax.imshow(overlay)
    ax.axis("off")
    present = np.unique(pred)
    ax.legend(handles=legend_handles([vocab[c] for c in present], colours[present]),
              labels=[vocab[c] for c in present], loc="upper right", fontsize=9)
    stem = Path(image_path).stem
    written = [Path(out_dir) / f"{stem}_overlay.png"]
    fig.savefig(written[0], dpi=100, bbox_inches="tight")
    plt.close(fig)
    if hasattr(wrapper, "predict_proposals"):
        p = wrapper.predict_proposals(batch, vocab=vocab)
        probs = p.get("ensemble_probs", p["class_probs"][..., :-1])[0]  # (Q, K) without the no-object column
        score, cls = probs.max(1)
        order = score.argsort(descending=True)[:top]
        second = "attn_bias" in p or "clip_probs" in p  # SAN: attention bias; zsseg: CLIP's class for the crop
        fig, axes = plt.subplots(1 + second, len(order), figsize=(2.6 * len(order), 2.7 * (1 + second)), squeeze=False)
        for j, q in enumerate(order.tolist()):
            axes[0, j].imshow(rgb)
            axes[0, j].imshow(p["masks"][0, q].cpu(), alpha=0.6, cmap="viridis", vmin=0, vmax=1)
            axes[0, j].set_title(f"q{q}: {vocab[cls[q]]} {score[q]:.2f}", fontsize=9)
            if "attn_bias" in p:
                axes[1, j].imshow(p["attn_bias"][0, :, q].mean(0).float().cpu(), cmap="magma")
                axes[1, j].set_title("attention bias (head mean)", fontsize=8)
            elif "clip_probs" in p:  # the masked crop, as CLIP saw it, and the class CLIP gave it
                mask = (p["masks"][0, q] > getattr(wrapper.cfg, "mask_thr", 0.5)).cpu().numpy()
                axes[1, j].imshow(np.where(mask[..., None], rgb, 0.5))
                c_score, c_cls = p["clip_probs"][0, q].max(0)
                axes[1, j].set_title(f"CLIP crop: {vocab[c_cls]} {c_score:.2f}", fontsize=8)
            for ax in axes[:, j]:
                ax.axis("off")
        fig.tight_layout()
        written.append(Path(out_dir) / f"{stem}_proposals.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def read_pose_json(path):
    """{"source": 18 x [y, x], "target": 18 x [y, x]} (pixels of the source image, -1 = missing) -> two (18, 2)
    arrays; a missing file or a malformed one is a clear error."""
    try:
        poses = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no keypoint file at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    try:
        out = [np.asarray(poses[k], np.float32) for k in ("source", "target")]
        assert all(a.shape == (18, 2) for a in out)
    except (KeyError, AssertionError, TypeError, ValueError):
        raise ValueError(f"{path}: expected {{\"source\": [[y, x] x 18], \"target\": [[y, x] x 18]}}, the keypoints "
                         "(rows y, columns x, in the source image's pixels, -1 = missing) in the COCO-18 / OpenPose "
                         "order nose, neck, Rsho, Relb, Rwri, Lsho, Lelb, Lwri, Rhip, Rkne, Rank, Lhip, Lkne, Lank, "
                         "Leye, Reye, Lear, Rear; \"source\" is the person's pose in the image") from None
    return out


@torch.no_grad()
def transfer_pose(wrapper, cfg, image_path, pose_path, out_dir, device):
    """Generate the person of `image_path` in the target pose of `pose_path` (read_pose_json). The image is resized to
    the model's image_size and the keypoints with it. Writes <stem>_posed.png and <stem>_posed_panel.png."""
    import data
    from PIL import Image
    plt = _pyplot()
    image = read_image(image_path)  # (3, h, w)
    source_kp, target_kp = read_pose_json(pose_path)
    H, W = cfg.image_size
    scale = np.array([H / image.shape[1], W / image.shape[2]], np.float32)
    source_kp, target_kp = [np.where(kp == -1, -1, np.round(kp * scale)) for kp in (source_kp, target_kp)]
    image = torch.nn.functional.interpolate(image[None], (H, W), mode="bilinear", antialias=True)[0].clamp(0, 1)
    heat = [data.keypoint_heatmaps(kp, H, W, cfg.heatmap_sigma) for kp in (source_kp, target_kp)]
    wrapper.eval()
    fake = wrapper.predict({"source": image[None].to(device), "source_pose": heat[0][None].to(device),
                            "target_pose": heat[1][None].to(device)})[0].float().cpu()
    stem = Path(image_path).stem
    written = [Path(out_dir) / f"{stem}_posed.png", Path(out_dir) / f"{stem}_posed_panel.png"]
    Image.fromarray(to_uint8(fake)).save(written[0])
    fig, axes = plt.subplots(1, 3, figsize=(6, 3 * H / W / 1.6))
    for ax, panel, title in zip(axes, (image.permute(1, 2, 0).numpy(), draw_skeleton(target_kp, H, W),
                                       fake.permute(1, 2, 0).numpy()), ("source", "target pose", "generated")):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(written[1], dpi=100)
    plt.close(fig)
    return written


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def main(argv=None):
    import data
    from checkpoint import config_from_checkpoint, load_checkpoint, load_model_module
    parser = argparse.ArgumentParser(
        prog="eval.py", description=__doc__.split("\n\n")[0],
        usage="%(prog)s --ckpt CKPT [--data-root DIR] [--image IMG [--vocab NAMES] | --source IMG --target-pose JSON]")
    parser.add_argument("--ckpt", required=True, help="a ckpt.pt written by train.py")
    parser.add_argument("--model", help="fail unless the checkpoint is of this model")
    parser.add_argument("--data-root", help="root of the real datasets (default: the one stored in the checkpoint)")
    parser.add_argument("--image", help="segment this image instead of evaluating")
    parser.add_argument("--vocab", help="comma-separated class names for --image (default: the training classes)")
    parser.add_argument("--source", help="pose transfer: generate this person image in --target-pose")
    parser.add_argument("--target-pose", help="pose transfer: a JSON file {\"source\": 18 x [y, x], \"target\": 18 x "
                                              "[y, x]} of the source image's and the wanted keypoints (-1 = missing)")
    parser.add_argument("--out", help="folder for the outputs (default: the checkpoint's folder)")
    args = parser.parse_args(argv)
    if bool(args.source) != bool(args.target_pose):
        parser.error("--source and --target-pose go together")
    if args.vocab is not None and not args.image:
        parser.error("--vocab names the classes for --image; give --image too")
    try:
        ckpt = load_checkpoint(args.ckpt, args.model)
        module = load_model_module(ckpt["model_name"])
        cfg = config_from_checkpoint(module, ckpt)
        if args.data_root:
            cfg.data_root = args.data_root
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        wrapper = module.build_model(cfg, pretrained=False).to(device)
        wrapper.load_state_dict(ckpt["model"])
        out = Path(args.out or Path(args.ckpt).parent)
        if args.source:
            if module.TASK != "pose":
                raise ValueError(f"--source / --target-pose are for pose-transfer models; {ckpt['model_name']!r} is "
                                 f"a {module.TASK!r} model")
            out.mkdir(parents=True, exist_ok=True)
            for path in transfer_pose(wrapper, cfg, args.source, args.target_pose, out, device):
                print(f"wrote {path}")
            return
        if args.image:
            if args.vocab is not None:
                vocab = [v.strip() for v in args.vocab.split(",") if v.strip()]
            else:  # the training vocabulary: stored in the config (open-vocabulary models), else the dataset's
                vocab = list(getattr(cfg, "class_names", ()) or
                             data.build_dataset(cfg.train_dataset, "val", cfg).class_names)
            if not vocab:
                raise ValueError("--vocab is empty; give comma-separated class names, e.g. --vocab \"cat,dog,grass\"")
            out.mkdir(parents=True, exist_ok=True)
            written = [detect_image(wrapper, args.image, vocab, out, device)] if module.TASK == "detection" else \
                segment_image(wrapper, args.image, vocab, out, device)
            for path in written:
                print(f"wrote {path}")
            return
        eval_sets = [(n, data.build_dataset(n, "val", cfg)) for n in getattr(cfg, "eval_datasets", ())]
        metrics = evaluate(wrapper, module.TASK, eval_sets, device)
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_metrics(metrics, "\n"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote {out / 'eval_metrics.json'}")


if __name__ == "__main__":
    main()
