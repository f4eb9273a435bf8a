"""Datasets and transforms shared by every model file.

Every semantic-segmentation dataset yields {"image": float32 (3, H, W) RGB in [0, 1], "label": int64 (H, W)} with
255 = ignore, and exposes `.class_names` (verbatim names, used as prompts by the open-vocabulary models) and
`.seen_classes` (indices of the classes seen in training for zero-shot splits, else None). Models normalise images
themselves, each with its own mean/std.

Contents, in reading order:
  1. Built-in synthetic data (no download, deterministic by seed, generated on the fly):
     - ToyContext: the class of an object is decided by a far-away cue, so only long-range context solves it (ANN).
     - ToyShapes: colour x shape objects with seen/unseen splits (SAN, zsseg), and ToyShapesCaptions, the captioned
       images the toy CLIP is pre-trained on.
  2. Real datasets in the layouts that the official repos / detectron2 / mmseg preparation scripts write.
  3. Training transforms (random scale, crop, flip, photometric) on image + mask with torchvision.transforms.v2.
  4. build_dataset(name, split, cfg): the one entry point train.py and eval.py use.
"""
import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE = 255  # label value that no loss and no metric counts


# ----------------------------------------------------------------------------------------------------------------------
# 1. Built-in synthetic data
# ----------------------------------------------------------------------------------------------------------------------
def _rng(seed, split, index):
    """One independent generator per (seed, split, index): any worker can render any item, reproducibly."""
    return np.random.default_rng([seed, {"train": 0, "val": 1}[split], index])


def _noise_texture(rng, size, mean, std, smooth=2):
    """(size, size) grey texture: white noise box-blurred `smooth` times, so it has a grain of a few pixels."""
    t = rng.normal(0.0, 1.0, (size, size))
    for _ in range(smooth):
        t = (t + np.roll(t, 1, 0) + np.roll(t, -1, 0) + np.roll(t, 1, 1) + np.roll(t, -1, 1)) / 5
    return mean + std * t / (t.std() + 1e-8)


def _shape_mask(kind, cy, cx, r, size, angle=0.0):
    """(size, size) bool mask of a square, circle/disc or triangle centred at (cy, cx) with 'radius' r."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    y, x = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y  # rotated coordinates
    if kind == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind in ("circle", "disc"):
        return u**2 + v**2 <= r**2
    if kind == "triangle":  # upward triangle (in the rotated frame) inscribed in the circle of radius r
        return (v <= r * 0.5) & (v >= -r + 1.732 * np.abs(u))
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
# Unseen in segmentation training, yet every colour and every shape word appears in some seen class.
UNSEEN_SHAPE_CLASSES = ("red circle", "green triangle", "blue square", "yellow circle")


def render_shapes(rng, size, num_objects):
    """Draw `num_objects` colour x shape objects on a dark noisy background.

    Returns image float32 (3, size, size) in [0, 1], label int64 (size, size) with indices into SHAPE_CLASSES
    (background = IGNORE), and the list of class indices drawn, front-most last.
    """
    S = size
    base = _noise_texture(rng, S, 0.18, 0.05)
    image = np.stack([base * rng.uniform(0.8, 1.2) for _ in range(3)])  # (3, S, S), slightly tinted
    label = np.full((S, S), IGNORE, np.int64)
    placed, drawn = [], []
    for _ in range(num_objects):
        for _try in range(30):
            r = rng.uniform(S / 9, S / 4.5)
            y, x = rng.uniform(r, S - r, 2)
            if all(np.hypot(y - py, x - px) > 0.8 * (r + pr) for py, px, pr in placed):
                break
        else:
            continue
        placed.append((y, x, r))
        k = rng.integers(len(SHAPE_CLASSES))
        colour, shape = SHAPE_CLASSES[k].split()
        mask = _shape_mask(shape, y, x, r, S, angle=rng.uniform(-0.4, 0.4))
        rgb = np.clip(np.asarray(COLOURS[colour]) + rng.normal(0, 0.05, 3), 0, 1)
        shade = _noise_texture(rng, S, 1.0, 0.08)[mask]  # a little texture, so colour is the cue, not flatness
        image[:, mask] = rgb[:, None] * shade[None]
        label[mask] = k
        drawn.append(int(k))
    return torch.from_numpy(np.clip(image, 0, 1).astype(np.float32)), torch.from_numpy(label), drawn


class ToyShapes(Dataset):
    """Colour x shape segmentation (the SAN / zsseg toy), background ignored.

    classes="all": the 12 SHAPE_CLASSES, with `seen_classes` telling which were seen in training (the generalized
    zero-shot evaluation). classes="seen": only the 8 seen classes, relabelled 0..7 in SHAPE_CLASSES order, and the
    pixels of unseen classes set to IGNORE -- exactly how the zero-shot `_base` label maps of zsseg/SAN are made.
    """

    def __init__(self, split="train", size=128, classes="all", length=None, seed=0):
        self.split, self.size, self.seed = split, size, seed
        self.length = length or (100_000 if split == "train" else 64)
        seen = [i for i, n in enumerate(SHAPE_CLASSES) if n not in UNSEEN_SHAPE_CLASSES]
        self.lut = torch.full((256,), IGNORE, dtype=torch.int64)  # raw class index -> dataset label
        if classes == "all":
            self.class_names, self.seen_classes = list(SHAPE_CLASSES), seen
            self.lut[:len(SHAPE_CLASSES)] = torch.arange(len(SHAPE_CLASSES))
        elif classes == "seen":
            self.class_names, self.seen_classes = [SHAPE_CLASSES[i] for i in seen], None
            self.lut[seen] = torch.arange(len(seen))
        else:
            raise ValueError(f"classes must be 'all' or 'seen', got {classes!r}")

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = _rng(self.seed, self.split, index)
        image, label, _ = render_shapes(rng, self.size, rng.integers(2, 5))
        return {"image": image, "label": self.lut[label]}


class ToyShapesCaptions(Dataset):
    """Captioned images of 1-2 shapes of ALL 12 classes: the 'web' the toy CLIP is pre-trained on.

    Like real CLIP before SAN ever saw COCO, the toy CLIP sees every colour x shape combination with words, so a
    class unseen by segmentation training is still one CLIP can name.
    """

    TEMPLATES = ("a photo of a {}.", "a {}.", "there is a {} in the scene.", "a picture of a {}.", "{}")

    def __init__(self, split="train", size=64, length=None, seed=0):
        self.split, self.size, self.seed = split, size, seed
        self.length = length or (100_000 if split == "train" else 256)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = _rng(self.seed, self.split, index)
        image, _, drawn = render_shapes(rng, self.size, rng.integers(1, 3))
        names = [SHAPE_CLASSES[k] for k in dict.fromkeys(drawn)]  # distinct, in drawing order
        if len(names) > 1 and rng.random() < 0.5:
            names = names[::-1]
        template = self.TEMPLATES[rng.integers(len(self.TEMPLATES))]
        return {"image": image, "caption": template.format(" and a ".join(names)), "classes": drawn}


# ----------------------------------------------------------------------------------------------------------------------
# 4. build_dataset: the entry point
# ----------------------------------------------------------------------------------------------------------------------
def build_dataset(name, split, cfg):
    """The dataset `name` ("toy_context", "toy_shapes", "cityscapes", ...) for split "train" or "val".

    Training splits of real datasets get the training transforms built from cfg.crop_size, cfg.base_size and
    cfg.scale_range; toy data is generated at cfg.crop_size and needs none.
    """
    seed = getattr(cfg, "seed", 0)
    toy = {
        "toy_context": lambda: ToyContext(split, cfg.crop_size, seed=seed),
        "toy_shapes": lambda: ToyShapes(split, cfg.crop_size, "all", seed=seed),
        "toy_shapes_seen": lambda: ToyShapes(split, cfg.crop_size, "seen", seed=seed),
        "toy_shapes_captions": lambda: ToyShapesCaptions(split, cfg.crop_size, seed=seed),
    }
    if name in toy:
        return toy[name]()
    raise KeyError(f"unknown dataset {name!r}; known: {sorted(toy)}")
