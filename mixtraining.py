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
  map_boxes, warp_image ..... boxes and pixels through a view's 3x3 matrix
  build_detector ............ torchvision Faster R-CNN R50-FPN (paper) or a small CNN + FPN (toy), whose body
                              toy_fpn loads from the toy ImageNet file (toy_backbone.py; see prerequisites)
  image_list ... score_boxes  hooks into torchvision's detector: features, sampled RoIs, RoI scores of given boxes
  soft_teacher_cls_loss,
  teacher_background_weights,
  detector_losses ........... the training step written out; background RoIs weighted by the teacher (Soft Teacher)
  teacher_detect,
  rate_human_boxes,
  mixed_targets ............. Sec. 3.2: pseudo boxes, the rating of the human boxes, the merge
  MixTraining (wrapper) ..... the training step (normal stream + 2.0 x strong stream), EMA teacher, predict
  export .................... mixed_targets.png: human boxes kept / dropped / replaced, pseudo boxes, merged targets
Copied from soft_teacher.py (marked, and a test keeps each copy identical): the detector, the hooks, map_boxes, the
losses, teacher_background_weights and ema_update.

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
  6. The normal stream's one colour op is data.py's "sup" view (Soft Teacher's nine ops: sharpness instead of hue);
     the official normal stream draws from the same nine ops as its strong view.
  7. torchvision's Faster R-CNN, not mmdet's (see soft_teacher.py): ImageNet RGB weights (not caffe BGR), smooth-L1
     (beta 1/9) box losses. Loss = normal + 2.0 x strong, each stream's losses computed on its own forward (the
     official concatenates both streams in one forward and splits the losses; with frozen BN the result is the same).
  8. The toy preset is ours: a small CNN + FPN with GroupNorm, its body pre-trained on a toy ImageNet
     (toy_backbone.py: one-object synthetic images, no boxes, no detection image), on the synthetic detection world
     with annotation noise (missing, loose, displaced and jittered boxes); evaluation uses the clean boxes.

Shapes: B images, N boxes of an image, R sampled RoIs, K classes (labels 0..K-1 outside, 1..K inside torchvision,
whose class 0 is background). Boxes are xyxy in pixels of the view they belong to.
"""
import copy
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, box_iou, clip_boxes_to_image
from torchvision.ops.poolers import initLevelMapper
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms.v2 import functional as TF

TASK = "detection"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's, RGB on [0, 1]: the fill of warped-out pixels and cutout


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
    # detector (the fields of soft_teacher.build_detector)
    backbone: str = "resnet50"  # "resnet50" (R50-FPN, the paper) or "toy" (a small CNN + FPN, toy_backbone.py init)
    weights: str = "IMAGENET1K_V1"  # ResNet50_Weights name or a .pth state dict; toy: its .pth, or "none" (random)
    toy_width: int = 32  # toy backbone: channels of the first stage (doubled per stage), FPN channels = 2x this
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # one anchor size per FPN level (mmdet: 8 x stride), 3 ratios each
    roi_head_dim: int = 1024  # width of the two shared FC layers of the RoI head
    rpn_pre_nms: tuple = (2000, 1000)  # RPN boxes per image kept before NMS: (training, test and teacher)
    rpn_post_nms: tuple = (1000, 1000)  # RPN proposals per image after NMS: (training, test and teacher)
    rois_per_image: int = 512  # RoIs sampled per image for the RoI head's losses (25% positives at most)
    roi_sampling_ratio: int = 0  # RoIAlign samples per bin side (0 = adaptive, as mmdet)
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
    warmup_iters: int = 500  # linear warm-up iterations
    warmup_ratio: float = 0.0  # warm-up's first lr factor (mmcv's; paper preset 0.001); 0 = train.py's 1/warmup_iters
    grad_clip: float = 0.0  # gradient-norm clipping (0 = none, as the paper)
    amp: bool = True  # mixed precision on CUDA
    eval_interval: int = 29_320  # iterations between evaluations (4 "epochs")
    ckpt_interval: int = 7330  # iterations between checkpoints
    log_interval: int = 50  # iterations between log lines
    num_workers: int = 4  # data loader workers per process
    seed: int = 0  # random seed
    # toy data (data.py's synthetic detection world)
    image_size: int = 160  # toy image side
    train_images: int = 0  # toy training set: the first n images of the stream, read every epoch (0 = 100,000)
    eval_images: int = 64  # toy evaluation images
    # the toy's annotation noise (data.ToyDetection; training boxes only, evaluation uses the clean ones)
    box_missing: float = 0.0  # probability that an object has no box
    box_shift: float = 0.0  # std of every box edge's shift, relative to the box's width / height
    box_loose: float = 0.0  # fraction of boxes drawn loose (edges pushed out by 5-20% of the size: IoU > 0.5)
    box_displaced: float = 0.0  # fraction of boxes moved whole by 20-40% of their size


PRESETS = {
    # COCO train2017 -> val2017, Faster R-CNN R50-FPN, the 8x schedule of the headline config: 32 GPUs x 4 images with
    # a 1:1 normal:strong sampler = 64 normal + 64 strong images per iteration; here every item gives both views, so
    # a batch of 64 items. SGD 0.01, warm-up 500, 703,680 iterations, x0.1 at 469,120 and 645,040.
    "paper": Config(warmup_ratio=0.001),  # mmcv's warm-up: lr x (0.001 + 0.999 i / 500)
    # The CPU toy: the synthetic detection world with noisy training boxes, a small FPN detector whose body is
    # pre-trained on a toy ImageNet (toy_backbone.py; train.py trains it first when the file is missing). Like COCO,
    # a fixed training set read for epochs: 200 images, 12 epochs (mmdet's 1x) at batch 2 (batch 4 for half the
    # steps gave the detector 12 AP less in the same time). The noise is mostly careless boxes: 30% loose (still IoU
    # > 0.5 with the object), 5% of the objects unboxed, 3% of the boxes displaced, every edge jittered by 4%.
    # RoIAlign samples adaptively, as mmdet and the paper preset (torchvision's 2 x 2 per bin took the same time).
    "toy": replace(Config(), train_dataset="toy_detection", eval_datasets=("toy_detection",), num_classes=5,
                   image_size=128, backbone="toy", weights="runs/toy_backbone/toy_backbone.pth", toy_width=16,
                   anchor_sizes=(16, 32, 64, 128), roi_head_dim=256,
                   rpn_pre_nms=(600, 300), rpn_post_nms=(200, 100), rois_per_image=64, roi_sampling_ratio=0,
                   train_scales=(96, 160), max_size=320, test_size=128, batch_size=2, max_iters=1200,
                   lr_steps=(900, 1100), warmup_iters=100, lr=0.02, grad_clip=10.0, ema_momentum=0.99,
                   eval_interval=300, ckpt_interval=300, log_interval=50, num_workers=1, amp=False,
                   train_images=200, box_missing=0.05, box_shift=0.04, box_loose=0.3, box_displaced=0.03),
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


# Copied from soft_teacher.map_boxes
def map_boxes(boxes, matrix, size):
    """(N, 4) xyxy boxes through a 3x3 affine matrix (4 corners mapped, then enclosed), clipped to size = (H, W);
    boxes left with no width or height are dropped. Returns (boxes (M, 4), keep (N,) bool)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    corners = torch.stack([torch.stack([x, y, torch.ones_like(x)], -1) for x, y in
                           ((x1, y1), (x2, y1), (x1, y2), (x2, y2))], 1)  # (N, 4, 3)
    xy = (corners @ matrix.T.to(boxes))[..., :2]  # (N, 4, 2)
    out = torch.cat([xy.min(1).values, xy.max(1).values], -1)  # (N, 4)
    out = torch.stack([out[:, 0].clamp(0, size[1]), out[:, 1].clamp(0, size[0]),
                       out[:, 2].clamp(0, size[1]), out[:, 3].clamp(0, size[0])], -1)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], keep


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
    -> strong image (3, h, w), the human boxes warped into it (M, 4), keep (N,) (False: pushed out of the view), and
    the 3x3 matrix G from weak-view to strong-view pixels. The official order: colour op, geometric op, cutout."""
    h, w = image.shape[-2:]
    fill = torch.tensor(IMAGENET_MEAN, device=image.device)
    image = colour_op((image * 255).round().to(torch.uint8)).float() / 255
    G = geometric_op(h, w).to(image.device)
    image = warp_image(image, G, fill)
    # PAPER: the human boxes go through the same geometry (the official release leaves them in the unwarped frame).
    boxes, keep = map_boxes(boxes, G, (h, w))
    return cutout(image, fill), boxes, keep, G


# ----------------------------------------------------------------------------------------------------------------------
# The detector: torchvision's Faster R-CNN, with resizing left to the data pipeline
# ----------------------------------------------------------------------------------------------------------------------
# Copied from soft_teacher.toy_stages
def toy_stages(width):
    """The toy body: 4 stride-2 stages of two 3x3 convs with GroupNorm, channels width/2, width, 2 width, 4 width.
    Stage i maps (B, c, H, W) -> (B, chans[i], H / 2, W / 2)."""
    chans = [width // 2, width, 2 * width, 4 * width]

    def stage(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(True),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(True))
    return nn.ModuleList([stage(cin, cout) for cin, cout in zip([3] + chans[:-1], chans)])


# Copied from soft_teacher.ToyBackbone
class ToyBackbone(nn.Module):
    """The toy body (toy_stages) + FPN on strides 4, 8, 16, max-pooled to 32.
    (B, 3, H, W) -> {"0": (B, C, H/4, W/4), "1": H/8, "2": H/16, "pool": H/32}, C = out_channels."""

    def __init__(self, width=32):
        super().__init__()
        self.stages = toy_stages(width)
        self.out_channels = 2 * width
        self.fpn = torchvision.ops.FeaturePyramidNetwork([width, 2 * width, 4 * width], self.out_channels,
                                                         LastLevelMaxPool())

    def forward(self, x):
        feats = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (B, chans[i], H / 2^(i+1), W / 2^(i+1))
            if i > 0:
                feats[str(i - 1)] = x
        return self.fpn(feats)


# Copied from soft_teacher.resnet50_fpn
def resnet50_fpn(weights):
    """ResNet-50 + FPN with frozen BN and frozen stem + stage 1 (mmdet frozen_stages=1, norm_eval), initialised from
    torchvision's ImageNet weights by name (e.g. IMAGENET1K_V1) or from a local state-dict file."""
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)  # FrozenBatchNorm2d
    if weights.endswith((".pth", ".pt")):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"no backbone weights at {weights} (expected a torchvision ResNet-50 state dict, "
                                    "e.g. resnet50-0676ba61.pth)") from None
    else:
        try:
            state = torchvision.models.ResNet50_Weights[weights].get_state_dict(progress=True)
        except KeyError:
            raise ValueError(f"unknown ResNet50_Weights {weights!r}; names: "
                             f"{', '.join(w.name for w in torchvision.models.ResNet50_Weights)}, or a .pth") from None
        except OSError as e:  # no network
            raise FileNotFoundError(f"cannot download ResNet50_Weights.{weights} ({e}); download it elsewhere and pass "
                                    "--weights path/to/resnet50.pth") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = backbone.body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} is not a ResNet-50 state dict (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return backbone


# Copied from soft_teacher.toy_fpn
def toy_fpn(weights, width, load=True):
    """ToyBackbone with its body initialised from the toy ImageNet classifier's file (toy_backbone.py: `stages.*` and
    `fc.*`, as a torchvision ResNet file; fc is dropped) and its first stage frozen (mmdet frozen_stages=1); load=False
    skips the file (a checkpoint follows). weights "none": random initialisation, nothing frozen."""
    backbone = ToyBackbone(width)
    if weights == "none":
        return backbone
    backbone.stages[0].requires_grad_(False)  # mmdet frozen_stages=1: the first stage keeps its pre-trained weights
    if not load:
        return backbone
    made_by = "it is trained by `python train.py --model toy_backbone`"
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no toy backbone weights at {weights} ({made_by})") from None
    except Exception:  # not a torch file, or one with pickled objects
        raise ValueError(f"{weights} is not a state-dict file ({made_by})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{weights} is not a state dict ({made_by})")
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k: v.shape for k, v in backbone.stages.state_dict(prefix="stages.").items()}
    if {k: v.shape for k, v in body.items()} != expected:
        raise ValueError(f"{weights} is not a toy backbone of width {width} (its keys or shapes differ; {made_by}"
                         f" --toy_width {width})")
    backbone.load_state_dict(body, strict=False)  # the FPN stays randomly initialised
    return backbone


# Copied from soft_teacher.prerequisites
def prerequisites(cfg):
    """{file: model that trains it}: train.py pre-trains the toy backbone first when its weights are missing."""
    return {cfg.weights: "toy_backbone"} if cfg.backbone == "toy" and cfg.weights != "none" else {}


# Copied from soft_teacher.build_detector
def build_detector(cfg, pretrained=True):
    """torchvision FasterRCNN with mmdet's faster_rcnn_r50_fpn settings (RPN 2000 pre-NMS / 1000 post-NMS per image
    in training, 1000 / 1000 at test; RoI sampler 512 at 25% positives; test score 0.05, NMS 0.5, 100 boxes).
    Training views are resized by the data pipeline, so the detector's own transform only normalises and pads to 32
    (image_list); at test it resizes to test_size as well (predict)."""
    if cfg.backbone == "resnet50":
        if not pretrained:  # a checkpoint will overwrite every weight: skip the download
            backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
        else:
            backbone = resnet50_fpn(cfg.weights)
        if pretrained and cfg.weights == "none":
            raise ValueError("resnet50 needs ImageNet weights (--weights IMAGENET1K_V1 or a .pth); 'none' is for the toy")
    elif cfg.backbone == "toy":
        backbone = toy_fpn(cfg.weights, cfg.toy_width, load=pretrained)
    else:
        raise ValueError(f"backbone must be 'resnet50' or 'toy', got {cfg.backbone!r}")
    levels = len(cfg.anchor_sizes)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    names = [str(i) for i in range(levels - 1)]  # RoIAlign on every level but the max-pooled one (P2-P5)
    roi_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=cfg.roi_sampling_ratio)
    # The levels' scales (P2 = 1/4, ...), fixed as mmdet's featmap_strides: torchvision would infer them from the first
    # batch and keep them, and a padded training view can round the coarsest one wrong for the rest of the run.
    roi_pool.scales = [2.0 ** -(i + 2) for i in range(len(names))]
    roi_pool.map_levels = initLevelMapper(2, len(names) + 1, canonical_scale=224, canonical_level=4)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, cfg.roi_head_dim)
    return FasterRCNN(backbone, num_classes=None, min_size=cfg.test_size, max_size=cfg.max_size,
                      rpn_anchor_generator=anchors, box_roi_pool=roi_pool, box_head=box_head,
                      box_predictor=FastRCNNPredictor(cfg.roi_head_dim, cfg.num_classes + 1),
                      rpn_pre_nms_top_n_train=cfg.rpn_pre_nms[0], rpn_post_nms_top_n_train=cfg.rpn_post_nms[0],
                      rpn_pre_nms_top_n_test=cfg.rpn_pre_nms[1], rpn_post_nms_top_n_test=cfg.rpn_post_nms[1],
                      box_score_thresh=0.05, box_nms_thresh=0.5,
                      box_detections_per_img=100, box_batch_size_per_image=cfg.rois_per_image,
                      box_positive_fraction=0.25)


# ----------------------------------------------------------------------------------------------------------------------
# Hooks into torchvision's detector: what GeneralizedRCNN.forward computes but does not return
# ----------------------------------------------------------------------------------------------------------------------
# Copied from soft_teacher.image_list
def image_list(detector, images):
    """Already-resized views -> an ImageList: normalised with the detector's mean/std, padded to a multiple of 32.
    images: list of (3, h, w) in [0, 1]; ImageList.tensors (B, 3, H, W), .image_sizes [(h, w)]."""
    normalised = [detector.transform.normalize(im) for im in images]
    return ImageList(detector.transform.batch_images(normalised, size_divisible=32), [im.shape[-2:] for im in images])


# Copied from soft_teacher.roi_head_outputs
def roi_head_outputs(detector, feats, rois, image_sizes):
    """RoIAlign + the two FC layers + the predictor for given boxes. rois: list of (R_i, 4) in view pixels.
    Returns class_logits (R, K+1) and box_regression (R, (K+1) * 4), the images' RoIs concatenated."""
    heads = detector.roi_heads
    pooled = heads.box_roi_pool(feats, rois, image_sizes)  # (R, C, 7, 7)
    return heads.box_predictor(heads.box_head(pooled))


# Copied from soft_teacher.sample_rois
def sample_rois(detector, proposals, targets):
    """torchvision's RoI assignment and sampling (MaxIoU 0.5, 512 RoIs per image, <= 25% positives, the targets added
    as proposals). targets: list of {"boxes" (N, 4), "labels" (N,) in 1..K}. Returns the sampled RoIs (list of
    (R_i, 4)), their labels (list of (R_i,), 0 = background) and regression targets (list of (R_i, 4))."""
    rois, _, labels, regression_targets = detector.roi_heads.select_training_samples(proposals, targets)
    return rois, labels, regression_targets


# Copied from soft_teacher.score_boxes
@torch.no_grad()
def score_boxes(detector, feats, boxes, image_sizes):
    """Class probabilities (R, K+1) (column 0 = background) and class-specific refined boxes (R, K+1, 4) of the
    detector's RoI head for given boxes (list of (R_i, 4)), no NMS and no score threshold."""
    logits, regression = roi_head_outputs(detector, feats, boxes, image_sizes)
    refined = detector.roi_heads.box_coder.decode(regression, boxes)  # (R, K+1, 4)
    refined = torch.cat([clip_boxes_to_image(r, size) for r, size in  # clipped to the image, as the official code
                         zip(refined.split([len(b) for b in boxes]), image_sizes)])
    return logits.softmax(-1), refined


# ----------------------------------------------------------------------------------------------------------------------
# Losses: torchvision's training step written out, so the sampled RoIs and their weights are ours
# ----------------------------------------------------------------------------------------------------------------------
# Copied from soft_teacher.soft_teacher_cls_loss
def soft_teacher_cls_loss(class_logits, labels, weights):
    """Sec. 3.2, the soft-teacher classification loss as the official code computes it (issue #19: the paper's Eq. (3)
    normalises foreground and background separately, the code does not):
      L_cls = sum_i w_i CE(p_i, y_i) / max(sum_i w_i, 1),  w_i = 1 (foreground RoI), r_i (background RoI)
    with r_i the teacher's background probability of RoI i. class_logits (R, K+1), labels (R,), weights (R,)."""
    ce = F.cross_entropy(class_logits, labels, reduction="none")  # (R,)
    return (weights * ce).sum() / weights.sum().clamp(min=1.0)


# Copied from soft_teacher.box_reg_loss
def box_reg_loss(box_regression, labels, regression_targets):
    """Smooth-L1 (beta 1/9) on the positive RoIs' class-specific deltas, summed and divided by the number of sampled
    RoIs (torchvision's fastrcnn_loss box term). box_regression (R, (K+1) * 4), labels (R,), targets (R, 4)."""
    pos = torch.where(labels > 0)[0]
    deltas = box_regression.unflatten(1, (-1, 4))[pos, labels[pos]]  # (R, K+1, 4) -> (P, 4); R may be 0
    loss = F.smooth_l1_loss(deltas, regression_targets[pos], beta=1 / 9, reduction="sum")
    return loss / max(labels.numel(), 1)


# Copied from soft_teacher.teacher_background_weights
@torch.no_grad()
def teacher_background_weights(teacher, feats, image_sizes, rois, labels, to_teacher):
    """Sec. 3.2, the soft teacher: the weight of each sampled student RoI, 1 for a foreground RoI and, for a
    background one, the teacher's background probability of that RoI mapped into the teacher's view.
    feats, image_sizes: the teacher's features and view sizes; rois: list of (R_i, 4) student-view boxes; labels (R,)
    (0 = background); to_teacher: list of 3x3 student-view -> teacher-view matrices. Returns (R,) weights."""
    mapped = [map_boxes(r, m, size) for r, m, size in zip(rois, to_teacher, image_sizes)]
    kept = torch.cat([k for _, k in mapped])  # a RoI with no area left in the teacher's view keeps weight 1
    p_bg = torch.ones(len(labels), device=labels.device)
    if kept.any():
        p_bg[kept] = score_boxes(teacher, feats, [b for b, _ in mapped], image_sizes)[0][:, 0]  # PAPER: r_j = p_bg
    return torch.where(labels == 0, p_bg, torch.ones_like(p_bg))


# Copied from soft_teacher.detector_losses
def detector_losses(detector, images, targets, roi_weights=None):
    """The Faster R-CNN losses of `detector` on views (list of (3, h, w)) with targets (list of {"boxes" (N, 4),
    "labels" (N,) in 1..K}): RPN objectness and box, RoI classification (weighted by roi_weights(rois, labels) -> (R,);
    None: all 1, plain mean CE) and box regression. Returns the losses {rpn_cls, rpn_reg, roi_cls, roi_reg} and
    (ImageList, features, RPN proposals) for further RoI samplings on the same views."""
    views = image_list(detector, images)
    feats = detector.backbone(views.tensors)
    proposals, rpn = detector.rpn(views, feats, targets)
    rois, labels, reg_targets = sample_rois(detector, proposals, targets)
    logits, regression = roi_head_outputs(detector, feats, rois, views.image_sizes)
    labels, reg_targets = torch.cat(labels), torch.cat(reg_targets)
    weights = torch.ones_like(logits[:, 0]) if roi_weights is None else roi_weights(rois, labels)
    return {"rpn_cls": rpn["loss_objectness"], "rpn_reg": rpn["loss_rpn_box_reg"],
            "roi_cls": soft_teacher_cls_loss(logits, labels, weights),
            "roi_reg": box_reg_loss(regression, labels, reg_targets)}, (views, feats, proposals)


# ----------------------------------------------------------------------------------------------------------------------
# The teacher and the mixed targets (Sec. 3.2)
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_detect(teacher, images):
    """The teacher's detections on weak views (list of (3, h, w)): test-time RPN, RoI head, score 0.05, class-wise NMS
    0.5, 100 per image. -> (list of {"boxes" (D, 4), "labels" (D,) in 1..K, "scores" (D,)}, features, ImageList)."""
    views = image_list(teacher, images)
    feats = teacher.backbone(views.tensors)
    proposals, _ = teacher.rpn(views, feats)
    detections, _ = teacher.roi_heads(feats, proposals, views.image_sizes)
    return detections, feats, views


@torch.no_grad()
def rate_human_boxes(teacher, feats, image_sizes, boxes, labels):
    """PAPER: the teacher's probability of each human box's own class, on the weak view: list of (N_i,), for boxes
    (list of (N_i, 4), weak-view pixels, clipped to the weak view) and labels (list of (N_i,) in 1..K)."""
    if not sum(len(b) for b in boxes):
        return [b.new_zeros(0) for b in boxes]
    probs = score_boxes(teacher, feats, boxes, image_sizes)[0]  # (N, K+1)
    own = probs.gather(1, torch.cat(labels)[:, None]).squeeze(1)  # (N,)
    return list(own.split([len(b) for b in boxes]))


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
# Copied from soft_teacher.ema_update
@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher = m teacher + (1 - m) student over the parameters; buffers (frozen BN statistics) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


class MixTraining(nn.Module):
    """The student (trained) and its EMA teacher. Training batches hold two views of each labelled image:
    batch["sup"] (normal augmentation) and batch["weak"] (resize and flip only), each {"image": list of (3, h, w) in
    [0, 1], "boxes": list of (N, 4), "labels": list of (N,) in 0..K-1}; the strong view is made here from the weak
    one."""

    def __init__(self, cfg, student):
        super().__init__()
        self.cfg, self.student = cfg, student
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval()  # the official _momentum_update(0.0)
        self.last_mix = []  # the last 4 strong views (of the last steps), for export()'s drawing

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher always predicts
        return self

    def forward(self, batch, step):
        """The training step -> {"loss", "loss_normal", "loss_strong", each stream's four detector losses, and the
        strong view's mean number of pseudo boxes, kept, dropped and replaced human boxes per image}."""
        cfg, normal = self.cfg, batch["sup"]
        targets = [{"boxes": b, "labels": l + 1} for b, l in zip(normal["boxes"], normal["labels"])]
        losses = {f"normal_{k}": v for k, v in detector_losses(self.student, list(normal["image"]), targets)[0].items()}
        out = {"loss_normal": sum(losses.values())}
        if cfg.mixed:
            strong, counts = self.strong_stream(batch["weak"])
            losses.update({f"strong_{k}": v for k, v in strong.items()})
            out["loss_strong"] = sum(strong.values())
            out.update(counts)
        # PAPER: L = L_normal + 2.0 x L_strong.
        return {"loss": out["loss_normal"] + cfg.strong_weight * out.get("loss_strong", 0.0), **out, **losses}

    def strong_stream(self, weak):
        """The strong view's losses on mixed targets, from the weak views: the teacher detects and rates on the weak
        view, the student learns on the strong view made from it. -> (losses, counts)."""
        cfg = self.cfg
        images = list(weak["image"])
        gt_labels = [l + 1 for l in weak["labels"]]  # (N_i,) in 1..K
        detections, feats, views = teacher_detect(self.teacher, images)
        rated = rate_human_boxes(self.teacher, feats, views.image_sizes, list(weak["boxes"]), gt_labels)
        strong_images, targets, to_weak = [], [], []
        counts = torch.zeros(4)  # pseudo boxes, kept, dropped, replaced human boxes
        for i, image in enumerate(images):
            s_image, s_gt, inside, G = strong_view(image, weak["boxes"][i])
            det = detections[i]
            confident = det["scores"] > cfg.score_thr  # PAPER: pseudo boxes, score > 0.9
            if not cfg.pseudo_boxes:  # ablation: strong augmentation on the rated human boxes only
                confident = torch.zeros_like(confident)
            p_boxes, p_inside = map_boxes(det["boxes"][confident], G, s_image.shape[-2:])
            p_labels = det["labels"][confident][p_inside]
            probs = rated[i][inside] if cfg.gt_rating else torch.ones(len(s_gt))  # ablation: no rating, all kept
            boxes, labels, status = mixed_targets(s_gt, gt_labels[i][inside], probs.to(s_gt), p_boxes, p_labels,
                                                  cfg.gt_score_thr, cfg.iou_thr)
            strong_images.append(s_image)
            targets.append({"boxes": boxes, "labels": labels})
            to_weak.append(torch.linalg.inv(G))
            counts += torch.tensor([len(p_boxes), *[(status == s).sum().item() for s in (KEPT, DROPPED, REPLACED)]])
            self.last_mix = self.last_mix[-3:] + [{"image": s_image.detach().cpu(), "gt": s_gt.cpu(),
                                                   "status": status.cpu(), "pseudo": p_boxes.cpu(),
                                                   "targets": boxes.cpu()}]

        def roi_weights(rois, labels):  # PAPER (Soft Teacher): background RoIs weigh the teacher's p_bg
            return teacher_background_weights(self.teacher, feats, views.image_sizes, rois, labels, to_weak)

        losses, _ = detector_losses(self.student, strong_images, targets, roi_weights if cfg.soft_weights else None)
        counts = dict(zip(("pseudo_boxes", "gt_kept", "gt_dropped", "gt_replaced"), counts / len(images)))
        return losses, counts

    def on_step_end(self, step):
        """PAPER (EMA teacher): before iteration t = step + 1, teacher = m teacher + (1 - m) student, with the official
        MeanTeacherHook's linear warm-up m = 0.999 min(t / 100, 1) (Soft Teacher's is min(0.999, t / (t + 1)))."""
        t = step + 1
        ema_update(self.teacher, self.student, self.cfg.ema_momentum * min(t / self.cfg.ema_warmup, 1.0))

    @torch.no_grad()
    def predict(self, batch, vocab=None):
        """{"image": (B, 3, H, W) or a list of (3, H, W) in [0, 1]} -> per image {"boxes" (D, 4) xyxy in the input's
        pixels, "labels" (D,) in 0..K-1, "scores" (D,)}: the student's (the official inference_on=student),
        resized to test_size inside torchvision's transform. `vocab` is ignored."""
        was_training = self.student.training
        self.student.eval()
        out = self.student(list(batch["image"]))
        self.student.train(was_training)
        return [{"boxes": d["boxes"], "labels": d["labels"] - 1, "scores": d["scores"]} for d in out]


# ----------------------------------------------------------------------------------------------------------------------
# Builders and the training-image drawing
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg, pretrained=True):
    """The training wrapper for `cfg`. pretrained=False skips the ImageNet weights (e.g. to load a checkpoint)."""
    return MixTraining(cfg, build_detector(cfg, pretrained))


def export(wrapper, cfg, out):
    """mixed_targets.png: the last 4 strong views of training (those of the last steps) with the human boxes (green:
    kept, red dashed: dropped by the rating, orange dotted: replaced by a pseudo box), the pseudo boxes (blue) and the
    merged targets (white, thin). -> [path] (nothing for SiTraining)."""
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
    fig.suptitle("strong views: human boxes kept (green), dropped by the teacher (red dashed),\n"
                 "replaced (orange dotted); pseudo boxes (blue); merged targets (white)", fontsize=9)
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
    cfg = replace(PRESETS["toy"], score_thr=0.0, gt_score_thr=0.0, weights="none")  # random: let every box through
    model = build_model(cfg)
    views = {k: {"image": [torch.rand(3, 128, 160), torch.rand(3, 160, 128)],
                 "boxes": [torch.tensor([[10.0, 10, 60, 70]]), torch.zeros(0, 4)],
                 "labels": [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)]} for k in ("sup", "weak")}
    losses = model(views, step=0)
    losses["loss"].backward()
    model.on_step_end(0)
    print(", ".join(f"{k} {float(v.detach()):.3f}" for k, v in losses.items()))
    print([{k: tuple(v.shape) for k, v in p.items()} for p in model.predict({"image": views["sup"]["image"]})])
