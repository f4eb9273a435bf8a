"""Tests of toy_clip.py: shapes, gradients, a short fit, the open_clip export round trip, the metric."""
import dataclasses
import json
import os
import sys

import open_clip
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy_clip  # noqa: E402
from data import SHAPE_CLASSES, ToyShapesCaptions  # noqa: E402

CFG = toy_clip.PRESETS["toy"]
CAPTIONS = ["a photo of a red square.", "a blue circle.", "there is a green triangle and a yellow square in the scene.",
            "a picture of a yellow circle.", "red triangle", "a blue square and a green circle."]


@pytest.fixture()
def wrapper():
    torch.manual_seed(0)
    return toy_clip.build_model(CFG)


def test_config_fields_are_plain():
    assert toy_clip.Config() == toy_clip.PRESETS["toy"]
    for f in dataclasses.fields(toy_clip.Config):
        assert isinstance(getattr(CFG, f.name), (int, float, str, bool, tuple)), f.name


def test_forward_shapes_and_gradients(wrapper):
    images = torch.rand(len(CAPTIONS), 3, CFG.crop_size, CFG.crop_size)
    out = wrapper({"image": images, "caption": CAPTIONS}, step=0)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's initial temperature
    out["loss"].backward()
    missing = [n for n, p in wrapper.named_parameters() if p.grad is None]
    assert not missing, missing  # the whole CLIP is trained
    assert wrapper.encode_image(images).shape == (len(CAPTIONS), CFG.embed_dim)
    logits = wrapper.zero_shot_logits(images, SHAPE_CLASSES)
    assert logits.shape == (len(CAPTIONS), len(SHAPE_CLASSES))
    assert torch.equal(wrapper.predict({"image": images}, SHAPE_CLASSES), logits)


def test_logit_scale_is_clamped_at_100(wrapper):
    with torch.no_grad():
        wrapper.clip.logit_scale.fill_(10.0)
    wrapper.on_step_end(0)
    assert wrapper.clip.logit_scale.exp().item() == pytest.approx(100.0)


def test_every_toy_caption_fits_the_context():
    tokenizer = open_clip.SimpleTokenizer(context_length=CFG.context_length)
    longest = max((t.format(" and a ".join([n] * 3)) for t in ToyShapesCaptions.TEMPLATES for n in SHAPE_CLASSES), key=len)
    tokens = tokenizer([longest])[0]
    assert tokens.shape == (CFG.context_length,) and (tokens == tokenizer.eot_token_id).any()  # not truncated


def test_a_few_steps_fit_a_fixed_batch(wrapper):
    items = [ToyShapesCaptions("train", CFG.crop_size)[i] for i in range(8)]
    batch = {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=3e-5)  # small: CLIP's first Adam steps are bumpy
    losses = []
    for step in range(8):
        loss = wrapper(batch, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        wrapper.on_step_end(step)
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_export_round_trip_through_open_clip(wrapper, tmp_path):
    with torch.no_grad():  # make the weights differ from a fresh init, so a silent re-init would be caught
        for p in wrapper.parameters():
            p.add_(0.01 * torch.randn_like(p))
    json_path, pt_path = toy_clip.export(wrapper, CFG, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["toy_clip.json", "toy_clip.pt"]  # no temporary file left behind

    model_cfg = json.load(open(json_path))
    assert {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg) and model_cfg["quick_gelu"] is False
    assert model_cfg["vision_cfg"] == {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32}
    assert model_cfg["text_cfg"]["context_length"] == CFG.context_length and model_cfg["text_cfg"]["vocab_size"] == 49408
    assert isinstance(torch.load(pt_path, weights_only=True)["logit_scale"], torch.Tensor)  # a raw state dict

    open_clip.add_model_config(json_path)
    clip = open_clip.create_model("toy_clip", pretrained=pt_path).eval()  # strict load
    tokenizer = open_clip.get_tokenizer("toy_clip")
    wrapper.eval()
    assert torch.equal(tokenizer(CAPTIONS), wrapper.tokenizer(CAPTIONS)) and tokenizer(CAPTIONS).shape[1] == CFG.context_length
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (clip.visual.preprocess_cfg["mean"], clip.visual.preprocess_cfg["std"]))
    images = torch.rand(3, 3, CFG.crop_size, CFG.crop_size)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image((images - mean) / std, normalize=True), wrapper.encode_image(images))
        torch.testing.assert_close(clip.encode_text(tokenizer(CAPTIONS), normalize=True), wrapper.encode_text(CAPTIONS))
        torch.testing.assert_close(clip.logit_scale, wrapper.clip.logit_scale)


def test_zero_shot_accuracy_reads_single_and_pair_images(wrapper):
    rng = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(3, 64, 64, generator=rng), "classes": c} for c in ([0], [3, 3], [1, 2], [5], [4, 7])]
    result = toy_clip.zero_shot_accuracy(wrapper, items, SHAPE_CLASSES, num_images=10)
    assert set(result) == {"top1", "per_class", "pair_top2"}
    assert set(result["per_class"]) == {"red square", "green square", "green triangle"}  # [3, 3] counts as single
    assert 0 <= result["top1"] <= 1 and 0 <= result["pair_top2"] <= 1
    assert wrapper.training  # restored


def test_a_quick_run_classifies_above_chance():
    """A short pre-training (30 steps at batch 32, about 20 s on one core: 42% measured) already names single objects
    well above chance (1 in 12) on held-out images: the toy data and the contrastive loss teach zero-shot names."""
    cfg = dataclasses.replace(CFG, batch_size=32)
    torch.manual_seed(0)
    wrapper = toy_clip.build_model(cfg)
    train = ToyShapesCaptions("train", cfg.crop_size)
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = 30
    for step in range(steps):
        items = [train[step * cfg.batch_size + i] for i in range(cfg.batch_size)]
        batch = {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 20)
        loss = wrapper(batch, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapper.parameters(), cfg.grad_clip)
        optimizer.step()
        wrapper.on_step_end(step)
    result = toy_clip.zero_shot_accuracy(wrapper, ToyShapesCaptions("val", cfg.crop_size), num_images=192)
    assert result["top1"] > 2.5 / 12, result["top1"]  # chance: 1 / 12


def test_hard_negatives_only_add_texts_that_no_image_matches():
    """hard_negatives: the swapped captions join the image -> text softmax (the loss can only grow), and a batch
    without any leaves the plain CLIP loss unchanged."""
    torch.manual_seed(0)
    plain = toy_clip.build_model(CFG)
    negclip = toy_clip.build_model(dataclasses.replace(CFG, hard_negatives=True))
    negclip.load_state_dict(plain.state_dict())
    items = [ToyShapesCaptions("train", CFG.crop_size)[i] for i in range(12)]
    batch = {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
             "negative": [it["negative"] for it in items]}
    assert any(batch["negative"])
    assert negclip(batch)["loss"].item() > plain(batch)["loss"].item()
    no_negatives = {**batch, "negative": [""] * len(items)}
    torch.testing.assert_close(negclip(no_negatives)["loss"], plain(no_negatives)["loss"])
