"""Evaluate a checkpoint, or segment one image with any vocabulary; the metrics and plots train.py uses.

    python eval.py --ckpt runs/ann/ckpt.pt                              # the config's evaluation sets
    python eval.py --ckpt runs/san/ckpt.pt --data-root datasets           # real data in another folder
    python eval.py --ckpt runs/san/ckpt.pt --image my.jpg --vocab "cat,dog,grass"

The model is rebuilt from the configuration stored in the checkpoint; no other flag is needed.

Contents: semantic-segmentation metrics (detectron2's SemSegEvaluator definitions, plus the generalized zero-shot
seen / unseen / harmonic split of zsseg) -> evaluation loops -> plots -> command line.
"""
import argparse
import json
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
    return sep.join(f"{k} {v:.2f}" for k, v in metrics.items() if "/IoU/" not in k)


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


def evaluate(wrapper, task, eval_sets, device, rank=0, world=1):
    """{"<dataset>/<metric>": value} over every (name, dataset) pair, with the metric the model's TASK calls for."""
    loops = {"semseg": evaluate_semseg, "clip": evaluate_clip}
    if task not in loops:
        raise NotImplementedError(f"no evaluation for task {task!r}")
    was_training = wrapper.training
    wrapper.eval()
    metrics = {}
    for name, dataset in eval_sets:
        metrics.update({f"{name}/{k}": v for k, v in loops[task](wrapper, dataset, device, rank, world).items()})
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
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "loss" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in dict.fromkeys(k for r in losses for k in r if k.startswith("loss")):  # a key may start later (stages)
        axes[0].plot([r["step"] for r in losses if key in r], [r[key] for r in losses if key in r], label=key)
    axes[0].set(xlabel="iteration", ylabel="loss", yscale="log", title="training losses")
    axes[0].legend(fontsize=8)
    for key in [k for k in (evals[0] if evals else {}) if k.rsplit("/", 1)[-1] in
                ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "zero_shot_acc")]:
        axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
    axes[1].set(xlabel="iteration", ylabel="%", title="evaluation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_predictions(wrapper, dataset, png, device, n=4):
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


@torch.no_grad()
def segment_image(wrapper, image_path, vocab, out_dir, device, top=6):
    """Segment one image with a free vocabulary: an overlay PNG and, for models with mask proposals, the top
    proposals beside their attention-bias maps (SAN) or the masked crop with the class CLIP gave it (zsseg).
    Returns the paths written."""
    from PIL import Image
    plt = _pyplot()
    image = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"))).permute(2, 0, 1).float() / 255
    batch = {"image": image[None].to(device)}
    wrapper.eval()
    pred = wrapper.predict(batch, vocab=vocab).argmax(1)[0].cpu().numpy()  # (H, W)
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


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def main(argv=None):
    import data
    import train
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a ckpt.pt written by train.py")
    parser.add_argument("--model", help="fail unless the checkpoint is of this model")
    parser.add_argument("--data-root", help="root of the real datasets (default: the one stored in the checkpoint)")
    parser.add_argument("--image", help="segment this image instead of evaluating")
    parser.add_argument("--vocab", help="comma-separated class names for --image (default: the training classes)")
    parser.add_argument("--out", help="folder for the outputs (default: the checkpoint's folder)")
    args = parser.parse_args(argv)
    try:
        ckpt = train.load_checkpoint(args.ckpt, args.model)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    module = train.load_model_module(ckpt["model_name"])
    cfg = train.config_from_checkpoint(module, ckpt)
    if args.data_root:
        cfg.data_root = args.data_root
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wrapper = module.build_model(cfg, pretrained=False).to(device)
    wrapper.load_state_dict(ckpt["model"])
    out = Path(args.out or Path(args.ckpt).parent)
    out.mkdir(parents=True, exist_ok=True)
    if args.image:
        vocab = [v.strip() for v in args.vocab.split(",")] if args.vocab else \
            data.build_dataset(cfg.train_dataset, "val", cfg).class_names
        for path in segment_image(wrapper, args.image, vocab, out, device):
            print(f"wrote {path}")
        return
    metrics = evaluate(wrapper, module.TASK, [(n, data.build_dataset(n, "val", cfg)) for n in cfg.eval_datasets],
                       device)
    print(format_metrics(metrics, "\n"))
    (out / "eval_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote {out / 'eval_metrics.json'}")


if __name__ == "__main__":
    main()
