"""SAN: Side Adapter Network for Open-Vocabulary Semantic Segmentation, in one file.

Paper: Mengde Xu, Zheng Zhang, Fangyun Wei, Han Hu, Xiang Bai. CVPR 2023 (highlight). arXiv 2302.12242.
Official code: github.com/MendelXu/SAN (detectron2 + timm + open_clip 2.16).

The idea. A frozen CLIP ViT can name things but not locate them. SAN attaches a small, randomly initialised "side"
ViT that reads the image and CLIP's intermediate features and predicts, for Q learnable queries, a mask proposal and,
separately, an attention bias for every CLIP head. CLIP's last few blocks then re-run with Q extra [SOS] tokens, copies
of the [CLS] token, whose attention to the patch tokens is steered by that bias; each [SOS] output, projected into
CLIP's text space, is classified against the text embeddings of any vocabulary. It takes one forward pass and 8.4M
trainable parameters, and because the loss reaches the side net through the frozen CLIP blocks, the proposals learn
to be "CLIP-aware".

File map (section -> paper):
  Config, PRESETS ........................ Sec. 4 implementation details; official configs/*.yaml
  load_clip, clip_features ............... Sec. 3: frozen CLIP; its first k blocks are the feature extractor
  Fusion, SideAdapter .................... Sec. 3: side adapter network, fusion of CLIP features
  MLPDecoder ............................. Sec. 3: decoupled heads, mask proposals and attention bias
  attention_bias_mask, recognize ......... Sec. 3: mask recognition with attention bias in CLIP's last blocks
  encode_vocabulary, SAN.classifier ...... Sec. 3/4: open-vocabulary classifier, ViLD prompts, learnable background
  SAN .................................... the whole network (the paper's overview figure)
  HungarianMatcher, SetCriterion ......... Sec. 4 / Mask2Former: set prediction losses on sampled points
  SANWrapper ............................. training step, semantic inference (sum over queries), proposals for plots;
                                           the official test resize (short side 640) in the paper presets
  OFFICIAL_KEYS, convert_official_... .... the released san_vit_b_16.pth / san_vit_large_14.pth -> our weights

Details of the official code that the paper does not state (kept here): CLIP's positional embedding is trainable;
[SOS] tokens are blocked (-100, not -inf) from [CLS] and from each other; one bias per head serves all recognition
blocks; the bias is max-pooled to CLIP's grid; the side pos-embed is re-added after every block but the last; side
blocks 7 and 8 are both supervised (two recognition passes per step); no-object is a learned text-space embedding.
Differences from the official code:
  1. No detectron2/timm: the side ViT (timm's vit with width 240, depth 8, 6 heads) is written out, same parameters.
  2. open_clip 3.x: its blocks are batch-first; the recognition mask is (B*heads, N, N) in the activation dtype.
     OpenAI weights need QuickGELU, which open_clip 3.x's create_model no longer picks by itself: `clip_quick_gelu`.
  3. The text tokenizer is open_clip.get_tokenizer(model), so a CLIP with a shorter context (the toy) works.
  4. The training vocabulary is `cfg.class_names` (official: detectron2 metadata of the training set).
  5. bg_embed has CLIP's embed_dim (official: text_projection.shape[0], the same number for B/16 and L/14).
  6. Augmentation (resize, crop, flip, colour jitter) lives in data.py; no test-time augmentation.

Labels: 255 = ignore (never a target, a negative pixel of every GT mask, as in Mask2Former); the no-object class is
index K of the logits. Shapes: B batch, Q queries, K classes (+1 no-object), D CLIP embedding, C CLIP width, W side
width, h x w side grid (1/16 of the padded input), h' x w' CLIP grid, L = h'w' CLIP patches, T GT masks.
"""
import logging
import os
import re
from dataclasses import dataclass, replace

import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
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
ZERO_SHOT_SETS = ("ade20k_847", "pcontext_459", "ade20k_150", "pcontext_59", "voc_20", "coco_stuff_171")


@dataclass
class Config:
    # data (data.py builds the datasets)
    train_dataset: str = "coco_stuff_171"  # training set; its class names are the training vocabulary
    eval_datasets: tuple = ZERO_SHOT_SETS  # evaluation sets, each with its own vocabulary
    data_root: str = "datasets"  # root of the real datasets
    num_classes: int = 171  # size of the training vocabulary
    class_names: tuple = ()  # training vocabulary, verbatim; () = must be set from the training set before training
    crop_size: int = 640  # training crop
    base_size: int = 640  # short side before random scaling
    scale_range: tuple = (0.5, 1.5)  # random rescale of base_size (official: short side in {320, 384, ..., 960})
    test_short_side: int = 0  # inference: resize the short side to this first, 0 = native size (paper: 640)
    test_max_size: int = 2560  # inference: ... with the long side at most this (detectron2's ResizeShortestEdge)
    pad_value: int = 128  # training crops smaller than crop_size are padded with this grey, 0-255 (official mapper)
    # CLIP
    clip_model: str = "ViT-B-16"  # open_clip model name, or the path of an open_clip model-config JSON
    clip_pretrained: str = "openai"  # open_clip pretrained tag or a local weights file
    clip_quick_gelu: bool = True  # OpenAI CLIP weights were trained with QuickGELU
    clip_trained_by: str = ""  # model file that trains clip_pretrained when it is missing ("" = downloaded)
    clip_resolution: float = 0.5  # CLIP sees the input rescaled by this ("asymmetric input")
    clip_feature_layers: tuple = (0, 3, 6, 9)  # CLIP outputs fused into the side net; the last, k, ends the extractor
    # side adapter network
    side_width: int = 240  # W, side ViT width
    side_depth: int = 8  # side ViT blocks
    side_heads: int = 6  # side ViT heads
    side_patch_size: int = 16  # side ViT patch size
    side_image_size: int = 640  # size the side pos-embed is learned at (bicubically resized otherwise)
    num_queries: int = 100  # Q, mask proposals
    deep_supervision: tuple = (7, 8)  # side blocks decoded in training (the last one is the prediction)
    decoder_dim: int = 256  # MLP decoder width and embedding dim
    size_divisibility: int = 32  # inputs are zero-padded (after normalisation) to a multiple of this
    # losses (Mask2Former)
    class_weight: float = 2.0  # CE weight, also the matching cost of the class
    mask_weight: float = 5.0  # point-BCE weight and matching cost
    dice_weight: float = 5.0  # dice weight and matching cost
    no_object_weight: float = 0.1  # CE weight of the no-object class
    num_points: int = 12544  # points per mask (112 x 112)
    oversample_ratio: float = 3.0  # PointRend candidate points per kept point
    importance_sample_ratio: float = 0.75  # share of the points chosen by uncertainty
    # optimisation (train.py)
    batch_size: int = 32  # global batch
    max_iters: int = 60000  # iterations
    lr: float = 1e-4  # AdamW learning rate
    clip_lr_multiplier: float = 1.0  # lr of CLIP's trainable part (its positional embedding) = lr x this (official
    #                                  SOLVER.CLIP_MULTIPLIER)
    weight_decay: float = 1e-4  # AdamW weight decay (0 on pos-embeds, query embeds, LayerNorms)
    schedule: str = "poly"  # lr schedule
    poly_power: float = 0.9  # poly exponent
    warmup_iters: int = 0  # linear warm-up iterations
    grad_clip: float = 0.01  # max L2 norm of all gradients, 0 = off
    amp: bool = True  # bf16/fp16 autocast on GPU
    eval_interval: int = 5000  # iterations between evaluations
    log_interval: int = 20  # iterations between log lines
    ckpt_interval: int = 5000  # iterations between checkpoints
    num_workers: int = 4  # data-loading processes
    seed: int = 0  # random seed


TOY_SEEN_CLASSES = ("red square", "red triangle", "green square", "green circle", "blue circle", "blue triangle",
                    "yellow square", "yellow triangle", "background")  # data.ToyShapes("seen").class_names (tested)
PRESETS = {
    # The official test protocol (INPUT.MIN_SIZE_TEST 640, MAX_SIZE_TEST 2560) is in both paper presets.
    "paper": Config(test_short_side=640),  # ViT-B/16, recognition in blocks 10-12; paper: ADE-150 27.5, PC-59 53.8
    "paper_l14": Config(clip_model="ViT-L-14-336", clip_resolution=0.7, clip_feature_layers=(0, 6, 12, 18),
                        test_short_side=640),  # recognition in blocks 19-24
    "toy": Config(  # trained on the 8 seen colour x shape classes + background, evaluated on all 13; CPU sizes
        train_dataset="toy_shapes_seen", eval_datasets=("toy_shapes",), num_classes=9, class_names=TOY_SEEN_CLASSES,
        crop_size=128, base_size=128, scale_range=(1.0, 1.0),
        clip_model="runs/toy_clip/toy_clip.json", clip_pretrained="runs/toy_clip/toy_clip.pt", clip_quick_gelu=False,
        clip_trained_by="toy_clip",
        # Recognition in blocks 2-4 of the toy CLIP's 4, the last three as ViT-B/16's 10-12 of 12. The toy CLIP's
        # patch tokens stay local only in its first blocks: after block 1 a region's patches show that region, after
        # block 3 the whole scene (bench.py --clip-probe). The paper sweeps the number of recognition layers.
        clip_feature_layers=(0, 1),
        clip_lr_multiplier=0.1,  # CLIP's pos-embed at the paper's lr, 1e-4: the toy's 10x lr is for the side network
        side_width=96, side_depth=4, side_heads=4, side_patch_size=8, side_image_size=128, num_queries=16,
        deep_supervision=(3, 4), decoder_dim=96, num_points=2048, batch_size=8, max_iters=1000, lr=1e-3,
        eval_interval=1000, log_interval=50, ckpt_interval=500, num_workers=2),  # grad_clip: the paper's 0.01
}


def prerequisites(cfg):
    """{file: model that trains it}: train.py trains the toy CLIP first when its weights are missing."""
    return {cfg.clip_pretrained: cfg.clip_trained_by} if cfg.clip_trained_by else {}


# ----------------------------------------------------------------------------------------------------------------------
# Frozen CLIP: loading and the feature extractor (its first k blocks)
# ----------------------------------------------------------------------------------------------------------------------
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


def check_standard_vit(visual):
    """SAN re-runs CLIP's own blocks: only the plain CLIP ViT path (class token, ln_pre, token pooling) is supported."""
    ok = (isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.pool_type == "tok"
          and not visual.final_ln_after_pool and isinstance(visual.patch_dropout, nn.Identity)
          and all(type(b) is ResidualAttentionBlock for b in visual.transformer.resblocks))
    if not ok:
        raise ValueError("SAN needs a standard open_clip ViT (no attentional pooler, patch dropout or custom blocks)")


def run_blocks(transformer, blocks, x, attn_mask=None):
    """x (B, N, C) through open_clip residual blocks; open_clip < 2.26 keeps (N, B, C) inside."""
    lnd = not getattr(transformer, "batch_first", False)
    x = x.transpose(0, 1) if lnd else x
    for block in blocks:
        x = block(x, attn_mask=attn_mask)
    return x.transpose(0, 1) if lnd else x


def resize_pos_embed(pos, src, dst, prefix):
    """(prefix + S, C) position embedding on grid src -> (prefix + L, C) on grid dst; bicubic, prefix tokens kept."""
    if tuple(src) == tuple(dst):
        return pos
    grid = pos[prefix:].reshape(1, *src, -1).permute(0, 3, 1, 2)  # (1, C, sh, sw)
    grid = F.interpolate(grid, size=tuple(dst), mode="bicubic", align_corners=False)  # (1, C, h, w)
    return torch.cat([pos[:prefix], grid.flatten(2)[0].T])  # (prefix + L, C)


def clip_features(visual, image, layers):
    """CLIP's first k = layers[-1] blocks. image (B, 3, H', W') normalised -> [(B, 1 + L, C) per layer], (h', w')."""
    x = visual.conv1(image)  # (B, C, h', w')
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)  # (B, L, C)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
    x = torch.cat([cls, x], dim=1)  # (B, 1 + L, C)
    x = x + resize_pos_embed(visual.positional_embedding, visual.grid_size, grid, prefix=1).to(x.dtype)
    x = visual.ln_pre(x)
    feats = [x]  # feature 0: the tokens after ln_pre
    for i in range(1, layers[-1] + 1):
        x = run_blocks(visual.transformer, [visual.transformer.resblocks[i - 1]], x)
        feats.append(x)
    return [feats[i] for i in layers], grid


# ----------------------------------------------------------------------------------------------------------------------
# Fusion of CLIP features into the side network
# ----------------------------------------------------------------------------------------------------------------------
class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map. A plain Module as in the official code, which also means
    AdamW decays its weights (only nn.LayerNorm is exempt there)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels)), eps

    def forward(self, x):
        x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Fusion(nn.Module):
    """Adds a CLIP feature map to the side net's patch tokens: LayerNorm2d, 1x1 conv C -> W, bilinear resize."""

    def __init__(self, clip_width, width):
        super().__init__()
        self.norm, self.proj = LayerNorm2d(clip_width), nn.Conv2d(clip_width, width, 1)
        nn.init.kaiming_uniform_(self.proj.weight, a=1)  # Caffe2 "Xavier" fill, as detectron2's c2_xavier_fill
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens, clip_map, grid):
        """tokens (B, hw, W), clip_map (B, C, h', w') -> (B, hw, W)."""
        y = self.proj(self.norm(clip_map))  # (B, W, h', w')
        y = F.interpolate(y, size=grid, mode="bilinear", align_corners=False)  # (B, W, h, w)
        return tokens + y.flatten(2).transpose(1, 2)  # (B, hw, W)


# ----------------------------------------------------------------------------------------------------------------------
# Side adapter network: a plain ViT with Q prepended queries, fed CLIP features
# ----------------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm ViT block (timm's): LN eps 1e-6, qkv bias, MLP ratio 4, GELU."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, N, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, n, N, W/n)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W)  # (B, N, W)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def mlp(dims, conv):
    """Linear (or 1x1 conv) layers dims[0] -> ... -> dims[-1], ReLU between them."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Conv2d(a, b, 1) if conv else nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers)


class MLPDecoder(nn.Module):
    """Decoupled heads (Sec. 3): mask proposals from query x pixel embeddings, and one attention bias per CLIP head
    from query x per-head pixel embeddings, rescaled by a learned scalar affine."""

    def __init__(self, width, dim, clip_heads):
        super().__init__()
        self.clip_heads = clip_heads
        self.query_mlp = mlp([width, dim, dim, dim], conv=False)
        self.pix_mlp = mlp([width, dim, dim, dim], conv=True)
        self.attn_mlp = mlp([width, dim, dim, dim * clip_heads], conv=True)
        self.bias_scaling = nn.Linear(1, 1)

    def forward(self, queries, x):
        """queries (B, Q, W), x (B, W, h, w) -> masks (B, Q, h, w) logits, attn_bias (B, heads, Q, h, w)."""
        q = self.query_mlp(queries)  # (B, Q, E)
        masks = torch.einsum("bqe,behw->bqhw", q, self.pix_mlp(x))  # (B, Q, h, w)
        attn = self.attn_mlp(x)  # (B, heads * E, h, w)
        attn = attn.reshape(x.shape[0], self.clip_heads, -1, *x.shape[-2:])  # (B, heads, E, h, w)
        bias = torch.einsum("bqe,bnehw->bnqhw", q, attn)  # PAPER: attention bias (B, heads, Q, h, w)
        return masks, self.bias_scaling(bias[..., None])[..., 0]  # PAPER: learned a * bias + b


class SideAdapter(nn.Module):
    """The side ViT: [Q queries | hw patches], CLIP feature i added to the patches after side block i (0 = before the
    first block), pos-embed re-added after every block but the last, the decoder applied after chosen blocks."""

    def __init__(self, cfg, clip_width, clip_heads):
        super().__init__()
        W, p, Q = cfg.side_width, cfg.side_patch_size, cfg.num_queries
        self.grid = (cfg.side_image_size // p,) * 2
        self.patch_embed = nn.Conv2d(3, W, p, stride=p)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(self.grid[0] * self.grid[1], W), std=0.02))
        self.query_embed = nn.Parameter(torch.randn(Q, W) * 0.02)
        self.query_pos_embed = nn.Parameter(torch.randn(Q, W) * 0.02)
        self.blocks = nn.ModuleList(Block(W, cfg.side_heads) for _ in range(cfg.side_depth))
        self.fusions = nn.ModuleList(Fusion(clip_width, W) for _ in cfg.clip_feature_layers)
        self.decoder = MLPDecoder(W, cfg.decoder_dim, clip_heads)
        for m in self.blocks.modules():  # timm's ViT init
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def fuse(self, i, x, clip_maps, grid):
        if i >= len(self.fusions):
            return x
        Q = self.query_embed.shape[0]  # queries are left untouched
        return torch.cat([x[:, :Q], self.fusions[i](x[:, Q:], clip_maps[i], grid)], dim=1)  # (B, Q + hw, W)

    def forward(self, image, clip_maps, decode_at):
        """image (B, 3, H, W) normalised and padded, clip_maps [(B, C, h', w')] -> [(masks, attn_bias)] per block in
        decode_at, with masks (B, Q, h, w) and attn_bias (B, heads, Q, h, w)."""
        x = self.patch_embed(image)  # (B, W, h, w)
        B, grid, Q = x.shape[0], tuple(x.shape[-2:]), self.query_embed.shape[0]
        pos = resize_pos_embed(self.pos_embed, self.grid, grid, prefix=0)  # (hw, W)
        pos = torch.cat([self.query_pos_embed, pos])  # (Q + hw, W)
        x = torch.cat([self.query_embed.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + pos  # (B, Q+hw, W)
        x = self.fuse(0, x, clip_maps, grid)
        outs = []
        for i, block in enumerate(self.blocks, start=1):
            x = self.fuse(i, block(x), clip_maps, grid)
            if i in decode_at:
                outs.append(self.decoder(x[:, :Q], x[:, Q:].transpose(1, 2).reshape(B, -1, *grid)))
            if i < len(self.blocks):
                x = x + pos
        return outs


# ----------------------------------------------------------------------------------------------------------------------
# Mask recognition with attention bias, in CLIP's last blocks
# ----------------------------------------------------------------------------------------------------------------------
def attention_bias_mask(bias):
    """bias (B*heads, Q, L) -> additive attn_mask (B*heads, Q+1+L, Q+1+L) over the sequence [Q SOS | CLS | L patches].

    Rows are queries. [CLS] and patch rows see [CLS] and the patches with 0, as in vanilla CLIP, and no SOS token;
    each SOS row sees itself (0), not the other SOS tokens nor [CLS] (-100), and the patches through the bias.
    """
    BH, Q, L = bias.shape
    mask = bias.new_zeros(Q + 1 + L, Q + 1 + L)
    mask[:, :Q] = -100.0  # nobody attends to an SOS token ...
    mask[torch.arange(Q), torch.arange(Q)] = 0.0  # ... except the SOS token itself
    mask[:Q, Q] = -100.0  # SOS tokens do not see [CLS]
    mask = mask.expand(BH, -1, -1).clone()  # (B*heads, Q+1+L, Q+1+L)
    mask[:, :Q, Q + 1:] = bias  # PAPER: the predicted attention bias steers each SOS token over the patches
    return mask


def recognize(visual, tokens, bias, k, grid):
    """CLIP blocks k+1.. with Q [SOS] tokens. tokens (B, 1+L, C) output of block k, bias (B, heads, Q, h, w) ->
    (B, Q, D) unit embeddings in CLIP's joint space."""
    B, heads, Q = bias.shape[:3]
    bias = F.adaptive_max_pool2d(bias.flatten(1, 2), grid)  # (B, heads*Q, h', w'): max-pooled to CLIP's grid
    bias = bias.reshape(B * heads, Q, -1)  # (B*heads, Q, L), row b*heads + n as nn.MultiheadAttention expects
    x = torch.cat([tokens[:, :1].expand(-1, Q, -1), tokens], dim=1)  # (B, Q+1+L, C): SOS = copies of [CLS]
    mask = attention_bias_mask(bias.to(x.dtype))  # (B*heads, Q+1+L, Q+1+L)
    x = run_blocks(visual.transformer, visual.transformer.resblocks[k:], x, mask)  # PAPER: biased recognition
    sos = visual.ln_post(x[:, :Q]) @ visual.proj  # (B, Q, D)
    return F.normalize(sos, dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Open-vocabulary classifier
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_vocabulary(clip, tokenizer, names, templates=VILD_TEMPLATES):
    """K names -> (K, D): each prompt's text embedding normalised, averaged over the templates, renormalised."""
    device = clip.logit_scale.device
    emb = torch.stack([clip.encode_text(tokenizer([t.format(n) for n in names]).to(device), normalize=True)
                       for t in templates])  # (templates, K, D)
    return F.normalize(emb.mean(0), dim=-1)  # (K, D)


# ----------------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------------
class SAN(nn.Module):
    """Frozen CLIP (but its positional embedding) + side adapter + learnable background embedding."""

    def __init__(self, cfg, clip, tokenizer):
        super().__init__()
        visual = clip.visual
        check_standard_vit(visual)
        if not 0 < cfg.clip_feature_layers[-1] < len(visual.transformer.resblocks):
            raise ValueError(f"clip_feature_layers {cfg.clip_feature_layers} must end inside CLIP's "
                             f"{len(visual.transformer.resblocks)} blocks, leaving some for recognition")
        self.cfg, self.clip, self.tokenizer = cfg, clip, tokenizer
        clip.requires_grad_(False)
        visual.positional_embedding.requires_grad_(True)  # trainable as in the official code (the paper: frozen CLIP)
        self.heads = visual.transformer.resblocks[0].attn.num_heads
        self.side = SideAdapter(cfg, visual.transformer.width, self.heads)
        D = visual.output_dim
        self.bg_embed = nn.Parameter(torch.randn(1, D) * D ** -0.5)  # the no-object class, in text space
        pre = getattr(visual, "preprocess_cfg", {})  # CLIP's own mean/std (OpenAI's if create_model set none)
        for key, default in (("mean", open_clip.OPENAI_DATASET_MEAN), ("std", open_clip.OPENAI_DATASET_STD)):
            self.register_buffer(key, torch.tensor(pre.get(key, default)).view(1, 3, 1, 1), persistent=False)
        self.text_cache = {}  # vocabulary -> (K, D) text embeddings
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self.text_cache.clear())

    def classifier(self, vocab):
        """(K+1, D) unit rows: the vocabulary's template-averaged text embeddings, then the background embedding."""
        key = tuple(vocab)
        if key not in self.text_cache:
            with torch.autocast(self.mean.device.type, enabled=False):
                self.text_cache[key] = encode_vocabulary(self.clip, self.tokenizer, list(vocab))
        return F.normalize(torch.cat([self.text_cache[key].to(self.bg_embed), self.bg_embed]), dim=-1)  # (K+1, D)

    def forward(self, images, vocab, decode_at):
        """images (B, 3, H, W) RGB in [0, 1], vocab K names, decode_at side blocks to decode -> dict:
        pred_logits (B, Q, K+1), pred_masks (B, Q, h, w) logits, attn_bias (B, heads, Q, h, w) of the last decoded
        block, and aux_outputs: [{pred_logits, pred_masks}] of the earlier ones."""
        cfg, visual = self.cfg, self.clip.visual
        H, W = images.shape[-2:]
        d = cfg.size_divisibility
        x = F.pad((images - self.mean) / self.std, (0, -W % d, 0, -H % d))  # (B, 3, Hp, Wp), 0 = the mean colour
        clip_in = F.interpolate(x, scale_factor=cfg.clip_resolution, mode="bilinear")  # (B, 3, H', W')
        feats, grid = clip_features(visual, clip_in, cfg.clip_feature_layers)  # [(B, 1+L, C)], (h', w')
        clip_maps = [f[:, 1:].transpose(1, 2).reshape(f.shape[0], -1, *grid) for f in feats]  # [(B, C, h', w')]
        text = self.classifier(vocab) * self.clip.logit_scale.exp()  # (K+1, D), exp(logit_scale) = 100 for CLIP
        outs = []
        for masks, bias in self.side(x, clip_maps, decode_at):
            sos = recognize(visual, feats[-1], bias, cfg.clip_feature_layers[-1], grid)  # (B, Q, D)
            outs.append({"pred_logits": sos @ text.to(sos.dtype).T, "pred_masks": masks, "attn_bias": bias})
        return {**outs[-1], "aux_outputs": [{k: o[k] for k in ("pred_logits", "pred_masks")} for o in outs[:-1]]}


# ----------------------------------------------------------------------------------------------------------------------
# Losses and matching (Mask2Former's, on sampled points)
# ----------------------------------------------------------------------------------------------------------------------
def point_sample(x, coords):
    """x (N, C, H, W), coords (N, P, 2) as (x, y) in [0, 1] -> (N, C, P), bilinear (PointRend's point_sample)."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, align_corners=False)[..., 0]  # (N, C, P)


@torch.no_grad()
def uncertain_points(logits, num_points, oversample_ratio, importance_ratio):
    """logits (N, 1, h, w) -> (N, P, 2): of oversample*P random points keep the importance*P most uncertain
    (uncertainty = -|logit|), then add (1 - importance)*P uniform ones (PointRend training sampling)."""
    N, dev = logits.shape[0], logits.device
    cand = torch.rand(N, int(num_points * oversample_ratio), 2, device=dev)  # (N, kP, 2)
    uncertainty = -point_sample(logits, cand)[:, 0].abs()  # (N, kP)
    n_unc = int(importance_ratio * num_points)
    idx = uncertainty.topk(n_unc, dim=1).indices  # (N, bP)
    picked = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))  # (N, bP, 2)
    return torch.cat([picked, torch.rand(N, num_points - n_unc, 2, device=dev)], dim=1)  # (N, P, 2)


def dice_loss(logits, targets):
    """(M, P), (M, P) -> (M,) 1 - (2|p.t| + 1) / (|p| + |t| + 1)."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


class HungarianMatcher(nn.Module):
    """Per image, the one-to-one query <-> GT-mask assignment of least cost
    cost_class * (-p[class]) + cost_mask * BCE + cost_dice * dice, mask costs on num_points uniform random points that
    all masks of the image share."""

    def __init__(self, cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=12544):
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice, self.num_points = cost_class, cost_mask, cost_dice, num_points

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs {pred_logits (B, Q, K+1), pred_masks (B, Q, h, w)}, targets [{labels (T,), masks (T, H, W)}] ->
        [(query indices, target indices)] per image, int64 tensors of equal length min(Q, T)."""
        indices = []
        for logits, masks, t in zip(outputs["pred_logits"], outputs["pred_masks"], targets):
            if len(t["labels"]) == 0:
                indices.append((t["labels"].new_zeros(0), t["labels"].new_zeros(0)))
                continue
            Q, T = masks.shape[0], len(t["labels"])
            cost_class = -logits.float().softmax(-1)[:, t["labels"]]  # (Q, T)
            coords = torch.rand(1, self.num_points, 2, device=masks.device)  # shared by all masks of the image
            pred = point_sample(masks[:, None].float(), coords.expand(Q, -1, -1))[:, 0]  # (Q, P)
            gt = point_sample(t["masks"][:, None].float(), coords.expand(T, -1, -1))[:, 0]  # (T, P)
            pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")  # (Q, P)
            neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")  # (Q, P)
            cost_mask = (pos @ gt.T + neg @ (1 - gt).T) / self.num_points  # (Q, T) mean BCE
            p = pred.sigmoid()
            cost_dice = 1 - (2 * p @ gt.T + 1) / (p.sum(-1)[:, None] + gt.sum(-1)[None] + 1)  # (Q, T)
            C = self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice  # (Q, T)
            q, j = linear_sum_assignment(C.cpu().numpy())
            indices.append((torch.as_tensor(q, device=masks.device), torch.as_tensor(j, device=masks.device)))
        return indices


class SetCriterion(nn.Module):
    """Weighted CE over K+1 classes (no-object weight 0.1) and point BCE + dice on the matched masks, normalised by
    the number of GT masks (averaged over DDP ranks); the same for every auxiliary output, with its own matching."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.matcher = HungarianMatcher(cfg.class_weight, cfg.mask_weight, cfg.dice_weight, cfg.num_points)

    def forward(self, outputs, targets):
        """outputs of SAN.forward, targets [{labels (T,), masks (T, Hp, Wp)}] -> {loss_ce, loss_mask, loss_dice,
        loss_ce_0, ... (aux output i), loss}, each already weighted."""
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
        b = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])  # (M,) image of each match
        q = torch.cat([q for q, _ in indices])  # (M,) its query
        target_classes = torch.full(logits.shape[:2], K, device=logits.device)  # (B, Q), no-object unless matched
        target_classes[b, q] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        weight = torch.ones(K + 1, device=logits.device)
        weight[K] = cfg.no_object_weight
        losses = {"loss_ce": cfg.class_weight * F.cross_entropy(logits.transpose(1, 2), target_classes, weight)}
        if len(q) == 0:  # no GT mask in the batch: only the no-object CE trains
            zero = out["pred_masks"].sum() * 0.0
            return {**losses, "loss_mask": zero, "loss_dice": zero}
        src = out["pred_masks"][b, q][:, None].float()  # (M, 1, h, w)
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])[:, None]  # (M, 1, Hp, Wp)
        coords = uncertain_points(src, cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio)  # (M, P, 2)
        labels = point_sample(tgt.float(), coords)[:, 0]  # (M, P)
        point_logits = point_sample(src, coords)[:, 0]  # (M, P)
        bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none").mean(1)  # (M,)
        losses["loss_mask"] = cfg.mask_weight * bce.sum() / num_masks
        losses["loss_dice"] = cfg.dice_weight * dice_loss(point_logits, labels).sum() / num_masks
        return losses


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
# Training wrapper: the training step, semantic inference, proposals for plots
# ----------------------------------------------------------------------------------------------------------------------
def resize_short_side(images, short, max_size):
    """(B, 3, H, W) -> (B, 3, h, w) with min(h, w) = short and max(h, w) <= max_size (detectron2's
    ResizeShortestEdge, rounding included; bilinear with antialiasing, as PIL resizes there). short=0: unchanged."""
    H, W = images.shape[-2:]
    if not short:
        return images
    scale = short / min(H, W)
    if max(H, W) * scale > max_size:
        scale = max_size / max(H, W)
    size = (int(H * scale + 0.5), int(W * scale + 0.5))
    if size == (H, W):
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True).clamp(0, 1)


class SANWrapper(nn.Module):
    """Owns the SAN network (`net`, with its frozen CLIP) and the criterion."""

    def __init__(self, cfg, net):
        super().__init__()
        self.cfg, self.net, self.criterion = cfg, net, SetCriterion(cfg)

    def forward(self, batch, step=0):
        """batch {image (B, 3, H, W) in [0, 1], label (B, H, W)} -> weighted losses, vocabulary cfg.class_names."""
        cfg = self.cfg
        if not cfg.class_names:
            raise ValueError("cfg.class_names is empty: SAN trains against the text embeddings of the training "
                             "vocabulary; set it to the training set's names, e.g. Config(class_names=tuple("
                             "data.build_dataset(cfg.train_dataset, 'train', cfg).class_names))")
        out = self.net(batch["image"], cfg.class_names, cfg.deep_supervision)
        d, (H, W) = cfg.size_divisibility, batch["label"].shape[-2:]
        labels = F.pad(batch["label"], (0, -W % d, 0, -H % d), value=IGNORE)  # (B, Hp, Wp), like the padded input
        with torch.autocast(labels.device.type, enabled=False):
            return self.criterion(out, semantic_targets(labels, len(cfg.class_names)))

    def infer(self, batch, vocab):
        """-> (SAN outputs of the last side block, mask logits (B, Q, H, W) at the input size).

        With cfg.test_short_side (the paper's test protocol) the network sees the image resized to that short side,
        and the mask logits are resized back to (H, W) before the sigmoid, as the official sem_seg_postprocess."""
        vocab = list(vocab if vocab is not None else self.cfg.class_names)
        if not vocab:
            raise ValueError("SAN needs a vocabulary: predict(batch, vocab=[class names])")
        H, W = batch["image"].shape[-2:]
        images = resize_short_side(batch["image"], self.cfg.test_short_side, self.cfg.test_max_size)  # (B, 3, h, w)
        out = self.net(images, vocab, (self.cfg.side_depth,))
        (h, w), d = images.shape[-2:], self.cfg.size_divisibility
        masks = F.interpolate(out["pred_masks"].float(), size=(h + -h % d, w + -w % d), mode="bilinear")
        masks = masks[..., :h, :w]  # (B, Q, h, w): the padding is cropped off
        if (h, w) != (H, W):
            masks = F.interpolate(masks, size=(H, W), mode="bilinear")  # (B, Q, H, W)
        return out, masks

    @torch.no_grad()
    def predict(self, batch, vocab=None):
        """batch {image (B, 3, H, W)}, vocab K names -> (B, K, H, W): sum_q softmax(class_q)[k] sigmoid(mask_q)."""
        out, masks = self.infer(batch, vocab)
        probs = out["pred_logits"].float().softmax(-1)[..., :-1]  # (B, Q, K): no-object dropped after the softmax
        return torch.einsum("bqk,bqhw->bkhw", probs, masks.sigmoid())  # (B, K, H, W)

    @torch.no_grad()
    def predict_proposals(self, batch, vocab=None):
        """-> {masks (B, Q, H, W) sigmoid, attn_bias (B, heads, Q, h, w), class_probs (B, Q, K+1)}."""
        out, masks = self.infer(batch, vocab)
        return {"masks": masks.sigmoid(), "attn_bias": out["attn_bias"].float(),
                "class_probs": out["pred_logits"].float().softmax(-1)}

    def configure_optimizers(self, cfg):
        """AdamW; weight decay 0 on position/query embeddings and nn.LayerNorm, as the official param groups (which
        decay the bg embedding and the fusion LayerNorm2d: neither matches its name or type rules); CLIP's trainable
        part (its positional embedding) at lr x clip_lr_multiplier (official SOLVER.CLIP_MULTIPLIER)."""
        groups = {}  # (lr, weight decay) -> parameters; with the multiplier at 1, the two groups of earlier versions
        for module_name, module in self.net.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    exempt = isinstance(module, nn.LayerNorm) or any(
                        s in name for s in ("pos_embed", "positional_embedding", "query_embed"))
                    lr = cfg.lr * (cfg.clip_lr_multiplier if module_name.startswith("clip") else 1.0)
                    groups.setdefault((lr, 0.0 if exempt else cfg.weight_decay), []).append(p)
        return {"adamw": torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": wd}
                                            for (lr, wd), params in groups.items()], lr=cfg.lr)}


# ----------------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg, pretrained=True):
    """The SANWrapper; CLIP weights from cfg.clip_pretrained if `pretrained`, else random (a checkpoint follows)."""
    clip, tokenizer = load_clip(cfg, pretrained)
    return SANWrapper(cfg, SAN(cfg, clip, tokenizer))


def count_trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------------
# Released checkpoints: MendelXu/SAN's san_vit_b_16.pth / san_vit_large_14.pth (detectron2: {"model": state dict})
# ----------------------------------------------------------------------------------------------------------------------
# (official key regex, our key): a regex replacement, or a function (match, k) -> key where an index shifts; k = the
# CLIP blocks before the recognition blocks (cfg.clip_feature_layers[-1]). Read from MendelXu/SAN san/model/*.
OFFICIAL_KEYS = (
    # side adapter: timm's ViT (its cls token and final norm removed), queries, fusion layers, MLP decoder
    (r"side_adapter_network\.vit_model\.patch_embed\.proj\.(.+)", r"net.side.patch_embed.\1"),
    (r"side_adapter_network\.vit_model\.pos_embed", r"net.side.pos_embed"),  # (1, hw, W) -> (hw, W)
    (r"side_adapter_network\.vit_model\.blocks\.(\d+)\.attn\.(qkv|proj)\.(.+)", r"net.side.blocks.\1.\2.\3"),
    (r"side_adapter_network\.vit_model\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(.+)", r"net.side.blocks.\1.\2.\3"),
    (r"side_adapter_network\.vit_model\.blocks\.(\d+)\.(norm1|norm2)\.(.+)", r"net.side.blocks.\1.\2.\3"),
    (r"side_adapter_network\.(query_embed|query_pos_embed)", r"net.side.\1"),  # (1, Q, W) -> (Q, W)
    (r"side_adapter_network\.fusion_layers\.layer_(\d+)\.input_proj\.0\.(.+)", r"net.side.fusions.\1.norm.\2"),
    (r"side_adapter_network\.fusion_layers\.layer_(\d+)\.input_proj\.1\.(.+)", r"net.side.fusions.\1.proj.\2"),
    (r"side_adapter_network\.mask_decoder\.(\w+_mlp)\.layers\.(\d+)\.(.+)",  # ours has ReLUs in the Sequential
     lambda m, k: f"net.side.decoder.{m[1]}.{2 * int(m[2])}.{m[3]}"),
    (r"side_adapter_network\.mask_decoder\.bias_scaling\.(.+)", r"net.side.decoder.bias_scaling.\1"),
    # CLIP's visual tower, split in two by the official code: the feature extractor (blocks 1..k) and the head
    (r"clip_visual_extractor\.(conv1|class_embedding|positional_embedding|ln_pre)(.*)", r"net.clip.visual.\1\2"),
    (r"clip_visual_extractor\.resblocks\.(\d+)\.(.+)", r"net.clip.visual.transformer.resblocks.\1.\2"),
    (r"clip_rec_head\.resblocks\.(\d+)\.(.+)",  # the head's block i is CLIP's block k + i
     lambda m, k: f"net.clip.visual.transformer.resblocks.{int(m[1]) + k}.{m[2]}"),
    (r"clip_rec_head\.(ln_post|proj)(.*)", r"net.clip.visual.\1\2"),
    # the classifier: CLIP without its visual tower (the text encoder, logit_scale), and the background embedding
    (r"ov_classifier\.bg_embed", r"net.bg_embed"),
    (r"ov_classifier\.(.+)", r"net.clip.\1"),
)
OFFICIAL_UNUSED = ("criterion.empty_weight",  # the no-object CE weight, a buffer made from cfg.no_object_weight
                   "ov_classifier.attn_mask")  # the text encoder's causal mask, a constant the classifier re-saves


def listing(keys, n=20):
    """The first n keys and how many more, for error messages."""
    return str(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def released_name(name, released, to_ours):
    """Our key `name`, not filled by a released file -> its name there: a file key mapping into the same module of
    ours (released: official key -> ours), as is or its last piece swapped, checked by to_ours; "?" if none."""
    module, _, leaf = name.rpartition(".")
    twins = [k for k, o in released.items() if (o or "").rpartition(".")[0] == module]
    return next((c for k in twins for c in (k, f"{k.rpartition('.')[0]}.{leaf}") if to_ours(c) == name), "?")


def official_name_to_ours(key, k):
    """One official key -> our key, or None if no rule of OFFICIAL_KEYS matches it."""
    for pattern, target in OFFICIAL_KEYS:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target) if isinstance(target, str) else target(m, k)
    return None


def official_weights(checkpoint):
    """The state dict inside a released file: detectron2 saves {"model": state dict, "iteration": ...}."""
    return checkpoint.get("model", checkpoint)


def official_preset(state):
    """The preset of a released checkpoint, told by CLIP's width: 768 -> "paper" (B/16), 1024 -> "paper_l14"."""
    conv1 = state.get("clip_visual_extractor.conv1.weight")
    return None if conv1 is None else {768: "paper", 1024: "paper_l14"}.get(conv1.shape[0])


def convert_official_state_dict(official, cfg):
    """An official SAN state dict (or detectron2's {"model": ...}) -> the state dict of build_model(cfg).

    Every official key must map to one of ours with the same number of elements, and every key of ours must be
    filled: otherwise a ValueError lists the unknown, missing and mis-shaped keys, and nothing is returned."""
    official = official_weights(official)
    wrapper = build_model(cfg, pretrained=False)
    ours, k = wrapper.state_dict(), cfg.clip_feature_layers[-1]
    out, unknown, mismatched, released = {}, [], [], {}
    for key, value in official.items():
        if key in OFFICIAL_UNUSED:
            continue
        name = released[key] = official_name_to_ours(key, k)
        if name not in ours:
            unknown.append(key if name is None else f"{key} (-> {name})")
        elif ours[name].numel() != value.numel():
            mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(ours[name].shape)}")
        else:
            out[name] = value.reshape(ours[name].shape).to(ours[name].dtype)  # only the (1, n, W) embeds reshape
    missing = [f"{released_name(m, released, lambda key: official_name_to_ours(key, k))} (-> {m})"
               for m in sorted(set(ours) - set(out))]  # named as in the released file, which the user holds
    if unknown or missing or mismatched:
        raise ValueError(f"the checkpoint does not fit SAN with this config ({len(unknown)} unknown, {len(missing)} "
                         f"missing, {len(mismatched)} mis-shaped keys): unknown {listing(unknown)}, missing "
                         f"{listing(missing)}, mis-shaped {listing(mismatched)}")
    wrapper.load_state_dict(out)  # strict: a last check
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Self-check: python san.py (offline: a tiny random CLIP written to a temporary folder)
# ----------------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    import json
    import tempfile

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 6, "width": 64, "head_width": 16,
                                                "patch_size": 8},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
        with open(f"{tmp}/tiny_clip.json", "w") as f:
            json.dump(spec, f)
        torch.save(open_clip.model.CLIP(**spec).state_dict(), f"{tmp}/tiny_clip.pt")
        cfg = replace(PRESETS["toy"], clip_model=f"{tmp}/tiny_clip.json", clip_pretrained=f"{tmp}/tiny_clip.pt")
        wrapper = build_model(cfg)
        batch = {"image": torch.rand(2, 3, 128, 128), "label": torch.randint(0, 8, (2, 128, 128))}
        losses = wrapper(batch, 0)
        losses["loss"].backward()
        print("losses:", {k: round(v.item(), 3) for k, v in losses.items()})
        print("predict:", tuple(wrapper.predict({"image": torch.rand(1, 3, 100, 75)}, ["cat", "dog", "sky"]).shape))
        print(f"toy-sized SAN on a tiny CLIP: {count_trainable(wrapper) / 1e6:.2f}M trainable")
    paper = build_model(PRESETS["paper"], pretrained=False)
    print(f"paper (ViT-B/16): {count_trainable(paper) / 1e6:.2f}M trainable (official log: 8.37M), "
          f"{sum(p.numel() for p in paper.parameters()) / 1e6:.1f}M in all")
