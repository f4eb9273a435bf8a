"""Toy backbone: the detection toys' ImageNet pre-training, a small classifier on synthetic one-object images.

Role: Soft Teacher and MixTraining, like nearly every detector, start Faster R-CNN from a ResNet-50 trained to
classify ImageNet (a torchvision ResNet is the body that the detector keeps and a `fc` head it drops). Their claims
live in that regime: the features already know what objects look like, the detector converges quickly on few labels,
and its teacher becomes confident early. The detection toys' small CNN (soft_teacher.ToyBackbone) gets the same
here: this file trains exactly its body (the four `stages`, the same module names) plus a classification head
(global average pooling + one linear layer, torchvision's `avgpool` + `fc`) on data.ToyObjects, and exports the
state dict as an ordinary file (runs/toy_backbone/toy_backbone.pth) that soft_teacher.py and mixtraining.py load the
way they load torchvision's ImageNet weights from a local file, dropping `fc.` (neither imports this file).

What it is trained on, and why that is fair: data.ToyObjects, one object per image with a class label and no box,
drawn from 10 shapes (the 5 detection classes and 5 more: ImageNet also holds COCO's objects and many others) in
random colours, sizes and places on the detection toys' kind of cluttered background. Its images come from their own
random stream, disjoint from every detection image (labelled, unlabelled or evaluated); it never sees a box, a
detection image or more than one object at a time. The detectors then learn localisation, the multi-object
scenes, occlusion and the unlabelled data themselves, as the papers' detectors do after ImageNet.

File map:
  Config, PRESETS ........ the toy recipe (there is no paper preset: the real backbone is torchvision's ResNet-50)
  toy_stages ............. the detectors' ToyBackbone body (a marked copy of soft_teacher.toy_stages)
  ToyClassifier .......... body + global pool + fc; forward(batch, step) -> {"loss", "acc"}; predict -> (B, K) logits
  build_model, export .... builders; export writes toy_backbone.pth (a plain state dict: stages.* and fc.*)

Differences from ImageNet training (torchvision's ResNet recipe): a 4-stage GroupNorm CNN instead of ResNet-50;
a fixed set of 20,000 synthetic 48 x 48 images (drawn once, kept in memory) read for about 6 epochs with random
horizontal flips, instead of 1.28 M photos for 90 epochs with random-resized crops and flips; AdamW with a cosine
schedule instead of SGD with steps. Input normalisation is torchvision's ImageNet mean / std, which is what the
detectors' transform applies. A fixed set read many times, not a new image every step, is also what makes it fast:
drawing an image costs more than the network's step on it.

Shapes: B batch, K classes (10), C = 4 * toy_width channels of the last stage, h x w = H/16 x W/16.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TASK = "classification"  # batch: {"image": (B, 3, H, W) float in [0, 1], "label": (B,) int64}; metric: top-1 accuracy
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, as the detectors use


# ----------------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # data
    train_dataset: str = "toy_objects"  # data.ToyObjects: one object of 10 classes per image, its own random stream
    eval_datasets: tuple = ("toy_objects",)  # top-1 accuracy on its validation images
    crop_size: int = 48  # image side (objects of radius 10-19 px, as the detection toys' mid-sized objects)
    train_images: int = 20_000  # the fixed training set, drawn once and read for many epochs (ImageNet: 1.28 M)
    eval_images: int = 512  # validation images
    num_classes: int = 10  # K: data.OBJECT_SHAPES
    # network: the detectors' toy body (their toy_width must match to load the file)
    toy_width: int = 16  # channels of the first stage (doubled per stage)
    # optimisation
    batch_size: int = 64  # images per iteration
    max_iters: int = 2000  # iterations: 6.4 epochs of the 20,000 images
    optimizer: str = "adamw"  # optimiser name
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    schedule: str = "cosine"  # lr schedule after warm-up
    warmup_iters: int = 150  # linear warm-up iterations
    grad_clip: float = 0.0  # max gradient L2 norm, 0 = off
    amp: bool = True  # bf16/fp16 autocast on GPU; nothing on CPU
    # bookkeeping
    eval_interval: int = 500  # iterations between evaluations
    log_interval: int = 100  # iterations between log lines
    ckpt_interval: int = 1000  # iterations between checkpoints
    num_workers: int = 0  # data loader workers: 0, so the one in-memory copy of the training images is reused
    seed: int = 0  # one seed for data, init and loader


PRESETS = {"toy": Config()}  # the only preset: the 'paper' backbone is torchvision's ImageNet ResNet-50


# ----------------------------------------------------------------------------------------------------------------------
# The network: the detectors' toy body + a classification head
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


class ToyClassifier(nn.Module):
    """`stages` (the detectors' body, same names) + global average pooling + `fc`, as torchvision's ResNet."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.stages = toy_stages(cfg.toy_width)
        self.fc = nn.Linear(4 * cfg.toy_width, cfg.num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def logits(self, images):
        """(B, 3, H, W) in [0, 1] -> (B, K) class logits."""
        x = (images - self.mean) / self.std
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H / 2^(i+1), W / 2^(i+1))
        return self.fc(x.mean((2, 3)))  # (B, C) -> (B, K)

    def forward(self, batch, step=0):
        """batch {"image": (B, 3, H, W), "label": (B,)} -> {"loss": cross-entropy, "acc": the batch's top-1}."""
        logits = self.logits(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        return {"loss": loss, "acc": (logits.argmax(1) == batch["label"]).float().mean().detach()}

    @torch.no_grad()
    def predict(self, batch, vocab=None):
        """batch {"image": (B, 3, H, W)} -> (B, K) logits (`vocab` is ignored: the classes are fixed)."""
        return self.logits(batch["image"])


# ----------------------------------------------------------------------------------------------------------------------
# Builders and export
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg, pretrained=True):
    """The classifier, randomly initialised: this file IS the pre-training (`pretrained` is accepted and unused, for
    the signature all model files share)."""
    return ToyClassifier(cfg)


def export(wrapper, cfg, out_dir):
    """Write out_dir/toy_backbone.pth: the classifier's state dict (stages.* and fc.*, as a torchvision ResNet file
    holds its body and fc), loadable with weights_only=True, written to a temporary file then renamed."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "toy_backbone.pth")
    torch.save({k: v.detach().cpu().clone() for k, v in wrapper.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return [path]


# ----------------------------------------------------------------------------------------------------------------------
# Self-check: python toy_backbone.py
# ----------------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    import tempfile

    torch.manual_seed(0)
    cfg = PRESETS["toy"]
    wrapper = build_model(cfg)
    batch = {"image": torch.rand(4, 3, cfg.crop_size, cfg.crop_size), "label": torch.tensor([0, 3, 9, 5])}
    out = wrapper(batch)
    out["loss"].backward()
    print(f"loss {out['loss'].item():.3f} (log {cfg.num_classes} = {torch.log(torch.tensor(10.0)):.3f}), "
          f"logits {tuple(wrapper.predict(batch).shape)}")
    with tempfile.TemporaryDirectory() as tmp:
        (path,) = export(wrapper, cfg, tmp)
        state = torch.load(path, weights_only=True)
        print(f"exported {len(state)} tensors: {sorted({k.split('.')[0] for k in state})}")
    print(f"parameters: {sum(p.numel() for p in wrapper.parameters()) / 1e6:.3f}M")
