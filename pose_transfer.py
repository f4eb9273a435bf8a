"""PATN: Progressive Pose Attention Transfer for Person Image Generation, and its aligned variant APATN.

Zhu, Huang, Shi, Yu, Wang, Bai. CVPR 2019 (oral), arXiv 1904.03349; journal version "Progressive and Aligned Pose
Attention Transfer for Person Image Generation", TPAMI 44(8) 2022, arXiv 2103.11622.
Official code: https://github.com/tengteng95/Pose-Transfer (PyTorch; models/model_variants.py, models/PATN.py).

The idea. To move a person from pose S_c to pose S_t, a generator encodes the condition image P_c and the two poses
(18 + 18 keypoint heatmaps) in two pathways, then transfers the person in small steps: a cascade of Pose-Attentional
Transfer Blocks (PATBs). In each block the pose pathway computes an attention mask M = sigmoid(conv_S(f_S)) that says
where the image code should change at this step; the image code takes a masked residual step f_P + M * conv_P(f_P);
the pose code is updated by concatenating the new image code to it. A decoder turns the final image code into P_g.
Two discriminators judge it: D_A on (image, condition image) for appearance, D_S on (image, target heatmaps) for
shape. Loss: L1 + perceptual L1 (VGG19 conv1_2) + the two GAN losses.

File map (reading order; "Eq. n" numbers this file's formulas in the order the paper's method section presents
them: the PDF was not at hand to check its own numbering):
  Config, PRESETS (market, deepfashion, paper = market, toy) ... the official scripts/train_star.sh
  encoder ..................................................... two pathways, two stride-2 downsamplings
  PATB ........................................................ the Pose-Attentional Transfer Block, Eq. 1-3
  APATB ....................................................... the journal's aligned block (reconstructed, below)
  ResnetBlock ................................................. the ablation "ResNet blocks instead of PATBs"
  PATNGenerator, ResnetDiscriminator .......................... the generator; D_A and D_S
  losses: GAN, L1 + perceptual ................................ Eq. 4-6
  ImagePool, PoseTransfer (training wrapper, one call per optimizer) ... training details
  build_model, __main__ self-check
  OFFICIAL_KEYS, convert_official_state_dict ................... the released Market / DeepFashion generators

Differences from the official code (each also said at its line):
  - The discriminators end in no sigmoid: the vanilla GAN loss (Market, --no_lsgan) is BCE-with-logits, which equals
    the official sigmoid + BCELoss and is numerically stable.
  - Iterations instead of "epochs" of 4000 random pairs: Market 700 x 125 = 87,500 iterations at batch 32, the lr
    linear from 62,500 to 0 (500 + 200 epochs); pairs are drawn without replacement per pass instead of with.
  - The heatmaps are computed from the keypoint csv on the fly (float Gaussians; the released DeepFashion .npy
    files were truncated to uint8 one-hot points).
  - APATB is not in the official code. We could not read the journal's Sec. 3 either (only its abstract): our APATB
    aligns the image code to the target pose with a cross-attention whose queries and keys come from the pose code and
    whose values are the image code, and then applies the PATB update to the aligned code. That the journal computes
    a correlation from pose features to gather condition-image features is our reading of the abstract; its exact
    projections, normalisation, where the alignment enters and which of the 9 blocks are APATBs are NOT confirmed.
  - The ResNet-block ablation feeds concat(P_c, S_c, S_t) to one encoder (39 channels) and 9 plain ResNet blocks, as
    the paper's ablation describes it in words; the exact ablation code is not released.

Shapes: B batch, H x W image (Market 128 x 64, DeepFashion 256 x 176), K = 18 keypoints, C = 4 ngf channels of the
codes at H/4 x W/4 (256 x 32 x 16 on Market). Images are in [0, 1] in batches and [-1, 1] inside the networks.
"""
import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

TASK = "pose"


# ----------------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    train_dataset: str = "market"  # data.py dataset of training pairs: market | deepfashion | toy_people
    eval_datasets: tuple = ("market",)  # data.py datasets evaluated (their test pairs)
    data_root: str = "datasets"  # folder holding market_data/ and fashion_data/
    toy_val_pairs: int = 128  # held-out pairs of toy_people evaluated (the toy only)
    image_size: tuple = (128, 64)  # (H, W) of the images
    heatmap_sigma: float = 6.0  # Gaussian sigma of the keypoint heatmaps, in pixels
    block: str = "patb"  # transfer blocks: patb (PATN) | apatb (APATN, TPAMI) | resnet (the no-attention ablation)
    n_blocks: int = 9  # transfer blocks (9 in the official define_G, both datasets)
    ngf: int = 64  # generator channels after the first conv (codes have 4 ngf)
    ndf: int = 64  # discriminator channels after the first conv
    n_layers_d: int = 3  # residual blocks in each discriminator
    norm: str = "batch"  # batch (Market) | instance (DeepFashion), in G and both Ds
    dropout: float = 0.5  # dropout inside every generator block (the official default, no --no_dropout)
    dropout_d: float = 0.5  # dropout inside every discriminator block
    gan_mode: str = "vanilla"  # vanilla (BCE; Market's --no_lsgan) | lsgan (MSE; DeepFashion)
    lambda_gan: float = 5.0  # weight of the GAN losses
    lambda_l1: float = 10.0  # weight of the L1 loss (official lambda_A)
    lambda_perceptual: float = 10.0  # weight of the VGG19 conv1_2 L1 loss (official lambda_B); 0 = no VGG
    vgg_weights: str = "IMAGENET1K_V1"  # torchvision VGG19 weights name, or a local .pth state dict
    pool_size: int = 50  # image pool of fakes shown to the discriminators (0 = off)
    batch_size: int = 32  # batch
    max_iters: int = 87_500  # iterations (700 epochs of 4000 pairs at batch 32)
    lr: float = 2e-4  # Adam learning rate of G and both Ds
    beta1: float = 0.5  # Adam beta1 (beta2 0.999)
    schedule: str = "linear"  # constant, then linear decay to 0 (the official "lambda" policy)
    lr_decay_from: int = 62_500  # iteration where the decay starts (500 epochs)
    amp: bool = False  # mixed precision on CUDA (the official code trains in fp32)
    log_interval: int = 100  # iterations between log lines
    ckpt_interval: int = 5000  # iterations between checkpoints
    eval_interval: int = 0  # iterations between evaluations (0 = at the end)
    num_workers: int = 4  # data-loading processes
    seed: int = 0  # random seed


PRESETS = {
    # scripts/train_star.sh: --norm batch --batchSize 32 --no_lsgan --lambda_GAN 5 --lambda_A 10 --lambda_B 10
    "market": Config(),
    # --norm instance --batchSize 7 --pool_size 0 --lambda_A 1 --lambda_B 1, LSGAN; 700 epochs of 572 iterations
    "deepfashion": Config(train_dataset="deepfashion", eval_datasets=("deepfashion",), image_size=(256, 176),
                          norm="instance", gan_mode="lsgan", lambda_l1=1.0, lambda_perceptual=1.0, pool_size=0,
                          batch_size=7, max_iters=400_400, lr_decay_from=286_000),
    # CPU, minutes: 64 x 32 people, ngf 8. No perceptual loss (VGG weights cannot be downloaded here: an explicit
    # choice, lambda_perceptual 0) and no dropout (it slows a short run down); everything else as Market's.
    "toy": Config(train_dataset="toy_people", eval_datasets=("toy_people",), image_size=(64, 32), heatmap_sigma=3.0,
                  ngf=8, ndf=8, dropout=0.0, dropout_d=0.0, lambda_perceptual=0.0, batch_size=8, max_iters=1500,
                  lr_decay_from=1000, log_interval=50, ckpt_interval=500, num_workers=0),
}
PRESETS["paper"] = PRESETS["market"]  # Market-1501, the paper's first benchmark


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks, in data-flow order
# ----------------------------------------------------------------------------------------------------------------------
def norm_layer(kind, channels):
    """BatchNorm (affine) on Market, InstanceNorm without affine on DeepFashion, as the official get_norm_layer."""
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.InstanceNorm2d(channels, affine=False)


def conv3x3(cin, cout, bias):
    return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3, bias=bias)]


def dropout_layer(p):
    """[a new nn.Dropout(p)] (each branch owns its module, as officially: 2 per PATB, 18 in the generator) or []."""
    return [nn.Dropout(p)] if p > 0 else []


def encoder(cin, ngf, norm, bias):
    """7x7 conv then two stride-2 3x3 convs: (B, cin, H, W) -> (B, 4 ngf, H/4, W/4)."""
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(cin, ngf, 7, bias=bias), norm_layer(norm, ngf), nn.ReLU(True)]
    for mult in (1, 2):
        layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
                   norm_layer(norm, ngf * mult * 2), nn.ReLU(True)]
    return nn.Sequential(*layers)


class PATB(nn.Module):
    """Pose-Attentional Transfer Block (Sec. 3.1): (f_P (B, C, h, w), f_S (B, C or 2C, h, w)) -> same shapes, f_S 2C.

        M_t     = sigmoid(conv_S(f_S))                       Eq. 1: the attention mask, one value per channel and pixel
        f_P'    = f_P + M_t * conv_P(f_P)                    Eq. 2: the image code changes only where M_t attends
        f_S'    = concat(conv_S(f_S), f_P')                  Eq. 3: the pose code sees the updated image code
    conv_S: 3x3 conv, norm, ReLU, dropout, 3x3 conv to C (no norm); conv_P: the two convs of a ResNet block. As
    officially, each branch has its own Dropout and conv_P (the official stream 1) runs before conv_S (stream 2).
    """

    def __init__(self, C, first, norm, bias, dropout):
        super().__init__()
        cs = C if first else 2 * C  # block 1 sees the encoder's pose code, later blocks the concatenated one
        self.conv_P = nn.Sequential(*conv3x3(C, C, bias), norm_layer(norm, C), nn.ReLU(True), *dropout_layer(dropout),
                                    *conv3x3(C, C, bias), norm_layer(norm, C))
        self.conv_S = nn.Sequential(*conv3x3(cs, cs, bias), norm_layer(norm, cs), nn.ReLU(True),
                                    *dropout_layer(dropout), *conv3x3(cs, C, bias))

    def update(self, f_P, s, residual):
        """The masked residual step and the pose update, given the pose branch's output s (B, C, h, w)."""
        mask = torch.sigmoid(s)  # PAPER: Eq. 1, the pose attention mask M_t (B, C, h, w)
        f_P = f_P + mask * residual  # PAPER: Eq. 2, only the attended regions of the image code change
        return f_P, torch.cat([s, f_P], 1), mask  # PAPER: Eq. 3, pose code updated by concatenation (B, 2C, h, w)

    def forward(self, f_P, f_S):
        residual = self.conv_P(f_P)  # (B, C, h, w); the image branch runs first, as officially (dropout draw order)
        f_P, f_S, self.last_mask = self.update(f_P, self.conv_S(f_S), residual)
        return f_P, f_S


class APATB(PATB):
    """Aligned PATB (TPAMI; reconstructed, see the file docstring): the image code is first aligned to the target pose
    by attention, then the PATB update runs on the aligned code.

        A      = softmax_j( q(f_S)_i . k(f_S)_j / sqrt(d) )     (B, hw, hw): pose-code correlation, query i <- key j
        f_A    = f_P + gamma * v(f_P) A^T                        image features gathered from where A points
        f_P'   = f_A + M_t * conv_P(f_A),  f_S' = concat(conv_S(f_S), f_P')
    gamma starts at 0, so an APATB starts as a PATB and learns how much alignment to use.
    """

    def __init__(self, C, first, norm, bias, dropout):
        super().__init__(C, first, norm, bias, dropout)
        cs, d = (C if first else 2 * C), max(C // 8, 4)
        self.q, self.k, self.v = nn.Conv2d(cs, d, 1), nn.Conv2d(cs, d, 1), nn.Conv2d(C, C, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, f_P, f_S):
        B, C, h, w = f_P.shape
        q, k = self.q(f_S).flatten(2), self.k(f_S).flatten(2)  # (B, d, hw)
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), -1)  # PAPER: alignment (B, hw, hw)
        aligned = (self.v(f_P).flatten(2) @ attn.transpose(1, 2)).view(B, C, h, w)  # (B, C, h, w)
        f_A = f_P + self.gamma * aligned
        residual = self.conv_P(f_A)  # the image branch first, as in PATB
        f_P, f_S, self.last_mask = self.update(f_A, self.conv_S(f_S), residual)
        return f_P, f_S


class ResnetBlock(nn.Module):
    """A plain ResNet block (pix2pix): x + conv(x). The ablation's transfer block, and the discriminators' block."""

    def __init__(self, C, norm, bias, dropout):
        super().__init__()
        self.conv = nn.Sequential(*conv3x3(C, C, bias), norm_layer(norm, C), nn.ReLU(True), *dropout_layer(dropout),
                                  *conv3x3(C, C, bias), norm_layer(norm, C))

    def forward(self, x):
        return x + self.conv(x)


# ----------------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------------
class PATNGenerator(nn.Module):
    """(P_c (B, 3, H, W), S_c (B, K, H, W), S_t (B, K, H, W)) in [-1, 1] / heatmaps -> P_g (B, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg, K=18):
        super().__init__()
        C, bias, self.block = 4 * cfg.ngf, cfg.norm == "instance", cfg.block  # convs before BatchNorm have no bias
        if cfg.block == "resnet":  # ablation: one pathway on the concatenated inputs, no pose attention
            self.image_encoder = encoder(3 + 2 * K, cfg.ngf, cfg.norm, bias)
            self.blocks = nn.ModuleList(ResnetBlock(C, cfg.norm, bias, cfg.dropout) for _ in range(cfg.n_blocks))
        elif cfg.block in ("patb", "apatb"):
            self.image_encoder = encoder(3, cfg.ngf, cfg.norm, bias)  # PAPER: two pathways, image ...
            self.pose_encoder = encoder(2 * K, cfg.ngf, cfg.norm, bias)  # PAPER: ... and both poses (S_c, S_t)
            Block = PATB if cfg.block == "patb" else APATB
            self.blocks = nn.ModuleList(Block(C, i == 0, cfg.norm, bias, cfg.dropout) for i in range(cfg.n_blocks))
        else:
            raise ValueError(f"block must be 'patb', 'apatb' or 'resnet', got {cfg.block!r}")
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(C, C // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
            norm_layer(cfg.norm, C // 2), nn.ReLU(True),
            nn.ConvTranspose2d(C // 2, C // 4, 3, stride=2, padding=1, output_padding=1, bias=bias),
            norm_layer(cfg.norm, C // 4), nn.ReLU(True),
            nn.ReflectionPad2d(3), nn.Conv2d(C // 4, 3, 7), nn.Tanh())

    def forward(self, P_c, S_c, S_t):
        if self.block == "resnet":
            f_P, f_S = self.image_encoder(torch.cat([P_c, S_c, S_t], 1)), None  # (B, C, H/4, W/4)
        else:
            f_P, f_S = self.image_encoder(P_c), self.pose_encoder(torch.cat([S_c, S_t], 1))  # (B, C, H/4, W/4) x 2
        for block in self.blocks:  # PAPER: progressive transfer, one small step per block
            f_P, f_S = (block(f_P), None) if self.block == "resnet" else block(f_P, f_S)
        return self.decoder(f_P)  # (B, 3, H, W)


class ResnetDiscriminator(nn.Module):
    """The official D: 7x7 conv, two stride-2 convs, n ResNet blocks, and no final 1-channel conv: every element of
    the (B, 4 ndf, H/4, W/4) map is a logit. (B, cin, H, W) -> (B, 4 ndf, H/4, W/4)."""

    def __init__(self, cin, cfg):
        super().__init__()
        bias = cfg.norm == "instance"
        self.model = nn.Sequential(encoder(cin, cfg.ndf, cfg.norm, bias),
                                   *[ResnetBlock(4 * cfg.ndf, cfg.norm, bias, cfg.dropout_d)
                                     for _ in range(cfg.n_layers_d)])

    def forward(self, x):
        return self.model(x)


def init_weights(module):
    """The official init_weights('normal'): conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------
def gan_loss(logits, real, mode):
    """Every element of the D map against 1 (real) or 0 (fake): BCE on logits (vanilla) or MSE (LSGAN)."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.mse_loss(logits, target)


class VGGConv12(nn.Module):
    """VGG19 features up to relu after conv1_2 (torchvision features[:4]), frozen: the official perceptual layer.

    weights: a torchvision weights name ("IMAGENET1K_V1"), a local .pth holding a VGG19 state dict (only
    features.0.* and features.2.* are read), or None (the weights will come from a checkpoint).
    (B, 3, H, W) in [-1, 1] -> (B, 64, H, W)."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, weights):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(True), nn.Conv2d(64, 64, 3, padding=1),
                                    nn.ReLU(True))
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        if weights is None:
            return
        if weights.endswith((".pth", ".pt")):
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise FileNotFoundError(f"no VGG19 weights file at {weights}") from None
        else:
            try:
                state = torchvision.models.vgg19(weights=weights).state_dict()
            except Exception as e:  # offline: the download fails; an unknown name: a ValueError/KeyError
                raise ValueError(f"cannot load torchvision VGG19 weights {weights!r} ({type(e).__name__}: {e}); "
                                 "download them once, or pass --vgg_weights /path/vgg19.pth, or "
                                 "--lambda_perceptual 0 to train without the perceptual loss") from None
        keys = ["features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"]
        if not all(k in state for k in keys):
            raise ValueError(f"{weights} is not a VGG19 state dict (needs {', '.join(keys)})")
        self.layers.load_state_dict({k[len("features."):]: state[k] for k in keys})

    def forward(self, x):
        return self.layers(((x + 1) / 2 - self.mean) / self.std)


# ----------------------------------------------------------------------------------------------------------------------
# The training wrapper
# ----------------------------------------------------------------------------------------------------------------------
class ImagePool(nn.Module):
    """pix2pix's history of fakes: each new fake enters the pool; once it is full, with probability 1/2 the
    discriminator sees a stored fake instead (which the new one replaces). Stored as buffers, so checkpointed."""

    def __init__(self, size, shape):
        super().__init__()
        self.size = size
        self.register_buffer("images", torch.zeros(size, *shape) if size else torch.zeros(0))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def query(self, x):
        if self.size == 0:
            return x
        out = []
        for image in x:
            n = int(self.count)
            if n < self.size:
                self.images[n] = image
                self.count += 1
                out.append(image)
            elif torch.rand(()) < 0.5:
                j = int(torch.randint(self.size, ()))
                out.append(self.images[j].clone())
                self.images[j] = image
            else:
                out.append(image)
        return torch.stack(out)


class PoseTransfer(nn.Module):
    """Generator, appearance discriminator D_A and shape discriminator D_S, trained by train.py with three optimizers.

    Batch keys: source, target (B, 3, H, W) in [0, 1]; source_pose, target_pose (B, K, H, W) heatmaps."""

    def __init__(self, cfg, pretrained=True):
        super().__init__()
        self.cfg, K = cfg, 18
        self.generator = PATNGenerator(cfg, K)
        self.disc_appearance = ResnetDiscriminator(3 + 3, cfg)  # PAPER: D_A judges (P, P_c): appearance consistency
        self.disc_shape = ResnetDiscriminator(3 + K, cfg)  # PAPER: D_S judges (P, S_t): shape consistency
        init_weights(self.generator)  # the official define_D leaves the Ds at PyTorch's default init
        self.vgg = VGGConv12(cfg.vgg_weights if pretrained else None) if cfg.lambda_perceptual > 0 else None
        H, W = cfg.image_size
        self.pool_appearance = ImagePool(cfg.pool_size, (6, H, W))
        self.pool_shape = ImagePool(cfg.pool_size, (3 + K, H, W))
        self.fake = None

    def generate(self, batch):
        """P_g (B, 3, H, W) in [-1, 1] from the batch's source image and both heatmaps."""
        return self.generator(batch["source"] * 2 - 1, batch["source_pose"], batch["target_pose"])

    def forward(self, batch, step=0, optimizer="generator"):
        """One optimizer's part of the iteration: "generator", then "disc_appearance", then "disc_shape"."""
        cfg = self.cfg
        P_c, P_t, S_t = batch["source"] * 2 - 1, batch["target"] * 2 - 1, batch["target_pose"]
        if optimizer == "generator":
            for d in (self.disc_appearance, self.disc_shape):
                d.requires_grad_(False)
            P_g = self.generate(batch)  # (B, 3, H, W)
            self.fake = P_g.detach()  # what the discriminators' calls judge
            gan_a = gan_loss(self.disc_appearance(torch.cat([P_g, P_c], 1)), True, cfg.gan_mode)
            gan_s = gan_loss(self.disc_shape(torch.cat([P_g, S_t], 1)), True, cfg.gan_mode)
            losses = {"loss_gan": cfg.lambda_gan * (gan_a + gan_s) / 2,  # Eq. 4; the code averages the two terms
                      "loss_l1": cfg.lambda_l1 * F.l1_loss(P_g, P_t)}  # Eq. 5
            if self.vgg is not None:  # Eq. 6, the perceptual L1 on VGG19 conv1_2 features
                losses["loss_perceptual"] = cfg.lambda_perceptual * F.l1_loss(self.vgg(P_g), self.vgg(P_t).detach())
            return {"loss": sum(losses.values()), **losses}
        if self.fake is None:
            raise RuntimeError("the generator's call must come first in an iteration (configure_optimizers' order)")
        if optimizer == "disc_appearance":
            d, pool, real, fake = self.disc_appearance, self.pool_appearance, torch.cat([P_t, P_c], 1), \
                torch.cat([self.fake, P_c], 1)
        elif optimizer == "disc_shape":
            d, pool, real, fake = self.disc_shape, self.pool_shape, torch.cat([P_t, S_t], 1), \
                torch.cat([self.fake, S_t], 1)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        d.requires_grad_(True)
        fake = pool.query(fake)  # PAPER (official code): Ds see a history of 50 fakes on Market
        loss = cfg.lambda_gan * 0.5 * (gan_loss(d(real), True, cfg.gan_mode) + gan_loss(d(fake), False, cfg.gan_mode))
        return {"loss": loss}

    def configure_optimizers(self, cfg):
        """Adam 2e-4, betas (0.5, 0.999) for G, D_A, D_S; train.py steps them in this order every iteration."""
        adam = lambda m: torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))  # noqa: E731
        return OrderedDict(generator=adam(self.generator), disc_appearance=adam(self.disc_appearance),
                           disc_shape=adam(self.disc_shape))

    @torch.no_grad()
    def predict(self, batch, vocab=None):
        """Generated target images (B, 3, H, W) in [0, 1]."""
        return (self.generate(batch).clamp(-1, 1) + 1) / 2


# ----------------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg, pretrained=True):
    """The training wrapper; pretrained=False skips loading VGG19 (a checkpoint will bring its weights)."""
    for field, allowed in (("norm", ("batch", "instance")), ("gan_mode", ("vanilla", "lsgan"))):
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"{field} must be one of {allowed}, got {getattr(cfg, field)!r}")
    return PoseTransfer(cfg, pretrained)


# ----------------------------------------------------------------------------------------------------------------------
# Released checkpoints: tengteng95/Pose-Transfer's latest_net_netG.pth (Market-1501 and DeepFashion generators)
# ----------------------------------------------------------------------------------------------------------------------
# (official key regex, our key), read from tengteng95/Pose-Transfer models/model_variants.py (PATNetwork holds PATNModel
# as `model`; PATBlock) and models/networks.py (define_G: 9 blocks; get_norm_layer). The official Sequentials have our
# layout index for index, reflection pads, ReLUs and the generator's Dropout(0.5) included, so only the names change:
#   stream1_down, stream2_down  [pad, 7x7 conv, norm, ReLU] + 2 x [stride-2 conv, norm, ReLU]   = our encoders
#   att.i.conv_block_stream1    [pad, conv, norm, ReLU, dropout, pad, conv, norm]                = our PATB conv_P
#   att.i.conv_block_stream2    [pad, conv, norm, ReLU, dropout, pad, conv] (the mask's logits)  = our PATB conv_S
#   stream1_up                  2 x [transposed conv, norm, ReLU], pad, 7x7 conv, tanh           = our decoder
# (A generator trained with --no_dropout has its second block conv at index 5: it needs a config with dropout=0.)
OFFICIAL_KEYS = (
    (r"model\.stream1_down\.(\d+)\.(.+)", r"generator.image_encoder.\1.\2"),  # the image pathway (P_c)
    (r"model\.stream2_down\.(\d+)\.(.+)", r"generator.pose_encoder.\1.\2"),  # the pose pathway (S_c, S_t)
    (r"model\.att\.(\d+)\.conv_block_stream1\.(\d+)\.(.+)", r"generator.blocks.\1.conv_P.\2.\3"),
    (r"model\.att\.(\d+)\.conv_block_stream2\.(\d+)\.(.+)", r"generator.blocks.\1.conv_S.\2.\3"),
    (r"model\.stream1_up\.(\d+)\.(.+)", r"generator.decoder.\1.\2"),
)


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


# Copied from ann.official_name_to_ours
def official_name_to_ours(key):
    """One official key -> our key, or None if no rule of OFFICIAL_KEYS matches it."""
    for pattern, target in OFFICIAL_KEYS:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target)
    return None


def official_weights(checkpoint):
    """The released latest_net_netG.pth is already the generator's plain state dict (base_model.save_network)."""
    return checkpoint


def official_preset(state):
    """The preset of a released generator, told by its first norm layer: a BatchNorm's affine weight says "market"
    (--norm batch); none, with biased convs, says "deepfashion" (--norm instance: InstanceNorm without affine)."""
    if "model.stream1_down.2.weight" in state:
        return "market"
    if "model.stream1_down.1.bias" in state:
        return "deepfashion"
    return None


def convert_official_state_dict(official, cfg):
    """A released PATN generator (a state dict of the official PATNetwork) -> the state dict of build_model(cfg,
    pretrained=False).

    Both releases were saved by PyTorch 0.3. Market's BatchNorm layers lack `num_batches_tracked` (added in 0.4.1; only
    read with momentum=None): it is filled with 0. DeepFashion's InstanceNorm (affine=False) layers carry
    running_mean / running_var buffers that 0.3 kept up to date but never read (it always normalised with the input's
    own statistics) and that PyTorch >= 0.4 rejects: they are dropped, as the official tool/rm_insnorm_running_vars.py
    does. Any other official key that maps nowhere, a generator weight of ours left unfilled, or a shape that differs,
    raises a ValueError listing them. The release holds the generator only: the discriminators, the image pools and
    the VGG19 layers of the returned state dict are those of a fresh build_model(cfg, pretrained=False) (random), which
    generation and eval.py never use; the converted checkpoint is for evaluation, not for resuming GAN training."""
    official = official_weights(official)
    wrapper = build_model(cfg, pretrained=False)
    ours = wrapper.state_dict()
    instance_norms = {f"generator.{n}" for n, m in wrapper.generator.named_modules()
                      if isinstance(m, nn.InstanceNorm2d)}
    out, unknown, mismatched, released = {}, [], [], {}
    for key, value in official.items():
        name = released[key] = official_name_to_ours(key)
        module, _, leaf = (name or "").rpartition(".")
        if module in instance_norms and leaf in ("running_mean", "running_var"):
            continue  # PyTorch 0.3's unused InstanceNorm statistics (DeepFashion)
        if name not in ours:
            unknown.append(key if name is None else f"{key} (-> {name})")
        elif ours[name].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(ours[name].shape)}")
        else:
            out[name] = value.to(ours[name].dtype)
    generator = {k for k in ours if k.startswith("generator.")}
    out.update({k: torch.zeros_like(ours[k]) for k in generator - set(out) if k.endswith(".num_batches_tracked")})
    missing = [f"{released_name(m, released, official_name_to_ours)} (-> {m})" for m in sorted(generator - set(out))]
    if unknown or missing or mismatched:
        hint = (" (a block's second conv at index 5 means a generator trained with --no_dropout: use dropout=0)"
                if any(re.search(r"conv_block_stream\d\.5\.weight", k) for k in unknown) else "")
        raise ValueError(f"the checkpoint does not fit the PATN generator with this config ({len(unknown)} unknown, "
                         f"{len(missing)} missing, {len(mismatched)} mis-shaped keys): unknown {listing(unknown)}, "
                         f"missing {listing(missing)}, mis-shaped {listing(mismatched)}{hint}")
    out.update({k: v for k, v in ours.items() if k not in generator})  # not released: fresh (unused by generation)
    wrapper.load_state_dict(out)  # strict: a last check
    return out


if __name__ == "__main__":
    cfg = PRESETS["market"]
    g = PATNGenerator(cfg)
    print(f"PATN generator, Market setting: {sum(p.numel() for p in g.parameters()) / 1e6:.2f}M parameters")
    toy = build_model(PRESETS["toy"])
    H, W = PRESETS["toy"].image_size
    batch = {"source": torch.rand(2, 3, H, W), "target": torch.rand(2, 3, H, W),
             "source_pose": torch.rand(2, 18, H, W), "target_pose": torch.rand(2, 18, H, W)}
    for name in toy.configure_optimizers(PRESETS["toy"]):
        print(name, {k: round(v.item(), 3) for k, v in toy(batch, 0, optimizer=name).items()})
    print("prediction", tuple(toy.predict(batch).shape))
