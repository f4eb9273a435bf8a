"""Soft Teacher: End-to-End Semi-Supervised Object Detection, in one file.

Paper: Mengde Xu, Zheng Zhang, Han Hu, Jianfeng Wang, Lijuan Wang, Fangyun Wei, Xiang Bai, Zicheng Liu. ICCV 2021.
arXiv 2106.09018. Official code: github.com/microsoft/SoftTeacher (mmdetection 2.16).

The idea. A Faster R-CNN student learns from a few labelled images and many unlabelled ones in ONE training run (no
separate pseudo-labelling stage). A teacher, the exponential moving average of the student, detects objects on a
weakly augmented view of each unlabelled image; its confident boxes (score > 0.9) become the student's targets on a
strongly augmented view of the same image. Two things make these noisy targets usable: (1) the soft teacher: every
student RoI that the pseudo boxes call background is weighted by the teacher's own background probability for it,
so a real object that the teacher missed costs the student little; (2) box jittering: a pseudo box serves as a
regression target only if the teacher's refinements of 10 randomly jittered copies of it agree (small spread), since
the classification score says little about how well a box is localised.

File map (section -> paper):
  Config, PRESETS ........................ Sec. 4.1 implementation details; configs/soft_teacher/base.py, *_180k.py
  build_detector, ToyBackbone ............ Faster R-CNN R50-FPN (torchvision), frozen BN, frozen stem + stage 1
  toy_fpn, prerequisites ................. the toy's body from the toy ImageNet file (toy_backbone.py), trained first
  map_boxes, view_matrix ................. boxes between the weak (teacher) and strong (student) views
  image_list, roi_head_outputs,
  sample_rois, score_boxes ............... hooks into torchvision's detector: features, sampled RoIs, RoI scores
  ema_momentum, ema_update ............... Sec. 3.1: the EMA teacher, with the official warm-up
  jitter_uncertainty ..................... Sec. 3.3: box jittering, regression reliability
  soft_teacher_cls_loss, box_reg_loss .... Sec. 3.2: Eq. (2)-(4), the soft-teacher loss (code's normalisation)
  teacher_pseudo_boxes ................... Sec. 3.2/3.3: NMS'd teacher detections, thresholds 0.5 / 0.9 / 0.02
  SoftTeacher ............................ Eq. (1): L = L_s + alpha L_u; the training step; predict; export

Details of the official code that the paper does not state (kept here): the teacher update warms up as a running
average (momentum min(0.999, t / (t + 1))); the classification loss is sum(w CE) / max(sum w, 1) over foreground and
background RoIs together (the paper's Eq. (3) is wrong, issue #19); the regression targets are NOT filtered by the
0.9 score, only by the 0.5 initial score and the jitter uncertainty; the uncertainty is per-axis normalised (x stds by
the width, y stds by the height of the mean refined box); the RPN learns from the 0.9 boxes; the regression loss comes
from a second, independent RoI sampling against the regression targets.
Differences from the official code:
  1. torchvision's Faster R-CNN, not mmdet's: PyTorch-style (RGB, ImageNet mean/std) ResNet-50 weights instead of the
     caffe-style detectron2 ones; smooth-L1 (beta 1/9) box losses instead of L1; a single 2000-pre-NMS RPN setting
     for training, 1000 at test (the teacher's pseudo boxes use the test setting, official: the training one); RPN
     post-NMS 1000 per image in training as mmdet. Anchors, samplers, thresholds, RoIAlign, heads are the same.
  2. Batches: each item is 1 labelled + num_unsup unlabelled images (exactly 1:4), one GPU's worth in the official
     set-up; official draws each GPU's labelled/unlabelled count at random (by_prob: about 27% labelled). Losses are
     normalised per item and averaged over items, which is what 8 GPUs with 5 images each compute.
  3. The schedule is train.py's "step", after mmcv's linear warm-up from 0.001 over 500 iterations (the paper presets'
     warmup_ratio; the toy presets keep train.py's ramp from 1/warmup_iters).
  4. The paper's sampling-ratio decay over the last iterations is not in the official code, nor here.
Labels: the data gives 0..K-1; torchvision's detector uses 0 = background and 1..K, so targets are labels + 1 and
predictions labels - 1. Shapes: N boxes, R sampled RoIs, K classes, T jitter copies; boxes are xyxy in view pixels.
"""
import copy
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
from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image
from torchvision.ops.poolers import initLevelMapper
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

TASK = "detection"


# ----------------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # data (data.py's detection datasets)
    train_dataset: str = "coco_detection_semi"  # two-stream data.py dataset (labelled + unlabelled images)
    eval_datasets: tuple = ("coco_detection",)  # data.py datasets scored with COCO box mAP (COCO: val2017)
    data_root: str = "datasets"  # folder holding coco/ (see data.COCO_TREE)
    percent: float = 10.0  # COCO: labelled percent of train2017 (split file instances_train2017.{fold}@{percent}.json)
    fold: int = 1  # COCO: which of the 5 splits per percent
    num_unsup: int = 4  # unlabelled images per labelled one: the 1:4 mix (official sample_ratio [1, 4])
    train_scales: tuple = (400, 1200)  # short side of every training view, uniform in this range (scale jitter)
    max_size: int = 1333  # long side at most, in training and test
    test_size: int = 800  # short side at test time
    image_size: int = 160  # toy only: rendered image size
    num_labelled: int = 32  # toy only: labelled images; the rest of the synthetic stream is unlabelled
    eval_images: int = 64  # toy only: validation images
    num_classes: int = 80  # object classes (no background)
    # detector
    backbone: str = "resnet50"  # "resnet50" (R50-FPN, the paper) or "toy" (a small CNN + FPN, toy_backbone.py init)
    weights: str = "IMAGENET1K_V1"  # ResNet50_Weights name or a .pth state dict; toy: its .pth, or "none" (random)
    toy_width: int = 32  # toy backbone: channels of the first stage (doubled per stage), FPN channels = 2x this
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # one anchor size per FPN level (mmdet: 8 x stride), 3 ratios each
    roi_head_dim: int = 1024  # width of the two shared FC layers of the RoI head
    rpn_pre_nms: tuple = (2000, 1000)  # RPN boxes per image kept before NMS: (training, test)
    rpn_post_nms: tuple = (1000, 1000)  # RPN proposals per image after NMS: (training, test)
    rois_per_image: int = 512  # RoIs sampled per image for the RoI head's losses (25% positives at most)
    roi_sampling_ratio: int = 0  # RoIAlign samples per bin side (0 = adaptive, as mmdet)
    # Soft Teacher (configs/soft_teacher/base.py, semi_wrapper.train_cfg)
    unsup_weight: float = 4.0  # alpha of Eq. (1): 4.0 partial COCO, 2.0 full; 0 = the supervised-only baseline
    unsup_start: int = 0  # iterations of labelled-only training before L_u joins (official: 0, alpha from step 0)
    ema_momentum: float = 0.999  # teacher EMA momentum, reached after the running-average warm-up
    initial_score_thr: float = 0.5  # teacher detections kept for pseudo-labelling (pseudo_label_initial_score_thr)
    cls_score_thr: float = 0.9  # pseudo boxes for the RPN and the RoI classification (rpn/cls_pseudo_threshold)
    reg_uncertainty_thr: float = 0.02  # pseudo boxes for RoI regression: jitter uncertainty below this
    jitter_times: int = 10  # jittered copies per pseudo box
    jitter_scale: float = 0.06  # jitter std, relative to the box width / height
    soft_weights: bool = True  # background RoIs weighted by the teacher's background score (False: weight 1)
    box_jitter: bool = True  # regression targets chosen by jitter uncertainty (False: the 0.9-score boxes)
    # optimisation (schedule_1x scaled to 180k; 8 GPUs x 5 images)
    batch_size: int = 8  # items per iteration (global): each is 1 labelled + num_unsup unlabelled images
    max_iters: int = 180_000  # iterations
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # base learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # weight decay
    schedule: str = "step"  # x0.1 at each of lr_steps
    lr_steps: tuple = (120_000, 160_000)  # step milestones
    warmup_iters: int = 500  # linear warm-up iterations
    warmup_ratio: float = 0.0  # warm-up's first lr factor (mmcv's; paper presets 0.001); 0 = train.py's 1/warmup_iters
    amp: bool = True  # mixed precision on CUDA (official: fp16)
    eval_interval: int = 4000  # iterations between evaluations (official: 4000)
    log_interval: int = 50  # iterations between log lines
    ckpt_interval: int = 4000  # iterations between checkpoints
    num_workers: int = 4  # data-loading processes
    seed: int = 0  # random seed


PRESETS = {
    # Partial COCO: --percent 1/5/10 --fold 1..5; 8 GPUs x (1 labelled + 4 unlabelled), alpha 4, 180k iterations.
    "paper": Config(warmup_ratio=0.001),  # mmcv's warm-up: lr x (0.001 + 0.999 i / 500)
    # Full COCO: train2017 labelled + unlabeled2017; 8 GPUs x (4 + 4) in the official 1:1 mix, alpha 2, 720k iterations.
    "paper_full": Config(train_dataset="coco_detection_semi_full", num_unsup=1, batch_size=32, unsup_weight=2.0,
                         max_iters=720_000, lr_steps=(480_000, 640_000), warmup_ratio=0.001),
}
# The toy: 5 shape classes on cluttered 128 px images (data.ToyDetection), 4 labelled images (9 boxes on seed 0, 15 on
# seed 1: the paper's 1% regime, where unlabelled images matter most), the rest unlabelled; a small CNN + FPN whose
# body is pre-trained on a toy ImageNet (toy_backbone.py, trained first by train.py when the file is missing), first
# stage frozen as mmdet's frozen_stages=1; anchors 4 x stride; a teacher momentum of 0.99 because the toy runs 1/100
# of the paper's iterations (0.999 would keep the teacher a running average of the whole run); and 800 labelled-only
# iterations before L_u joins (official: 0): the pseudo boxes need a teacher that scores objects above 0.9, which the
# toy's needs about that long to become (measured, docs/soft_teacher.md: with L_u from step 0 the student learns for
# hundreds of iterations that every unlabelled object is background and falls behind labelled-only training). The
# RoI head samples 64 RoIs per image (the paper's 512 scaled to the toy's ~4 objects) with mmdet's adaptive RoIAlign
# sampling, as the paper preset: RoIAlign's backward is most of a CPU step, and 128 RoIs at 2 x 2 samples per bin
# made a step 1.7x slower (docs/soft_teacher.md).
PRESETS["toy"] = replace(
    Config(), train_dataset="toy_detection_semi", eval_datasets=("toy_detection",), num_classes=5, image_size=128,
    num_labelled=4, train_scales=(96, 160), max_size=320, test_size=128, backbone="toy",
    weights="runs/toy_backbone/toy_backbone.pth", toy_width=16, anchor_sizes=(16, 32, 64, 128), roi_head_dim=256,
    rpn_pre_nms=(1000, 500), rpn_post_nms=(300, 300), rois_per_image=64, roi_sampling_ratio=0, batch_size=1,
    num_unsup=4, max_iters=1600, lr=0.02, lr_steps=(1200, 1450), warmup_iters=100, ema_momentum=0.99,
    eval_interval=200, log_interval=50, ckpt_interval=400, num_workers=0, amp=False, unsup_start=800)
# The baseline: the same labelled images, batches and iterations, no unlabelled images, no teacher.
PRESETS["toy_supervised"] = replace(PRESETS["toy"], unsup_weight=0.0, num_unsup=0)


# ----------------------------------------------------------------------------------------------------------------------
# The detector: torchvision's Faster R-CNN R50-FPN with mmdet's training settings
# ----------------------------------------------------------------------------------------------------------------------
def toy_stages(width):
    """The toy body: 4 stride-2 stages of two 3x3 convs with GroupNorm, channels width/2, width, 2 width, 4 width.
    Stage i maps (B, c, H, W) -> (B, chans[i], H / 2, W / 2)."""
    chans = [width // 2, width, 2 * width, 4 * width]

    def stage(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(True),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(True))
    return nn.ModuleList([stage(cin, cout) for cin, cout in zip([3] + chans[:-1], chans)])


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


def prerequisites(cfg):
    """{file: model that trains it}: train.py pre-trains the toy backbone first when its weights are missing."""
    return {cfg.weights: "toy_backbone"} if cfg.backbone == "toy" and cfg.weights != "none" else {}


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
# Views: boxes between the weak and the strong view of an image
# ----------------------------------------------------------------------------------------------------------------------
def view_matrix(src, dst):
    """3x3 map from view `src` to view `dst` pixels, given each view's matrix from the original image: T_dst T_src^-1."""
    return dst @ torch.linalg.inv(src)


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


# ----------------------------------------------------------------------------------------------------------------------
# Hooks into torchvision's detector: what GeneralizedRCNN.forward computes but does not return
# ----------------------------------------------------------------------------------------------------------------------
def image_list(detector, images):
    """Already-resized views -> an ImageList: normalised with the detector's mean/std, padded to a multiple of 32.
    images: list of (3, h, w) in [0, 1]; ImageList.tensors (B, 3, H, W), .image_sizes [(h, w)]."""
    normalised = [detector.transform.normalize(im) for im in images]
    return ImageList(detector.transform.batch_images(normalised, size_divisible=32), [im.shape[-2:] for im in images])


def roi_head_outputs(detector, feats, rois, image_sizes):
    """RoIAlign + the two FC layers + the predictor for given boxes. rois: list of (R_i, 4) in view pixels.
    Returns class_logits (R, K+1) and box_regression (R, (K+1) * 4), the images' RoIs concatenated."""
    heads = detector.roi_heads
    pooled = heads.box_roi_pool(feats, rois, image_sizes)  # (R, C, 7, 7)
    return heads.box_predictor(heads.box_head(pooled))


def sample_rois(detector, proposals, targets):
    """torchvision's RoI assignment and sampling (MaxIoU 0.5, 512 RoIs per image, <= 25% positives, the targets added
    as proposals). targets: list of {"boxes" (N, 4), "labels" (N,) in 1..K}. Returns the sampled RoIs (list of
    (R_i, 4)), their labels (list of (R_i,), 0 = background) and regression targets (list of (R_i, 4))."""
    rois, _, labels, regression_targets = detector.roi_heads.select_training_samples(proposals, targets)
    return rois, labels, regression_targets


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
# The EMA teacher
# ----------------------------------------------------------------------------------------------------------------------
def ema_momentum(t, momentum=0.999):
    """Momentum of the update before iteration t (official MeanTeacher hook, warm_up 0): min(m, t / (t + 1)), so the
    teacher is the running average of the student over the first 1 / (1 - m) iterations, then an EMA."""
    return min(momentum, t / (t + 1))


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher = m teacher + (1 - m) student over the parameters; buffers (frozen BN statistics) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


# ----------------------------------------------------------------------------------------------------------------------
# Pseudo boxes: teacher detections, their box-jitter reliability
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def jitter_uncertainty(detector, feats, boxes, labels, image_sizes, times=10, scale=0.06):
    """Sec. 3.3, box jittering. Each box b (list of (N_i, 4), labels in 1..K) is copied `times` times with each
    coordinate moved by N(0, 1) * scale * (box width for x, height for y, each at least 1); the RoI head refines the
    copies (the box of b's class). The uncertainty is the mean over the 4 coordinates of the std over the copies,
    x stds divided by the width and y stds by the height of the mean refined box (at least 1). Returns list of (N_i,).
      u(b) = 1/4 sum_k std_j(x_k^j) / size_k(mean_j b^j)
    """
    jittered = []
    for b in boxes:
        wh = (b[:, 2:] - b[:, :2]).clamp(min=1).repeat(1, 2)  # (N, 4): w, h, w, h
        jittered.append((b[None] + torch.randn(times, *b.shape, device=b.device) * scale * wh).reshape(-1, 4))
    _, refined = score_boxes(detector, feats, jittered, image_sizes)  # (sum T N_i, K+1, 4)
    out = []
    for r, b, lab in zip(refined.split([len(j) for j in jittered]), boxes, labels):
        if len(b) == 0:  # an image without pseudo boxes beside images with some
            out.append(b.new_zeros(0))
            continue
        r = r.reshape(times, len(b), -1, 4)[:, torch.arange(len(b)), lab]  # (T, N, 4): the pseudo label's box
        std, mean = r.std(0), r.mean(0)  # (N, 4) each; unbiased std, as the official torch.std
        size = (mean[:, 2:] - mean[:, :2]).clamp(min=1).repeat(1, 2)  # (N, 4)
        out.append((std / size).mean(1))  # PAPER: box regression variance, Eq. (5)
    return out


@torch.no_grad()
def teacher_pseudo_boxes(teacher, images, cfg):
    """The teacher's detections on the weak views (images: list of (3, h, w)): RPN proposals, RoI head, class-wise
    NMS 0.5, score > initial_score_thr; each box with its score and jitter uncertainty.
    Returns a list of {"boxes" (N, 4), "labels" (N,) in 1..K, "scores" (N,), "uncertainty" (N,)}, and the teacher's
    features and ImageList (to score the student's RoIs later)."""
    views = image_list(teacher, images)
    feats = teacher.backbone(views.tensors)
    proposals, _ = teacher.rpn(views, feats)
    detections, _ = teacher.roi_heads(feats, proposals, views.image_sizes)
    pseudo = []
    for d in detections:
        keep = d["scores"] > cfg.initial_score_thr  # PAPER: initial filter 0.5
        pseudo.append({k: v[keep] for k, v in d.items()})
    boxes, labels = [p["boxes"] for p in pseudo], [p["labels"] for p in pseudo]
    if any(len(b) for b in boxes):
        unc = jitter_uncertainty(teacher, feats, boxes, labels, views.image_sizes, cfg.jitter_times, cfg.jitter_scale)
    else:
        unc = [b.new_zeros(0) for b in boxes]
    for p, u in zip(pseudo, unc):
        p["uncertainty"] = u
    return pseudo, feats, views


def split_pseudo_boxes(pseudo, cfg):
    """The target sets of one strong view, from its mapped pseudo boxes (dict of "boxes", "labels", "scores",
    "uncertainty"): G_cls (score > 0.9), the targets of the RPN (class-agnostic) and of the RoI classification, and
    G_reg (jitter uncertainty < 0.02, any score > 0.5; with box_jitter off, G_cls), the RoI regression targets.
    Each a torchvision target {"boxes", "labels"}."""
    def subset(keep):
        return {"boxes": pseudo["boxes"][keep], "labels": pseudo["labels"][keep]}
    confident = pseudo["scores"] > cfg.cls_score_thr  # PAPER: foreground threshold 0.9
    reliable = pseudo["uncertainty"] < cfg.reg_uncertainty_thr if cfg.box_jitter else confident  # PAPER: Sec. 3.3
    return subset(confident), subset(reliable)


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------
def soft_teacher_cls_loss(class_logits, labels, weights):
    """Sec. 3.2, the soft-teacher classification loss as the official code computes it (issue #19: the paper's Eq. (3)
    normalises foreground and background separately, the code does not):
      L_cls = sum_i w_i CE(p_i, y_i) / max(sum_i w_i, 1),  w_i = 1 (foreground RoI), r_i (background RoI)
    with r_i the teacher's background probability of RoI i. class_logits (R, K+1), labels (R,), weights (R,)."""
    ce = F.cross_entropy(class_logits, labels, reduction="none")  # (R,)
    return (weights * ce).sum() / weights.sum().clamp(min=1.0)


def box_reg_loss(box_regression, labels, regression_targets):
    """Smooth-L1 (beta 1/9) on the positive RoIs' class-specific deltas, summed and divided by the number of sampled
    RoIs (torchvision's fastrcnn_loss box term). box_regression (R, (K+1) * 4), labels (R,), targets (R, 4)."""
    pos = torch.where(labels > 0)[0]
    deltas = box_regression.unflatten(1, (-1, 4))[pos, labels[pos]]  # (R, K+1, 4) -> (P, 4); R may be 0
    loss = F.smooth_l1_loss(deltas, regression_targets[pos], beta=1 / 9, reduction="sum")
    return loss / max(labels.numel(), 1)


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
# The training wrapper
# ----------------------------------------------------------------------------------------------------------------------
class SoftTeacher(nn.Module):
    """Student (trained) and teacher (EMA of the student, never trained). forward(batch, step) -> losses, Eq. (1):
      L = L_s + alpha L_u,  L_u = L_rpn(G_cls) + L_cls^soft(G_cls) + L_reg(G_reg)
    batch = {"sup": {"image": [(3, h, w)] x B, "boxes", "labels"}, "unsup": [[{"weak": view, "strong": view}] x k] x B}
    (data.TwoStream of data.Views; each view has "image" and "matrix", original -> view)."""

    eval_variants = ("student", "teacher")  # eval.py scores both; the student's numbers are the reported ones

    def __init__(self, cfg, detector):
        super().__init__()
        self.cfg, self.student = cfg, detector
        self.teacher = copy.deepcopy(detector).requires_grad_(False).eval()
        self.last_unsup = []  # a few weak views of the last step, for export's pseudo-box figure

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher always predicts (RPN proposals without targets, detections)
        return self

    def forward(self, batch, step):
        groups = len(batch["sup"]["image"])
        totals = {}
        for g in range(groups):  # one item = one official GPU's images; its losses are normalised on their own
            seed = int(batch["sup"]["image_id"][g]) * 1_000_003 + step  # sampling independent of the process count
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
                torch.manual_seed(seed)
                losses = self.group_losses({k: v[g] for k, v in batch["sup"].items()}, batch["unsup"][g], step)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v / groups
        return totals

    def group_losses(self, sup, unsup, step):
        target = {"boxes": sup["boxes"], "labels": sup["labels"] + 1}
        sup_losses, _ = detector_losses(self.student, [sup["image"]], [target])
        losses = {f"sup_{k}": v for k, v in sup_losses.items()}
        loss = sum(sup_losses.values())
        if self.cfg.unsup_weight > 0 and unsup and step >= self.cfg.unsup_start:
            unsup_losses = self.unsup_losses(unsup)
            losses.update({f"unsup_{k}": v for k, v in unsup_losses.items()})
            loss = loss + self.cfg.unsup_weight * sum(v for k, v in unsup_losses.items() if k != "pseudo_boxes")
        return {"loss": loss, **losses}

    def unsup_losses(self, unsup):
        """The unlabelled images of one item: teacher on the weak views, student on the strong views."""
        cfg = self.cfg
        weak = [u["weak"] for u in unsup]
        strong = [u["strong"] for u in unsup]
        self.last_unsup = [w["image"].detach() for w in weak][:4]
        pseudo, t_feats, t_views = teacher_pseudo_boxes(self.teacher, [w["image"] for w in weak], cfg)
        cls_t, reg_t = [], []  # per strong view: G_cls (RPN and classification targets), G_reg (regression)
        for p, w, s in zip(pseudo, weak, strong):
            boxes, keep = map_boxes(p["boxes"], view_matrix(w["matrix"], s["matrix"]), s["image"].shape[-2:])
            mapped = {"boxes": boxes, **{k: p[k][keep] for k in ("labels", "scores", "uncertainty")}}
            g_cls, g_reg = split_pseudo_boxes(mapped, cfg)
            cls_t.append(g_cls)
            reg_t.append(g_reg)

        def soft_weights(rois, labels):  # PAPER: background RoIs weighted by the teacher's background score
            if not cfg.soft_weights:
                return torch.ones_like(labels, dtype=torch.float32)
            to_teacher = [view_matrix(s["matrix"], w["matrix"]) for w, s in zip(weak, strong)]
            return teacher_background_weights(self.teacher, t_feats, t_views.image_sizes, rois, labels, to_teacher)

        losses, (views, feats, proposals) = detector_losses(self.student, [s["image"] for s in strong], cls_t,
                                                            soft_weights)
        # The RPN and the RoI classification learn from G_cls (above); the regression from its own sampling against G_reg.
        rois, labels, reg_targets = sample_rois(self.student, proposals, reg_t)
        _, regression = roi_head_outputs(self.student, feats, rois, views.image_sizes)
        losses["roi_reg"] = box_reg_loss(regression, torch.cat(labels), torch.cat(reg_targets))  # PAPER: G_reg
        losses["pseudo_boxes"] = torch.tensor(sum(len(t["boxes"]) for t in cls_t) / len(cls_t),
                                              dtype=torch.float32, device=losses["rpn_cls"].device)
        return losses

    def on_step_end(self, step):
        """The teacher update before the next iteration t = step + 1 (official: before_train_iter)."""
        ema_update(self.teacher, self.student, ema_momentum(step + 1, self.cfg.ema_momentum))  # PAPER: EMA teacher

    @torch.no_grad()
    def predict(self, batch, vocab=None, variant="student"):
        """Detections per image, in the input image's pixels: [{"boxes" (N, 4) xyxy, "labels" (N,) 0..K-1,
        "scores" (N,)}]. batch["image"]: (B, 3, H, W) or a list of (3, h, w); resized to test_size inside."""
        detector = {"student": self.student, "teacher": self.teacher}[variant]
        was_training = detector.training
        detector.eval()
        out = detector(list(batch["image"]))
        detector.train(was_training)
        return [{"boxes": d["boxes"], "labels": d["labels"] - 1, "scores": d["scores"]} for d in out]


# ----------------------------------------------------------------------------------------------------------------------
# Builders and export
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg, pretrained=True):
    """The SoftTeacher wrapper; pretrained=False skips the backbone's ImageNet weights (a checkpoint follows)."""
    return SoftTeacher(cfg, build_detector(cfg, pretrained))


def export(wrapper, cfg, out_dir):
    """pseudo_boxes.png: the final teacher's detections (score > initial_score_thr) on weak views of the last
    training step, coloured by score; solid = passed the classification threshold (G_cls), dashed = not; a "reg" tag =
    passed the box-jitter test (G_reg). Returns the path written."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    images = wrapper.last_unsup
    if not images:
        return []
    pseudo, _, _ = teacher_pseudo_boxes(wrapper.teacher, images, cfg)
    fig, axes = plt.subplots(1, len(images), figsize=(3.6 * len(images), 3.9), squeeze=False)
    cmap = matplotlib.colormaps["viridis"]
    for ax, image, p in zip(axes[0], images, pseudo):
        ax.imshow(image.permute(1, 2, 0).cpu().numpy())
        ax.axis("off")
        for box, score, unc in zip(p["boxes"].tolist(), p["scores"].tolist(), p["uncertainty"].tolist()):
            cls_ok, reg_ok = score > cfg.cls_score_thr, unc < cfg.reg_uncertainty_thr
            colour = cmap((score - cfg.initial_score_thr) / (1 - cfg.initial_score_thr))
            ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color=colour, lw=2,
                                       ls="-" if cls_ok else "--"))
            ax.text(box[0], box[1], f"{score:.2f}{' reg' if reg_ok else ''}", fontsize=7, color="white",
                    va="bottom", bbox=dict(facecolor=colour, alpha=0.8, pad=0.5, lw=0))
    fig.suptitle(f"teacher pseudo boxes (score > {cfg.initial_score_thr}); solid: score > {cfg.cls_score_thr} "
                 f"(classification targets), 'reg': jitter uncertainty < {cfg.reg_uncertainty_thr}", fontsize=9)
    fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(cfg.initial_score_thr, 1), cmap),
                 ax=axes[0].tolist(), fraction=0.02, label="teacher score")
    path = os.path.join(out_dir, "pseudo_boxes.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------------------------------
# Self-check: python soft_teacher.py
# ----------------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = replace(PRESETS["toy"], weights="none")  # a random backbone: runs without the toy_backbone file
    wrapper = build_model(cfg)
    eye = torch.eye(3)
    flip = torch.tensor([[-1.0, 0, 160], [0, 1, 0], [0, 0, 1]])
    item = lambda n: {"image": torch.rand(3, 160, 160), "boxes": torch.tensor([[10.0, 20, 60, 80]] * n),  # noqa
                      "labels": torch.zeros(n, dtype=torch.int64), "image_id": n}
    unsup = [{"weak": {"image": torch.rand(3, 160, 160), "matrix": eye},
              "strong": {"image": torch.rand(3, 160, 160), "matrix": flip}} for _ in range(2)]
    batch = {"sup": {k: [item(1)[k], item(0)[k]] for k in ("image", "boxes", "labels", "image_id")},
             "unsup": [unsup, unsup]}
    losses = wrapper(batch, 0)
    losses["loss"].backward()
    print({k: round(float(v), 4) for k, v in losses.items()})
    print([{k: tuple(v.shape) for k, v in p.items()} for p in wrapper.predict({"image": torch.rand(2, 3, 160, 160)})])
    print(f"parameters: {sum(p.numel() for p in wrapper.student.parameters()) / 1e6:.2f}M per detector")
