"""ANN: Asymmetric Non-local Neural Networks for Semantic Segmentation.

Zhen Zhu, Mengde Xu, Song Bai, Tengteng Huang, Xiang Bai. ICCV 2019. arXiv:1908.07678.
Official code: https://github.com/MendelXu/ANN (read at commit f4eabeb; network in models/seg/nets/annn.py, blocks in
models/seg/utils/{apnb,afnb}.py, loss in models/seg/loss/seg_modules.py).

The idea. A non-local block lets every pixel attend to every other pixel: an N x N affinity, N = H*W, which for a
128x256 feature map is one 4 GiB fp32 matrix. ANN keeps all N queries but samples the keys and values at a few
anchors only: adaptive average pooling to 1x1, 3x3, 6x6 and 8x8 gives S = 110 anchors, so the affinity is N x S.
Two blocks use this attention. AFNB (Asymmetric Fusion Non-local Block) lets the last ResNet stage (res5) query the
previous one (res4), fusing two levels; APNB (Asymmetric Pyramid Non-local Block) is self-attention on the fused
features. Each block concatenates its attention output with its input and fuses them with a 1x1 conv. On a dilated
ResNet-101 (output stride 8) the paper reports 81.3 mIoU on Cityscapes test (train+val, multi-scale; the released
model gets 79.9 single-scale on val), and APNB is ~6x faster and needs ~28x less GPU memory than a non-local block
at 128x256 (abstract).

File map (section -> paper):
  Config, PRESETS ............ implementation details; the official hypes/*.json and scripts/*.sh (60k its, OHEM)
  Backbone ................... dilated ResNet, output stride 8 (res4 and res5 both at 1/8)
  pyramid_sample ............. "Asymmetric Pyramid Non-local Block": pyramid sampling, S = 1+9+36+64 = 110 anchors
  AttentionCore .............. "Revisiting Non-local Block": softmax(Q K^T / sqrt(C_k)) V, then W_o; with
                               pyramid-sampled K, V it is the asymmetric version (pyramid_sizes=None: plain non-local)
  APNB, AFNB ................. the two blocks (concat [context, input] -> 1x1 conv fusion); arXiv Fig. 3
  ANNNet ..................... "Network Architecture": backbone -> AFNB -> 3x3 conv -> APNB -> classifier, aux head
  ohem_cross_entropy ......... the official loss (fs_auxohemce_loss): OHEM CE on the main output + 0.4 x CE on aux
  ANN (wrapper) .............. normalisation, training step, predict
  OFFICIAL_KEYS, convert_... . the released Cityscapes model (79.9 mIoU val) -> our weights (deepbase_resnet101)

Differences from the official code:
  1. Backbone: torchvision's ResNet with its 7x7 stem by default; the official deep 3-conv stem ("deepbase", CSAIL
     3x3resnet101-imagenet.pth) is backbone="deepbase_resnet101" (preset paper_deepstem, which also loads the released
     Cityscapes model: convert_official_state_dict). Dilation layout is the same (first block of res4/res5 at half
     the dilation).
  2. Plain BatchNorm (the official uses sync BN); train.py converts it under DDP when Config.sync_bn is true.
  3. Input normalisation: torchvision's ImageNet RGB mean/std on [0,1] images, as torchvision's weights expect (the
     official subtracts a BGR mean on 0-255 with std 1, for its own deep-stem weights: input_norm="caffe").
  4. APNB applies its shared query/key projection once and reuses it (the official runs the same conv twice:
     identical result, one 1x1 conv fewer, 17 of the official 69 conv GMACs at 128x256).
  5. Evaluation: whole-image single-scale inference only, the official Cityscapes val protocol (test mode "ss_test":
     the 2048x1024 frame in one pass); no multi-scale/flip testing.
  6. context="nl" / "none" are our ablations: the same blocks without pyramid sampling / no context blocks at all.
  7. The toy preset is ours: a 4-stage, output-stride-8 bottleneck backbone with a small receptive field, AdamW.

Shapes: B batch, K classes, H x W image, h x w = H/8 x W/8 feature grid, N = h*w query positions, S anchors
(110 with pyramid sampling, N without), C_k key/query channels, C_v value channels. Labels: 255 = ignore.
"""
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

TASK = "semseg"
IGNORE = 255  # label value that the losses skip
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, RGB on [0, 1]
CAFFE_BGR_MEAN = (102.9801, 115.9465, 122.7717)  # the official input: BGR on 0-255 minus this, std 1 (hypes json)


# ----------------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # data
    train_dataset: str = "cityscapes"  # data.py dataset for training
    eval_datasets: tuple = ("cityscapes",)  # data.py datasets evaluated (whole image, single scale)
    data_root: str = "datasets"  # root folder of the real datasets
    num_classes: int = 19  # classes predicted (label 255 is ignored)
    crop_size: int = 769  # training crop size (toy: the image size)
    base_size: int = 0  # short side before random scaling (0 = native size)
    scale_range: tuple = (0.5, 2.0)  # random rescale range in training
    aspect_range: tuple = (0.9, 1.1)  # random aspect-ratio jitter in training
    # model
    backbone: str = "resnet101"  # resnet101 | resnet50 | deepbase_resnet101 (official deep stem) | toy; stride 8
    pretrained_backbone: str = "ResNet101_Weights.IMAGENET1K_V1"  # torchvision weights name, local .pth, or "" (toy)
    input_norm: str = "imagenet"  # imagenet: RGB [0,1], torchvision mean/std | caffe: BGR 0-255 minus a mean (official)
    context: str = "apnb"  # apnb: AFNB+APNB (paper) | nl: plain non-local blocks in their place | none: no context
    key_channels: int = 256  # query/key channels C_k of both blocks
    value_channels: int = 256  # value channels C_v of both blocks
    head_channels: int = 512  # channels of the 3x3 conv after AFNB, of APNB and of the aux head
    pyramid_sizes: tuple = (1, 3, 6, 8)  # adaptive-pool sizes of pyramid sampling: S = 1+9+36+64 = 110 anchors
    dropout: float = 0.05  # Dropout2d after each block's fusion conv and in the aux head
    # loss
    use_ohem: bool = True  # OHEM cross-entropy on the main output (plain CE if false)
    ohem_thresh: float = 0.7  # OHEM keeps pixels whose true-class probability is below max(this, p of min_kept-th)
    ohem_min_kept: int = 100_000  # OHEM keeps at least this many pixels per process batch
    aux_weight: float = 0.4  # weight of the aux (res4) head's CE
    class_weights: tuple = ()  # per-class CE weights (empty = unweighted)
    # optimisation
    batch_size: int = 8  # global batch (8 GPUs x 1 image in the official runs)
    max_iters: int = 60_000  # training iterations
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # base learning rate (same for backbone and head)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # weight decay
    schedule: str = "poly"  # poly | cosine | step, per iteration
    poly_power: float = 0.9  # lr = base * (1 - it / max_iters) ** poly_power
    lr_steps: tuple = ()  # milestones of the step schedule (unused by poly)
    warmup_iters: int = 0  # linear warm-up iterations
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    amp: bool = False  # bf16/fp16 autocast on CUDA (the official code trains in fp32)
    sync_bn: bool = True  # SyncBatchNorm under DDP (nn.SyncBatchNorm.convert_sync_batchnorm), as the official code
    # bookkeeping
    eval_interval: int = 10_000  # iterations between evaluations
    log_interval: int = 50  # iterations between log lines
    ckpt_interval: int = 2_000  # iterations between checkpoints
    num_workers: int = 4  # data-loading processes per GPU
    seed: int = 0  # random seed


CITYSCAPES_CLASS_WEIGHTS = (0.8373, 0.9180, 0.8660, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)  # hypes/.../fs_annn_cityscapes_seg.json
PRESETS = {
    # Cityscapes, ResNet-101: crop 769, batch 8, SGD 0.01, wd 5e-4, poly 0.9, 60k its (script; the json says 40k),
    # OHEM + 0.4 aux, and the official json's 19 per-class CE weights (road ... bicycle).
    "paper": replace(Config(), class_weights=CITYSCAPES_CLASS_WEIGHTS),
    # The official network: deep-stem ResNet-101 with its ImageNet weights (CSAIL's 3x3resnet101-imagenet.pth, from the
    # official README's Google Drive link) and the official BGR input; the released Cityscapes model loads into it.
    "paper_deepstem": replace(Config(), class_weights=CITYSCAPES_CLASS_WEIGHTS, backbone="deepbase_resnet101",
                              pretrained_backbone="pretrained_models/3x3resnet101-imagenet.pth", input_norm="caffe"),
    # ADE20K: the official json is stale (model deeplabv3, no loss weights); 0.02 / 150k / crop 520 / batch 16 is the
    # intended recipe read from its json and script, lr 0.02 not cross-checked against the paper.
    "ade20k": replace(Config(), train_dataset="ade20k_150", eval_datasets=("ade20k_150",), num_classes=150,
                      crop_size=520, base_size=520, batch_size=16, lr=0.02, weight_decay=1e-4, max_iters=150_000),
    "pcontext": replace(Config(), train_dataset="pcontext_59", eval_datasets=("pcontext_59",), num_classes=59,
                        crop_size=480, base_size=520, batch_size=16, lr=0.01, weight_decay=1e-4, max_iters=28_000),
    # CPU toy (~6 min on 2 free cores): data.py's toy_context, where an object's class is set by a far-away corner cue.
    # AdamW, not the paper's SGD: in this budget SGD (lr 0.05-0.1) had learned only one of the three cue colours.
    "toy": replace(Config(), train_dataset="toy_context", eval_datasets=("toy_context",), num_classes=7,
                   crop_size=128, scale_range=(1.0, 1.0), backbone="toy", pretrained_backbone="", key_channels=32,
                   value_channels=32, head_channels=64, ohem_min_kept=20_000, batch_size=16, max_iters=1200,
                   optimizer="adamw", lr=2e-3, weight_decay=1e-4, sync_bn=False, eval_interval=400,
                   log_interval=50, ckpt_interval=400, num_workers=2),
}


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks, in data-flow order: backbone -> pyramid sampling -> attention core -> AFNB, APNB
# ----------------------------------------------------------------------------------------------------------------------
def conv_bn_relu(cin, cout, k=1, stride=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ToyBottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, plus shortcut), small: (B, cin, H, W) -> (B, cout, H/stride, W/stride)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        mid = cout // 2
        self.body = nn.Sequential(conv_bn_relu(cin, mid), conv_bn_relu(mid, mid, 3, stride),
                                  conv_bn_relu(mid, cout, relu=False))
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else conv_bn_relu(cin, cout, 1, stride, False)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def load_imagenet_weights(resnet, spec):
    """Load ImageNet weights into a torchvision ResNet: `spec` is a torchvision weights name or a local state dict."""
    if os.path.isfile(spec):
        state = torch.load(spec, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))  # plain, or wrapped as many checkpoints are
    elif spec.endswith((".pth", ".pt")):
        raise FileNotFoundError(f"pretrained_backbone {spec!r}: no such file")
    else:
        try:
            state = torchvision.models.get_weight(spec).get_state_dict(progress=False)
        except Exception as e:  # offline, unknown name, corrupt cache
            raise FileNotFoundError(
                f"could not load the ImageNet backbone weights {spec!r} ({type(e).__name__}: {e}). The paper presets "
                f"need them. Offline? On a machine with a network run `python -c \"import torchvision; "
                f"torch.save(torchvision.models.get_weight('{spec}').get_state_dict(), 'r.pth')\"` (or fill "
                f"$TORCH_HOME/hub/checkpoints), then pass --pretrained_backbone PATH/TO/r.pth.") from e
    try:  # shape mismatches raise; missing or unexpected names are reported
        missing, unexpected = resnet.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                     strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]  # the classifier is not used
        if missing or unexpected:
            raise RuntimeError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    except RuntimeError as e:
        raise ValueError(f"backbone weights {spec!r} do not fit a torchvision ResNet: {str(e)[:400]}") from None


class Backbone(nn.Module):
    """Dilated ResNet, output stride 8: (B, 3, H, W) -> res4 (B, C4, h, w), res5 (B, C5, h, w), h, w = H/8, W/8.

    resnet50/101: torchvision's ResNet with replace_stride_with_dilation=[False, True, True] (res4 dilation 2, res5
    dilation 4), C4 = 1024, C5 = 2048. It has torchvision's 7x7 stem, not the official deep 3-conv stem ("deepbase"),
    and plain BatchNorm (the official uses sync BN; nn.SyncBatchNorm.convert_sync_batchnorm works on this module).

    deepbase_resnet101: the official backbone: the same ResNet-101 with a deep stem (3x3 convs 3 -> 64 -> 64 -> 128, the
    first with stride 2, each with BN and ReLU) and a ceil-mode max-pool, so res2 takes 128 channels. Its ImageNet
    weights (CSAIL's 3x3resnet101-imagenet.pth) use torchvision's key names (conv1..3, bn1..3, layer1..4, fc).

    toy: the same four stages and stride 8 with one small bottleneck each, C4 = 64, C5 = 128, and NO dilation so that
    its receptive field stays well inside the 128 px toy image: each 3x3 conv adds 2 * (input stride) px, so
    stem 3, res2 (/4) 7, res3 (/8) 15, res4 31, res5 47 px; the head's 3x3 conv makes it 63 px for the logits (71 with
    the bilinear upsampling). With dilations 2/4 as in the real backbone, res5 alone would see 111 px.
    """

    def __init__(self, name, weights=""):
        super().__init__()
        if name == "toy":
            self.stem = conv_bn_relu(3, 16, 3, stride=2)  # (B, 16, H/2, W/2)
            self.layer1, self.layer2 = ToyBottleneck(16, 32, 2), ToyBottleneck(32, 64, 2)  # /4, /8
            self.layer3, self.layer4 = ToyBottleneck(64, 64), ToyBottleneck(64, 128)
            self.channels = (64, 128)
            return
        if name not in ("resnet50", "resnet101", "deepbase_resnet101"):
            raise ValueError(f"backbone must be resnet101, resnet50, deepbase_resnet101 or toy, got {name!r}")
        deep = name.startswith("deepbase_")
        net = getattr(torchvision.models, name.removeprefix("deepbase_"))(
            weights=None, replace_stride_with_dilation=[False, True, True])
        if deep:  # the deep stem replaces conv1/bn1, adds conv2/bn2, conv3/bn3; res2's first block takes 128 channels
            net.conv1, net.bn1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64)
            net.conv2, net.bn2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
            net.conv3, net.bn3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False), nn.BatchNorm2d(128)
            net.layer1[0].conv1 = nn.Conv2d(128, 64, 1, bias=False)
            net.layer1[0].downsample[0] = nn.Conv2d(128, 256, 1, bias=False)
        if weights:
            load_imagenet_weights(net, weights)
        if deep:
            self.stem = nn.Sequential(OrderedDict(  # (B, 128, H/4, W/4)
                conv1=net.conv1, bn1=net.bn1, relu1=nn.ReLU(), conv2=net.conv2, bn2=net.bn2, relu2=nn.ReLU(),
                conv3=net.conv3, bn3=net.bn3, relu3=nn.ReLU(), maxpool=nn.MaxPool2d(3, 2, 1, ceil_mode=True)))
        else:
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)  # (B, 64, H/4, W/4)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = (1024, 2048)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))  # (B, C3, h, w)
        res4 = self.layer3(x)  # (B, C4, h, w)
        return res4, self.layer4(res4)  # (B, C5, h, w)


def pyramid_sample(x, sizes):
    """(B, C, h, w) -> (B, C, S): adaptive average pooling at each size, flattened and concatenated.

    sizes=None keeps every position (S = h*w): the plain non-local block."""
    if sizes is None:
        return x.flatten(2)  # (B, C, h*w)
    return torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in sizes], dim=2)  # PAPER: (B, C, sum s^2 = 110)


class AttentionCore(nn.Module):
    """The (asymmetric) non-local operation, without fusion: what the official efficiency scripts time.

    (B, C_low, h', w') keys/values source, (B, C_high, h, w) queries source -> (B, C_out, h, w).
    Queries come from every position of `high`; keys and values from the pyramid anchors of `low` (all positions of
    `low` when pyramid_sizes is None, which is exactly a non-local block). shared_query_key=True (APNB; needs
    low is high) uses one projection for both, as arXiv Fig. 3 and the official code do.
    """

    def __init__(self, low_channels, high_channels, out_channels, key_channels, value_channels, pyramid_sizes,
                 shared_query_key=False):
        super().__init__()
        self.pyramid_sizes = None if pyramid_sizes is None else tuple(pyramid_sizes)
        self.key = nn.Sequential(nn.Conv2d(low_channels, key_channels, 1), nn.BatchNorm2d(key_channels), nn.ReLU())
        self.query = None if shared_query_key else nn.Sequential(
            nn.Conv2d(high_channels, key_channels, 1), nn.BatchNorm2d(key_channels), nn.ReLU())
        self.value = nn.Conv2d(low_channels, value_channels, 1)  # plain conv, no BN
        self.W_o = nn.Conv2d(value_channels, out_channels, 1)
        nn.init.zeros_(self.W_o.weight)  # zero-init weight AND bias: the block starts by adding nothing to the
        nn.init.zeros_(self.W_o.bias)  # concatenation, i.e. the fusion first sees [0, input]
        self.scale = key_channels ** -0.5

    def forward(self, low, high):
        B, _, h, w = high.shape
        key = self.key(low)  # (B, Ck, h', w')
        query = (key if self.query is None else self.query(high)).flatten(2).transpose(1, 2)  # (B, N, Ck)
        key = pyramid_sample(key, self.pyramid_sizes)  # PAPER: (B, Ck, S), S = 110 anchors instead of N
        value = pyramid_sample(self.value(low), self.pyramid_sizes).transpose(1, 2)  # PAPER: (B, S, Cv)
        attention = torch.softmax((self.scale * query) @ key, dim=-1)  # (B, N, S): similarity / sqrt(Ck), over S
        context = (attention @ value).transpose(1, 2).reshape(B, -1, h, w)  # (B, Cv, h, w)
        return self.W_o(context)  # (B, C_out, h, w)


class AFNB(nn.Module):
    """Asymmetric Fusion Non-local Block: res5 queries res4. (B, C4, h, w), (B, C5, h, w) -> (B, C5, h, w).

    Fusion: concat [context, res5] -> 1x1 conv -> BN (no ReLU, as the official code) -> Dropout2d.
    pyramid_sizes=None gives its non-local counterpart (full N x N cross-level attention)."""

    def __init__(self, low_channels, high_channels, key_channels, value_channels, dropout, pyramid_sizes=(1, 3, 6, 8)):
        super().__init__()
        self.attention = AttentionCore(low_channels, high_channels, high_channels, key_channels, value_channels,
                                       pyramid_sizes)
        self.fuse = nn.Sequential(nn.Conv2d(2 * high_channels, high_channels, 1), nn.BatchNorm2d(high_channels),
                                  nn.Dropout2d(dropout))

    def forward(self, low, high):
        return self.fuse(torch.cat([self.attention(low, high), high], dim=1))  # (B, 2 C5, h, w) -> (B, C5, h, w)


class APNB(nn.Module):
    """Asymmetric Pyramid Non-local Block: self-attention with pyramid-sampled keys. (B, C, h, w) -> (B, C, h, w).

    Fusion: concat [context, x] -> 1x1 conv -> BN -> ReLU -> Dropout2d. pyramid_sizes=None: a plain non-local block
    (the shared query/key self-attention of OCNet's BaseOC, the official efficiency baseline)."""

    def __init__(self, channels, key_channels, value_channels, dropout, pyramid_sizes=(1, 3, 6, 8)):
        super().__init__()
        self.attention = AttentionCore(channels, channels, channels, key_channels, value_channels, pyramid_sizes,
                                       shared_query_key=True)
        self.fuse = nn.Sequential(nn.Conv2d(2 * channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                  nn.Dropout2d(dropout))

    def forward(self, x):
        return self.fuse(torch.cat([self.attention(x, x), x], dim=1))  # (B, 2C, h, w) -> (B, C, h, w)


# ----------------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------------
class ANNNet(nn.Module):
    """(B, 3, H, W) normalised image -> main logits (B, K, H, W), aux logits (B, K, H, W), both upsampled.

    backbone -> AFNB(res4, res5) -> 3x3 conv C5 -> head_channels + BN + ReLU -> APNB -> 1x1 classifier;
    aux head on res4: 3x3 conv + BN + ReLU + Dropout2d + 1x1 classifier. context="none" drops AFNB and APNB
    (res5 goes straight to the 3x3 conv); context="nl" uses both blocks without pyramid sampling.
    """

    def __init__(self, cfg, pretrained=True):
        super().__init__()
        if cfg.context not in ("apnb", "nl", "none"):
            raise ValueError(f"context must be apnb, nl or none, got {cfg.context!r}")
        self.backbone = Backbone(cfg.backbone, cfg.pretrained_backbone if pretrained else "")
        C4, C5 = self.backbone.channels
        C, K, kc, vc = cfg.head_channels, cfg.num_classes, cfg.key_channels, cfg.value_channels
        sizes = tuple(cfg.pyramid_sizes) if cfg.context == "apnb" else None  # None: every position is an anchor
        self.afnb = AFNB(C4, C5, kc, vc, cfg.dropout, sizes) if cfg.context != "none" else None
        self.conv = nn.Sequential(nn.Conv2d(C5, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(inplace=True))
        self.apnb = APNB(C, kc, vc, cfg.dropout, sizes) if cfg.context != "none" else None
        self.classifier = nn.Conv2d(C, K, 1)
        self.aux = nn.Sequential(nn.Conv2d(C4, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(inplace=True),
                                 nn.Dropout2d(cfg.dropout), nn.Conv2d(C, K, 1))

    def forward(self, image):
        res4, res5 = self.backbone(image)  # (B, C4, h, w), (B, C5, h, w)
        x = res5 if self.afnb is None else self.afnb(res4, res5)  # (B, C5, h, w)
        x = self.conv(x)  # (B, C, h, w)
        x = x if self.apnb is None else self.apnb(x)  # (B, C, h, w)
        size = image.shape[-2:]
        main = F.interpolate(self.classifier(x), size, mode="bilinear", align_corners=True)  # (B, K, H, W)
        aux = F.interpolate(self.aux(res4), size, mode="bilinear", align_corners=True)  # (B, K, H, W)
        return main, aux


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------
def ohem_cross_entropy(logits, label, thresh=0.7, min_kept=100_000, weight=None):
    """Online hard example mining CE, as the official FSOhemCELoss. (B, K, H, W), (B, H, W) -> scalar.

    p = softmax probability of the true class at each non-ignored pixel. threshold = max(thresh, p_[k]) with p_ the
    sorted p and k = min(min_kept, #pixels - 1) (0-based, as the official code indexes it), so at least ~min_kept
    pixels are kept. The loss is the MEAN of the per-pixel CE (times the class weight, if any) over pixels with
    p < threshold: a plain count, not a weight sum. Applied per process, i.e. per GPU batch as in the official runs.
    """
    valid = label != IGNORE  # (B, H, W)
    target = label.masked_fill(~valid, 0)  # any class at ignored pixels; they are masked out below
    nll = -logits.float().log_softmax(1).gather(1, target[:, None])[:, 0]  # (B, H, W) per-pixel CE
    prob = torch.exp(-nll.detach())  # (B, H, W) true-class probability
    if not valid.any():
        return nll.sum() * 0.0
    p_valid = prob[valid]  # (M,)
    k = min(min_kept, p_valid.numel() - 1)
    threshold = p_valid.kthvalue(k + 1).values.clamp(min=thresh)  # p_[k]: the (k+1)-th smallest
    keep = valid & (prob < threshold)  # (B, H, W)
    loss = nll if weight is None else nll * weight[target]
    return loss[keep].sum() / keep.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------------
# The training wrapper: normalisation, training step, predict
# ----------------------------------------------------------------------------------------------------------------------
class ANN(nn.Module):
    """Owns the network and its losses. Batches: {"image": (B, 3, H, W) RGB in [0, 1], "label": (B, H, W) int64}."""

    def __init__(self, cfg, net):
        super().__init__()
        self.cfg, self.net = cfg, net
        # torchvision's ImageNet statistics (RGB, [0, 1]) for torchvision's weights; input_norm="caffe" is the official
        # input for the deep-stem weights: BGR on 0-255 minus [102.98, 115.95, 122.77], std 1.
        if cfg.input_norm not in ("imagenet", "caffe"):
            raise ValueError(f"input_norm must be imagenet or caffe, got {cfg.input_norm!r}")
        self.caffe = cfg.input_norm == "caffe"
        mean, std = (CAFFE_BGR_MEAN, (1.0,) * 3) if self.caffe else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        weights = torch.tensor([float(w) for w in cfg.class_weights]) if cfg.class_weights else None
        if weights is not None and len(weights) != cfg.num_classes:
            raise ValueError(f"class_weights has {len(weights)} values for {cfg.num_classes} classes")
        self.register_buffer("class_weights", weights, persistent=False)

    def logits(self, image):
        """(B, 3, H, W) RGB in [0, 1] -> main, aux logits (B, K, H, W)."""
        if self.caffe:  # the official input, computed as officially: BGR x 255 - mean (float32 rounding included)
            return self.net(image.flip(1) * 255 - self.mean)
        return self.net((image - self.mean) / self.std)

    def forward(self, batch, step):
        """The training step -> {"loss": total, "loss_main": OHEM CE (main), "loss_aux": CE (aux)}, scalars."""
        cfg, label = self.cfg, batch["label"]
        main, aux = self.logits(batch["image"])  # (B, K, H, W) each
        if cfg.use_ohem:
            loss_main = ohem_cross_entropy(main, label, cfg.ohem_thresh, cfg.ohem_min_kept, self.class_weights)
        else:
            loss_main = F.cross_entropy(main.float(), label, self.class_weights, ignore_index=IGNORE)
        loss_aux = F.cross_entropy(aux.float(), label, self.class_weights, ignore_index=IGNORE)  # weighted mean
        return {"loss": loss_main + cfg.aux_weight * loss_aux, "loss_main": loss_main, "loss_aux": loss_aux}

    @torch.no_grad()
    def predict(self, batch, vocab=None):
        """{"image": (B, 3, H, W)} -> (B, K, H, W) softmax scores of the main head, whole image (call in eval mode).

        `vocab` is ignored: ANN is a closed-vocabulary model."""
        main, _ = self.logits(batch["image"])
        return main.float().softmax(1)


# ----------------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg, pretrained=True):
    """The training wrapper for `cfg`. pretrained=False skips the ImageNet weights (e.g. to load a checkpoint)."""
    if pretrained and cfg.backbone != "toy" and not cfg.pretrained_backbone:
        raise ValueError(f"backbone {cfg.backbone} needs ImageNet weights: set --pretrained_backbone to a "
                           "torchvision weights name (e.g. ResNet101_Weights.IMAGENET1K_V1) or a local .pth file")
    return ANN(cfg, ANNNet(cfg, pretrained))


# ----------------------------------------------------------------------------------------------------------------------
# Released checkpoint: MendelXu/ANN's Cityscapes model (fs_annn_cityscapes_segohem_latest.pth, 79.9 mIoU val, ss)
# ----------------------------------------------------------------------------------------------------------------------
# (official key regex, our key), read from MendelXu/ANN models/seg/nets/annn.py, seg/utils/{afnb,apnb}.py and
# backbones/resnet/*. Official names: fusion = AFNB, context = [3x3 conv, BNReLU, APNB], cls, dsn = the aux head;
# each block keeps its one attention in stages.0, and ModuleHelper.BNReLU is Sequential(BN, ReLU), hence the ".1.0".
OFFICIAL_KEYS = (
    (r"backbone\.prefix\.(.+)", r"net.backbone.stem.\1"),  # the deep stem: conv1..3, bn1..3
    (r"backbone\.(layer\d\..+)", r"net.backbone.\1"),  # torchvision's Bottleneck names
    (r"fusion\.stages\.0\.f_(key|query)\.0\.(.+)", r"net.afnb.attention.\1.0.\2"),
    (r"fusion\.stages\.0\.f_(key|query)\.1\.0\.(.+)", r"net.afnb.attention.\1.1.\2"),
    (r"fusion\.stages\.0\.f_value\.(.+)", r"net.afnb.attention.value.\1"),
    (r"fusion\.stages\.0\.W\.(.+)", r"net.afnb.attention.W_o.\1"),
    (r"fusion\.conv_bn_dropout\.([01])\.(.+)", r"net.afnb.fuse.\1.\2"),  # conv, BN (no ReLU in AFNB)
    (r"context\.0\.(.+)", r"net.conv.0.\1"),
    (r"context\.1\.0\.(.+)", r"net.conv.1.\1"),
    (r"context\.2\.stages\.0\.f_key\.0\.(.+)", r"net.apnb.attention.key.0.\1"),  # APNB: f_query IS f_key (below)
    (r"context\.2\.stages\.0\.f_key\.1\.0\.(.+)", r"net.apnb.attention.key.1.\1"),
    (r"context\.2\.stages\.0\.f_value\.(.+)", r"net.apnb.attention.value.\1"),
    (r"context\.2\.stages\.0\.W\.(.+)", r"net.apnb.attention.W_o.\1"),
    (r"context\.2\.conv_bn_dropout\.0\.(.+)", r"net.apnb.fuse.0.\1"),
    (r"context\.2\.conv_bn_dropout\.1\.0\.(.+)", r"net.apnb.fuse.1.\1"),
    (r"cls\.(.+)", r"net.classifier.\1"),
    (r"dsn\.0\.(.+)", r"net.aux.0.\1"),
    (r"dsn\.1\.0\.(.+)", r"net.aux.1.\1"),
    (r"dsn\.3\.(.+)", r"net.aux.4.\1"),
)
# APNB's f_query is the same module as its f_key, so the state dict holds it twice; the copy must equal f_key.
OFFICIAL_SHARED = (r"context\.2\.stages\.0\.f_query\.(.+)", r"context.2.stages.0.f_key.\1")


# Copied from san.listing
def listing(keys, n=20):
    """The first n keys and how many more, for error messages."""
    return str(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# Copied from san.released_name
def released_name(name, released, to_ours):
    """Our key `name`, not filled by a released file -> its name there: a file key mapping into the same module of
    ours (released: official key -> ours), as is or its last piece swapped, checked by to_ours; "?" if none."""
    module, _, leaf = name.rpartition(".")
    twins = [k for k, o in released.items() if (o or "").rpartition(".")[0] == module]
    return next((c for k in twins for c in (k, f"{k.rpartition('.')[0]}.{leaf}") if to_ours(c) == name), "?")


def official_name_to_ours(key):
    """One official key -> our key, or None if no rule of OFFICIAL_KEYS matches it."""
    for pattern, target in OFFICIAL_KEYS:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target)
    return None


def official_weights(checkpoint):
    """The state dict inside a released file ({"state_dict": ..., "config_dict": ...}), without DataParallel's
    "module." prefix."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k.removeprefix("module."): v for k, v in state.items()}


def official_preset(state):
    """The preset of a released checkpoint: the deep stem's conv2 says paper_deepstem."""
    return "paper_deepstem" if "backbone.prefix.conv2.weight" in state else None


def convert_official_state_dict(official, cfg):
    """A released ANN checkpoint (or its state dict) -> the state dict of build_model(cfg, pretrained=False).

    Unknown, missing or mis-shaped keys raise a ValueError that lists them. BatchNorm's num_batches_tracked, which
    PyTorch < 0.4.1 did not save and eval never reads, is kept at ours when absent."""
    official = official_weights(official)
    ours = build_model(cfg, pretrained=False).state_dict()
    out, unknown, mismatched, released = {}, [], [], {}
    for key, value in official.items():
        shared = re.fullmatch(OFFICIAL_SHARED[0], key)
        if shared:  # the second name of APNB's shared query/key projection
            twin = official.get(shared.expand(OFFICIAL_SHARED[1]))
            if twin is None or not torch.equal(twin, value):
                unknown.append(f"{key} (differs from its f_key twin)")
            continue
        name = released[key] = official_name_to_ours(key)
        if name not in ours:
            unknown.append(key if name is None else f"{key} (-> {name})")
        elif ours[name].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(ours[name].shape)}")
        else:
            out[name] = value.to(ours[name].dtype)
    out.update({k: v for k, v in ours.items() if k.endswith("num_batches_tracked") and k not in out})
    missing = [f"{released_name(m, released, official_name_to_ours)} (-> {m})" for m in sorted(set(ours) - set(out))]
    if unknown or missing or mismatched:
        raise ValueError(f"the checkpoint does not fit ANN with this config ({len(unknown)} unknown, {len(missing)} "
                         f"missing, {len(mismatched)} mis-shaped keys): unknown {listing(unknown)}, missing "
                         f"{listing(missing)}, mis-shaped {listing(mismatched)}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Self-check: python ann.py
# ----------------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = PRESETS["toy"]
    for context in ("apnb", "nl", "none"):
        model = build_model(replace(cfg, context=context))
        batch = {"image": torch.rand(2, 3, cfg.crop_size, cfg.crop_size),
                 "label": torch.randint(0, cfg.num_classes, (2, cfg.crop_size, cfg.crop_size))}
        losses = model(batch, step=0)
        losses["loss"].backward()
        res4, res5 = model.net.backbone(batch["image"])
        model.eval()
        scores = model.predict(batch)
        print(f"context={context}: res4 {tuple(res4.shape)} res5 {tuple(res5.shape)} -> scores {tuple(scores.shape)}, "
              + ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
              + f", {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters")
