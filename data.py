"""Datasets and transforms shared by every model file.

Every semantic-segmentation dataset yields {"image": float32 (3, H, W) RGB in [0, 1], "label": int64 (H, W)} and
exposes `.class_names` (verbatim names, used as prompts by the open-vocabulary models) and `.seen_classes` (indices of
the classes seen in training for zero-shot splits, else None). Models normalise images themselves, each with its own
mean/std.

Every pose-transfer dataset (ToyPeople, PoseFolder) yields pairs {"source", "target": float32 (3, H, W) in [0, 1],
"source_keypoints", "target_keypoints": float32 (18, 2) (y, x), -1 = missing, "source_pose", "target_pose": float32
(18, H, W) heatmaps} and states `.repad` (white columns added before SSIM), `.masked_metrics`, `.inception_score`.

Ignore label: 255 (IGNORE) everywhere, except in the two label sets with more than 255 classes, PC-459 and ADE-847.
There 255 is a real class, so their labels keep the 65535 (IGNORE_16BIT) that detectron2 stores in the 16-bit TIFFs,
as the official SAN registration declares. Real datasets state theirs as `.ignore_index`; read it with
`getattr(dataset, "ignore_index", IGNORE)`. In every dataset, label >= len(class_names) means ignore.

Contents, in reading order:
  1. Built-in synthetic data (no download, deterministic by seed, generated on the fly):
     - ToyContext: the class of an object is decided by a far-away cue, so only long-range context solves it (ANN).
     - ToyShapes: colour x shape objects on a "background" stuff class, with seen/unseen splits (SAN, zsseg), and
       ToyShapesCaptions, the captioned images the toy CLIP is pre-trained on.
     - ToyPeople: pairs of one synthetic person in two poses, with 18 keypoints and their heatmaps (PATN).
     - ToyDetection: boxes of shape classes on cluttered backgrounds, a labelled / unlabelled split of it, and
       optional annotation noise (missing, shifted, loose, displaced boxes) on the training split; and ToyObjects,
       one object of 10 shape classes per image with an image-level label, the toy ImageNet that the detection toys'
       backbone is pre-trained on (toy_backbone.py), from a random stream no ToyDetection image shares.
  2. Real datasets in the layouts that the official repos / detectron2 / mmseg preparation scripts write, the
     pose-transfer pairs of Market-1501 and DeepFashion (PoseFolder), and COCO detection (pycocotools) with the
     semi-supervised split files.
  3. Training transforms (random scale, crop, flip, photometric) on image + mask with torchvision.transforms.v2, and
     the box-aware detection views (weak / strong) that record their geometry as a 3x3 matrix; the two-stream
     (labelled + unlabelled) dataset.
  4. build_dataset(name, split, cfg): the one entry point train.py and eval.py use.

Detection items: {"image": float32 (3, H, W) in [0, 1], "boxes": float32 (N, 4) xyxy in pixels, "labels": int64 (N,)
contiguous class indices 0..K-1 into `.class_names` (no background index), "image_id": int}; an augmented view adds
"matrix": float32 (3, 3), the affine map from original-image pixels to view pixels (x, y, 1). Images differ in size,
so a batch keeps them in lists (train.collate).
"""
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

IGNORE = 255  # label value that no loss and no metric counts
IGNORE_16BIT = 65535  # the ignore label of the 16-bit label sets (PC-459, ADE-847), where 255 is a class


# ----------------------------------------------------------------------------------------------------------------------
# 1. Built-in synthetic data
# ----------------------------------------------------------------------------------------------------------------------
def _rng(seed, split, index):
    """One independent generator per (seed, split, index): any worker can render any item, reproducibly."""
    return np.random.default_rng([seed, {"train": 0, "val": 1}[split], index])


def _noise_texture(rng, size, mean, std, smooth=2):
    """(size, size) grey texture: white noise box-blurred `smooth` times, so it has a grain of a few pixels."""
    t = rng.normal(0.0, 1.0, (size, size))
    for _ in range(smooth):  # each pixel and its 4 neighbours, wrapping around the borders
        p = np.empty((size + 2, size + 2))  # t with a 1-pixel wrapped border (its corners are never read)
        p[1:-1, 1:-1], p[0, 1:-1], p[-1, 1:-1], p[1:-1, 0], p[1:-1, -1] = t, t[-1], t[0], t[:, -1], t[:, 0]
        t = (t + p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]) / 5
    return mean + std * t / (t.std() + 1e-8)


@functools.lru_cache(maxsize=8)
def _grid(size):
    """(2, size, size) float32 row and column indices, made once per size (read-only)."""
    grid = np.mgrid[:size, :size].astype(np.float32)
    grid.flags.writeable = False
    return grid


def _shape_mask(kind, cy, cx, r, size, angle=0.0):
    """(size, size) bool mask of a square, circle/disc or triangle centred at (cy, cx) with 'radius' r."""
    yy, xx = _grid(size)
    y, x = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y  # rotated coordinates
    if kind == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind in ("circle", "disc"):
        return u**2 + v**2 <= r**2
    if kind == "triangle":  # upward triangle (in the rotated frame) inscribed in the circle of radius r
        return (v <= r * 0.5) & (v >= -r + 1.732 * np.abs(u))
    if kind == "ring":
        return (u**2 + v**2 <= r**2) & (u**2 + v**2 >= (0.55 * r) ** 2)
    if kind in ("cross", "x"):  # a plus sign, arms 0.6 r wide; "x" is the same turned by 45 degrees
        if kind == "x":
            u, v = (u + v) / np.sqrt(2), (v - u) / np.sqrt(2)
        return ((np.abs(u) <= r * 0.9) & (np.abs(v) <= r * 0.3)) | ((np.abs(v) <= r * 0.9) & (np.abs(u) <= r * 0.3))
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if kind == "frame":  # a hollow square
        return (np.maximum(np.abs(u), np.abs(v)) <= r * 0.85) & (np.maximum(np.abs(u), np.abs(v)) >= r * 0.5)
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1
    if kind == "semicircle":
        return (u**2 + v**2 <= r**2) & (v <= 0)
    raise ValueError(kind)


class ToyContext(Dataset):
    """Long-range context is the only way to label the objects (the ANN toy).

    Each image holds grey textured objects of two shapes (square, disc) on a noisy background, and ONE small coloured
    cue patch in a random corner. The cue's colour (red, green or blue) decides the class of every object in the
    image: class = 1 + 3 * shape + cue_colour; background is 0; the cue itself is ignored. Objects keep at least
    `size / 3` away from the cue, so a network whose receptive field is smaller than that must guess the colour
    (1 in 3); relating each object to the cue, as a non-local block can, solves it.
    """

    CUE_COLOURS = ((0.9, 0.15, 0.15), (0.15, 0.85, 0.15), (0.15, 0.3, 0.95))
    SHAPES = ("square", "disc")
    class_names = ["background"] + [f"{s} with {c} cue" for s in SHAPES for c in ("red", "green", "blue")]
    seen_classes = None

    def __init__(self, split="train", size=128, length=None, seed=0):
        self.split, self.size, self.seed = split, size, seed
        self.length = length or (100_000 if split == "train" else 64)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng, S = _rng(self.seed, self.split, index), self.size
        image = np.repeat(_noise_texture(rng, S, 0.35, 0.08)[None], 3, 0)  # (3, S, S)
        label = np.zeros((S, S), np.int64)
        colour = rng.integers(3)
        cue = max(S // 10, 4)
        cy, cx = [(2, S - cue - 2)[b] for b in rng.integers(2, size=2)]  # a random corner
        placed = []
        for _ in range(rng.integers(3, 7)):
            for _try in range(20):  # rejection sampling: far from the cue, not touching other objects
                r = rng.uniform(S / 14, S / 8)
                y, x = rng.uniform(r, S - r, 2)
                far = np.hypot(y - cy - cue / 2, x - cx - cue / 2) > S / 3 + r
                apart = all(np.hypot(y - py, x - px) > r + pr + 2 for py, px, pr in placed)
                if far and apart:
                    break
            else:
                continue
            placed.append((y, x, r))
            shape = rng.integers(2)
            mask = _shape_mask(self.SHAPES[shape], y, x, r, S, angle=rng.uniform(0, np.pi))
            image[:, mask] = _noise_texture(rng, S, rng.uniform(0.55, 0.75), 0.06)[mask]
            label[mask] = 1 + 3 * shape + colour
        image[:, cy:cy + cue, cx:cx + cue] = np.asarray(self.CUE_COLOURS[colour])[:, None, None]
        label[cy:cy + cue, cx:cx + cue] = IGNORE
        image = torch.from_numpy(np.clip(image, 0, 1).astype(np.float32))
        return {"image": image, "label": torch.from_numpy(label)}


COLOURS = {"red": (0.9, 0.12, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("square", "circle", "triangle")
SHAPE_CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # 12 classes, "red square", ...
# The segmentation toys label every pixel, as COCO-Stuff does: the 12 objects and the "background" stuff (index 12).
BACKGROUND = "background"
TOY_SEGMENTATION_CLASSES = [*SHAPE_CLASSES, BACKGROUND]
# Unseen in segmentation training, yet every colour and every shape word appears in some seen class.
UNSEEN_SHAPE_CLASSES = ("red circle", "green triangle", "blue square", "yellow circle")


def render_shapes(rng, size, num_objects, radius=(1 / 7, 1 / 3.5)):
    """Draw `num_objects` colour x shape objects on a dark noisy background, each of radius uniform in `radius` x size
    (an object that finds no free place in 30 tries is left out).

    Returns image float32 (3, size, size) in [0, 1], label int64 (size, size) with indices into
    TOY_SEGMENTATION_CLASSES (the background is 12, "background"), and the list of object classes drawn, front-most
    last.
    """
    S = size
    base = _noise_texture(rng, S, 0.18, 0.05)
    image = np.stack([base * rng.uniform(0.8, 1.2) for _ in range(3)])  # (3, S, S), slightly tinted
    label = np.full((S, S), TOY_SEGMENTATION_CLASSES.index(BACKGROUND), np.int64)
    placed, drawn = [], []
    for _ in range(num_objects):
        for _try in range(30):
            r = rng.uniform(radius[0] * S, radius[1] * S)
            y, x = rng.uniform(r, S - r, 2)
            if all(np.hypot(y - py, x - px) > 0.8 * (r + pr) for py, px, pr in placed):
                break
        else:
            continue
        placed.append((y, x, r))
        k = rng.integers(len(SHAPE_CLASSES))
        colour, shape = SHAPE_CLASSES[k].split()
        # Squares as wide as the circles' diameter and only slightly turned, so their corners tell them apart at the
        # toy CLIP's 8-pixel patches (with the 0.85 r of ToyContext's squares they looked like circles to it).
        mask = _shape_mask(shape, y, x, r / 0.85 if shape == "square" else r, S, angle=rng.uniform(-0.2, 0.2))
        rgb = np.clip(np.asarray(COLOURS[colour]) + rng.normal(0, 0.05, 3), 0, 1)
        shade = _noise_texture(rng, S, 1.0, 0.08)[mask]  # a little texture, so colour is the cue, not flatness
        image[:, mask] = rgb[:, None] * shade[None]
        label[mask] = k
        drawn.append(int(k))
    return torch.from_numpy(np.clip(image, 0, 1).astype(np.float32)), torch.from_numpy(label), drawn


class ToyShapes(Dataset):
    """Colour x shape segmentation (the SAN / zsseg toy): every pixel labelled, the background as a stuff class.

    classes="all": the 13 TOY_SEGMENTATION_CLASSES (12 objects + "background"), with `seen_classes` telling which were
    seen in training (the generalized zero-shot evaluation). classes="seen": only the 9 seen classes (8 objects and
    the background), relabelled 0..8 in TOY_SEGMENTATION_CLASSES order, and the pixels of unseen classes set to
    IGNORE -- exactly how the zero-shot `_base` label maps of zsseg/SAN are made.
    """

    def __init__(self, split="train", size=128, classes="all", length=None, seed=0):
        self.split, self.size, self.seed = split, size, seed
        # 256 val scenes, about 40 objects per class: with 64 (about 10), one misnamed object moved a class's IoU by 10
        self.length = length or (100_000 if split == "train" else 256)
        names = TOY_SEGMENTATION_CLASSES
        seen = [i for i, n in enumerate(names) if n not in UNSEEN_SHAPE_CLASSES]
        self.lut = torch.full((256,), IGNORE, dtype=torch.int64)  # raw class index -> dataset label
        if classes == "all":
            self.class_names, self.seen_classes = list(names), seen
            self.lut[:len(names)] = torch.arange(len(names))
        elif classes == "seen":
            self.class_names, self.seen_classes = [names[i] for i in seen], None
            self.lut[seen] = torch.arange(len(seen))
        else:
            raise ValueError(f"classes must be 'all' or 'seen', got {classes!r}")

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = _rng(self.seed, self.split, index)
        # 1-3 objects of radius S/7 to S/3.5: at SAN's clip_resolution 0.5 one spans 2.3 to 4.6 of CLIP's 8 px patches
        # (the first toy's 2-4 objects of radius S/9 to S/4.5 spanned about 2).
        image, label, _ = render_shapes(rng, self.size, rng.integers(1, 4))
        return {"image": image, "label": self.lut[label]}


class ToyShapesCaptions(Dataset):
    """Captioned images of 1-3 shapes of ALL 12 classes: the 'web' the toy CLIP is pre-trained on.

    Like real CLIP before SAN ever saw COCO, the toy CLIP sees every colour x shape combination with words, so a
    class unseen by segmentation training is still one CLIP can name. One image in 13 holds no object and is
    captioned as the "background", the stuff class of the segmentation toys. Objects come at every scale the
    segmenters show CLIP (`RADIUS`, a fraction of the side): small, as in SAN's half-resolution scenes (radius 9-18 px
    of 64), up to filling the image, as in zsseg's crops of one mask resized to CLIP's input; the caption names each
    object drawn, in random order.
    """

    TEMPLATES = ("a photo of a {}.", "a {}.", "there is a {} in the scene.", "a picture of a {}.", "{}")
    class_names, seen_classes = SHAPE_CLASSES, None  # what zero-shot classification is scored on
    RADIUS = (1 / 9, 1 / 2.2)  # object radius range, x size (render_shapes drops what does not fit)

    def __init__(self, split="train", size=64, length=None, seed=0):
        self.split, self.size, self.seed = split, size, seed
        self.length = length or (100_000 if split == "train" else 256)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = _rng(self.seed, self.split, index)
        if self.split == "train" and rng.random() < 1 / 13:  # an empty scene (val: objects only, for zero-shot acc)
            image, _, _ = render_shapes(rng, self.size, 0)
            template = self.TEMPLATES[rng.integers(len(self.TEMPLATES))]
            return {"image": image, "caption": template.format(BACKGROUND), "classes": [], "negative": ""}
        image, _, drawn = render_shapes(rng, self.size, rng.integers(1, 4), self.RADIUS)
        names = [SHAPE_CLASSES[k] for k in dict.fromkeys(drawn)]  # distinct
        names = [names[i] for i in rng.permutation(len(names))]  # in random order
        template = self.TEMPLATES[rng.integers(len(self.TEMPLATES))]
        swapped = swap_attributes(names)  # a hard negative for toy_clip's `hard_negatives`
        return {"image": image, "caption": template.format(" and a ".join(names)), "classes": drawn,
                "negative": template.format(" and a ".join(swapped)) if swapped else ""}


def swap_attributes(names):
    """The caption's names with the shapes of its first two objects of different colours and shapes swapped ("red
    square", "blue circle" -> "red circle", "blue square"): a hard negative, the same words bound differently (NegCLIP,
    Yuksekgonul et al., ICLR 2023). None when no two objects differ in both."""
    parts = [n.split() for n in names]
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            if parts[i][0] != parts[j][0] and parts[i][1] != parts[j][1]:
                swapped = [list(p) for p in parts]
                swapped[i][1], swapped[j][1] = parts[j][1], parts[i][1]
                return [" ".join(p) for p in swapped]
    return None


# Pose transfer (PATN): 18 COCO-order keypoints as OpenPose writes them, (y, x) rows and columns, -1 = not detected.
KEYPOINTS = ("nose", "neck", "Rsho", "Relb", "Rwri", "Lsho", "Lelb", "Lwri", "Rhip", "Rkne", "Rank", "Lhip", "Lkne",
             "Lank", "Leye", "Reye", "Lear", "Rear")
MISSING = -1


def keypoint_heatmaps(keypoints, height, width, sigma=6.0):
    """(18, H, W) float32 Gaussians exp(-d^2 / (2 sigma^2)), one channel per keypoint, over the whole image (the
    official tool/pose_utils.cords_to_map, sigma 6 at Market's 128 x 64); a missing keypoint (y or x = -1) gives an
    all-zero channel. keypoints: (18, 2) (y, x)."""
    kp = torch.as_tensor(keypoints, dtype=torch.float32)
    yy = torch.arange(height, dtype=torch.float32)[None, :, None]
    xx = torch.arange(width, dtype=torch.float32)[None, None, :]
    d2 = (yy - kp[:, 0, None, None]) ** 2 + (xx - kp[:, 1, None, None]) ** 2  # (18, H, W)
    missing = ((kp[:, 0] == MISSING) | (kp[:, 1] == MISSING))[:, None, None]
    return torch.exp(-d2 / (2 * sigma**2)).masked_fill(missing, 0.0)


def _segment_distance(yy, xx, a, b):
    """(H, W) distance of every pixel to the segment a-b ((y, x) points)."""
    d = np.subtract(b, a)
    t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    return np.hypot(yy - a[0] - t * d[0], xx - a[1] - t * d[1])


def _polygon_inside(yy, xx, points):
    """(H, W) signed distance inside a convex polygon ((y, x) vertices in order; > 0 inside)."""
    p = np.asarray(points, np.float64)
    (ay, ax), (by, bx) = p[1] - p[0], p[2] - p[0]
    if ay * bx - ax * by < 0:
        p = p[::-1]
    inside = np.full(yy.shape, np.inf)
    for a, b in zip(p, np.roll(p, -1, 0)):
        e = (b - a) / max(np.hypot(*(b - a)), 1e-6)
        inside = np.minimum(inside, (xx - a[1]) * e[0] - (yy - a[0]) * e[1])
    return inside


class ToyPeople(Dataset):
    """Synthetic people for pose transfer (the PATN toy): pairs of the same person in two poses.

    A person is a figure drawn from the 18 keypoints: capsule limbs, a polygon torso, a round head with hair, in a
    random pose (arm and leg angles) seen from a random viewpoint (a yaw angle: front, back or side views, which hide
    the face keypoints a detector would miss), with one appearance kept across the pair: skin, hair, a shirt (plain,
    striped or mottled; short or long sleeves), trousers, shoes, a background colour. Each keypoint is also dropped
    with probability 3%, as a detector misses joints. Deterministic by (seed, split, index), generated on the fly.
    Items as PoseFolder's: source/target images (3, H, W) in [0, 1], their (18, 2) keypoints and (18, H, W) heatmaps.
    """

    repad = 0  # DeepFashion-style white re-padding before SSIM (none here)
    masked_metrics, inception_score = True, False  # 64 x 32 pixels are too small for Inception

    def __init__(self, split="train", size=(64, 32), sigma=3.0, length=None, seed=0):
        self.split, (self.H, self.W), self.sigma, self.seed = split, size, sigma, seed
        self.length = length or (100_000 if split == "train" else 128)

    def __len__(self):
        return self.length

    def _appearance(self, rng):
        hue = lambda: np.clip(rng.uniform(0.05, 0.95, 3), 0, 1)  # noqa: E731
        skin = np.array([0.95, 0.78, 0.62]) * rng.uniform(0.45, 1.0)
        return dict(skin=skin, hair=rng.uniform(0.05, 0.5) * np.array([1.0, 0.8, 0.6]), shirt=hue(), shirt2=hue(),
                    pattern=rng.choice(["plain", "stripes", "mottled"]), period=rng.uniform(3, 6) * self.H / 64,
                    long_sleeves=rng.random() < 0.5, trousers=hue() * rng.uniform(0.3, 1.0), shoes=hue() * 0.3,
                    background=rng.uniform(0.3, 0.85, 3), build=rng.uniform(0.85, 1.15))

    def _pose(self, rng, build):
        """(18, 2) float (y, x) keypoints, and whether the face is seen from the front, back or side."""
        H, W = self.H, self.W
        s = H * rng.uniform(0.78, 0.9)  # head top to ankles
        cx, top = W / 2 + rng.uniform(-0.08, 0.08) * W, (H - s) / 2 + rng.uniform(-0.04, 0.04) * H
        yaw = rng.uniform(0, 2 * np.pi)
        c, sn = np.cos(yaw), np.sin(yaw)
        kp = np.full((18, 2), float(MISSING))
        neck = np.array([top + 0.17 * s, cx])
        kp[1] = neck
        width = 0.12 * s * build * np.sign(c) * max(abs(c), 0.35)  # signed: + = person faces the camera
        kp[2], kp[5] = neck + [0.02 * s, -width], neck + [0.02 * s, width]  # Rsho on the viewer's left when facing
        kp[8], kp[11] = neck + [0.33 * s, -0.6 * width], neck + [0.33 * s, 0.6 * width]

        def limb(start, angle, length):  # angle from straight down, positive towards +x
            return start + length * np.array([np.cos(angle), np.sin(angle)])

        for sho, elb, wri, side in ((2, 3, 4, -np.sign(width)), (5, 6, 7, np.sign(width))):
            a1 = side * np.deg2rad(rng.uniform(-25, 120))
            kp[elb] = limb(kp[sho], a1, 0.17 * s)
            kp[wri] = limb(kp[elb], a1 + side * np.deg2rad(rng.uniform(-30, 110)), 0.15 * s)
        for hip, kne, ank, side in ((8, 9, 10, -np.sign(width)), (11, 12, 13, np.sign(width))):
            a1 = side * np.deg2rad(rng.uniform(-12, 30))
            kp[kne] = limb(kp[hip], a1, 0.25 * s)
            kp[ank] = limb(kp[kne], a1 + np.deg2rad(rng.uniform(-25, 25)), 0.24 * s)
        head = np.array([top + 0.085 * s, cx])
        view = "front" if c > 0.3 else "back" if c < -0.3 else "side"
        e, r = 0.035 * s, 0.065 * s
        if view == "front":
            kp[0] = head + [0.015 * s, 0]
            kp[14], kp[15], kp[16], kp[17] = head + [-0.01 * s, e], head + [-0.01 * s, -e], head + [0, r], head - [0, r]
        elif view == "back":
            kp[16], kp[17] = head + [0, -r], head + [0, r]  # ears only, mirrored
        else:  # side: the nose, one eye and one ear, towards where the person looks
            d = np.sign(sn) or 1.0
            kp[0] = head + [0.015 * s, d * 0.07 * s]
            kp[14 if d > 0 else 15] = head + [-0.01 * s, d * 0.045 * s]
            kp[16 if d > 0 else 17] = head + [0, -d * 0.01 * s]
        return kp, head, view, s

    def _render(self, rng, look, kp, head, view, s):
        H, W = self.H, self.W
        yy, xx = np.mgrid[:H, :W].astype(np.float64)
        image = look["background"][:, None, None] * _noise_texture(rng, max(H, W), 1.0, 0.06)[None, :H, :W]
        image = np.repeat(image, 1, 0) * np.ones((3, 1, 1))

        def paint(alpha, colour):
            nonlocal image
            colour = colour if np.ndim(colour) == 3 else np.asarray(colour)[:, None, None]
            image = alpha[None] * colour + (1 - alpha[None]) * image

        def capsule(a, b, radius, colour):
            paint(np.clip(radius - _segment_distance(yy, xx, a, b) + 0.5, 0, 1), colour)

        if look["pattern"] == "stripes":
            band = ((yy + rng.uniform(0, 10)) // look["period"]) % 2
            shirt = np.where(band[None] > 0, look["shirt"][:, None, None], look["shirt2"][:, None, None])
        elif look["pattern"] == "mottled":
            shirt = look["shirt"][:, None, None] * _noise_texture(rng, max(H, W), 1.0, 0.25)[None, :H, :W]
        else:
            shirt = look["shirt"][:, None, None] * np.ones((3, H, W))
        limb_r = 0.045 * s * look["build"]
        for hip, kne, ank in ((8, 9, 10), (11, 12, 13)):
            capsule(kp[hip], kp[kne], limb_r * 1.2, look["trousers"])
            capsule(kp[kne], kp[ank], limb_r, look["trousers"])
            capsule(kp[ank], kp[ank] + [0.02 * s, 0], limb_r * 0.9, look["shoes"])
        paint(np.clip(_polygon_inside(yy, xx, [kp[2], kp[5], kp[11], kp[8]]) + 0.5 + 0.02 * s, 0, 1), shirt)
        for sho, elb, wri in ((2, 3, 4), (5, 6, 7)):
            capsule(kp[sho], kp[elb], limb_r, shirt)
            capsule(kp[elb], kp[wri], limb_r * 0.85, shirt if look["long_sleeves"] else look["skin"])
            capsule(kp[wri], kp[wri], limb_r * 0.9, look["skin"])
        capsule(kp[1], head, 0.035 * s, look["skin"])
        d_head = np.hypot(yy - head[0], xx - head[1])
        head_r = 0.075 * s
        paint(np.clip(head_r - d_head + 0.5, 0, 1), look["skin"] if view != "back" else look["hair"])
        if view != "back":  # hair on the upper part of the head
            paint(np.clip(head_r - d_head + 0.5, 0, 1) * np.clip(head[0] - 0.02 * s - yy + 0.5, 0, 1), look["hair"])
        return np.clip(image, 0, 1).astype(np.float32)

    def __getitem__(self, index):
        rng = _rng(self.seed, self.split, index)
        look = self._appearance(rng)
        item = {}
        for which in ("source", "target"):
            kp, head, view, s = self._pose(rng, look["build"])
            image = self._render(rng, look, kp, head, view, s)
            kp = np.round(kp)  # OpenPose writes integer pixels
            outside = (kp[:, 0] < 0) | (kp[:, 0] >= self.H) | (kp[:, 1] < 0) | (kp[:, 1] >= self.W)
            kp[outside | (rng.random(18) < 0.03)] = MISSING
            kp = torch.from_numpy(kp.astype(np.float32))
            item.update({which: torch.from_numpy(image), f"{which}_keypoints": kp,
                         f"{which}_pose": keypoint_heatmaps(kp, self.H, self.W, self.sigma)})
        return item


DETECTION_SHAPES = ("square", "circle", "triangle", "ring", "cross")  # the ToyDetection classes


def _stripe(rng, S):
    """(S, S) bool mask of a thin straight stripe at a random place and angle."""
    yy, xx = np.mgrid[:S, :S]
    a, (cy, cx) = rng.uniform(0, np.pi), rng.uniform(0, S, 2)
    across = np.abs((xx - cx) * np.sin(a) - (yy - cy) * np.cos(a))
    along = np.abs((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a))
    return (across < rng.uniform(1, 3)) & (along < rng.uniform(S / 8, S / 2))


def cluttered_background(rng, S):
    """(3, S, S) float: a tinted noise texture with clutter that no class claims: stripes, then speckles."""
    image = np.stack([_noise_texture(rng, S, rng.uniform(0.25, 0.6), 0.07, smooth=3) for _ in range(3)])
    for _ in range(rng.integers(2, 6)):
        image[:, _stripe(rng, S)] = rng.uniform(0.1, 0.95, 3)[:, None]
    yy, xx = _grid(S)
    for _ in range(rng.integers(10, 30)):  # a speckle: a disc of radius 1-2.5, drawn in its own small window
        y, x, r = *rng.uniform(0, S, 2), rng.uniform(1, 2.5)
        window = np.s_[max(int(y - r) - 1, 0):int(y + r) + 2, max(int(x - r) - 1, 0):int(x + r) + 2]
        disc = (xx[window] - x) ** 2 + (yy[window] - y) ** 2 <= r**2
        image[(slice(None), *window)][:, disc] = rng.uniform(0.1, 0.95, 3)[:, None]
    return image


# The toy ImageNet's classes: the five detection shapes and five more, as ImageNet holds COCO's objects and many others.
OBJECT_SHAPES = (*DETECTION_SHAPES, "diamond", "frame", "ellipse", "semicircle", "x")


class ToyObjects(Dataset):
    """One object per image, to be named (the toy ImageNet that toy_backbone.py pre-trains the detectors' backbone on).

    The object is one of OBJECT_SHAPES (10 classes: the 5 of ToyDetection and 5 more), in a random colour and turn,
    large and near the centre as ImageNet's objects are (radius 0.2-0.4 of the side, log-uniform; centre within 0.15
    of the side from the image centre), on ToyDetection's cluttered background with 0-2 stripes in front. No boxes:
    a label per image, as ImageNet gives. Image `index` comes from its own stream ([seed, 10 + split, index]), which no
    ToyDetection image (stream [seed, 0 or 1, index]) shares: no detection image, labelled, unlabelled or evaluated,
    is ever drawn here. Items: {"image": float32 (3, S, S) in [0, 1], "label": int64 () in 0..9}.

    Like ImageNet, the training split is a fixed set of `length` images read for many epochs: each image is drawn
    once, kept in memory as 8 bits per channel (as a PNG holds it), and read back from there (cache=True; drawing
    costs ~2 ms an image, a small CNN's step on it far less). With flip=True a read is mirrored left-right with
    probability 1/2 (ImageNet training's flip), drawn from torch's generator, which train.py seeds per sample.
    """

    class_names = list(OBJECT_SHAPES)
    radius = (0.2, 0.4)  # object radius range, relative to the image side (log-uniform)
    shift = 0.15  # the object's centre: the image centre moved by up to this fraction of the side on each axis

    def __init__(self, split="train", size=64, length=None, seed=0, cache=False, flip=False):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.size, self.seed, self.flip = split, size, seed, flip
        self.length = length or (1_000_000 if split == "train" else 512)
        self.cache = {} if cache else None  # index -> (uint8 (3, S, S) image, label)

    def __len__(self):
        return self.length

    def draw(self, index):
        """The image `index` of the stream: float32 (3, S, S) in [0, 1] and its class."""
        rng = np.random.default_rng([self.seed, 10 + (self.split == "val"), index])
        S = self.size
        image = cluttered_background(rng, S)
        k = rng.integers(len(OBJECT_SHAPES))
        r = S * np.exp(rng.uniform(*np.log(self.radius)))
        y, x = S / 2 + rng.uniform(-self.shift, self.shift, 2) * S  # near the centre, as ImageNet's objects
        mask = _shape_mask(OBJECT_SHAPES[k], y, x, r, S, angle=rng.uniform(-0.3, 0.3))
        image[:, mask] = rng.uniform(0.05, 1.0, 3)[:, None] * _noise_texture(rng, S, 1.0, 0.1)[mask][None]
        for _ in range(rng.integers(0, 3)):  # stripes in front of the object, as in ToyDetection
            image[:, _stripe(rng, S)] = rng.uniform(0.1, 0.95, 3)[:, None]
        return torch.from_numpy(np.clip(image, 0, 1).astype(np.float32)), int(k)

    def __getitem__(self, index):
        if self.cache is None:
            image, k = self.draw(index)
        else:
            if index not in self.cache:
                image, k = self.draw(index)
                self.cache[index] = ((image * 255).round().to(torch.uint8), k)
            image, k = self.cache[index]
            image = image.float() / 255
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "label": torch.tensor(k)}


class ToyDetection(Dataset):
    """Shapes to detect on a cluttered, textured background (the Soft Teacher / MixTraining toy).

    An image holds 1-6 objects; the class is the shape (DETECTION_SHAPES), whatever its colour, size (radius S/14 to
    S/5, log-uniform: small, medium and large objects) or turn. Objects may overlap, a later one hiding part of an
    earlier one (the box is that of the visible pixels; an object less than 40% visible is not annotated, like a
    hidden object in a real photo, and one fewer than 40% visible is kept out at placement). The background is a
    tinted noise texture with clutter: stripes and speckles of random colours that no class claims.

    Items index..: image `index` of the stream is the same whatever `start` / `length` select, so two datasets with
    disjoint index ranges of one split are disjoint sets of images (the labelled / unlabelled split of the toy:
    indices [0, n) labelled, [n, ...) unlabelled). annotated=False drops the boxes (unlabelled data).
    Annotation noise (training split only; evaluation always uses the clean boxes): `missing` = probability that a
    box is left out of the annotations; `shift` = std of a box edge's random shift, relative to the box's width
    (x edges) or height (y edges), so shifted boxes are loose, tight or displaced. Badly drawn boxes, as human
    annotators draw them (after missing and shift, each kept box is one of three kinds): a fraction `loose` is drawn
    loose, each edge pushed out by U(0.05, 0.2) of the box's width (x) or height (y), so that it still matches its
    object at IoU > 0.5 (a careless box, not a wrong one); a fraction `displaced` is moved whole by U(0.2, 0.4) of its
    width and height, in a random direction per axis (a wrong box: IoU < 0.5); the rest are as drawn.
    Boxes are clipped to the image. The noise of an image is the same every time it is read.
    """

    class_names, seen_classes = list(DETECTION_SHAPES), None

    def __init__(self, split="train", size=160, length=None, seed=0, start=0, annotated=True, missing=0.0,
                 shift=0.0, loose=0.0, displaced=0.0):
        self.split, self.size, self.seed, self.start, self.annotated = split, size, seed, start, annotated
        self.length = length or (100_000 if split == "train" else 64)
        if (missing or shift or loose or displaced) and split != "train":
            raise ValueError("annotation noise (missing, shift, loose, displaced) applies to the training split only")
        if not (0 <= loose and 0 <= displaced and loose + displaced <= 1):
            raise ValueError(f"box noise: loose ({loose}) and displaced ({displaced}) are fractions of the boxes, "
                             "each >= 0 and together at most 1")
        self.missing, self.shift, self.loose, self.displaced = missing, shift, loose, displaced

    def __len__(self):
        return self.length

    def render(self, rng):
        """image float32 (3, S, S), clean boxes float32 (N, 4) xyxy, labels int64 (N,)."""
        S = self.size
        image = cluttered_background(rng, S)
        owner = np.full((S, S), -1)  # which object each pixel shows
        placed, labels, full = [], [], []
        for _ in range(rng.integers(1, 7)):
            for _try in range(20):
                r = S * np.exp(rng.uniform(np.log(1 / 14), np.log(1 / 5)))
                y, x = rng.uniform(r, S - r, 2)
                if all(np.hypot(y - py, x - px) > 0.75 * (r + pr) for py, px, pr in placed):  # partial overlap only
                    break
            else:
                continue
            k = rng.integers(len(DETECTION_SHAPES))
            mask = _shape_mask(DETECTION_SHAPES[k], y, x, r, S, angle=rng.uniform(-0.3, 0.3))
            if mask.sum() < 4:
                continue
            rgb = rng.uniform(0.05, 1.0, 3)
            image[:, mask] = rgb[:, None] * _noise_texture(rng, S, 1.0, 0.1)[mask][None]
            owner[mask] = len(labels)
            placed.append((y, x, r))
            labels.append(k)
            full.append(mask.sum())
        for _ in range(rng.integers(0, 3)):  # stripes in front of the objects: more occlusion
            stripe = _stripe(rng, S)
            image[:, stripe], owner[stripe] = rng.uniform(0.1, 0.95, 3)[:, None], -1
        boxes, kept = [], []
        for i, k in enumerate(labels):
            ys, xs = np.nonzero(owner == i)
            if len(ys) >= 0.4 * full[i]:
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # pixel edges, xyxy
                kept.append(k)
        image = torch.from_numpy(np.clip(image, 0, 1).astype(np.float32))
        return image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(kept, dtype=torch.int64)

    def __getitem__(self, index):
        index = self.start + index
        image, boxes, labels = self.render(_rng(self.seed, self.split, index))
        if not self.annotated:
            boxes, labels = boxes[:0], labels[:0]
        elif self.missing or self.shift:
            noise = np.random.default_rng([self.seed, 2, index])  # the same noise every time the image is read
            keep = torch.from_numpy(noise.random(len(boxes)) >= self.missing)
            wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (N, 4) w, h, w, h
            boxes = boxes + self.shift * wh * torch.from_numpy(noise.normal(size=(len(boxes), 4))).float()
            boxes = torch.stack([boxes[:, :2].min(boxes[:, 2:]), boxes[:, :2].max(boxes[:, 2:])], 1).reshape(-1, 4)
            boxes = boxes.clamp(0, self.size)
            keep &= ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)
            boxes, labels = boxes[keep], labels[keep]
        if self.annotated and (self.loose or self.displaced):
            boxes = self.badly_drawn(boxes, np.random.default_rng([self.seed, 3, index]))
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": index}

    def badly_drawn(self, boxes, rng):
        """(N, 4) boxes -> the same boxes, a fraction `loose` drawn loose and a fraction `displaced` moved (see the
        class docstring); each box's kind is drawn independently."""
        kind = torch.from_numpy(rng.random(len(boxes))).float()  # < loose: loose; < loose + displaced: displaced
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (N, 4) w, h, w, h
        margin = torch.from_numpy(rng.uniform(0.05, 0.2, (len(boxes), 4))).float() * wh * torch.tensor([-1, -1, 1, 1])
        move = torch.from_numpy(rng.uniform(0.2, 0.4, (len(boxes), 2)) * rng.choice([-1, 1], (len(boxes), 2))).float()
        move = move.repeat(1, 2) * wh  # (N, 4): the same shift for both edges of an axis
        loose = (kind < self.loose)[:, None]
        displaced = ((kind >= self.loose) & (kind < self.loose + self.displaced))[:, None]
        boxes = boxes + loose * margin + displaced * move
        return boxes.clamp(0, self.size)



# ----------------------------------------------------------------------------------------------------------------------
# 2. Real datasets, in the layouts the preparation scripts write
# ----------------------------------------------------------------------------------------------------------------------
# Where the class names come from. The long lists live in class_names/<dataset>.txt, one name per line, verbatim
# (trailing spaces kept: ADE-150 has "window "; SAN strips names before it builds prompts). They were extracted with
# Python's `ast` from the official code, not retyped:
#   coco_stuff_171, voc_20, pcontext_59, pcontext_459, ade20k_847: MendelXu/SAN, san/data/datasets/register_*.py
#     (COCO_CATEGORIES, CLASS_NAMES, PCONTEXT_SEM_SEG_CATEGORIES, PCONTEXT_FULL_SEM_SEG_CATEGORIES,
#     ADE20K_SEM_SEG_FULL_CATEGORIES in trainId order);
#   ade20k_150: facebookresearch/detectron2, detectron2/data/datasets/builtin_meta.py ADE20K_SEM_SEG_CATEGORIES (SAN
#     evaluates ADE-150 through detectron2's builtin registration).
# The PC-59 order is also mmseg's PascalContext59Dataset order, so both PC-59 layouts below share one list.
CLASS_NAME_DIR = Path(__file__).resolve().parent / "class_names"
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]  # cityscapesScripts' labels.py, train ids 0..18
CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]  # of train ids 0..18

# Label lookup tables, raw uint8 value -> label (applied as lut[raw]).
REDUCE_ZERO_LABEL = np.array([IGNORE, *range(254), IGNORE])  # 0 (background / "other") -> ignore, k -> k - 1
CITYSCAPES_ID_TO_TRAIN_ID = np.full(256, IGNORE)
CITYSCAPES_ID_TO_TRAIN_ID[CITYSCAPES_LABEL_IDS] = np.arange(19)  # every other labelId -> ignore


# The zero-shot splits (zsseg.baseline's prepare scripts; the SPNet / ZS3 splits): the unseen classes, by name. A
# `_base` set holds the other (seen) classes, relabelled 0.. in order; the full set is scored with them as seen.
UNSEEN_CLASSES = {
    "coco_stuff_171": ("cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard",
                       "clouds", "grass", "playingfield", "river", "road", "tree", "wall-concrete"),
    "voc_20": ("pottedplant", "sheep", "sofa", "train", "tv"),
}


def class_names(name):
    """The verbatim class names of a real dataset, in label order (a `_base` set: its seen classes)."""
    if name == "cityscapes":
        return list(CITYSCAPES_CLASSES)
    if name.endswith("_base"):
        full = name[:-len("_base")]
        return [n for n in class_names(full) if n not in UNSEEN_CLASSES[full]]
    return (CLASS_NAME_DIR / f"{name}.txt").read_text(encoding="utf-8").splitlines()


def seen_classes(name):
    """Indices of the seen classes of a dataset with a zero-shot split (the generalized protocol), else None."""
    if name not in UNSEEN_CLASSES:
        return None
    return [i for i, n in enumerate(class_names(name)) if n not in UNSEEN_CLASSES[name]]


def _files(folder, suffix):
    """{stem: path} of the files under `folder` (sub-folders included) whose name ends with `suffix`; the stem is the
    path relative to `folder` without the suffix, e.g. "aachen/aachen_000000_000019" for Cityscapes."""
    return {p.relative_to(folder).as_posix()[:-len(suffix)]: p for p in folder.rglob("*" + suffix)}


def read_file(path, convert=lambda im: im):
    """A numpy array of the image or label map at `path` (PIL: 8-bit PNG/JPEG, 16-bit TIFF). A corrupt or truncated
    file stops the run with its path: a skipped file would silently change the dataset and its metrics."""
    try:
        with Image.open(path) as im:
            return np.array(convert(im))
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read {path} ({e}); the run stops: replace or remove the file") from None


class SegFolder(Dataset):
    """Images and label maps from two folders, paired by file stem, in sorted (deterministic) order.

    label_suffixes: ((suffix, lut), ...), tried in this order for each image; `lut` (a numpy array, or None) maps the
    stored values to labels. index: what lists the samples: "images", "labels" (when one image folder serves every
    split, as VOC's JPEGImages) or the path of a text file of stems. Labels are read with PIL, so 8-bit PNGs and
    16-bit TIFFs both keep their values. `transform(image uint8 (3, H, W), label int64 (H, W)) -> (image, label)` is
    set by build_dataset for training; without it the image is only scaled to [0, 1].
    """

    seen_classes = None

    def __init__(self, image_dir, label_dir, class_names, image_suffix=".jpg", label_suffixes=((".png", None),),
                 index="images", ignore_index=IGNORE, transform=None):
        self.class_names, self.ignore_index, self.transform = class_names, ignore_index, transform
        image_dir, label_dir = Path(image_dir), Path(label_dir)
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"folder not found: {folder}")
        images = _files(image_dir, image_suffix)
        labels = [(_files(label_dir, suffix), lut) for suffix, lut in label_suffixes]
        if index == "images":
            stems, listed = sorted(images), f"'*{image_suffix}' files in {image_dir}"
        elif index == "labels":
            stems, listed = sorted(set().union(*(found for found, _ in labels))), f"label files in {label_dir}"
        else:
            stems, listed = Path(index).read_text().split(), f"names in {index}"
        if not stems:
            raise FileNotFoundError(f"no {listed}")
        self.items = []  # (image path, label path, lut)
        for stem in stems:
            image = images.get(stem)
            label = next(((found[stem], lut) for found, lut in labels if stem in found), None)
            if image is None or label is None:
                expected = " or ".join(str(label_dir / (stem + suffix)) for suffix, _ in label_suffixes)
                raise FileNotFoundError(f"incomplete pair for {stem!r}: image {image_dir / (stem + image_suffix)} "
                                        f"{'found' if image else 'MISSING'}, label {expected} "
                                        f"{'found' if label else 'MISSING'}")
            self.items.append((image, *label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image_path, label_path, lut = self.items[index]
        image, label = read_file(image_path, lambda im: im.convert("RGB")), read_file(label_path)
        image = torch.from_numpy(image).permute(2, 0, 1)  # uint8 (3, H, W)
        label = torch.from_numpy((label if lut is None else lut[label]).astype(np.int64))
        if label.shape != image.shape[1:]:
            raise ValueError(f"label {label_path} has shape {tuple(label.shape)}, its image {image_path} has size "
                             f"{tuple(image.shape[1:])}; expected a single-channel map of the same size")
        if self.transform is not None:
            image, label = self.transform(image, label)
        else:
            image = image.float() / 255
        return {"image": image, "label": label}


@dataclass(frozen=True)
class Layout:
    """Where one preparation script puts a dataset. Paths are relative to data_root; {split} becomes splits[0] for
    train, splits[1] for val. `tree` draws the layout for error messages, "<root>" standing for data_root."""
    images: str  # image folder
    labels: str  # label folder
    tree: str
    made_by: str  # the script (or download) that writes this layout
    image_suffix: str = ".jpg"
    label_suffixes: tuple = ((".png", None),)  # see SegFolder
    splits: tuple = ("train", "val")
    index: str = "images"  # see SegFolder; a split file is given relative to data_root
    ignore_index: int = IGNORE


# The layouts of each dataset, in order of preference: the first one found on disk is used. The detectron2 / SAN
# layouts come first where there are two, because the SAN numbers are measured on them.
REAL_DATASETS = {
    "cityscapes": [Layout(
        "cityscapes/leftImg8bit/{split}", "cityscapes/gtFine/{split}", image_suffix="_leftImg8bit.png",
        label_suffixes=(("_gtFine_labelTrainIds.png", None), ("_gtFine_labelIds.png", CITYSCAPES_ID_TO_TRAIN_ID)),
        made_by="the official leftImg8bit + gtFine zips; mmseg's tools/dataset_converters/cityscapes.py writes the "
                "*_labelTrainIds.png (without them the *_labelIds.png are mapped to the 19 train ids on the fly)",
        tree="""<root>/cityscapes/
├── leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
└── gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png   0..18, 255 = ignore
                                 (or <name>_gtFine_labelIds.png)""")],
    "ade20k_150": [Layout(
        "ADEChallengeData2016/images/{split}", "ADEChallengeData2016/annotations_detectron2/{split}",
        splits=("training", "validation"), made_by="detectron2's datasets/prepare_ade20k_sem_seg.py (the SAN layout)",
        tree="""<root>/ADEChallengeData2016/
├── images/{training,validation}/<name>.jpg
└── annotations_detectron2/{training,validation}/<name>.png   0..149, 255 = ignore"""), Layout(
        "ADEChallengeData2016/images/{split}", "ADEChallengeData2016/annotations/{split}",
        label_suffixes=((".png", REDUCE_ZERO_LABEL),), splits=("training", "validation"),
        made_by="the official ADEChallengeData2016.zip as it is (the mmseg / ANN layout; 0 = other is ignored)",
        tree="""<root>/ADEChallengeData2016/
├── images/{training,validation}/<name>.jpg
└── annotations/{training,validation}/<name>.png   0 = other (ignored), 1..150""")],
    "pcontext_59": [Layout(
        "pcontext/{split}/image", "pcontext/{split}/label", made_by="SAN's datasets/prepare_pcontext_sem_seg_59cls.py",
        tree="""<root>/pcontext/{train,val}/
├── image/<name>.jpg
└── label/<name>.png   0..58, 255 = background (ignored)"""), Layout(
        "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/SegmentationClassContext",
        label_suffixes=((".png", REDUCE_ZERO_LABEL),),
        index="VOCdevkit/VOC2010/ImageSets/SegmentationContext/{split}.txt",
        made_by="mmseg's tools/dataset_converters/pascal_context.py (Detail API, trainval_merged.json)",
        tree="""<root>/VOCdevkit/VOC2010/
├── JPEGImages/<name>.jpg
├── SegmentationClassContext/<name>.png   0 = background (ignored), 1..59
└── ImageSets/SegmentationContext/{train,val}.txt""")],
    "coco_stuff_171": [Layout(
        "coco/{split}", "coco/stuffthingmaps_detectron2/{split}", splits=("train2017", "val2017"), index="labels",
        made_by="zsseg.baseline's datasets/prepare_coco_stuff_164k_sem_seg.py",
        tree="""<root>/coco/
├── {train2017,val2017}/<name>.jpg
└── stuffthingmaps_detectron2/{train2017,val2017}/<name>.png   0..170, 255 = ignore
    (an image whose map is all ignore has no label file and is not listed)""")],
    "coco_stuff_171_base": [Layout(  # zsseg / SAN zero-shot training set: the 156 seen classes
        "coco/{split}", "coco/stuffthingmaps_detectron2/{split}_base", splits=("train2017", "val2017"),
        index="labels", made_by="zsseg.baseline's datasets/prepare_coco_stuff_164k_sem_seg.py",
        tree="""<root>/coco/
├── {train2017,val2017}/<name>.jpg
└── stuffthingmaps_detectron2/{train2017_base,val2017_base}/<name>.png   0..155 (seen), 255 = ignore/unseen
    (an image whose map is all ignore has no label file and is not listed)""")],
    "voc_20": [Layout(
        "VOC2012/JPEGImages", "VOC2012/annotations_detectron2/{split}", index="labels",
        made_by="SAN's datasets/prepare_voc_sem_seg.py (from SegmentationClassAug)",
        tree="""<root>/VOC2012/
├── JPEGImages/<name>.jpg   (every split; a split is the set of its label files)
└── annotations_detectron2/{train,val}/<name>.png   0..19, 255 = background (ignored)""")],
    "voc_20_base": [Layout(  # zsseg zero-shot training set: the 15 seen classes
        "VOC2012/JPEGImages", "VOC2012/annotations_detectron2/{split}_base", index="labels",
        made_by="zsseg.baseline's datasets/prepare_voc_sem_seg.py",
        tree="""<root>/VOC2012/
├── JPEGImages/<name>.jpg   (every split; a split is the set of its label files)
└── annotations_detectron2/{train_base,val_base}/<name>.png   0..14 (seen), 255 = background/unseen""")],
    "pcontext_459": [Layout(
        "pcontext_full/{split}/image", "pcontext_full/{split}/label", label_suffixes=((".tif", None),),
        ignore_index=IGNORE_16BIT, made_by="SAN's datasets/prepare_pcontext_sem_seg_459cls.py",
        tree="""<root>/pcontext_full/{train,val}/
├── image/<name>.jpg
└── label/<name>.tif   16-bit, 0..458, 65535 = ignore""")],
    "ade20k_847": [Layout(
        "ADE20K_2021_17_01/images_detectron2/{split}", "ADE20K_2021_17_01/annotations_detectron2/{split}",
        label_suffixes=((".tif", None),), splits=("training", "validation"), ignore_index=IGNORE_16BIT,
        made_by="MaskFormer's datasets/prepare_ade20k_full_sem_seg.py",
        tree="""<root>/ADE20K_2021_17_01/
├── images_detectron2/{training,validation}/<name>.jpg
└── annotations_detectron2/{training,validation}/<name>.tif   16-bit, 0..846, 65535 = ignore""")],
}


def real_dataset(name, split, data_root):
    """The SegFolder of dataset `name` (a key of REAL_DATASETS), split "train" or "val", from the first of its
    layouts found under data_root. A missing or malformed folder raises FileNotFoundError that draws the expected
    layouts with data_root filled in and names the scripts that write them."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root, layouts = Path(data_root).expanduser().resolve(), REAL_DATASETS[name]

    def where(layout, path):
        return root / path.format(split=layout.splits[split == "val"])

    def expected(problem):
        drawn = "\n\n".join(f"({i}) made by {lay.made_by}:\n{lay.tree.replace('<root>', str(root))}"
                            for i, lay in enumerate(layouts, 1))
        return f"dataset {name!r} (split {split!r}) under data_root {root}: {problem}\nExpected layout" \
               f"{'s, in order of preference' if len(layouts) > 1 else ''}:\n\n{drawn}"

    missing = []
    for lay in layouts:
        index = lay.index if lay.index in ("images", "labels") else where(lay, lay.index)  # or a split file
        needed = [where(lay, lay.images), where(lay, lay.labels)] + ([] if isinstance(index, str) else [index])
        absent = [p for p in needed if not p.exists()]
        if absent:
            missing += absent
            continue
        try:
            dataset = SegFolder(needed[0], needed[1], class_names(name), lay.image_suffix, lay.label_suffixes, index,
                                lay.ignore_index)
            dataset.seen_classes = seen_classes(name)
            return dataset
        except FileNotFoundError as e:  # an empty folder, an image without its label
            raise FileNotFoundError(expected(str(e))) from None
    raise FileNotFoundError(expected("not found; missing " + ", ".join(map(str, missing))))


class PoseFolder(Dataset):
    """Pose-transfer pairs in the official Pose-Transfer layout (tengteng95/Pose-Transfer, data/keypoint.py).

    Images come from <root>/<phase>/<name>; keypoints from the ':'-separated annotation csv (header
    name:keypoints_y:keypoints_x, each a JSON list of 18 ints, -1 = missing); pairs from the pair csv (header from,to).
    Heatmaps are computed on the fly from the csv (sigma 6) instead of read from the <phase>K/*.npy files, which the
    official heatmap script writes from the same csv (for DeepFashion as uint8, truncating them to one-hot points: we
    use the float Gaussians the script intends). Items as ToyPeople's.
    """

    def __init__(self, root, phase, annotation_csv, pairs_csv, sigma=6.0, repad=0, masked_metrics=False):
        import csv
        import json
        self.root, self.phase, self.sigma = Path(root), phase, sigma
        self.repad, self.masked_metrics, self.inception_score = repad, masked_metrics, True
        with open(annotation_csv, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=":"))
        if not rows or not {"name", "keypoints_y", "keypoints_x"} <= rows[0].keys():
            raise ValueError(f"{annotation_csv}: expected a ':'-separated csv with header name:keypoints_y:keypoints_x")
        self.keypoints = {r["name"]: np.stack([json.loads(r["keypoints_y"]), json.loads(r["keypoints_x"])], 1)
                          for r in rows}
        with open(pairs_csv, newline="") as f:
            self.pairs = [(r["from"], r["to"]) for r in csv.DictReader(f)]
        if not self.pairs:
            raise ValueError(f"{pairs_csv}: no pairs (expected a csv with header from,to)")
        for name in {n for pair in self.pairs for n in pair}:
            if name not in self.keypoints:
                raise ValueError(f"{pairs_csv} names {name!r}, which {annotation_csv} does not annotate")

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        item = {}
        for which, name in zip(("source", "target"), self.pairs[index]):
            image = torch.from_numpy(read_file(self.root / self.phase / name, lambda im: im.convert("RGB")))
            image = image.permute(2, 0, 1).float() / 255  # (3, H, W)
            kp = torch.from_numpy(self.keypoints[name].astype(np.float32))
            item.update({which: image, f"{which}_keypoints": kp,
                         f"{which}_pose": keypoint_heatmaps(kp, *image.shape[1:], self.sigma)})
        return item


# name -> (folder under data_root, annotation csv, pair csv, white columns re-padded before SSIM, masked metrics)
POSE_DATASETS = {
    "market": ("market_data", "market-annotation-{phase}.csv", "market-pairs-{phase}.csv", 0, True),
    "deepfashion": ("fashion_data", "fasion-resize-annotation-{phase}.csv", "fasion-resize-pairs-{phase}.csv", 40,
                    False),  # "fasion": the official files' spelling
}
POSE_TREES = {"market": """<root>/market_data/            (tengteng95/Pose-Transfer's README: Market-1501 renamed)
├── train/<name>.jpg               128 x 64 (bounding_box_train)
├── test/<name>.jpg                (bounding_box_test)
├── market-annotation-{train,test}.csv   name:keypoints_y:keypoints_x, JSON lists of 18 ints, -1 = missing
└── market-pairs-{train,test}.csv        from,to""",
              "deepfashion": """<root>/fashion_data/    (Pose-Transfer's tool/generate_fashion_datasets.py)
├── train/<name>.jpg               176 x 256 In-shop images, flattened names
├── test/<name>.jpg
├── fasion-resize-annotation-{train,test}.csv   name:keypoints_y:keypoints_x
└── fasion-resize-pairs-{train,test}.csv        from,to"""}


def pose_dataset(name, split, data_root, sigma):
    """The PoseFolder of `name` ("market" or "deepfashion"): split "train" -> train/, "val" -> test/ (the papers
    evaluate on the test pairs). A missing file raises FileNotFoundError that draws the expected layout."""
    folder, annotation, pairs, repad, masked = POSE_DATASETS[name]
    phase = "train" if split == "train" else "test"
    root = Path(data_root).expanduser().resolve() / folder
    needed = [root / phase, root / annotation.format(phase=phase), root / pairs.format(phase=phase)]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        raise FileNotFoundError(f"dataset {name!r} (split {split!r}): missing {', '.join(absent)}\nExpected layout:\n"
                                + POSE_TREES[name].replace("<root>", str(root.parent)))
    return PoseFolder(root, phase, needed[1], needed[2], sigma, repad, masked)
class CocoDetection(Dataset):
    """Boxes of a COCO-format json (pycocotools), as mmdet's CocoDataset reads them for training and testing.

    Crowd boxes (iscrowd=1) and boxes under 1 pixel wide or high are left out; categories become contiguous labels
    0..K-1 in the order of their ids (`.cat_ids[label]` gives the COCO id back). keep_empty=False drops the images
    without a box (mmdet's filter_empty_gt for the labelled stream); True keeps every image (evaluation, unlabelled
    data). annotated=False drops the boxes (the unlabelled stream). `.coco` is the pycocotools COCO of the file, with
    which the evaluator scores val2017 exactly as mmdet does.
    """

    seen_classes = None

    def __init__(self, image_dir, ann_file, keep_empty=True, annotated=True):
        from pycocotools.coco import COCO
        import contextlib
        import io
        self.image_dir, self.annotated = Path(image_dir), annotated
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints timings
            self.coco = COCO(str(ann_file))
        self.cat_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.label_of = {c: i for i, c in enumerate(self.cat_ids)}
        self.ids = [i for i in sorted(self.coco.imgs) if keep_empty or self._boxes(i)[0].numel()]

    def __len__(self):
        return len(self.ids)

    def _boxes(self, image_id):
        boxes, labels = [], []
        for a in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = a["bbox"]
            if a.get("iscrowd", 0) or w < 1 or h < 1 or a["category_id"] not in self.label_of:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[a["category_id"]])
        return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)

    def __getitem__(self, index):
        image_id = self.ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        image = torch.from_numpy(read_file(path, lambda im: im.convert("RGB"))).permute(2, 0, 1).float() / 255
        boxes, labels = self._boxes(image_id) if self.annotated else (torch.zeros(0, 4), torch.zeros(0, torch.int64))
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": image_id}


COCO_TREE = """<root>/coco/
├── train2017/<id>.jpg, val2017/<id>.jpg, unlabeled2017/<id>.jpg
└── annotations/
    ├── instances_train2017.json, instances_val2017.json
    ├── instances_unlabeled2017.json                               unlabeled2017 image list (full setting)
    └── semi_supervised/
        ├── instances_train2017.{fold}@{percent}.json             labelled part of train2017
        └── instances_train2017.{fold}@{percent}-unlabeled.json   the rest (its boxes are not used)
made by the official COCO 2017 zips and SoftTeacher's tools/dataset/prepare_coco_data.sh (semi_coco.py), or this
repository's prepare.py"""


def coco_detection(data_root, images, ann_file, **kw):
    """CocoDetection of <data_root>/coco/<images> and <data_root>/coco/annotations/<ann_file>; a missing file raises
    FileNotFoundError drawing the expected layout."""
    root = Path(data_root).expanduser().resolve() / "coco"
    missing = [p for p in (root / images, root / "annotations" / ann_file) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"COCO detection: missing {', '.join(map(str, missing))}\nExpected layout:\n"
                                + COCO_TREE.replace("<root>", str(root.parent)))
    return CocoDetection(root / images, root / "annotations" / ann_file, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Training transforms
# ----------------------------------------------------------------------------------------------------------------------
def _uniform(low, high):
    return float(torch.empty(()).uniform_(low, high))  # torch's RNG, which the loader seeds per worker


def _randint(n):
    return int(torch.randint(n + 1, ()))  # 0..n


class TrainTransform:
    """Random rescale -> photometric jitter -> random crop (padded) -> horizontal flip, on an image and its labels.

    The rescale factor is drawn from scale_range, relative to the image with its short side resized to base_size
    (0 = the native size); both resizes are done as one. aspect_range stretches the width by sqrt(a) and shrinks the
    height by sqrt(a) (ANN: 0.9-1.1). Labels are resized with nearest neighbour (v2 does so for every Mask). The crop
    pads the image with `pad_value` (0-255: 0 black, as mmseg; SAN's official mapper pads with 128) and the labels with
    `ignore_index` where the scaled image is smaller than the crop; it comes after the jitter, so the padding keeps its
    value (mmseg and detectron2 pad last too).
    Photometric jitter, one mild setting for every model: brightness x[0.875, 1.125] (about SSD's +-32/255; ANN only
    shifts brightness by +-10/255), contrast and saturation x[0.75, 1.25] (SSD: 0.5-1.5). No hue jitter (SSD: +-18
    degrees): on one core it costs 0.14 s per 769x769 crop, more than the rest of the pipeline together.
    """

    def __init__(self, crop_size, base_size=0, scale_range=(0.5, 2.0), aspect_range=(1.0, 1.0), ignore_index=IGNORE,
                 pad_value=0):
        self.crop_size, self.base_size = crop_size, base_size
        self.scale_range, self.aspect_range = scale_range, aspect_range
        self.jitter_crop_flip = v2.Compose([
            v2.ColorJitter(brightness=0.125, contrast=0.25, saturation=0.25),  # changes images only; before the padding
            v2.RandomCrop(crop_size, pad_if_needed=True,
                          fill={tv_tensors.Image: pad_value, tv_tensors.Mask: ignore_index}),
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),  # uint8 -> [0, 1]
        ])

    def __call__(self, image, label):
        """image uint8 (3, H, W), label int64 (H, W) -> image float32 (3, c, c) in [0, 1], label int64 (c, c)."""
        h, w = image.shape[-2:]
        s = (self.base_size / min(h, w) if self.base_size else 1.0) * _uniform(*self.scale_range)
        a = _uniform(*self.aspect_range) ** 0.5
        sy, sx = s / a, s * a  # vertical and horizontal scale
        # Resize only a random window just large enough for the crop: the same crop as resize-then-crop (up to
        # interpolation at the window's edge), without resizing the pixels the crop throws away (a 2x Cityscapes
        # frame: 0.3 s on one core).
        wh, ww = min(h, math.ceil(self.crop_size / sy) + 1), min(w, math.ceil(self.crop_size / sx) + 1)
        top, left = _randint(h - wh), _randint(w - ww)
        image, label = image[:, top:top + wh, left:left + ww], label[top:top + wh, left:left + ww]
        size = [max(1, round(wh * sy)), max(1, round(ww * sx))]  # (h', w'), >= crop unless the image is smaller
        image = v2.functional.resize(tv_tensors.Image(image), size, antialias=True)
        label = v2.functional.resize(tv_tensors.Mask(label), size)  # nearest
        image, label = self.jitter_crop_flip(image, label)
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)


# Detection views. Each view is drawn from the ORIGINAL image and records the affine map original -> view as a 3x3
# matrix T, so a box moves from view a to view b through T_b @ inverse(T_a) (map_boxes). The three kinds are Soft
# Teacher's pipelines (configs/soft_teacher/base.py, ssod/datasets/pipelines/rand_aug.py), which MixTraining reuses.
def map_boxes(boxes, matrix, size=None):
    """(N, 4) xyxy boxes through a 3x3 affine matrix: the 4 corners are mapped and enclosed by an axis-aligned box,
    clipped to size = (H, W) when given."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    corners = torch.stack([torch.stack([x, y, torch.ones_like(x)], -1) for x, y in
                           ((x1, y1), (x2, y1), (x1, y2), (x2, y2))], 1)  # (N, 4, 3)
    xy = (corners @ matrix.T.to(boxes))[..., :2]  # (N, 4, 2)
    out = torch.cat([xy.min(1).values, xy.max(1).values], -1)  # (N, 4)
    if size is not None:
        out = torch.stack([out[:, 0].clamp(0, size[1]), out[:, 1].clamp(0, size[0]),
                           out[:, 2].clamp(0, size[1]), out[:, 3].clamp(0, size[0])], -1)
    return out


def warp_image(image, matrix, fill):
    """uint8 (3, H, W) image through a 3x3 matrix onto a canvas of the same size; uncovered pixels get `fill`.
    Pixel (i, j) covers [j, j+1) x [i, i+1), the convention of the box coordinates."""
    H, W = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    out = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ torch.linalg.inv(matrix).T  # (H, W, 3) source points
    grid = torch.stack([2 * out[..., 0] / W - 1, 2 * out[..., 1] / H - 1], -1)[None]  # (1, H, W, 2) in [-1, 1]
    shifted = image[None].float() - fill
    warped = torch.nn.functional.grid_sample(shifted, grid, align_corners=False) + fill  # zero padding -> fill
    return warped[0].round().clamp(0, 255).to(torch.uint8)


def _about_centre(matrix, H, W):
    c = torch.tensor([[1, 0, W / 2], [0, 1, H / 2], [0, 0, 1.0]])
    return c @ matrix @ torch.linalg.inv(c)


def photometric(image):
    """One colour op drawn uniformly from Soft Teacher's 9, at a level L in 1..9 (of 10): Identity, AutoContrast,
    Equalize, Solarize (threshold 256 L / 10), Color / Contrast / Brightness / Sharpness (factor 0.1 + 1.8 L / 10),
    Posterize (4 - 4 L / 10 bits). image uint8 (3, H, W)."""
    F = v2.functional
    level = 1 + _randint(8)
    factor = 0.1 + 1.8 * level / 10
    ops = [lambda x: x, F.autocontrast, F.equalize, lambda x: F.solarize(x, int(256 * level / 10)),
           lambda x: F.adjust_saturation(x, factor), lambda x: F.adjust_contrast(x, factor),
           lambda x: F.adjust_brightness(x, factor), lambda x: F.adjust_sharpness(x, factor),
           lambda x: F.posterize(x, 4 - int(4 * level / 10))]
    return ops[_randint(len(ops) - 1)](image)


def geometric_matrix(H, W):
    """One geometric op drawn uniformly from Soft Teacher's 4, as a 3x3 matrix: translate x by U(-0.1, 0.1) W,
    translate y by U(-0.1, 0.1) H, rotate U(-30, 30) degrees, or shear x then y by U(-30, 30) degrees each (factor
    tanh of the angle in radians, as the official code has it), rotation and shear about the image centre."""
    m = torch.eye(3)
    op = _randint(3)
    if op == 0:
        m[0, 2] = _uniform(-0.1, 0.1) * W
    elif op == 1:
        m[1, 2] = _uniform(-0.1, 0.1) * H
    elif op == 2:
        a = math.radians(_uniform(-30, 30))
        m[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    else:
        sx, sy = (math.tanh(math.radians(_uniform(-30, 30))) for _ in range(2))
        m = torch.tensor([[1, 0, 0], [sy, 1, 0], [0, 0, 1.0]]) @ torch.tensor([[1, sx, 0], [0, 1, 0], [0, 0, 1.0]])
    return _about_centre(m, H, W)


def erase(image, fill=125):
    """1-4 patches of fill, each r H x r W with r ~ U(0, 0.2) (Soft Teacher's RandErase; boxes unchanged)."""
    H, W = image.shape[-2:]
    for _ in range(1 + _randint(3)):
        r = _uniform(0, 0.2)
        h, w = int(r * H), int(r * W)
        top, left = _randint(H - h), _randint(W - w)
        image[:, top:top + h, left:left + w] = fill
    return image


class DetectionView:
    """One random view of a detection item; kind is one of Soft Teacher's pipelines:
    "weak": keep-ratio resize with the short side drawn from scale_range, the long side at most max_size, and a
    horizontal flip with p 0.5 (the teacher's view); "sup": weak + one photometric op (the labelled stream);
    "strong": weak, then in random order one photometric and one geometric op, then 1-4 erased patches (the
    student's view of an unlabelled image). Resize and flip carry the boxes with torchvision.transforms.v2; the
    geometric op maps them through its matrix. Boxes that leave the image are dropped.
    Returns the item with image float32 (3, h, w), boxes, labels in view coordinates and "matrix" (3, 3)."""

    KINDS = ("weak", "sup", "strong")

    def __init__(self, kind, scale_range, max_size, fill=125):
        if kind not in self.KINDS:
            raise ValueError(f"view kind must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.scale_range, self.max_size, self.fill = kind, scale_range, max_size, fill

    def __call__(self, item):
        F = v2.functional
        image = (item["image"] * 255).round().to(torch.uint8)
        H, W = image.shape[-2:]
        s = min(_uniform(*self.scale_range) / min(H, W), self.max_size / max(H, W))
        h, w = max(1, round(H * s)), max(1, round(W * s))
        boxes = tv_tensors.BoundingBoxes(item["boxes"], format="XYXY", canvas_size=(H, W))
        image, boxes = F.resize(tv_tensors.Image(image), [h, w], antialias=True), F.resize(boxes, [h, w])
        T = torch.tensor([[w / W, 0, 0], [0, h / H, 0], [0, 0, 1.0]])
        if _uniform(0, 1) < 0.5:
            image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
            T = torch.tensor([[-1, 0, w], [0, 1, 0], [0, 0, 1.0]]) @ T
        image, boxes = image.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor)
        if self.kind == "sup":
            image = photometric(image)
        elif self.kind == "strong":
            for op in ("colour", "geometry") if _uniform(0, 1) < 0.5 else ("geometry", "colour"):
                if op == "colour":
                    image = photometric(image)
                else:
                    G = geometric_matrix(h, w)
                    image, boxes, T = warp_image(image, G, self.fill), map_boxes(boxes, G, (h, w)), G @ T
            image = erase(image, self.fill)
        keep = ((boxes[:, 2:] - boxes[:, :2]) > 0).all(1)
        return {**item, "image": image.float() / 255, "boxes": boxes[keep].float(), "labels": item["labels"][keep],
                "matrix": T}


class Views(Dataset):
    """dataset[i] through `views`: one DetectionView (the item becomes that view) or {name: DetectionView} (the item
    becomes {name: view}, each view drawn independently from the original image)."""

    def __init__(self, dataset, views):
        self.dataset, self.views = dataset, views
        self.class_names, self.seen_classes = dataset.class_names, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if isinstance(self.views, dict):
            return {name: view(item) for name, view in self.views.items()}
        return self.views(item)


class TwoStream(Dataset):
    """Semi-supervised items: item i = {"sup": labelled[i], "unsup": [num_unsup items of `unlabelled`]}, the
    unlabelled ones drawn at random (torch's generator, which train.py seeds per item), so a batch of B items holds
    B labelled and B * num_unsup unlabelled images (Soft Teacher's 1:4 is num_unsup = 4). len = len(labelled)."""

    def __init__(self, labelled, unlabelled, num_unsup):
        self.labelled, self.unlabelled, self.num_unsup = labelled, unlabelled, num_unsup
        self.class_names, self.seen_classes = labelled.class_names, None

    def __len__(self):
        return len(self.labelled)

    def __getitem__(self, index):
        picks = torch.randint(len(self.unlabelled), (self.num_unsup,)).tolist()
        return {"sup": self.labelled[index], "unsup": [self.unlabelled[j] for j in picks]}


# ----------------------------------------------------------------------------------------------------------------------
# 4. build_dataset: the entry point
# ----------------------------------------------------------------------------------------------------------------------
def detection_dataset(name, split, cfg):
    """The detection datasets of build_dataset. Config fields read (each optional, default in brackets):
    image_size [160] and eval_images [64] (toy), num_labelled [32] (toy labelled images: indices [0, n) of the
    training stream, the unlabelled ones follow), train_images [0: 100,000] (the fully labelled toy's training set:
    images [0, n) of the stream, read every epoch), box_missing / box_shift / box_loose / box_displaced [0] (toy
    annotation noise, see ToyDetection), percent [10] and fold [1] (the COCO split file), num_unsup [4] (unlabelled
    images per labelled one), train_scales [(400, 1200)] and max_size [1333] (short-side range and long-side cap of
    the views), sup_views [("sup",)] (the view kinds of a labelled image: one kind gives the view itself, several give
    {kind: view}, e.g. ("sup", "weak", "strong") for MixTraining's mixed views)."""
    get = lambda field, default: getattr(cfg, field, default)  # noqa: E731
    toy, semi = name.startswith("toy"), name.endswith(("_semi", "_semi_full"))
    if split == "val":
        if toy:
            return ToyDetection("val", get("image_size", 160), get("eval_images", 64), seed=get("seed", 0))
        return coco_detection(get("data_root", "datasets"), "val2017", "instances_val2017.json")
    if split != "train":
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    scales, max_size = tuple(get("train_scales", (400, 1200))), get("max_size", 1333)
    kinds = tuple(get("sup_views", ("sup",)))
    sup_view = DetectionView(kinds[0], scales, max_size) if len(kinds) == 1 else \
        {k: DetectionView(k, scales, max_size) for k in kinds}
    unsup_views = {"weak": DetectionView("weak", scales, max_size), "strong": DetectionView("strong", scales, max_size)}
    if toy:
        noise = dict(seed=get("seed", 0), missing=get("box_missing", 0.0), shift=get("box_shift", 0.0),
                     loose=get("box_loose", 0.0), displaced=get("box_displaced", 0.0))
        size, n = get("image_size", 160), get("num_labelled", 32)
        labelled = ToyDetection("train", size, n if semi else get("train_images", None), **noise)
        unlabelled = ToyDetection("train", size, seed=get("seed", 0), start=n, annotated=False)
    else:
        root = get("data_root", "datasets")
        if name == "coco_detection_semi":
            stem = f"semi_supervised/instances_train2017.{get('fold', 1)}@{get('percent', 10):g}"
            labelled = coco_detection(root, "train2017", stem + ".json", keep_empty=False)
            unlabelled = coco_detection(root, "train2017", stem + "-unlabeled.json", annotated=False)
        else:  # all of train2017 labelled; coco_detection_semi_full adds unlabeled2017
            labelled = coco_detection(root, "train2017", "instances_train2017.json", keep_empty=False)
            if semi:
                unlabelled = coco_detection(root, "unlabeled2017", "instances_unlabeled2017.json", annotated=False)
    if not semi:
        return Views(labelled, sup_view)
    return TwoStream(Views(labelled, sup_view), Views(unlabelled, unsup_views), get("num_unsup", 4))


DETECTION_DATASETS = ("toy_detection", "toy_detection_semi", "coco_detection", "coco_detection_semi",
                      "coco_detection_semi_full")


def build_dataset(name, split, cfg):
    """The dataset `name` ("toy_context", "toy_shapes", "cityscapes", ...) for split "train" or "val".

    Real datasets (REAL_DATASETS) are read from cfg.data_root. Their training split gets the TrainTransform built
    from cfg.crop_size, cfg.base_size, cfg.scale_range and, if the config has them, cfg.aspect_range (default none)
    and cfg.pad_value (default 0); their val split is returned whole at its native size (models resize internally).
    Toy data is generated at cfg.crop_size and needs no transform. Detection datasets (DETECTION_DATASETS): see
    detection_dataset; pose datasets (POSE_DATASETS, toy_people): heatmaps at cfg.heatmap_sigma.
    """
    seed = getattr(cfg, "seed", 0)
    toy = {
        "toy_context": lambda: ToyContext(split, cfg.crop_size, seed=seed),
        "toy_shapes": lambda: ToyShapes(split, cfg.crop_size, "all", seed=seed),
        "toy_shapes_seen": lambda: ToyShapes(split, cfg.crop_size, "seen", seed=seed),
        "toy_shapes_captions": lambda: ToyShapesCaptions(split, cfg.crop_size, seed=seed),
        "toy_objects": lambda: ToyObjects(split, cfg.crop_size, getattr(cfg, "eval_images", None) if split == "val"
                                          else getattr(cfg, "train_images", None), seed=seed, cache=split == "train",
                                          flip=split == "train"),
    }
    if name == "toy_people":
        return ToyPeople(split, tuple(cfg.image_size), cfg.heatmap_sigma, seed=seed,
                         length=getattr(cfg, "toy_val_pairs", None) if split == "val" else None)
    if name in toy:
        return toy[name]()
    if name in POSE_DATASETS:
        return pose_dataset(name, split, cfg.data_root, cfg.heatmap_sigma)
    if name in DETECTION_DATASETS:
        return detection_dataset(name, split, cfg)
    if name in REAL_DATASETS:
        dataset = real_dataset(name, split, cfg.data_root)
        if split == "train":
            dataset.transform = TrainTransform(cfg.crop_size, cfg.base_size, cfg.scale_range,
                                               getattr(cfg, "aspect_range", (1.0, 1.0)), dataset.ignore_index,
                                               getattr(cfg, "pad_value", 0))
        return dataset
    known = sorted(toy) + ["toy_people"] + sorted(REAL_DATASETS) + sorted(POSE_DATASETS) + list(DETECTION_DATASETS)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known)}")
