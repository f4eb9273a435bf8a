"""Toy CLIP: contrastive image-text pre-training on synthetic captioned shapes, so open-vocabulary models run offline.

Paper: Learning Transferable Visual Models From Natural Language Supervision (CLIP), Radford et al., ICML 2021,
arXiv 2103.00020; official code github.com/openai/CLIP, the network and loss used here from open_clip
(github.com/mlfoundations/open_clip).

Idea: an image encoder and a text encoder map a batch of B (image, caption) pairs into one D-dimensional space; the
B x B matrix of scaled cosine similarities is trained with a symmetric cross-entropy whose targets are its diagonal
(InfoNCE, with a learnable temperature). After that, any phrase is a classifier: embed "a photo of a {name}." for
each candidate name and pick the nearest text embedding. The open-vocabulary segmenters (SAN, zsseg) rely on exactly
this: a class never seen by segmentation training is still a phrase CLIP knows, because CLIP saw it on the web. Here
the 'web' is data.ToyShapesCaptions (1-3 colour x shape objects, captions such as "a photo of a red square and a blue
circle."), which covers all 12 colour x shape classes, including the four that the segmentation toys hold out, and
empty scenes captioned "background" (the segmentation toys' stuff class). Its objects come at every scale the
segmenters show CLIP: small among others, as SAN's half-resolution scenes (an object spans 2-5 of the 8 x 8 patches),
up to filling the image, as zsseg's crop of one mask resized to CLIP's input.

File map:
  Config, PRESETS ................ the toy recipe (there is no paper preset: real CLIP weights come from OpenAI)
  clip_model_config .............. the open_clip model-config dict: built here, exported as JSON, rebuilt by open_clip
  ToyCLIP ........................ training wrapper: forward(batch, step) -> {"loss"}, zero_shot_logits, predict
  build_model, export ............ builders; export writes toy_clip.json + toy_clip.pt for open_clip.create_model
  zero_shot_accuracy ............. the metric: top-1 over the class names on single-object images

Differences from the paper: a 4-block ViT (width 128, patch 8, 64 x 64 images -> 8 x 8 grid) and a 2-block text
transformer with a 24-token context instead of ViT-B/16 and 77 tokens; nn.GELU instead of OpenAI's QuickGELU; the real
CLIP BPE tokenizer (49408 tokens, shipped inside open_clip, so no download); no augmentation; identical captions in a
batch (12 classes!) are still counted as negatives by the InfoNCE loss, as in CLIP. `hard_negatives` (off) adds
NegCLIP's swapped captions (Yuksekgonul et al., ICLR 2023: the same words, the shapes of two objects swapped) as texts
no image matches; tried for SAN's multi-object scenes, it did not help there (README, SAN section). Images are
normalised with OpenAI's mean/std, which is what open_clip's default preprocessing of the exported model expects.

Using the exported model (what san.py does, with no import of this file):
    open_clip.add_model_config("out/toy_clip.json")
    clip = open_clip.create_model("toy_clip", pretrained="out/toy_clip.pt")
    tokenizer = open_clip.get_tokenizer("toy_clip")       # context_length 24, from the JSON

Shapes: B batch, T captions, K class names, D embedding (embed_dim), L context length, h x w = 8 x 8 patch grid.
"""
import json
import math
import os
from dataclasses import dataclass

import open_clip
import torch
import torch.distributed as dist
from torch import nn

TASK = "clip"  # batch: {"image": (B, 3, H, W) float in [0, 1], "caption": list of B str}; metric: zero_shot_accuracy


# ----------------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # data
    train_dataset: str = "toy_shapes_captions"  # captioned 1-3 object images of all 12 classes, and backgrounds
    eval_datasets: tuple = ("toy_shapes_captions",)  # zero-shot accuracy on its single-object val images
    crop_size: int = 64  # image side; also the ViT input size
    # architecture (open_clip CLIP with a ViT image tower)
    embed_dim: int = 128  # D, the joint image-text embedding
    vision_width: int = 128  # ViT token width
    vision_layers: int = 4  # ViT blocks (SAN's toy feeds its side network with blocks up to 1, recognises with 2-4)
    vision_heads: int = 4  # ViT attention heads (open_clip's head_width = vision_width // vision_heads)
    patch_size: int = 8  # ViT patch side: 64 / 8 = an 8 x 8 grid
    text_width: int = 128  # text transformer width
    text_layers: int = 2  # text transformer blocks (captions of at most 3 names)
    text_heads: int = 4  # text attention heads
    context_length: int = 24  # L, tokens per caption incl. start/end (the longest toy caption, 3 names, has 19)
    vocab_size: int = 49408  # the real CLIP BPE vocabulary (open_clip's SimpleTokenizer)
    # optimisation
    batch_size: int = 64  # (image, caption) pairs per step: the InfoNCE negatives
    max_iters: int = 600  # training iterations (at batch 64: 98.5% zero-shot on single objects; batch 32: 75%)
    hard_negatives: bool = False  # NegCLIP: also contrast each image with its caption, shapes of two objects swapped
    optimizer: str = "adamw"  # optimiser name
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.1  # AdamW weight decay (CLIP: 0.2)
    schedule: str = "cosine"  # lr schedule after warm-up (CLIP: cosine)
    warmup_iters: int = 50  # linear warm-up iterations
    grad_clip: float = 1.0  # max gradient L2 norm, 0 = off
    amp: bool = True  # bf16/fp16 autocast on GPU; nothing on CPU
    # bookkeeping
    eval_interval: int = 200  # iterations between evaluations
    log_interval: int = 50  # iterations between log lines
    ckpt_interval: int = 200  # iterations between checkpoints
    num_workers: int = 2  # data loader workers
    seed: int = 0  # one seed for data, init and loader


PRESETS = {"toy": Config()}  # Config() is the toy; a 'paper' CLIP is OpenAI's released weights, not trained here


# ----------------------------------------------------------------------------------------------------------------------
# The network: open_clip's CLIP, from a plain model-config dict
# ----------------------------------------------------------------------------------------------------------------------
def clip_model_config(cfg):
    """The open_clip model config: open_clip.model.CLIP(**it) builds the network, and the same dict, saved as JSON,
    lets open_clip.add_model_config + create_model + get_tokenizer rebuild it."""
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": False,  # nn.GELU (OpenAI's CLIP used QuickGELU; the choice must match at load time)
        "vision_cfg": {  # standard ViT: class token, ln_pre, 'tok' pooling, no attentional pooler
            "image_size": cfg.crop_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
            "layers": cfg.vision_layers, "head_width": cfg.vision_width // cfg.vision_heads,
        },
        "text_cfg": {  # causal transformer, pooled at the end-of-text token (argmax of the token ids)
            "context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
            "heads": cfg.text_heads, "layers": cfg.text_layers,
        },
    }


# ----------------------------------------------------------------------------------------------------------------------
# The training wrapper
# ----------------------------------------------------------------------------------------------------------------------
class ToyCLIP(nn.Module):
    """Owns the open_clip CLIP (`self.clip`), its tokenizer and the contrastive loss."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.model_config = cfg, clip_model_config(cfg)
        self.clip = open_clip.model.CLIP(**self.model_config)  # logit_scale initialised to log(1 / 0.07)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
        ddp = dist.is_available() and dist.is_initialized()  # gather the other ranks' features as extra negatives
        self.loss = open_clip.ClipLoss(rank=dist.get_rank() if ddp else 0,
                                       world_size=dist.get_world_size() if ddp else 1)
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def encode_image(self, images):
        """(B, 3, H, W) in [0, 1] -> (B, D) unit image embeddings."""
        return self.clip.encode_image((images - self.mean) / self.std, normalize=True)

    def encode_text(self, texts):
        """list of T str -> (T, D) unit text embeddings."""
        tokens = self.tokenizer(list(texts)).to(self.mean.device)  # (T, L) BPE ids, 0-padded
        return self.clip.encode_text(tokens, normalize=True)

    def forward(self, batch, step=0):
        """batch {"image": (B, 3, H, W), "caption": list of B str} -> {"loss": symmetric InfoNCE, "logit_scale"}."""
        image_features = self.encode_image(batch["image"])  # (B, D)
        text_features = self.encode_text(batch["caption"])  # (B, D)
        logit_scale = self.clip.logit_scale.exp()  # 1 / temperature, learnable
        # PAPER: logits = exp(t) * I_e @ T_e^T; loss = (CE(logits, arange) + CE(logits^T, arange)) / 2
        negatives = [n for n in batch.get("negative", []) if n] if self.cfg.hard_negatives else []
        if negatives:  # NegCLIP: the swapped captions are extra texts that no image matches (local batch only)
            texts = torch.cat([text_features, self.encode_text(negatives)]).float()  # (B + N, D)
            labels = torch.arange(len(image_features), device=texts.device)
            loss = (nn.functional.cross_entropy(logit_scale * image_features.float() @ texts.T, labels) +
                    nn.functional.cross_entropy(logit_scale * text_features.float() @ image_features.float().T,
                                                labels)) / 2
        else:
            loss = self.loss(image_features.float(), text_features.float(), logit_scale)
        return {"loss": loss, "logit_scale": logit_scale.detach()}

    @torch.no_grad()
    def on_step_end(self, step):
        """Clip the temperature so the logits are scaled by at most 100, as CLIP does after each optimiser step."""
        self.clip.logit_scale.clamp_(0, math.log(100))

    @torch.no_grad()
    def zero_shot_logits(self, images, class_names, template="a photo of a {}."):
        """(B, 3, H, W) in [0, 1], K names -> (B, K) scaled cosine similarity of each image to each class prompt."""
        text_features = self.encode_text([template.format(name) for name in class_names])  # (K, D)
        return self.clip.logit_scale.exp() * self.encode_image(images) @ text_features.T  # (B, K)

    def predict(self, batch, vocab):
        """batch {"image": (B, 3, H, W)}, vocab: K class names -> (B, K) zero-shot logits."""
        return self.zero_shot_logits(batch["image"], vocab)


# ----------------------------------------------------------------------------------------------------------------------
# Builders, export and the metric
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg, pretrained=True):
    """The ToyCLIP wrapper, randomly initialised: this file IS the pre-training (`pretrained` is accepted and unused,
    for the signature all model files share)."""
    return ToyCLIP(cfg)


def export(wrapper, cfg, out_dir):
    """Write out_dir/toy_clip.json (open_clip model config) and out_dir/toy_clip.pt (the CLIP state dict, loadable with
    weights_only=True), each to a temporary file then renamed. Returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, pt_path = os.path.join(out_dir, "toy_clip.json"), os.path.join(out_dir, "toy_clip.pt")
    state = {k: v.detach().cpu().clone() for k, v in wrapper.clip.state_dict().items()}
    torch.save(state, pt_path + ".tmp")
    with open(json_path + ".tmp", "w") as f:
        json.dump(clip_model_config(cfg), f, indent=2)
    os.replace(pt_path + ".tmp", pt_path)
    os.replace(json_path + ".tmp", json_path)
    return json_path, pt_path


@torch.no_grad()
def zero_shot_accuracy(wrapper, dataset, class_names=None, num_images=512, batch_size=256):
    """Zero-shot classification of the first `num_images` single-object images of `dataset` (items with "image" and
    "classes", indices into class_names) against "a photo of a {name}." for every name.

    Returns {"top1": accuracy, "per_class": {name: accuracy}, "pair_top2": the fraction of the two-object images seen
    on the way whose two highest-scoring names are exactly its two classes} -- the last is what SAN relies on.
    Images of three objects are skipped.
    """
    class_names = list(class_names if class_names is not None else dataset.class_names)
    was_training, device = wrapper.training, wrapper.mean.device
    wrapper.eval()
    singles, pairs = [], []  # (image, {class indices})
    for i in range(len(dataset)):
        item = dataset[i]
        classes = set(item["classes"])
        if len(classes) in (1, 2):
            (singles if len(classes) == 1 else pairs).append((item["image"], classes))
        if len(singles) == num_images:
            break
    predictions = []
    for items in (singles, pairs):
        scores = [wrapper.zero_shot_logits(torch.stack([im for im, _ in items[j:j + batch_size]]).to(device),
                                           class_names) for j in range(0, len(items), batch_size)]
        predictions.append(torch.cat(scores).topk(2, dim=1).indices.cpu() if items else None)  # (N, 2)
    wrapper.train(was_training)
    truth = torch.tensor([next(iter(c)) for _, c in singles])  # (N,)
    correct = (predictions[0][:, 0] == truth).float()
    per_class = {n: correct[truth == k].mean().item() for k, n in enumerate(class_names) if (truth == k).any()}
    pair_top2 = [set(p.tolist()) == c for p, (_, c) in zip(predictions[1], pairs)] if pairs else [0.0]
    return {"top1": correct.mean().item(), "per_class": per_class, "pair_top2": sum(pair_top2) / len(pair_top2)}


# ----------------------------------------------------------------------------------------------------------------------
# Self-check: python toy_clip.py
# ----------------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    import tempfile

    torch.manual_seed(0)
    cfg = PRESETS["toy"]
    wrapper = build_model(cfg)
    batch = {"image": torch.rand(4, 3, cfg.crop_size, cfg.crop_size),
             "caption": ["a photo of a red square.", "a blue circle.", "a green triangle and a yellow square.", "x"]}
    out = wrapper(batch, 0)
    out["loss"].backward()
    print(f"loss {out['loss'].item():.3f} (log 4 = {math.log(4):.3f}), logit scale {out['logit_scale'].item():.2f}")
    print("zero-shot logits", tuple(wrapper.zero_shot_logits(batch["image"], ["red square", "blue circle"]).shape))
    with tempfile.TemporaryDirectory() as tmp:
        json_path, pt_path = export(wrapper, cfg, tmp)
        open_clip.add_model_config(json_path)
        clip = open_clip.create_model("toy_clip", pretrained=pt_path).eval()
        tokens = open_clip.get_tokenizer("toy_clip")(["a photo of a red square."])  # (1, 24)
        same = torch.allclose(clip.encode_text(tokens, normalize=True),
                              wrapper.eval().encode_text(["a photo of a red square."]))
        print(f"exported and reloaded with open_clip: tokens {tuple(tokens.shape)}, identical text features: {same}")
    print(f"parameters: {sum(p.numel() for p in wrapper.parameters()) / 1e6:.2f}M")
