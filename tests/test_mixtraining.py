"""MixTraining: the rating and the merge of the strong view's targets, the strong view's geometry and colour, the
EMA warm-up, one training step of the toy detector, and train.py -> eval.py on a tiny config."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

import mixtraining as mt

REPO = Path(__file__).resolve().parents[1]


TOY = replace(mt.PRESETS["toy"], weights="none")  # a random backbone: no toy_backbone pre-training in a test


def test_rating_and_merge_keep_drop_and_replace_human_boxes():
    gt = torch.tensor([[0.0, 0, 10, 10],      # rated 0.95: kept, overlaps no pseudo box
                       [20, 20, 30, 30],      # rated 0.50: dropped (no strong augmentation for it)
                       [40, 40, 60, 60]])     # rated 0.99, a pseudo box covers it at IoU 0.82: replaced
    gt_labels = torch.tensor([1, 2, 3])
    probs = torch.tensor([0.95, 0.5, 0.99])
    pseudo = torch.tensor([[41.0, 41, 61, 61], [70, 70, 80, 80]])  # the second one fills in a missing box
    pseudo_labels = torch.tensor([3, 4])
    boxes, labels, status = mt.mixed_targets(gt, gt_labels, probs, pseudo, pseudo_labels, 0.9, 0.5)
    assert status.tolist() == [mt.KEPT, mt.DROPPED, mt.REPLACED]
    assert torch.equal(boxes, torch.cat([pseudo, gt[:1]])) and labels.tolist() == [3, 4, 1]
    # a dropped box stays dropped even under a pseudo box; a replaced one needs IoU above the threshold
    _, _, status = mt.mixed_targets(gt, gt_labels, probs, pseudo, pseudo_labels, 0.9, 0.9)
    assert status.tolist() == [mt.KEPT, mt.DROPPED, mt.KEPT]
    # no pseudo boxes (early teacher, or the ablation): the targets are the kept human boxes
    boxes, labels, status = mt.mixed_targets(gt, gt_labels, probs, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert status.tolist() == [mt.KEPT, mt.DROPPED, mt.KEPT] and len(boxes) == 2 and labels.tolist() == [1, 3]


def test_training_step_targets_follow_the_rating(monkeypatch):
    """Inside the wrapper: a human box the teacher rates low is no target of the strong view; pseudo boxes are."""
    torch.manual_seed(0)
    cfg = replace(TOY, gt_score_thr=0.9)
    model = mt.build_model(cfg)
    gt = torch.tensor([[10.0, 10, 50, 50], [80, 80, 120, 120]])
    monkeypatch.setattr(mt, "teacher_detect", lambda t, images: (
        [{"boxes": torch.tensor([[100.0, 10, 140, 40], [0, 0, 5, 5]]), "labels": torch.tensor([2, 1]),
          "scores": torch.tensor([0.95, 0.5])}], None, ImageList(None, [(160, 160)])))
    rated = {}
    monkeypatch.setattr(mt, "score_boxes", lambda t, f, boxes, sizes: rated.update(boxes=boxes) or (
        torch.tensor([[0.0, 0.95, 0.05], [0.0, 0.5, 0.5]]), None))
    monkeypatch.setattr(mt, "geometric_op", lambda h, w: torch.eye(3))  # boxes stay where they are
    cfg = replace(cfg, soft_weights=False)
    model.cfg = cfg
    seen = {}
    monkeypatch.setattr(mt, "detector_losses", lambda det, images, targets, w=None: (seen.update(t=targets), None))
    weak = {"image": [torch.rand(3, 160, 160)], "boxes": [gt], "labels": [torch.tensor([0, 1])]}
    _, counts = model.strong_stream(weak)
    assert torch.equal(rated["boxes"][0], gt)  # the teacher rates the human boxes of the weak view
    target = seen["t"][0]
    assert torch.equal(target["boxes"], torch.tensor([[100.0, 10, 140, 40], [10, 10, 50, 50]]))
    assert target["labels"].tolist() == [2, 1]  # the pseudo box (score 0.95 > 0.9), then the kept human box
    assert model.last_mix[0]["status"].tolist() == [mt.KEPT, mt.DROPPED]
    assert [counts[k].item() for k in ("pseudo_boxes", "gt_kept", "gt_dropped", "gt_replaced")] == [1, 1, 1, 0]


def test_human_boxes_are_warped_into_the_strong_view(monkeypatch):
    shift = torch.tensor([[1.0, 0, 30], [0, 1, -10], [0, 0, 1]])  # translate x by 30, y by -10
    monkeypatch.setattr(mt, "geometric_op", lambda h, w: shift)
    monkeypatch.setattr(mt, "colour_op", lambda x: x)  # geometry only: no colour op, no cutout
    monkeypatch.setattr(mt, "cutout", lambda image, fill: image)
    image = torch.zeros(3, 100, 120)
    image[:, 40:60, 20:50] = 1.0  # a white object at x 20..50, y 40..60
    box = torch.tensor([[20.0, 40, 50, 60]])
    torch.manual_seed(0)
    strong, boxes, keep, G = mt.strong_view(image, box)
    assert torch.equal(G, shift)
    assert torch.allclose(boxes, torch.tensor([[50.0, 30, 80, 50]])) and keep.tolist() == [True]
    # the pixels moved with the box: the object is exactly inside the warped box, and gone from where it was
    assert torch.allclose(strong[:, 30:50, 50:80], torch.ones(1), atol=1e-5)
    assert (strong[:, 40:60, 20:50] < 0.6).all() and (strong > 0.99).sum() == 3 * 20 * 30
    # a box pushed out of the view is dropped
    out, keep = mt.map_boxes(torch.tensor([[100.0, 0, 118, 10], [0, 50, 10, 60]]), shift, (100, 120))
    assert keep.tolist() == [False, True] and out.tolist() == [[30.0, 40, 40, 50]]


def test_rotation_and_shear_enclose_the_corners():
    torch.manual_seed(3)
    m = torch.tensor([[1.0, 0.3, 0], [0, 1, 0], [0, 0, 1]])  # shear x by 0.3
    boxes, _ = mt.map_boxes(torch.tensor([[10.0, 10, 20, 30]]), m, (100, 100))
    assert torch.allclose(boxes, torch.tensor([[13.0, 10, 29, 30]]))


@pytest.mark.parametrize("op", mt.COLOUR_OPS[1:])
def test_every_colour_op_changes_the_image(op):
    """The official Jitter ops (contrast, brightness, hue) return nothing: here each op but identity changes pixels."""
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 32, 32, generator=g) * 200 + 20).to(torch.uint8)
    image[0] = image[0] // 2  # not grey, so that hue and saturation have something to change
    for level in (0.2, 0.8):  # (0.5 is the identity of the enhance ops: factor 0.1 + 1.8 x 0.5 = 1)
        out = mt.colour_op(image, op, level)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        assert (out.int() - image.int()).abs().float().mean() > 1.0, (op, level)
    assert torch.equal(mt.colour_op(image, "identity", 0.5), image)


def test_ema_warm_up_is_linear_over_100_iterations():
    torch.manual_seed(0)
    model = mt.build_model(TOY)
    p_s, p_t = next(model.student.parameters()), next(model.teacher.parameters())
    assert torch.equal(p_s, p_t)  # the teacher starts as a copy
    with torch.no_grad():
        p_s.add_(1.0)
    before = p_t.clone()
    model.on_step_end(49)  # before iteration 50: m = momentum * 50 / 100 (the toy's momentum is 0.99)
    m = model.cfg.ema_momentum * 0.5
    assert torch.allclose(p_t, m * before + (1 - m) * p_s, atol=1e-6)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_one_step_learns_from_both_streams_and_predicts():
    torch.manual_seed(0)
    cfg = replace(TOY, score_thr=0.0, gt_score_thr=0.0)  # a random teacher lets everything through
    model = mt.build_model(cfg)
    view = {"image": [torch.rand(3, 96, 128), torch.rand(3, 128, 96)],
            "boxes": [torch.tensor([[10.0, 10, 60, 70]]), torch.zeros(0, 4)],
            "labels": [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)]}
    losses = model({"sup": view, "weak": view}, step=0)
    assert set(losses) >= {"loss", "loss_normal", "loss_strong", "strong_roi_cls", "pseudo_boxes"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.student.roi_heads.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    si = mt.build_model(replace(cfg, mixed=False))
    assert "loss_strong" not in si({"sup": view, "weak": view}, step=0)
    assert len(model.last_mix) == 2  # the strong views drawn by export(): the last 4, over the last steps
    with torch.no_grad():
        model({"sup": view, "weak": view}, step=1), model({"sup": view, "weak": view}, step=2)
    assert len(model.last_mix) == 4 and model.last_mix[-1]["image"].shape == (3, 128, 96)
    out = model.predict({"image": view["image"]})
    assert [o["boxes"].shape[1] for o in out] == [4, 4] and all((o["labels"] >= 0).all() for o in out)


def test_annotation_noise_removes_and_perturbs_the_fractions_it_says():
    import data
    clean = data.ToyDetection("train", size=96, length=60, seed=0)
    n_boxes = sum(len(clean[i]["boxes"]) for i in range(len(clean)))
    missing = data.ToyDetection("train", size=96, length=60, seed=0, missing=0.3)
    kept = sum(len(missing[i]["boxes"]) for i in range(len(missing)))
    assert n_boxes > 150 and abs(1 - kept / n_boxes - 0.3) < 0.1  # 3 binomial stds
    noisy = data.ToyDetection("train", size=96, length=60, seed=0, loose=0.3, displaced=0.2)
    counts = {"same": 0, "loose": 0, "displaced": 0}
    for i in range(len(clean)):
        a, b = clean[i], noisy[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
        for box, bad in zip(a["boxes"], b["boxes"]):
            if torch.equal(box, bad):
                counts["same"] += 1
            elif (bad[:2] <= box[:2]).all() and (bad[2:] >= box[2:]).all():  # encloses the object: loose
                counts["loose"] += 1
                assert box_iou(box[None], bad[None]).item() > 0.5  # loose, yet still the object's box by IoU 0.5
            else:  # moved: at most the clipping changed its size
                counts["displaced"] += 1
                assert ((bad[2:] - bad[:2]) <= (box[2:] - box[:2]) + 1e-4).all()
    total = sum(counts.values())
    assert abs(counts["loose"] / total - 0.3) < 0.1 and abs(counts["displaced"] / total - 0.2) < 0.09
    assert noisy[3]["boxes"].tolist() == noisy[3]["boxes"].tolist()  # the same noise at every read
    val = data.ToyDetection("val", size=96, length=4, seed=0)
    with pytest.raises(ValueError, match="training split only"):
        data.ToyDetection("val", size=96, loose=0.1)
    with pytest.raises(ValueError, match="fractions"):
        data.ToyDetection("train", size=96, loose=0.7, displaced=0.5)
    cfg = replace(TOY, image_size=96, eval_images=4)
    assert torch.equal(data.build_dataset("toy_detection", "val", cfg)[2]["boxes"], val[2]["boxes"])  # clean


def test_toy_training_set_is_the_first_images_of_the_stream_with_their_noise():
    import data
    cfg = replace(TOY, image_size=96, train_images=5, sup_views=("sup",))
    fixed = data.build_dataset("toy_detection", "train", cfg)
    stream = data.ToyDetection("train", size=96, seed=0, missing=cfg.box_missing, shift=cfg.box_shift,
                               loose=cfg.box_loose, displaced=cfg.box_displaced)
    assert len(fixed) == 5
    assert len(data.build_dataset("toy_detection", "train", replace(cfg, train_images=0))) == 100_000  # the stream
    assert torch.equal(fixed.dataset[4]["image"], stream[4]["image"])
    assert torch.equal(fixed.dataset[4]["boxes"], stream[4]["boxes"])  # the same noisy boxes at every epoch


def test_train_then_eval_round_trip(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tiny = ["--image_size", 64, "--eval_images", 2, "--train_scales", "56,72", "--test_size", 64, "--toy_width", 16,
            "--roi_head_dim", 32, "--rois_per_image", 16, "--max_iters", 2, "--batch_size", 2, "--eval_interval", 2,
            "--num_workers", 0, "--score_thr", 0.0, "--gt_score_thr", 0.0, "--weights", "none"]
    result = subprocess.run([sys.executable, "train.py", "--model", "mixtraining", *map(str, tiny), "--out", tmp_path],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "toy_detection/AP50" in result.stdout and "gt_kept" in (tmp_path / "log.jsonl").read_text()
    for name in ("ckpt.pt", "metrics.json", "predictions.png", "mixed_targets.png"):
        assert (tmp_path / name).is_file(), name
    result = subprocess.run([sys.executable, "eval.py", "--ckpt", tmp_path / "ckpt.pt"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((tmp_path / "metrics.json").read_text())
    assert json.loads((tmp_path / "eval_metrics.json").read_text()) == trained  # the same model, rebuilt from the file
