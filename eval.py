"""Evaluate a checkpoint, or segment one image with any vocabulary; the metrics and plots train.py uses.

    python eval.py --ckpt runs/ann/ckpt.pt                              # the config's evaluation sets
    python eval.py --ckpt runs/san/ckpt.pt --data-root datasets           # real data in another folder
    python eval.py --ckpt runs/san/ckpt.pt --image my.jpg --vocab "cat,dog,grass"
    python eval.py --ckpt runs/soft_teacher/ckpt.pt --image my.jpg         # draws the detections

The model is rebuilt from the configuration stored in the checkpoint (checkpoint.py); no other flag is needed. What
is measured and drawn follows the model file's TASK: EVALUATORS[task] computes the metrics, PLOTTERS[task] draws
train.py's predictions.png.

Contents: semantic-segmentation metrics (detectron2's SemSegEvaluator definitions, plus the generalized zero-shot
seen / unseen / harmonic split of zsseg) -> evaluation loops (COCO box mAP with pycocotools for detection) and
EVALUATORS -> plots and PLOTTERS -> command line.
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
    return sep.join(f"{k} {v:.2f}" for k, v in metrics.items() if "/IoU/" not in k) or "(no evaluation datasets)"


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


EVALUATORS = {"semseg": evaluate_semseg, "clip": evaluate_clip, "detection": evaluate_detection}  # TASK -> fn(wrapper, dataset, device, rank, world)


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


def colourise(label, num_classes):
    label = np.asarray(label).astype(np.int64)
    colours = palette(num_classes)
    return colours[np.where((label >= 0) & (label < num_classes), label, len(colours) - 1)]


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
    for key in [k for k in losses[0] if k.startswith("loss")] if losses else []:
        axes[0].plot([r["step"] for r in losses], [r[key] for r in losses], label=key)
    axes[0].set(xlabel="iteration", ylabel="loss", yscale="log", title="training losses")
    for key in [k for k in (evals[0] if evals else {}) if k.rsplit("/", 1)[-1] in
                ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "zero_shot_acc", "AP", "AP50", "teacher_AP")]:
        axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
    axes[1].set(xlabel="iteration", ylabel="%", title="evaluation")
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
    K = len(dataset.class_names)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for row in range(min(n, len(dataset))):
        item = dataset[row]
        pred = wrapper.predict({"image": item["image"][None].to(device)}, vocab=dataset.class_names).argmax(1)[0]
        for ax, img, title in zip(axes[row], [item["image"].permute(1, 2, 0).numpy(), colourise(item["label"], K),
                                              colourise(pred.cpu(), K)], ["image", "ground truth", "prediction"]):
            ax.imshow(img)
            ax.set_title(title)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
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


PLOTTERS = {"semseg": plot_semseg, "detection": plot_detection}  # TASK -> fn(wrapper, dataset, png, device): train.py's predictions.png


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
    """Segment one image with a free vocabulary: an overlay PNG and, for models with mask proposals (SAN), the top
    proposals beside their attention-bias maps. Returns the paths written."""
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
    overlay = 0.5 * rgb + 0.5 * colourise(pred, len(vocab))
    fig, ax = plt.subplots(figsize=(8, 8 * rgb.shape[0] / rgb.shape[1]))
    ax.imshow(overlay)
    ax.axis("off")
    present = np.unique(pred)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=palette(len(vocab))[c]) for c in present],
              labels=[vocab[c] for c in present], loc="upper right", fontsize=9)
    stem = Path(image_path).stem
    written = [Path(out_dir) / f"{stem}_overlay.png"]
    fig.savefig(written[0], dpi=100, bbox_inches="tight")
    plt.close(fig)
    if hasattr(wrapper, "predict_proposals"):
        p = wrapper.predict_proposals(batch, vocab=vocab)
        probs = p["class_probs"][0, :, :-1]  # (Q, K) without the no-object column
        score, cls = probs.max(1)
        order = score.argsort(descending=True)[:top]
        fig, axes = plt.subplots(2, len(order), figsize=(2.6 * len(order), 5.4), squeeze=False)
        for j, q in enumerate(order.tolist()):
            axes[0, j].imshow(rgb)
            axes[0, j].imshow(p["masks"][0, q].cpu(), alpha=0.6, cmap="viridis", vmin=0, vmax=1)
            axes[0, j].set_title(f"q{q}: {vocab[cls[q]]} {score[q]:.2f}", fontsize=9)
            axes[1, j].imshow(p["attn_bias"][0, :, q].mean(0).float().cpu(), cmap="magma")
            axes[1, j].set_title("attention bias (head mean)", fontsize=8)
            for ax in axes[:, j]:
                ax.axis("off")
        fig.tight_layout()
        written.append(Path(out_dir) / f"{stem}_proposals.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def main(argv=None):
    import data
    from checkpoint import config_from_checkpoint, load_checkpoint, load_model_module
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a ckpt.pt written by train.py")
    parser.add_argument("--model", help="fail unless the checkpoint is of this model")
    parser.add_argument("--data-root", help="root of the real datasets (default: the one stored in the checkpoint)")
    parser.add_argument("--image", help="segment this image instead of evaluating")
    parser.add_argument("--vocab", help="comma-separated class names for --image (default: the training classes)")
    parser.add_argument("--out", help="folder for the outputs (default: the checkpoint's folder)")
    args = parser.parse_args(argv)
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
        if args.image:
            vocab = [v.strip() for v in args.vocab.split(",") if v.strip()] if args.vocab is not None else \
                data.build_dataset(cfg.train_dataset, "val", cfg).class_names
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
