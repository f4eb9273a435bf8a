"""MixTraining: Bootstrap Your Object Detector via Mixed Training.

Mengde Xu, Zheng Zhang, Fangyun Wei, Yutong Lin, Yue Cao, Stephen Lin, Han Hu, Xiang Bai. NeurIPS 2021.
arXiv:2111.03056. Official code: https://github.com/MendelXu/MixTraining (mmdet 2.11; read at ca97b38: the detector
in src/models/detectors/semi_two_stage.py, the teacher's pseudo boxes and ground-truth rating in
teacher_wrapper/two_stage_teacher.py, the target merge in student_wrapper/two_stage_student.py, the augmentations in
src/datasets/pipeline/transform.py and configs/_base_/datasets/disl_coco_detection_default.py, the EMA in
src/utils/hooks.py).

The idea. A detector trained on human boxes alone ("SiTraining": single augmentation, ground-truth targets) suffers
from two things: strong augmentation hurts it, because a heavily distorted object can become unrecognisable, and
human labels are imperfect (missing objects, loose boxes). MixTraining uses every labelled image twice per step: a
normally augmented view trained on the ground truth as usual, and a strongly augmented view (colour op, geometric op,
cutout) whose targets are MIXED. An EMA copy of the detector (the teacher) looks at a weakly augmented view of the
same image: its confident detections (score > 0.9) become pseudo boxes, and it rates every human box by the
probability it gives the box's own class; a human box stays a target of the strong view only if that is > 0.9
(objects too hard to recognise are not strongly augmented). Pseudo boxes replace the human boxes they overlap
(IoU > 0.5): the detector mends loose boxes and finds missing ones ("bootstrapping"). The strong view's
classification loss weighs background RoIs by the teacher's background probability (Soft Teacher), and the strong
stream counts twice. Faster R-CNN R50-FPN on COCO: 41.7 -> 44.0 mAP with no extra data (abstract).

File map (section -> paper):
  Config, PRESETS ........... Sec. 4.1 implementation details; configs/ours/mixed_faster_rcnn_r50_caffe_fpn_coco_8x.py
  colour_op, geometric_op,
  cutout, strong_view ....... Sec. 3.1 "mixed data augmentation": the strong view, made from the weak view
  warp_boxes, warp_image .... boxes and pixels through a view's 3x3 matrix
  build_detector ............ torchvision Faster R-CNN R50-FPN (paper) or a small FPN detector (toy)
  rcnn_losses ............... the torchvision training step written out, with per-RoI classification weights
  teacher_* ................. the teacher's pseudo boxes and its class probabilities for given boxes
  mixed_targets ............. Sec. 3.2 "pseudo boxes" and the rating of the human boxes; the merge (Eq. 1-2 in words)
  MixTraining (wrapper) ..... the training step (normal stream + 2.0 x strong stream), EMA, predict
  export .................... mixed_targets.png: human boxes kept / dropped, pseudo boxes, merged targets

Differences from the official release (each also at its line):
  1. The official strong view never warps the human boxes into its geometry (TransformAnnotation is in no config),
     so rating and merging compare boxes in different frames. Here the boxes are warped (a test checks it).
  2. The official Jitter colour ops (contrast, brightness, "hue") compute an image and never return it (no-ops). Here
     they change the image; "hue" is a real hue shift (the official would blend the image with its Laplacian).
  3. The strong view is drawn from the weak view (its resize and flip, then colour, geometry, cutout); the official
     draws its own resize and flip. Boxes move between the views through the geometric op's matrix alone.
  4. Boxes are mapped by their 4 corners (the enclosing box); the official maps the 4 edge midpoints: the same for
     translation, scale and flip, looser here under rotation and shear.
  5. The rating classifies the human boxes on the weak view clipped to the weak view's size (the official clips at the
     strong view's size, which can make a box degenerate).
  6. torchvision's Faster R-CNN, not mmdet's: ImageNet RGB weights (not caffe BGR), smooth-L1 (beta 1/9) box losses,
     RoIAlign sampling ratio 2. Loss = normal + 2.0 x strong, each stream's losses computed on its own forward (the
     official concatenates both streams in one forward; with frozen BN the result is the same).
  7. The toy preset is ours: a small FPN detector with GroupNorm, trained from scratch, on the synthetic detection
     world with annotation noise (missing, loose and shifted boxes); evaluation uses the clean boxes.

Shapes: B images, N boxes of an image, R sampled RoIs, K classes (labels 0..K-1 outside, 1..K inside torchvision,
whose class 0 is background). Boxes are xyxy in pixels of the view they belong to.
"""
import copy
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, box_iou
from torchvision.transforms.v2 import functional as TF

TASK = "detection"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, RGB on [0, 1]


# ----------------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # data
    train_dataset: str = "coco_detection"  # data.py dataset: all of train2017, labelled
    eval_datasets: tuple = ("coco_detection",)  # data.py datasets for COCO box mAP (val2017)
    data_root: str = "datasets"  # root folder of the real datasets
    sup_views: tuple = ("sup", "weak")  # data.py views of a labelled image: normal stream, teacher's weak view
    train_scales: tuple = (400, 1200)  # short side of the training views, drawn uniformly (long side <= max_size)
    max_size: int = 1333  # long-side cap of every view
    test_size: int = 800  # short side at test time (long side <= max_size)
    num_classes: int = 80  # object classes (background excluded)
    # detector
    backbone: str = "resnet50"  # resnet50 (paper: Faster R-CNN R50-FPN) | toy (small FPN net, GroupNorm)
    pretrained_backbone: str = "ResNet50_Weights.IMAGENET1K_V1"  # torchvision weights name, local .pth, "" (toy)
    fpn_channels: int = 256  # FPN width
    fc_dim: int = 1024  # width of the RoI head's two FC layers
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # one anchor size per FPN level P2-P6 (ratios 0.5, 1, 2)
    rpn_train_proposals: tuple = (2000, 1000)  # RPN proposals before / after NMS per level / image in training
    rpn_test_proposals: tuple = (1000, 1000)  # the same at test time, and for the teacher's pseudo boxes
    rois_per_image: int = 512  # sampled RoIs per image, 25% foreground at most
    # MixTraining
    mixed: bool = True  # MixTraining (true) or the SiTraining baseline (false: normal view, human boxes only)
    pseudo_boxes: bool = True  # ablation: false = strong view on the rated human boxes only
    gt_rating: bool = True  # ablation: false = every human box is a strong-view target (pseudo boxes still replace)
    soft_weights: bool = True  # background RoIs of the strong view weighted by the teacher's background probability
    score_thr: float = 0.9  # teacher score above which a detection is a pseudo box
    gt_score_thr: float = 0.9  # teacher probability of its own class above which a human box is kept
    iou_thr: float = 0.5  # a human box overlapping a pseudo box by more is replaced by it
    strong_weight: float = 2.0  # weight of the strong stream's losses
    ema_momentum: float = 0.999  # teacher = m * teacher + (1 - m) * student
    ema_warmup: int = 100  # m grows linearly from 0 over the first iterations
    # optimisation
    batch_size: int = 64  # labelled images per iteration (each in both streams), over all processes
    max_iters: int = 703_680  # iterations (96 "epochs" of 7330)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # base learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # weight decay
    schedule: str = "step"  # step: x0.1 at each of lr_steps
    lr_steps: tuple = (469_120, 645_040)  # epochs 64 and 88
    warmup_iters: int = 500  # linear warm-up (from ~0)
    amp: bool = True  # mixed precision on CUDA
    eval_interval: int = 29_320  # iterations between evaluations (4 "epochs")
    ckpt_interval: int = 7330  # iterations between checkpoints
    log_interval: int = 50  # iterations between log lines
    num_workers: int = 4  # data loader workers per process
    seed: int = 0  # random seed
    # toy data (data.py's synthetic detection world)
    image_size: int = 160  # toy image side
    eval_images: int = 64  # toy evaluation images
    # the toy's annotation noise (data.ToyDetection; training boxes only, evaluation uses the clean ones)
    box_missing: float = 0.0  # probability that an object has no box
    box_shift: float = 0.0  # std of every box edge's shift, relative to the box's width / height
    box_loose: float = 0.0  # fraction of boxes drawn loose (edges pushed out by 10-35% of the size)
    box_displaced: float = 0.0  # fraction of boxes moved whole by 20-40% of their size


PRESETS = {
    # COCO train2017 -> val2017, Faster R-CNN R50-FPN, the 8x schedule of the headline config: 32 GPUs x 4 images with
    # a 1:1 normal:strong sampler = 64 normal + 64 strong images per iteration; here every item gives both views, so
    # a batch of 64 items. SGD 0.01, warm-up 500, 703,680 iterations, x0.1 at 469,120 and 645,040.
    "paper": Config(),
    # The CPU toy: the synthetic detection world with noisy training boxes, a small FPN detector from scratch.
    "toy": replace(Config(), train_dataset="toy_detection", eval_datasets=("toy_detection",), num_classes=5,
                   train_scales=(128, 192), max_size=320, test_size=160, backbone="toy", pretrained_backbone="",
                   fpn_channels=64, fc_dim=256, anchor_sizes=(16, 32, 64, 128, 256), rpn_train_proposals=(300, 150),
                   rpn_test_proposals=(300, 150),
                   rois_per_image=128, batch_size=4, max_iters=600, lr_steps=(450, 550), warmup_iters=50,
                   optimizer="sgd", lr=0.02, eval_interval=600, ckpt_interval=600, log_interval=25, num_workers=1,
                   ema_momentum=0.99, box_missing=0.3, box_shift=0.04,
                   box_loose=0.25, box_displaced=0.15),
}
PRESETS["toy_si"] = replace(PRESETS["toy"], mixed=False)  # the SiTraining baseline of the toy


# ----------------------------------------------------------------------------------------------------------------------
# The strong view (Sec. 3.1): one colour op, one geometric op, cutout; boxes follow the geometry
# ----------------------------------------------------------------------------------------------------------------------
def _level():
    """The official magnitude: level L drawn from 1..9 of 10, so a magnitude is L / 10 of its maximum."""
    return int(torch.randint(1, 10, ()).item()) / 10


COLOUR_OPS = ("identity", "contrast", "brightness", "hue", "equalize", "autocontrast", "posterize", "saturation",
              "solarize")  # the official nine ("saturation" is its RandomGrayScale)


def colour_op(image, op=None, level=None):
    """One colour op, uniformly from COLOUR_OPS unless `op` is given, at magnitude `level` (drawn: L / 10, L in 1..9).
    image uint8 (3, H, W) -> uint8 (3, H, W)."""
    op = COLOUR_OPS[int(torch.randint(len(COLOUR_OPS), ()).item())] if op is None else op
    level = _level() if level is None else level
    factor = 0.1 + 1.8 * level  # the official enhance factor, 0.28 .. 1.72
    sign = 1 if torch.rand(()) < 0.5 else -1
    # PAPER: the official Jitter ops (contrast, brightness, hue) compute the adjusted image and never return it, so
    # they are no-ops there; here they change the image. Its "hue" blends the image with its Laplacian; ours shifts hue.
    ops = {"identity": lambda x: x,
           "contrast": lambda x: TF.adjust_contrast(x, factor),
           "brightness": lambda x: TF.adjust_brightness(x, factor),
           "hue": lambda x: TF.adjust_hue(x, sign * 0.5 * level),
           "equalize": TF.equalize,
           "autocontrast": TF.autocontrast,
           "posterize": lambda x: TF.posterize(x, max(1, int(4 - 4 * level))),  # the official reaches 0 bits (black)
           "saturation": lambda x: TF.adjust_saturation(x, factor),
           "solarize": lambda x: TF.solarize(x, int(256 - 256 * level))}
    return ops[op](image)


def geometric_op(h, w):
    """One of the official five geometric ops, uniformly, as a 3x3 matrix on view pixels: identity, translate x or y
    by up to 0.18 of the side, rotate by up to 27 degrees about the centre, shear x by up to 0.27 (sign at random)."""
    op, level = int(torch.randint(5, ()).item()), _level()
    sign = 1 if torch.rand(()) < 0.5 else -1
    m = torch.eye(3)
    if op == 1:
        m[0, 2] = sign * 0.2 * level * w
    elif op == 2:
        m[1, 2] = sign * 0.2 * level * h
    elif op == 3:
        a = math.radians(sign * 30 * level)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        c, s = math.cos(a), math.sin(a)
        m = torch.tensor([[c, s, (1 - c) * cx - s * cy], [-s, c, s * cx + (1 - c) * cy], [0, 0, 1.0]])
    elif op == 4:
        m[0, 1] = sign * 0.3 * level  # the official LazyShear is horizontal only
    return m


def cutout(image, fill):
    """1-5 square-ish holes of side r x (H, W), r from the official list, filled with `fill` (3,) (the mean colour:
    the official fills 0 after normalisation). The official list also holds 0.75, a typo we leave out."""
    H, W = image.shape[-2:]
    ratios = (0.05, 0.1, 0.125, 0.15, 0.175, 0.2)
    for _ in range(int(torch.randint(1, 6, ()).item())):
        r = ratios[int(torch.randint(len(ratios), ()).item())]
        h, w = max(1, int(r * H)), max(1, int(r * W))
        y, x = int(torch.randint(0, H - h + 1, ()).item()), int(torch.randint(0, W - w + 1, ()).item())
        image[:, y:y + h, x:x + w] = fill.view(3, 1, 1)
    return image


def warp_boxes(boxes, matrix, size):
    """(N, 4) xyxy boxes through a 3x3 matrix: the box enclosing the 4 mapped corners, clipped to size = (H, W).
    Boxes that come out empty (outside the view) keep zero width or height; callers drop them."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    corners = torch.stack([x1, y1, x2, y1, x1, y2, x2, y2], -1).view(-1, 4, 2)  # (N, 4, 2)
    xy = corners @ matrix[:2, :2].T.to(boxes) + matrix[:2, 2].to(boxes)  # (N, 4, 2)
    out = torch.cat([xy.min(1).values, xy.max(1).values], -1)  # (N, 4)
    limit = torch.tensor([size[1], size[0], size[1], size[0]], dtype=boxes.dtype, device=boxes.device)
    return out.clamp(min=0).minimum(limit)


def nonempty(boxes):
    """(N,) bool: width and height > 0."""
    return ((boxes[:, 2:] - boxes[:, :2]) > 0).all(1)


def warp_image(image, matrix, fill):
    """float (3, H, W) through a 3x3 matrix onto a canvas of the same size; uncovered pixels get `fill` (3,).
    Pixel (i, j) covers [j, j+1) x [i, i+1), the convention of the box coordinates."""
    H, W = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H, device=image.device) + 0.5, torch.arange(W, device=image.device) + 0.5,
                            indexing="ij")
    src = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ torch.linalg.inv(matrix).T.to(image)  # (H, W, 3)
    grid = torch.stack([2 * src[..., 0] / W - 1, 2 * src[..., 1] / H - 1], -1)[None]  # (1, H, W, 2) in [-1, 1]
    shifted = image[None] - fill.view(1, 3, 1, 1)
    return F.grid_sample(shifted, grid, align_corners=False)[0] + fill.view(3, 1, 1)  # zeros outside -> fill


def strong_view(image, boxes):
    """PAPER: the strong view of a weak view (Sec. 3.1). image float (3, h, w) in [0, 1], boxes (N, 4) in the weak view
    -> strong image (3, h, w), the human boxes warped into it (N, 4; empty ones for boxes pushed out), and the 3x3
    matrix G from weak-view to strong-view pixels. The official pipeline: colour op, then geometric op, then cutout."""
    h, w = image.shape[-2:]
    fill = torch.tensor(IMAGENET_MEAN, device=image.device)
    image = colour_op((image * 255).round().to(torch.uint8)).float() / 255
    G = geometric_op(h, w).to(image.device)
    image = warp_image(image, G, fill)
    # PAPER: the human boxes go through the same geometry (the official release leaves them in the unwarped frame).
    boxes = warp_boxes(boxes, G, (h, w))
    return cutout(image, fill), boxes, G


# ----------------------------------------------------------------------------------------------------------------------
# The detector: torchvision's Faster R-CNN, with resizing left to the data pipeline
# ----------------------------------------------------------------------------------------------------------------------
class ViewTransform(GeneralizedRCNNTransform):
    """Normalise and pad to a multiple of 32, never resize: every view arrives at its final size, so boxes stay in the
    pixels of their view (torchvision's transform would rescale images and boxes by itself)."""

    def resize(self, image, target=None):
        return image, target


def load_imagenet_weights(resnet, spec):
    """ImageNet weights into a torchvision ResNet: `spec` is a torchvision weights name or a local state-dict file."""
    if os.path.isfile(spec):
        state = torch.load(spec, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    elif spec.endswith((".pth", ".pt")):
        raise FileNotFoundError(f"pretrained_backbone {spec!r}: no such file")
    else:
        try:
            state = torchvision.models.get_weight(spec).get_state_dict(progress=False)
        except Exception as e:  # offline, unknown name
            raise FileNotFoundError(
                f"could not load the ImageNet backbone weights {spec!r} ({type(e).__name__}: {e}); offline, save them "
                f"on a machine with a network (torchvision.models.get_weight('{spec}').get_state_dict()) and pass "
                "--pretrained_backbone PATH.pth") from e
    missing, unexpected = resnet.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                 strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"backbone weights {spec!r} do not fit a ResNet-50: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def toy_backbone(out_channels):
    """Four stages at strides 4, 8, 16, 32 (widths 32, 64, 128, 256; GroupNorm, as nothing is pre-trained) under an
    FPN: P2-P5 and a max-pooled P6, like R50-FPN's levels."""
    def stage(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(True),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(True))
    body = nn.Sequential(OrderedDict(stem=stage(3, 32, 2), layer1=stage(32, 32, 2), layer2=stage(32, 64, 2),
                                     layer3=stage(64, 128, 2), layer4=stage(128, 256, 2)))
    return BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, [32, 64, 128, 256], out_channels)


def build_detector(cfg, pretrained=True):
    """Faster R-CNN with FPN and K + 1 classes (torchvision: 0 = background), set as mmdet's faster_rcnn_r50_fpn:
    RPN 2000 -> 1000 proposals in training, 1000 at test; 512 RoIs per image, 25% positive, IoU 0.5; test score
    0.05, NMS 0.5, 100 detections. The paper's backbone: ResNet-50 with frozen BN and frozen stem + stage 1."""
    if cfg.backbone == "toy":
        backbone = toy_backbone(cfg.fpn_channels)
    elif cfg.backbone == "resnet50":
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        if pretrained:
            if not cfg.pretrained_backbone:
                raise ValueError("backbone resnet50 needs ImageNet weights: set --pretrained_backbone to a torchvision "
                                 "weights name (ResNet50_Weights.IMAGENET1K_V1) or a local .pth file")
            load_imagenet_weights(resnet, cfg.pretrained_backbone)
        backbone = _resnet_fpn_extractor(resnet, trainable_layers=3)  # stem + layer1 frozen (mmdet frozen_stages=1)
    else:
        raise ValueError(f"backbone must be 'resnet50' or 'toy', got {cfg.backbone!r}")
    C = backbone.out_channels
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
    det = FasterRCNN(backbone, rpn_anchor_generator=anchors,
                     box_head=TwoMLPHead(C * 7 * 7, cfg.fc_dim), box_predictor=FastRCNNPredictor(cfg.fc_dim,
                                                                                                   cfg.num_classes + 1),
                     rpn_pre_nms_top_n_train=cfg.rpn_train_proposals[0],
                     rpn_post_nms_top_n_train=cfg.rpn_train_proposals[1],
                     rpn_pre_nms_top_n_test=cfg.rpn_test_proposals[0],
                     rpn_post_nms_top_n_test=cfg.rpn_test_proposals[1],
                     box_batch_size_per_image=cfg.rois_per_image, box_positive_fraction=0.25,
                     box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100)
    det.transform = ViewTransform(cfg.test_size, cfg.max_size, IMAGENET_MEAN, IMAGENET_STD)
    return det


# ----------------------------------------------------------------------------------------------------------------------
# Losses: torchvision's training step written out, so the sampled RoIs and their weights are ours
# ----------------------------------------------------------------------------------------------------------------------
def weighted_cross_entropy(logits, labels, weights):
    """Soft-teacher RoI classification loss: sum_i w_i CE_i / max(sum_i w_i, 1), over the R sampled RoIs of the batch
    (the official renormalises w to mean 1 before mmdet's mean CE: the same value). logits (R, K+1), labels (R,)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (R,)
    return (weights * ce).sum() / weights.sum().clamp(min=1)


def rcnn_losses(det, images, targets, bg_weights=None):
    """Faster R-CNN losses of one stream: images list of (3, h, w) in [0, 1], targets list of {"boxes" (N, 4),
    "labels" (N,) in 1..K}. bg_weights(rois list of (R_i, 4)) -> list of (R_i,) gives the weight of each sampled RoI
    when it is background (foreground RoIs weigh 1); None = plain mean CE. -> {rpn_cls, rpn_box, rcnn_cls, rcnn_box}."""
    image_list, targets = det.transform(images, targets)
    feats = det.backbone(image_list.tensors)  # {"0": (B, C, H/4, W/4), ..., "pool": (B, C, H/64, W/64)}
    proposals, rpn = det.rpn(image_list, feats, targets)
    heads = det.roi_heads
    rois, _, labels, reg_targets = heads.select_training_samples(proposals, targets)  # R_i per image
    x = heads.box_head(heads.box_roi_pool(feats, rois, image_list.image_sizes))  # (R, fc_dim)
    logits, deltas = heads.box_predictor(x)  # (R, K+1), (R, (K+1)*4)
    labels, reg_targets = torch.cat(labels), torch.cat(reg_targets)  # (R,), (R, 4)
    weights = torch.ones_like(labels, dtype=torch.float32)
    if bg_weights is not None:
        # PAPER (Soft Teacher): a background RoI weighs what the teacher believes it is background.
        weights = torch.where(labels == 0, torch.cat(bg_weights(rois)).to(weights), weights)
    pos = torch.nonzero(labels > 0).squeeze(1)
    deltas = deltas.reshape(len(labels), -1, 4)[pos, labels[pos]]  # (P, 4): the box of the RoI's own class
    rcnn_box = F.smooth_l1_loss(deltas, reg_targets[pos], beta=1 / 9, reduction="sum") / max(labels.numel(), 1)
    return {"rpn_cls": rpn["loss_objectness"], "rpn_box": rpn["loss_rpn_box_reg"],
            "rcnn_cls": weighted_cross_entropy(logits, labels, weights), "rcnn_box": rcnn_box}


# ----------------------------------------------------------------------------------------------------------------------
# The teacher and the mixed targets (Sec. 3.2)
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_detect(teacher, images):
    """The teacher's detections on weak views (test-time RPN 1000/1000, score 0.05, NMS 0.5, 100 per image), with its
    features for later queries. -> (detections list of {boxes, labels 1..K, scores}, feats, image sizes)."""
    image_list, _ = teacher.transform(images)
    feats = teacher.backbone(image_list.tensors)
    proposals, _ = teacher.rpn(image_list, feats)
    detections, _ = teacher.roi_heads(feats, proposals, image_list.image_sizes)
    return detections, feats, image_list.image_sizes


@torch.no_grad()
def teacher_probs(teacher, feats, boxes, image_sizes):
    """The teacher's class probabilities (R_i, K+1) for given boxes (list of (R_i, 4) in its view), no NMS."""
    heads = teacher.roi_heads
    logits, _ = heads.box_predictor(heads.box_head(heads.box_roi_pool(feats, boxes, image_sizes)))
    return logits.float().softmax(-1).split([len(b) for b in boxes])


KEPT, DROPPED, REPLACED = 0, 1, 2  # what becomes of a human box in the strong view


def mixed_targets(gt_boxes, gt_labels, gt_probs, pseudo_boxes, pseudo_labels, gt_score_thr=0.9, iou_thr=0.5):
    """PAPER: the strong view's targets, from human boxes and pseudo boxes in the strong view's pixels.

    A human box is rated by the teacher's probability of its own class, gt_probs (N,): kept if > gt_score_thr, else
    DROPPED (too hard to recognise: no strong augmentation for it). A kept box that overlaps a pseudo box by
    IoU > iou_thr is REPLACED by it. targets = all pseudo boxes + the KEPT human boxes (hard labels, no NMS).
    -> boxes (M, 4), labels (M,), status (N,) of each human box (KEPT / DROPPED / REPLACED)."""
    status = torch.where(gt_probs > gt_score_thr, KEPT, DROPPED)
    if len(pseudo_boxes) and len(gt_boxes):
        overlap = box_iou(gt_boxes, pseudo_boxes).max(1).values  # (N,)
        status = torch.where((status == KEPT) & (overlap > iou_thr), REPLACED, status)
    kept = status == KEPT
    return torch.cat([pseudo_boxes, gt_boxes[kept]]), torch.cat([pseudo_labels, gt_labels[kept]]), status


# ----------------------------------------------------------------------------------------------------------------------
# The training wrapper
# ----------------------------------------------------------------------------------------------------------------------
class MixTraining(nn.Module):
    """The student (trained) and its EMA teacher. Training batches hold two views of each labelled image:
    batch["sup"] (normal augmentation) and batch["weak"] (resize and flip only), each {"image": list of (3, h, w) in
    [0, 1], "boxes": list of (N, 4), "labels": list of (N,) in 0..K-1}; the strong view is made here from the weak one."""

    def __init__(self, cfg, student):
        super().__init__()
        self.cfg, self.student = cfg, student
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval()  # the official _momentum_update(0.0)
        self.last_mix = []  # the strong views of the last step, for export()'s drawing

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher always predicts
        return self

    def forward(self, batch, step):
        """The training step -> {"loss", "loss_normal", "loss_strong", and each stream's four detector losses}."""
        cfg, normal = self.cfg, batch["sup"]
        targets = [{"boxes": b, "labels": l + 1} for b, l in zip(normal["boxes"], normal["labels"])]
        losses = {f"normal_{k}": v for k, v in rcnn_losses(self.student, list(normal["image"]), targets).items()}
        out = {"loss_normal": sum(losses.values())}
        if cfg.mixed:
            losses.update({f"strong_{k}": v for k, v in self.strong_stream(batch["weak"]).items()})
            out["loss_strong"] = sum(v for k, v in losses.items() if k.startswith("strong_"))
        # PAPER: L = L_normal + 2.0 x L_strong.
        return {"loss": out["loss_normal"] + cfg.strong_weight * out.get("loss_strong", 0.0), **out, **losses}

    def strong_stream(self, weak):
        """The strong view's losses on mixed targets, from the weak views: the teacher detects and rates on the weak
        view, the student learns on the strong view."""
        cfg = self.cfg
        images = list(weak["image"])
        detections, feats, sizes = teacher_detect(self.teacher, images)
        # PAPER: the teacher's probability of each human box's own class, on the weak view.
        probs = teacher_probs(self.teacher, feats, list(weak["boxes"]), sizes)
        strong_images, targets, matrices, self.last_mix = [], [], [], []
        for i, image in enumerate(images):
            gt, labels = weak["boxes"][i], weak["labels"][i] + 1  # (N, 4), (N,) in 1..K
            s_image, s_gt, G = strong_view(image, gt)
            size = s_image.shape[-2:]
            gt_probs = probs[i].gather(1, labels[:, None]).squeeze(1)  # (N,)
            if not cfg.gt_rating:
                gt_probs = torch.ones_like(gt_probs)
            det = detections[i]
            confident = det["scores"] > cfg.score_thr  # PAPER: pseudo boxes, score > 0.9
            if not cfg.pseudo_boxes:
                confident &= False
            p_boxes = warp_boxes(det["boxes"][confident], G, size)
            p_labels, p_valid = det["labels"][confident], nonempty(p_boxes)
            g_valid = nonempty(s_gt)  # boxes pushed out of the strong view are no targets
            boxes, t_labels, status = mixed_targets(s_gt[g_valid], labels[g_valid], gt_probs[g_valid],
                                                    p_boxes[p_valid], p_labels[p_valid], cfg.gt_score_thr, cfg.iou_thr)
            strong_images.append(s_image)
            targets.append({"boxes": boxes, "labels": t_labels})
            matrices.append(G)
            if i < 4:
                self.last_mix.append({"image": s_image.detach().cpu(), "gt": s_gt[g_valid].cpu(),
                                      "status": status.cpu(), "pseudo": p_boxes[p_valid].cpu(),
                                      "targets": boxes.cpu()})

        def bg_weights(rois):
            """The teacher's background probability of the student's RoIs, mapped back into the weak view."""
            weak_rois = [warp_boxes(r.detach(), torch.linalg.inv(G), s) for r, G, s in zip(rois, matrices, sizes)]
            return [p[:, 0] for p in teacher_probs(self.teacher, feats, weak_rois, sizes)]

        return rcnn_losses(self.student, strong_images, targets, bg_weights if cfg.soft_weights else None)

    @torch.no_grad()
    def on_step_end(self, step):
        """PAPER (EMA teacher): before iteration t = step + 1, teacher = m teacher + (1 - m) student over the
        parameters, m = 0.999 min(t / 100, 1) (the official MeanTeacherHook's linear warm-up). Buffers are not
        averaged, as in the official code (the paper's BN is frozen; the toy's GroupNorm has none)."""
        t = step + 1
        m = self.cfg.ema_momentum * min(t / self.cfg.ema_warmup, 1.0)
        for p_t, p_s in zip(self.teacher.parameters(), self.student.parameters()):
            p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)

    @torch.no_grad()
    def predict(self, batch, vocab=None):
        """{"image": list (or batch) of (3, H, W) in [0, 1]} -> per image {"boxes" (D, 4) xyxy in the input's pixels,
        "labels" (D,) in 0..K-1, "scores" (D,)}, by the student at the test scale. `vocab` is ignored."""
        was_training = self.training
        self.eval()
        resized, scales = [], []
        for image in batch["image"]:
            H, W = image.shape[-2:]
            s = min(self.cfg.test_size / min(H, W), self.cfg.max_size / max(H, W))
            resized.append(F.interpolate(image[None], (round(H * s), round(W * s)), mode="bilinear",
                                         antialias=True, align_corners=False)[0] if abs(s - 1) > 1e-6 else image)
            scales.append(torch.tensor([W / resized[-1].shape[-1], H / resized[-1].shape[-2]] * 2,
                                       device=image.device))
        outputs = self.student(resized)
        self.train(was_training)
        return [{"boxes": o["boxes"] * s, "labels": o["labels"] - 1, "scores": o["scores"]}
                for o, s in zip(outputs, scales)]


# ----------------------------------------------------------------------------------------------------------------------
# Builders and the training-image drawing
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg, pretrained=True):
    """The training wrapper for `cfg`. pretrained=False skips the ImageNet weights (e.g. to load a checkpoint)."""
    return MixTraining(cfg, build_detector(cfg, pretrained))


def export(wrapper, cfg, out):
    """mixed_targets.png: the strong views of the last training step with the human boxes (green: kept, red dashed:
    dropped by the rating, orange dotted: replaced by a pseudo box), the pseudo boxes (blue) and the merged targets
    (white, thin). -> [path] (nothing for SiTraining)."""
    if not wrapper.last_mix:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    n = len(wrapper.last_mix)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4.4), squeeze=False)
    styles = {KEPT: ("lime", "-"), DROPPED: ("red", "--"), REPLACED: ("orange", ":")}
    for ax, mix in zip(axes[0], wrapper.last_mix):
        ax.imshow(mix["image"].permute(1, 2, 0).clamp(0, 1).numpy())
        for box, status in zip(mix["gt"].tolist(), mix["status"].tolist()):
            colour, style = styles[status]
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec=colour, ls=style, lw=2))
        for box in mix["pseudo"].tolist():
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="deepskyblue", lw=2))
        for box in mix["targets"].tolist():
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="white", lw=0.7))
        counts = [int((mix["status"] == s).sum()) for s in (KEPT, DROPPED, REPLACED)]
        ax.set_title(f"human kept {counts[0]} / dropped {counts[1]} / replaced {counts[2]}\n"
                     f"pseudo {len(mix['pseudo'])} -> targets {len(mix['targets'])}", fontsize=9)
        ax.axis("off")
    fig.suptitle("strong views: human boxes kept (green), dropped by the teacher (red dashed), replaced (orange "
                 "dotted); pseudo boxes (blue); merged targets (white)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "mixed_targets.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------------------------------
# Self-check: python mixtraining.py
# ----------------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = replace(PRESETS["toy"], score_thr=0.0, gt_score_thr=0.0)  # a random teacher: let every box through
    model = build_model(cfg)
    views = {k: {"image": [torch.rand(3, 128, 160), torch.rand(3, 160, 128)],
                 "boxes": [torch.tensor([[10.0, 10, 60, 70]]), torch.zeros(0, 4)],
                 "labels": [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)]} for k in ("sup", "weak")}
    losses = model(views, step=0)
    losses["loss"].backward()
    model.on_step_end(0)
    print(", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
    print([{k: tuple(v.shape) for k, v in p.items()} for p in model.predict({"image": views["sup"]["image"]})])
