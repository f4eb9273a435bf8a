"""zsseg (SimBaseline): a two-stage open-vocabulary semantic segmenter, MaskFormer proposals + CLIP on masked crops.

Paper: Mengde Xu, Zheng Zhang, Fangyun Wei, Yutong Lin, Yue Cao, Han Hu, Xiang Bai. "A Simple Baseline for
Open-Vocabulary Semantic Segmentation with Pre-trained Vision-language Model". ECCV 2022. arXiv 2112.14757.
Official code: github.com/MendelXu/zsseg.baseline (detectron2 0.6 + MaskFormer + a modified OpenAI CLIP).

The idea. Split open-vocabulary segmentation in two. (1) A class-agnostic-ish mask proposal network, MaskFormer,
trained on the seen classes only, whose class head outputs an embedding compared by cosine with CLIP text embeddings
(plus a learned "no object" embedding), so its proposals generalise to classes it never saw. (2) Each proposal is
binarised, its tight box cropped out of the image, the outside of the mask filled with the mean colour, and the crop
classified by the frozen CLIP image encoder against the text of any vocabulary. The two class scores are blended
geometrically: seen classes trust the trained head (p^l c^(1-l)), unseen classes trust CLIP (p^(1-l) c^l). Text comes
from prompts learned CoOp-style on crops of seen classes (stage 0), or from hand-written ViLD templates. It works,
but CLIP runs once per proposal (up to 100 times per image): the cost SAN (san.py) removes.

File map (section -> paper):
  Config, PRESETS ........................ Sec. 4.1 implementation details; official configs/*.yaml
  load_clip, encode_vocabulary ........... frozen CLIP, hand-written prompts (ViLD templates)
  PromptLearner .......................... Sec. 3.3 learnable prompts (CoOp): 16 context vectors, stage 0
  build_backbone, PixelDecoder ........... MaskFormer: ResNet + FPN pixel decoder (1/4 per-pixel embeddings)
  TransformerDecoder, ZeroShotMaskFormer . MaskFormer: DETR decoder, mask MLP, class head in CLIP's text space
  masked_crops, ensemble ................. Sec. 3.2 mask-crop CLIP classification, the seen/unseen geometric ensemble
  HungarianMatcher, SetCriterion ......... MaskFormer v1: class + focal + dice matching and losses, deep supervision
  ZSSegWrapper ........................... stage 0 then stage 1 in one training loop, inference, proposals for plots
  OFFICIAL_KEYS, convert_official_... .... the two released COCO-Stuff models (R101c) -> our weights

Differences from the official code:
  1. Backbone: torchvision's ResNet (7x7 stem, no dilation, weights by torchvision name or a local file) instead of
     detectron2's DeepLab "R101c" (3-conv stem, multi-grid res5, R-103.pkl). Frozen BatchNorm as detectron2; the
     toy's from-scratch ResNet-10 trains its BatchNorm. R101c itself is backbone="resnet101c" (presets *_r101c, which
     load the released models: convert_official_state_dict); R-103.pkl is not read.
  2. Stage 0 (prompt learning) runs inside the same training loop: the first `prompt_iters` steps train only the
     context vectors on GT mask crops of the training batch (official: a separate run on 32/128 sampled crops per
     class, SGD lr 0.02 cosine, RandomResizedCrop); then they are frozen and MaskFormer trains. One AdamW serves both
     stages (the prompt group with its own lr), under train.py's single schedule.
  3. Which classes count as "seen" in the ensemble: those of a vocabulary that contains the whole training vocabulary
     (the generalized zero-shot set of the training dataset) and are in it; in any other vocabulary (cross-dataset
     sets, a free --vocab) every class is unseen -- the official rule, made from names instead of dataset metadata.
  4. Augmentation (resize, crop, flip, jitter) lives in data.py; class names are stripped before prompting as
     officially; the text tokenizer is open_clip's, so a CLIP with a shorter context (the toy) works.

Labels: 255 = ignore; no-object is index K of the logits. Shapes: B batch, Q queries, K classes (+1 no-object),
D CLIP embedding, E decoder width, T GT masks, N valid proposals, S CLIP input side, H x W image, h x w at 1/4.
"""
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace

import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy.optimize import linear_sum_assignment

TASK = "semseg"
IGNORE = 255
VILD_TEMPLATES = (  # the 14 ViLD prompts (official template set "vild")
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
)


# ----------------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # data (data.py builds the datasets)
    train_dataset: str = "coco_stuff_171_base"  # seen classes only: unseen pixels are 255 in the `_base` maps
    eval_datasets: tuple = ("coco_stuff_171",)  # generalized zero-shot: all classes predicted jointly
    data_root: str = "datasets"  # root of the real datasets
    num_classes: int = 156  # size of the training vocabulary
    class_names: tuple = ()  # training vocabulary, verbatim; () = filled from the training set by train.py
    crop_size: int = 640  # training crop
    base_size: int = 640  # short side before random scaling
    scale_range: tuple = (0.5, 1.5)  # random rescale of base_size
    # CLIP (frozen)
    clip_model: str = "ViT-B-16"  # open_clip model name, or the path of an open_clip model-config JSON
    clip_pretrained: str = "openai"  # open_clip pretrained tag or a local weights file
    clip_quick_gelu: bool = True  # OpenAI CLIP weights were trained with QuickGELU
    clip_trained_by: str = ""  # model file that trains clip_pretrained when it is missing ("" = downloaded)
    prompt: str = "learnable"  # "learnable" (CoOp, stage 0) or "vild" (the 14 ViLD templates)
    prompt_ctx: int = 16  # learnable context vectors before the class name
    prompt_iters: int = 16000  # stage 0: the first iterations train only the context vectors
    prompt_lr: float = 2e-3  # AdamW lr of the context vectors (official: SGD 0.02, cosine, separate run)
    # mask proposals (MaskFormer)
    backbone: str = "resnet101"  # torchvision ResNet name, "resnet101c" (detectron2's DeepLab R101c: deep stem,
    # res5 multi-grid; the released models' backbone) or "resnet10" (BasicBlock x [1,1,1,1], for the toy)
    backbone_weights: str = "IMAGENET1K_V2"  # torchvision weights name, a local state-dict file, or "none"
    conv_dim: int = 256  # pixel decoder width
    mask_dim: int = 256  # per-pixel / mask embedding dim
    hidden_dim: int = 256  # E, transformer decoder width
    num_queries: int = 100  # Q
    dec_layers: int = 6  # transformer decoder layers, all supervised
    nheads: int = 8  # decoder attention heads
    dim_feedforward: int = 2048  # decoder FFN width
    embed_hidden_dim: int = 1024  # class-head MLP hidden width (256 -> 1024 -> D)
    size_divisibility: int = 32  # inputs are zero-padded (after normalisation) to a multiple of this
    # losses (MaskFormer v1)
    class_weight: float = 1.0  # CE weight and matching cost
    focal_weight: float = 20.0  # sigmoid focal mask loss weight and matching cost
    dice_weight: float = 1.0  # dice weight and matching cost
    no_object_weight: float = 0.1  # CE weight of the no-object class
    # inference (mask-crop CLIP classification and the ensemble)
    mask_thr: float = 0.5  # binarisation threshold of the proposals
    ensemble_weight: float = 0.8  # lambda: seen p^l c^(1-l), unseen p^(1-l) c^l
    # optimisation (train.py)
    batch_size: int = 32  # global batch
    max_iters: int = 76000  # iterations: prompt_iters + 60k MaskFormer iterations
    lr: float = 1e-4  # AdamW learning rate
    backbone_multiplier: float = 0.1  # backbone lr factor
    weight_decay: float = 1e-4  # AdamW weight decay (0 on norms and embeddings)
    schedule: str = "poly"  # lr schedule
    poly_power: float = 0.9  # poly exponent
    warmup_iters: int = 0  # linear warm-up iterations (official: none)
    grad_clip: float = 0.01  # max L2 norm of all gradients
    amp: bool = False  # official: no AMP
    eval_interval: int = 5000  # iterations between evaluations
    log_interval: int = 20  # iterations between log lines
    ckpt_interval: int = 5000  # iterations between checkpoints
    num_workers: int = 4  # data-loading processes
    seed: int = 0  # random seed


TOY_SEEN_CLASSES = ("red square", "red triangle", "green square", "green circle", "blue circle", "blue triangle",
                    "yellow square", "yellow triangle", "background")  # data.ToyShapes("seen").class_names
VOC_SEEN_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                    "diningtable", "dog", "horse", "motorbike", "person")  # VOC ids 1-15; unseen: 16-20
CROSS_DATASET_SETS = ("ade20k_847", "pcontext_459", "ade20k_150", "pcontext_59", "voc_20")
PRESETS = {
    # COCO-Stuff 156 seen / 15 unseen, R101c, learned prompts, lambda 0.8. Paper: 39.3 / 36.3 / 37.8 (s/u/h).
    "paper_coco": Config(eval_datasets=("coco_stuff_171",)),
    # VOC 15 / 5 (background ignored), crop 512, batch 16, 20k iterations (+3.2k prompt). Paper: 83.5 / 72.5 / 77.5.
    "paper_voc": Config(train_dataset="voc_20_base", eval_datasets=("voc_20",), num_classes=15, crop_size=512,
                        base_size=512, scale_range=(1.0, 1.0), prompt_iters=3200, ensemble_weight=0.7,
                        batch_size=16, max_iters=23200),
    # Cross-dataset: the 156 seen COCO-Stuff classes with ViLD prompts, 120k iterations (the official README).
    "paper_cross": Config(eval_datasets=CROSS_DATASET_SETS, prompt="vild", prompt_iters=0, max_iters=120000,
                          ensemble_weight=0.7),
    "toy": Config(  # the 8 seen colour x shape classes + background; evaluated on all 13 (4 unseen); CPU sizes
        train_dataset="toy_shapes_seen", eval_datasets=("toy_shapes",), num_classes=9, class_names=TOY_SEEN_CLASSES,
        crop_size=128, base_size=128, scale_range=(1.0, 1.0),
        clip_model="runs/toy_clip/toy_clip.json", clip_pretrained="runs/toy_clip/toy_clip.pt", clip_quick_gelu=False,
        clip_trained_by="toy_clip", prompt_ctx=4, prompt_iters=100,  # the toy CLIP's context is 24 tokens
        backbone="resnet10", backbone_weights="none", conv_dim=64, mask_dim=64, hidden_dim=64, num_queries=16,
        nheads=4, dim_feedforward=256, embed_hidden_dim=128, batch_size=8, max_iters=600, lr=1e-3,
        backbone_multiplier=1.0, eval_interval=600, log_interval=50, ckpt_interval=300, num_workers=2),
}
PRESETS["paper"] = PRESETS["paper_coco"]
# The two released models (convert_official_state_dict) on R101c; training them needs its weights in our names.
PRESETS["paper_coco_r101c"] = replace(PRESETS["paper_coco"], backbone="resnet101c", backbone_weights="R-103.pth")
PRESETS["paper_cross_r101c"] = replace(PRESETS["paper_cross"], backbone="resnet101c", backbone_weights="R-103.pth")


def prerequisites(cfg):
    """{file: model that trains it}: train.py trains the toy CLIP first when its weights are missing."""
    return {cfg.clip_pretrained: cfg.clip_trained_by} if cfg.clip_trained_by else {}


# ----------------------------------------------------------------------------------------------------------------------
# Frozen CLIP: loading, hand-written and learned prompts
# ----------------------------------------------------------------------------------------------------------------------
# Copied from san.load_clip
def load_clip(cfg, pretrained=True):
    """(open_clip CLIP, tokenizer), with the weights cfg.clip_pretrained if `pretrained`, else random."""
    name = cfg.clip_model
    made_by = f" (it is trained by `python train.py --model {cfg.clip_trained_by}`)" if cfg.clip_trained_by else ""
    if name.endswith(".json"):  # a model-config file, registered under its file stem
        if not os.path.isfile(name):
            raise FileNotFoundError(f"open_clip model config {name!r} not found{made_by}")
        open_clip.add_model_config(name)
        name = os.path.splitext(os.path.basename(name))[0]
    if not pretrained:  # random weights that a checkpoint replaces: open_clip's "initialized randomly" is noise here
        logging.disable(logging.WARNING)
        try:
            clip = open_clip.create_model(name, force_quick_gelu=cfg.clip_quick_gelu)
        finally:
            logging.disable(logging.NOTSET)
        return clip, open_clip.get_tokenizer(name)
    weights, tag = cfg.clip_pretrained, open_clip.get_pretrained_cfg(name, cfg.clip_pretrained)
    if not tag and not os.path.isfile(weights):
        raise FileNotFoundError(f"CLIP weights file {weights!r} for {name} not found{made_by}")
    try:
        clip = open_clip.create_model(name, pretrained=weights, force_quick_gelu=cfg.clip_quick_gelu)
    except Exception as e:  # never fall back to a random CLIP
        if not tag:
            raise
        hub = f" from https://huggingface.co/{tag['hf_hub'].rstrip('/')}" if tag.get("hf_hub") else ""
        raise FileNotFoundError(f"could not load CLIP weights {weights!r} for {name} (no network?); download "
                           f"open_clip_pytorch_model.bin{hub} and pass --clip_pretrained PATH") from e
    return clip, open_clip.get_tokenizer(name)


# Copied from san.encode_vocabulary
@torch.no_grad()
def encode_vocabulary(clip, tokenizer, names, templates=VILD_TEMPLATES):
    """K names -> (K, D): each prompt's text embedding normalised, averaged over the templates, renormalised."""
    device = clip.logit_scale.device
    emb = torch.stack([clip.encode_text(tokenizer([t.format(n) for n in names]).to(device), normalize=True)
                       for t in templates])  # (templates, K, D)
    return F.normalize(emb.mean(0), dim=-1)  # (K, D)


class PromptLearner(nn.Module):
    """CoOp prompts: [SOS] ctx_1 .. ctx_n <class name> . [EOS], the n context vectors learned, CLIP frozen.

    The sequence is built by tokenizing "X X .. X <name>." and replacing the n placeholder embeddings by the context
    vectors; padding keeps the embedding of token 0, as officially. Pooled at [EOS] (the largest token id)."""

    def __init__(self, clip, tokenizer, n_ctx):
        super().__init__()
        self.tokenizer, self.n_ctx = tokenizer, n_ctx
        self.ctx = nn.Parameter(torch.randn(n_ctx, clip.token_embedding.weight.shape[1]) * 0.02)  # N(0, 0.02)

    def forward(self, clip, names):
        """K names -> (K, D) unit text embeddings; gradients reach only self.ctx."""
        tokens = self.tokenizer([" ".join(["X"] * self.n_ctx) + f" {n}." for n in names]).to(self.ctx.device)
        if tokens[:, -1].ne(0).any():  # the tokenizer truncated a prompt
            raise ValueError(f"a prompt of {self.n_ctx} context vectors + class name exceeds CLIP's context length")
        x = clip.token_embedding(tokens)  # (K, L, C)
        x = torch.cat([x[:, :1], self.ctx.to(x.dtype).expand(len(names), -1, -1), x[:, 1 + self.n_ctx:]], dim=1)
        x = clip.transformer(x + clip.positional_embedding.to(x.dtype), attn_mask=clip.attn_mask)  # (K, L, C)
        x = clip.ln_final(x)[torch.arange(len(names)), tokens.argmax(-1)]  # (K, C) at [EOS]
        return F.normalize(x @ clip.text_projection, dim=-1)  # (K, D)


# ----------------------------------------------------------------------------------------------------------------------
# MaskFormer proposal generator: backbone, pixel decoder, transformer decoder
# ----------------------------------------------------------------------------------------------------------------------
def build_backbone(cfg, pretrained=True):
    """A torchvision ResNet; weights by torchvision name, a local file, or "none" (stated; then BatchNorm trains,
    else it is frozen as detectron2's); random if not `pretrained` (a checkpoint follows)."""
    scratch = cfg.backbone_weights == "none"  # BatchNorm trains from scratch; frozen on pre-trained weights
    norm = nn.BatchNorm2d if scratch else torchvision.ops.FrozenBatchNorm2d
    if cfg.backbone == "resnet10":  # toy: one BasicBlock per stage, widths 64..512
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm)
    elif cfg.backbone == "resnet101c":  # detectron2's DeepLab ResNet-101 (build_resnet_deeplab_backbone, R101c)
        net = torchvision.models.resnet101(weights=None, norm_layer=norm)
        del net.conv1, net.bn1  # the deep stem: three 3x3 convs 3 -> 64 -> 64 -> 128, the first with stride 2
        net.stem = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(3, 64, 3, 2, 1, bias=False), bn1=norm(64), relu1=nn.ReLU(),
            conv2=nn.Conv2d(64, 64, 3, 1, 1, bias=False), bn2=norm(64), relu2=nn.ReLU(),
            conv3=nn.Conv2d(64, 128, 3, 1, 1, bias=False), bn3=norm(128), relu3=nn.ReLU()))
        net.layer1[0].conv1 = nn.Conv2d(128, 64, 1, bias=False)  # res2 takes the stem's 128 channels
        net.layer1[0].downsample[0] = nn.Conv2d(128, 256, 1, bias=False)
        for block, grid in zip(net.layer4, (1, 2, 4)):  # res5 multi-grid: its 3x3 convs dilated 1, 2, 4 (stride 32)
            block.conv2.dilation = block.conv2.padding = (grid, grid)
    else:
        net = torchvision.models.get_model(cfg.backbone, weights=None, norm_layer=norm)
    w = cfg.backbone_weights
    if pretrained and scratch:
        print(f"zsseg: backbone {cfg.backbone} trains from scratch (backbone_weights='none')")
    elif pretrained and os.path.isfile(w):
        net.load_state_dict(torch.load(w, map_location="cpu", weights_only=True))
    elif pretrained:
        try:
            weights = torchvision.models.get_model_weights(cfg.backbone)[w]
        except (KeyError, ValueError):
            raise ValueError(f"backbone_weights {w!r}: not a file, nor a torchvision weights name of {cfg.backbone}, "
                             f"nor 'none'") from None
        try:
            net.load_state_dict(weights.get_state_dict(progress=False))
        except Exception as e:  # never a silent random init
            raise FileNotFoundError(f"could not load {cfg.backbone} weights {w} (no network?); download {weights.url} "
                               f"and pass --backbone_weights PATH") from e
    net.fc = nn.Identity()
    return net


def backbone_features(net, x):
    """x (B, 3, H, W) -> [res2 (B, C2, H/4, W/4), res3 /8, res4 /16, res5 (B, C5, H/32, W/32)]."""
    x, feats = net.maxpool(net.stem(x) if hasattr(net, "stem") else net.relu(net.bn1(net.conv1(x)))), []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        feats.append(x)
    return feats


def conv_gn(cin, cout, k, relu=True):
    """detectron2 Conv2d with GroupNorm(32) (and ReLU), Caffe2 Xavier fill, no bias."""
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    return nn.Sequential(conv, nn.GroupNorm(32, cout), *([nn.ReLU()] if relu else []))


class PixelDecoder(nn.Module):
    """MaskFormer's BasePixelDecoder: an FPN top-down path from res5 to res2, then a 3x3 conv to mask features."""

    def __init__(self, in_channels, conv_dim, mask_dim):
        super().__init__()
        self.top = conv_gn(in_channels[-1], conv_dim, 3)
        self.lateral = nn.ModuleList(conv_gn(c, conv_dim, 1, relu=False) for c in in_channels[:-1])
        self.output = nn.ModuleList(conv_gn(conv_dim, conv_dim, 3) for _ in in_channels[:-1])
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)

    def forward(self, feats):
        """[res2..res5] -> (B, mask_dim, H/4, W/4)."""
        y = self.top(feats[-1])  # (B, conv_dim, H/32, W/32)
        for x, lat, out in zip(feats[-2::-1], self.lateral[::-1], self.output[::-1]):
            y = out(lat(x) + F.interpolate(y, size=x.shape[-2:], mode="nearest"))  # /16, /8, /4
        return self.mask_features(y)  # (B, mask_dim, H/4, W/4)


def sine_position(x, temperature=10000):
    """DETR's normalised sine embedding of a (B, C, h, w) map -> (B, C, h, w)."""
    B, C, h, w = x.shape
    eps, scale, n = 1e-6, 2 * torch.pi, C // 2
    y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w) / (h + eps) * scale
    x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None].expand(h, w) / (w + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(n, device=x.device) // 2) / n)  # (n,)
    px, py = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t  # (h, w, n)
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=3).flatten(2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=3).flatten(2)
    return torch.cat((py, px), dim=2).permute(2, 0, 1)[None].expand(B, -1, -1, -1).to(x.dtype)  # (B, C, h, w)


class DecoderLayer(nn.Module):
    """DETR decoder layer, post-norm: self-attention, cross-attention to the image, FFN (ReLU), dropout 0.1."""

    def __init__(self, dim, heads, ffn, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt, memory, query_pos, pos):
        """tgt (B, Q, E), memory (B, hw, E), query_pos (B, Q, E), pos (B, hw, E) -> (B, Q, E)."""
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.drop(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt = self.norms[1](tgt + self.drop(self.cross_attn(tgt + query_pos, memory + pos, memory,
                                                            need_weights=False)[0]))
        return self.norms[2](tgt + self.drop(self.ffn(tgt)))


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's MLP)."""

    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


# ----------------------------------------------------------------------------------------------------------------------
# The network: MaskFormer with a class head in CLIP's text space
# ----------------------------------------------------------------------------------------------------------------------
class ZeroShotMaskFormer(nn.Module):
    """Backbone -> pixel decoder (mask features at 1/4) and res5 -> 6-layer decoder over Q queries; per layer a mask
    embedding (3-layer MLP) and a class embedding (2-layer MLP to D) compared by cosine x 100 with the text."""

    def __init__(self, cfg, text_dim, pretrained=True):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg, pretrained)
        chans = [m[-1].conv3.out_channels if hasattr(m[-1], "conv3") else m[-1].conv2.out_channels
                 for m in (self.backbone.layer1, self.backbone.layer2, self.backbone.layer3, self.backbone.layer4)]
        self.pixel_decoder = PixelDecoder(chans, cfg.conv_dim, cfg.mask_dim)
        E = cfg.hidden_dim
        self.input_proj = nn.Conv2d(chans[-1], E, 1)
        nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
        nn.init.zeros_(self.input_proj.bias)
        self.query_embed = nn.Embedding(cfg.num_queries, E)
        self.layers = nn.ModuleList(DecoderLayer(E, cfg.nheads, cfg.dim_feedforward) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(E)
        self.mask_embed = MLP([E, E, E, cfg.mask_dim])
        self.class_embed = MLP([E, cfg.embed_hidden_dim, text_dim])  # PAPER: class head -> CLIP's text space
        self.non_object = nn.Parameter(torch.randn(1, text_dim) * text_dim ** -0.5)  # learnable "no object"
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images, text):
        """images (B, 3, H, W) in [0, 1]; text (K, D) unit rows -> {pred_logits (B, Q, K+1), pred_masks (B, Q, Hp/4,
        Wp/4) logits (Hp, Wp: H, W padded to size_divisibility), aux_outputs: [the same of decoder layers 1..5]}."""
        (H, W), d = images.shape[-2:], self.cfg.size_divisibility
        x = F.pad((images - self.mean) / self.std, (0, -W % d, 0, -H % d))  # (B, 3, Hp, Wp), 0 = the mean colour
        feats = backbone_features(self.backbone, x)  # res2..res5
        mask_features = self.pixel_decoder(feats)  # (B, mask_dim, H/4, W/4)
        src = self.input_proj(feats[-1])  # (B, E, H/32, W/32)
        pos = sine_position(src).flatten(2).transpose(1, 2)  # (B, hw, E)
        memory = src.flatten(2).transpose(1, 2)  # (B, hw, E)
        query_pos = self.query_embed.weight.expand(images.shape[0], -1, -1)  # (B, Q, E)
        classes = F.normalize(torch.cat([text.to(src.dtype), self.non_object.to(src.dtype)]), dim=-1)  # (K+1, D)
        tgt, outs = torch.zeros_like(query_pos), []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, pos)
            hs = self.decoder_norm(tgt)  # (B, Q, E), every layer decoded (deep supervision)
            logits = 100 * F.normalize(self.class_embed(hs), dim=-1) @ classes.T  # (B, Q, K+1), fixed temperature
            masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(hs), mask_features)  # (B, Q, H/4, W/4)
            outs.append({"pred_logits": logits, "pred_masks": masks})
        return {**outs[-1], "aux_outputs": outs[:-1]}


# ----------------------------------------------------------------------------------------------------------------------
# Mask-crop CLIP classification and the ensemble (inference)
# ----------------------------------------------------------------------------------------------------------------------
def masked_crops(image, masks, size, mean):
    """PAPER: image (3, H, W) in [0, 1], masks (N, H, W) bool -> (N, 3, size, size) crops of each mask's tight box,
    pixels outside the mask set to `mean` (3,), resized bicubically. Every mask must have a pixel."""
    crops = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1  # tight box (expand ratio 1.0)
        crop = torch.where(m[y0:y1, x0:x1], image[:, y0:y1, x0:x1], mean.view(3, 1, 1))  # mean fill outside
        crops.append(F.interpolate(crop[None], size=(size, size), mode="bicubic", align_corners=False))
    return torch.cat(crops) if crops else image.new_zeros(0, 3, size, size)  # (N, 3, S, S)


def ensemble(p, c, seen, lam):
    """PAPER, the geometric ensemble: p (.., K) proposal-head probs, c (.., K) CLIP crop probs, seen (K,) bool ->
    seen classes p^lam c^(1-lam), unseen classes p^(1-lam) c^lam."""
    return torch.where(seen, p ** lam * c ** (1 - lam), p ** (1 - lam) * c ** lam)


# ----------------------------------------------------------------------------------------------------------------------
# Losses and matching (MaskFormer v1: full-resolution focal + dice)
# ----------------------------------------------------------------------------------------------------------------------
def focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """(M, P), (M, P) -> (M,) sigmoid focal loss averaged over the pixels (RetinaNet's, as MaskFormer)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return (ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))).mean(-1)


# Copied from san.dice_loss
def dice_loss(logits, targets):
    """(M, P), (M, P) -> (M,) 1 - (2|p.t| + 1) / (|p| + |t| + 1)."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


class HungarianMatcher(nn.Module):
    """Per image, the query <-> GT-mask assignment of least cost class * (-p[class]) + focal * focal + dice * dice,
    the GT masks nearest-resized to the prediction's resolution (MaskFormer v1)."""

    def __init__(self, cost_class=1.0, cost_focal=20.0, cost_dice=1.0):
        super().__init__()
        self.cost_class, self.cost_focal, self.cost_dice = cost_class, cost_focal, cost_dice

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs {pred_logits (B, Q, K+1), pred_masks (B, Q, h, w)}, targets [{labels (T,), masks (T, H, W)}] ->
        [(query indices, target indices)] per image, int64 tensors of equal length min(Q, T)."""
        indices = []
        for logits, masks, t in zip(outputs["pred_logits"], outputs["pred_masks"], targets):
            if len(t["labels"]) == 0:
                indices.append((t["labels"].new_zeros(0), t["labels"].new_zeros(0)))
                continue
            cost_class = -logits.float().softmax(-1)[:, t["labels"]]  # (Q, T)
            gt = F.interpolate(t["masks"][:, None].float(), size=masks.shape[-2:], mode="nearest")[:, 0]
            x, gt = masks.float().flatten(1), gt.flatten(1)  # (Q, P), (T, P)
            p, P = x.sigmoid(), x.shape[1]
            pos = 0.25 * (1 - p) ** 2 * F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
            neg = 0.75 * p ** 2 * F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
            cost_focal = (pos @ gt.T + neg @ (1 - gt).T) / P  # (Q, T)
            cost_dice = 1 - (2 * p @ gt.T + 1) / (p.sum(-1)[:, None] + gt.sum(-1)[None] + 1)  # (Q, T)
            C = self.cost_class * cost_class + self.cost_focal * cost_focal + self.cost_dice * cost_dice
            q, j = linear_sum_assignment(C.cpu().numpy())
            indices.append((torch.as_tensor(q, device=masks.device), torch.as_tensor(j, device=masks.device)))
        return indices


class SetCriterion(nn.Module):
    """CE over K+1 classes (no-object weight 0.1), and focal + dice on the matched masks upsampled to the GT size,
    normalised by the number of GT masks (averaged over DDP ranks); the same for every decoder layer."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.matcher = cfg, HungarianMatcher(cfg.class_weight, cfg.focal_weight, cfg.dice_weight)

    def forward(self, outputs, targets):
        """-> {loss_ce, loss_focal, loss_dice, loss_ce_0, ... (decoder layer i), loss}, each already weighted."""
        num_masks = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=outputs["pred_logits"].device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            num_masks = num_masks / dist.get_world_size()
        num_masks = num_masks.clamp(min=1).item()
        losses = self.single(outputs, targets, num_masks)
        for i, aux in enumerate(outputs["aux_outputs"]):
            losses.update({f"{k}_{i}": v for k, v in self.single(aux, targets, num_masks).items()})
        losses["loss"] = sum(losses.values())
        return losses

    def single(self, out, targets, num_masks):
        cfg, logits = self.cfg, out["pred_logits"].float()  # (B, Q, K+1)
        K, indices = logits.shape[-1] - 1, self.matcher(out, targets)
        b = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])  # (M,)
        q = torch.cat([q for q, _ in indices])  # (M,)
        target_classes = torch.full(logits.shape[:2], K, device=logits.device)  # (B, Q) no-object unless matched
        target_classes[b, q] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        weight = torch.cat([logits.new_ones(K), logits.new_tensor([cfg.no_object_weight])])  # (K+1,)
        losses = {"loss_ce": cfg.class_weight * F.cross_entropy(logits.transpose(1, 2), target_classes, weight)}
        if len(q) == 0:
            zero = out["pred_masks"].sum() * 0.0
            return {**losses, "loss_focal": zero, "loss_dice": zero}
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])  # (M, H, W)
        src = F.interpolate(out["pred_masks"][b, q][:, None].float(), size=tgt.shape[-2:], mode="bilinear",
                            align_corners=False)[:, 0]  # (M, H, W): full resolution
        src, tgt = src.flatten(1), tgt.flatten(1)
        losses["loss_focal"] = cfg.focal_weight * focal_loss(src, tgt).sum() / num_masks
        losses["loss_dice"] = cfg.dice_weight * dice_loss(src, tgt).sum() / num_masks
        return losses


# Copied from san.semantic_targets
def semantic_targets(labels, num_classes):
    """labels (B, H, W) int, IGNORE = 255 -> per image {labels (T,): classes present, masks (T, H, W) float}; ignore
    pixels are 0 in every mask."""
    targets = []
    for label in labels:
        classes = label.unique()
        classes = classes[(classes != IGNORE) & (classes < num_classes)]  # (T,)
        targets.append({"labels": classes, "masks": (label[None] == classes[:, None, None]).float()})  # (T, H, W)
    return targets


# ----------------------------------------------------------------------------------------------------------------------
# Training wrapper: stage 0 (prompts), stage 1 (MaskFormer), two-stage inference, proposals for plots
# ----------------------------------------------------------------------------------------------------------------------
class ZSSegWrapper(nn.Module):
    """Owns the frozen CLIP, the prompt learner, the MaskFormer (`net`) and the criterion."""

    def __init__(self, cfg, clip, tokenizer, pretrained=True):
        super().__init__()
        if cfg.prompt not in ("learnable", "vild"):
            raise ValueError(f"prompt must be 'learnable' or 'vild', got {cfg.prompt!r}")
        self.cfg, self.clip, self.tokenizer = cfg, clip, tokenizer
        clip.requires_grad_(False)
        self.prompt = PromptLearner(clip, tokenizer, cfg.prompt_ctx) if cfg.prompt == "learnable" else None
        self.net = ZeroShotMaskFormer(cfg, clip.visual.output_dim, pretrained)
        self.criterion = SetCriterion(cfg)
        pre = getattr(clip.visual, "preprocess_cfg", {})  # CLIP's own mean/std (OpenAI's if create_model set none)
        for key, default in (("clip_mean", open_clip.OPENAI_DATASET_MEAN), ("clip_std", open_clip.OPENAI_DATASET_STD)):
            self.register_buffer(key, torch.tensor(pre.get(key[5:], default)), persistent=False)
        size = clip.visual.image_size  # crops go to CLIP at its own input size (224 for ViT-B/16)
        self.crop_size = size[0] if isinstance(size, (tuple, list)) else size
        self.text_cache = {}  # vocabulary -> (K, D), once the prompts are frozen
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self.text_cache.clear())

    def text(self, vocab):
        """K names -> (K, D) unit text embeddings (names stripped, as officially), cached: the prompts are frozen."""
        key = tuple(n.strip() for n in vocab)
        if key not in self.text_cache:
            with torch.no_grad(), torch.autocast(self.clip_mean.device.type, enabled=False):
                self.text_cache[key] = (self.prompt(self.clip, key) if self.prompt is not None
                                        else encode_vocabulary(self.clip, self.tokenizer, key))
        return self.text_cache[key]

    def clip_classify(self, image, masks, text):
        """image (3, H, W), masks (N, H, W) bool, text (K, D) -> (N, K) softmax of 100 cos over the K classes."""
        crops = masked_crops(image, masks, self.crop_size, self.clip_mean)  # (N, 3, S, S)
        crops = (crops - self.clip_mean.view(3, 1, 1)) / self.clip_std.view(3, 1, 1)
        emb = self.clip.encode_image(crops, normalize=True)  # (N, D)
        return (100 * emb @ text.to(emb.dtype).T).float().softmax(-1)  # no-object column dropped before the softmax

    def prompt_step(self, batch):
        """Stage 0: CE of CLIP's masked GT crops against the learned-prompt text of the training classes."""
        targets = semantic_targets(batch["label"], len(self.cfg.class_names))
        with torch.no_grad():
            crops = torch.cat([masked_crops(img, t["masks"] > 0, self.crop_size, self.clip_mean)
                               for img, t in zip(batch["image"], targets)])  # (M, 3, S, S)
            emb = self.clip.encode_image((crops - self.clip_mean.view(3, 1, 1)) / self.clip_std.view(3, 1, 1),
                                         normalize=True)  # (M, D)
        labels = torch.cat([t["labels"] for t in targets])  # (M,)
        text = self.prompt(self.clip, [n.strip() for n in self.cfg.class_names])  # (K, D), gradients to ctx
        logits = 100 * emb.float() @ text.float().T  # (M, K)
        acc = (logits.argmax(-1) == labels).float().mean() if len(labels) else logits.sum() * 0
        return {"loss_prompt": F.cross_entropy(logits, labels) if len(labels) else self.prompt.ctx.sum() * 0,
                "prompt_acc": acc.detach()}

    def forward(self, batch, step=0):
        """batch {image (B, 3, H, W) in [0, 1], label (B, H, W)} -> weighted losses; stage 0 before prompt_iters."""
        cfg = self.cfg
        if not cfg.class_names:
            raise ValueError("cfg.class_names is empty: zsseg trains against the text of the training vocabulary")
        if self.prompt is not None and step < cfg.prompt_iters:  # PAPER: stage 0, learn the prompts, CLIP frozen
            losses = self.prompt_step(batch)
            return {"loss": losses["loss_prompt"], **losses}
        d, (H, W) = cfg.size_divisibility, batch["label"].shape[-2:]
        labels = F.pad(batch["label"], (0, -W % d, 0, -H % d), value=IGNORE)  # (B, Hp, Wp), like the padded input
        out = self.net(batch["image"], self.text(cfg.class_names))  # prompts frozen from here on
        with torch.autocast(labels.device.type, enabled=False):
            return self.criterion(out, semantic_targets(labels, len(cfg.class_names)))

    @torch.no_grad()
    def predict_proposals(self, batch, vocab=None):
        """-> {masks (B, Q, H, W) sigmoid, class_probs (B, Q, K+1) of the proposal head, clip_probs (B, Q, K) of the
        masked crops (1 where the mask is empty), ensemble_probs (B, Q, K), valid (B, Q) bool}."""
        vocab = list(vocab if vocab is not None else self.cfg.class_names)
        if not vocab:
            raise ValueError("zsseg needs a vocabulary: predict(batch, vocab=[class names])")
        (H, W), text = batch["image"].shape[-2:], self.text(vocab)
        out = self.net(batch["image"], text)
        probs = out["pred_logits"].float().softmax(-1)  # (B, Q, K+1)
        masks = F.interpolate(out["pred_masks"].float(), scale_factor=4, mode="bilinear")[..., :H, :W].sigmoid()
        binary = masks > self.cfg.mask_thr  # (B, Q, H, W)
        valid = binary.flatten(2).any(-1)  # (B, Q): empty masks are not classified
        clip_probs = torch.ones_like(probs[..., :-1])  # (B, Q, K)
        for i in range(len(masks)):
            if valid[i].any():  # PAPER: one batched CLIP call over the masked crops of the image
                clip_probs[i, valid[i]] = self.clip_classify(batch["image"][i], binary[i, valid[i]], text)
        train = {n.strip() for n in self.cfg.class_names}
        names = [n.strip() for n in vocab]
        seen = torch.tensor([n in train for n in names] if train <= set(names) else [False] * len(names),
                            device=probs.device)  # difference 3: all unseen unless vocab holds the training one
        blend = ensemble(probs[..., :-1], clip_probs, seen, self.cfg.ensemble_weight)  # (B, Q, K)
        return {"masks": masks, "class_probs": probs, "clip_probs": clip_probs, "ensemble_probs": blend,
                "valid": valid}

    @torch.no_grad()
    def predict(self, batch, vocab=None):
        """batch {image (B, 3, H, W)}, vocab K names -> (B, K, H, W): sum_q ensemble_q[k] sigmoid(mask_q)."""
        p = self.predict_proposals(batch, vocab)
        return torch.einsum("bqk,bqhw->bkhw", p["ensemble_probs"], p["masks"])  # (B, K, H, W)

    def configure_optimizers(self, cfg):
        """AdamW: backbone lr x backbone_multiplier; weight decay 0 on norms and embeddings (detectron2's groups);
        the prompt context vectors in their own group (lr prompt_lr, no decay)."""
        groups = {}
        for mname, module in self.net.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    lr = cfg.lr * (cfg.backbone_multiplier if mname.startswith("backbone") else 1.0)
                    wd = 0.0 if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.Embedding)) else cfg.weight_decay
                    groups.setdefault((lr, wd), []).append(p)
        params = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
        if self.prompt is not None:
            params.append({"params": [self.prompt.ctx], "lr": cfg.prompt_lr, "weight_decay": 0.0})
        return {"adamw": torch.optim.AdamW(params, lr=cfg.lr)}


# ----------------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg, pretrained=True):
    """The ZSSegWrapper; CLIP and backbone weights if `pretrained`, else random (a checkpoint follows)."""
    clip, tokenizer = load_clip(cfg, pretrained)
    return ZSSegWrapper(cfg, clip, tokenizer, pretrained)


# ----------------------------------------------------------------------------------------------------------------------
# Released checkpoints: MendelXu/zsseg.baseline's zero-shot (learned prompts) and cross-dataset (ViLD) COCO-Stuff models
# ----------------------------------------------------------------------------------------------------------------------
# (official key regex, our key: a regex replacement or a function of the match), read from MendelXu/zsseg.baseline
# mask_former/{zero_shot_mask_former_model, mask_former_model}.py, modeling/heads/{zero_shot_mask_former_head,
# pixel_decoder}.py, modeling/transformer/{zero_shot_transformer_predictor, transformer_predictor, transformer}.py,
# modeling/clip_adapter/{adapter, text_prompt}.py, and detectron2's projects/deeplab/resnet.py (the R101c backbone:
# each conv holds its FrozenBN as `.norm`; stages res2..res5 are torchvision's layer1..layer4).
def res_block(m):
    """Official block res<s>.<i> (a match's groups 1, 2) -> ours: stages res2..res5 are torchvision's layer1..4."""
    return f"net.backbone.layer{int(m[1]) - 1}.{m[2]}"


def fpn_conv(m):
    """Official adapter_<i> / layer_<i> (groups 1, 2), the lateral 1x1 / output 3x3 conv of res<i+1> -> ours."""
    return f"net.pixel_decoder.{'lateral' if m[1] == 'adapter' else 'output'}.{int(m[2]) - 1}"


PIX = r"sem_seg_head\.pixel_decoder\."
DEC = r"sem_seg_head\.predictor\.transformer\.decoder\.layers\.(\d+)\."

OFFICIAL_KEYS = (
    # backbone: the DeepLab stem, then BottleneckBlocks (conv1..3, a shortcut conv where the width changes)
    (r"backbone\.stem\.conv(\d)\.weight", r"net.backbone.stem.conv\1.weight"),
    (r"backbone\.stem\.conv(\d)\.norm\.(.+)", r"net.backbone.stem.bn\1.\2"),
    (r"backbone\.res(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"{res_block(m)}.conv{m[3]}.weight"),
    (r"backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\.(.+)", lambda m: f"{res_block(m)}.bn{m[3]}.{m[4]}"),
    (r"backbone\.res(\d)\.(\d+)\.shortcut\.weight", lambda m: f"{res_block(m)}.downsample.0.weight"),
    (r"backbone\.res(\d)\.(\d+)\.shortcut\.norm\.(.+)", lambda m: f"{res_block(m)}.downsample.1.{m[3]}"),
    # pixel decoder (BasePixelDecoder, GroupNorm): layer_4 is the 3x3 conv on res5; adapter_i / layer_i the lateral
    # 1x1 and output 3x3 convs of res(i+1); each conv's GroupNorm is its `.norm`
    (PIX + r"layer_4\.weight", r"net.pixel_decoder.top.0.weight"),
    (PIX + r"layer_4\.norm\.(.+)", r"net.pixel_decoder.top.1.\1"),
    (PIX + r"(adapter|layer)_([123])\.weight", lambda m: f"{fpn_conv(m)}.0.weight"),
    (PIX + r"(adapter|layer)_([123])\.norm\.(.+)", lambda m: f"{fpn_conv(m)}.1.{m[3]}"),
    (PIX + r"mask_features\.(.+)", r"net.pixel_decoder.mask_features.\1"),
    # transformer predictor: DETR decoder (no encoder layers), queries, input projection, mask and class MLPs
    (r"sem_seg_head\.predictor\.(query_embed|input_proj|mask_embed|class_embed)\.(.+)", r"net.\1.\2"),
    (r"sem_seg_head\.predictor\.transformer\.decoder\.norm\.(.+)", r"net.decoder_norm.\1"),
    (DEC + r"self_attn\.(.+)", r"net.layers.\1.self_attn.\2"),
    (DEC + r"multihead_attn\.(.+)", r"net.layers.\1.cross_attn.\2"),
    (DEC + r"linear1\.(.+)", r"net.layers.\1.ffn.0.\2"),
    (DEC + r"linear2\.(.+)", r"net.layers.\1.ffn.3.\2"),
    (DEC + r"norm([123])\.(.+)", lambda m: f"net.layers.{m[1]}.norms.{int(m[2]) - 1}.{m[3]}"),
    # the CLIP adapter: OpenAI CLIP (open_clip's names), the no-object embedding, the learned prompt's context
    (r"clip_adapter\.clip_model\.(.+)", r"clip.\1"),
    (r"clip_adapter\.non_object_embedding", r"net.non_object"),
    (r"clip_adapter\.prompt_learner\.prefix_prompt", r"prompt.ctx"),
)
OFFICIAL_UNUSED = re.compile(  # buffers of constants that this file does not keep
    r"criterion\.empty_weight"  # the CE class weights (no-object 0.1), rebuilt from the config
    r"|clip_adapter\.pixel_(mean|std)"  # CLIP's mean / std x 255 (ours: clip_mean / clip_std, not saved)
    r"|clip_adapter\.prompt_learner\.(start|dot|end|pad)_signal")  # copies of 4 rows of CLIP's token embedding


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
            return m.expand(target) if isinstance(target, str) else target(m)
    return None


# Copied from san.official_weights
def official_weights(checkpoint):
    """The state dict inside a released file: detectron2 saves {"model": state dict, "iteration": ...}."""
    return checkpoint.get("model", checkpoint)


def official_preset(state):
    """The preset of a released checkpoint: R101c's deep stem (3x3 first conv) is required; the learned prompt's
    context vectors say the zero-shot model ("paper_coco_r101c"), their absence the ViLD one ("paper_cross_r101c")."""
    stem = state.get("backbone.stem.conv1.weight")
    if stem is None or tuple(stem.shape[-2:]) != (3, 3):
        return None
    return "paper_coco_r101c" if "clip_adapter.prompt_learner.prefix_prompt" in state else "paper_cross_r101c"


def convert_official_state_dict(official, cfg):
    """A released zsseg checkpoint (detectron2's {"model": ...} or its state dict) -> the state dict of
    build_model(cfg, pretrained=False); cfg.backbone must be "resnet101c", the released backbone.

    Every official key must map to one of ours with the same shape (the constant buffers of OFFICIAL_UNUSED are
    skipped), and every key of ours must be filled: otherwise a ValueError lists the unknown, missing and mis-shaped
    keys, and nothing is returned."""
    official = official_weights(official)
    ours = build_model(cfg, pretrained=False).state_dict()
    out, unknown, mismatched, released = {}, [], [], {}
    for key, value in official.items():
        if OFFICIAL_UNUSED.fullmatch(key):
            continue
        name = released[key] = official_name_to_ours(key)
        if name not in ours:
            unknown.append(key if name is None else f"{key} (-> {name})")
        elif ours[name].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(ours[name].shape)}")
        else:
            out[name] = value.to(ours[name].dtype)
    missing = [f"{released_name(m, released, official_name_to_ours)} (-> {m})" for m in sorted(set(ours) - set(out))]
    if unknown or missing or mismatched:
        hint = (f" (the released models need backbone='resnet101c', this config has {cfg.backbone!r})"
                if cfg.backbone != "resnet101c" else "")
        raise ValueError(f"the checkpoint does not fit zsseg with this config ({len(unknown)} unknown, {len(missing)} "
                         f"missing, {len(mismatched)} mis-shaped keys): unknown {listing(unknown)}, missing "
                         f"{listing(missing)}, mis-shaped {listing(mismatched)}{hint}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Self-check: python zsseg.py (offline: a tiny random CLIP written to a temporary folder)
# ----------------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    import json
    import tempfile

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 16,
                                                "patch_size": 8},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
        with open(f"{tmp}/tiny_clip.json", "w") as f:
            json.dump(spec, f)
        torch.save(open_clip.model.CLIP(**spec).state_dict(), f"{tmp}/tiny_clip.pt")
        cfg = replace(PRESETS["toy"], clip_model=f"{tmp}/tiny_clip.json", clip_pretrained=f"{tmp}/tiny_clip.pt")
        wrapper = build_model(cfg)
        batch = {"image": torch.rand(2, 3, 128, 128), "label": torch.randint(0, 8, (2, 128, 128))}
        for step in (0, cfg.prompt_iters):
            losses = wrapper(batch, step)
            losses["loss"].backward()
            print(f"step {step}:", {k: round(v.item(), 3) for k, v in losses.items() if "_" not in k[5:]})
        print("predict:", tuple(wrapper.predict({"image": torch.rand(1, 3, 100, 75)}, ["cat", "dog", "sky"]).shape))
