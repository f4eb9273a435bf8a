"""toy_backbone.py, the detection toys' ImageNet: its body is the detectors' body, the exported file loads into both
detectors' toy presets (a wrong or missing one is a one-line error naming the command), train.py pre-trains it first
when it is missing, and a short pre-training learns (above chance)."""
import os
import sys
from dataclasses import replace

import pytest
import torch

import data
import eval as evaluation
import mixtraining as mt
import soft_teacher as st
import toy_backbone as tb
import train

CFG = tb.PRESETS["toy"]


def test_the_body_has_the_detectors_module_names_and_gradients_reach_it():
    torch.manual_seed(0)
    wrapper = tb.build_model(CFG)
    ours = {k: v.shape for k, v in wrapper.state_dict().items() if not k.startswith("fc.")}
    detector = {k: v.shape for k, v in st.ToyBackbone(CFG.toy_width).state_dict().items() if k.startswith("stages.")}
    assert ours == detector
    batch = {"image": torch.rand(3, 3, CFG.crop_size, CFG.crop_size), "label": torch.tensor([0, 4, 9])}
    out = wrapper(batch)
    assert out["loss"].ndim == 0 and 0 <= out["acc"] <= 1
    out["loss"].backward()
    assert all(p.grad is not None for p in wrapper.parameters())
    assert wrapper.predict(batch).shape == (3, CFG.num_classes)


def test_objects_come_from_their_own_stream_and_hold_more_classes_than_detection():
    objects = data.ToyObjects("train", 48, length=4)
    assert len(objects.class_names) == 10 and objects.class_names[:5] == data.ToyDetection.class_names
    item = objects[3]
    assert item["image"].shape == (3, 48, 48) and item["label"].ndim == 0 and torch.equal(objects[3]["image"],
                                                                                         item["image"])
    assert not torch.equal(data.ToyObjects("val", 48)[3]["image"], item["image"])


def test_the_training_set_is_drawn_once_kept_in_8_bits_and_flipped_by_the_seeded_generator():
    drawn = data.ToyObjects("train", 48, length=4)
    kept = data.ToyObjects("train", 48, length=4, cache=True)
    first = kept[2]
    assert list(kept.cache) == [2] and kept.cache[2][0].dtype == torch.uint8
    assert (first["image"] - drawn[2]["image"]).abs().max() <= 0.5 / 255 + 1e-6  # the same image, in 8 bits
    assert first["label"] == drawn[2]["label"]
    kept.draw = None  # a second read must not draw again
    assert torch.equal(kept[2]["image"], first["image"])
    flipped = data.ToyObjects("train", 48, length=4, flip=True)
    reads = []
    for seed in range(8):  # train.py's SeededItems seeds torch per sample position
        torch.manual_seed(seed)
        reads.append(flipped[1]["image"])
    plain = drawn[1]["image"]
    assert all(torch.equal(r, plain) or torch.equal(r, plain.flip(-1)) for r in reads)
    assert any(torch.equal(r, plain) for r in reads) and any(torch.equal(r, plain.flip(-1)) for r in reads)
    torch.manual_seed(3)
    again = flipped[1]["image"]
    assert torch.equal(again, reads[3])
    train_set = data.build_dataset("toy_objects", "train", CFG)
    assert len(train_set) == CFG.train_images and train_set.cache == {} and train_set.flip
    val_set = data.build_dataset("toy_objects", "val", CFG)
    assert len(val_set) == CFG.eval_images and val_set.cache is None and not val_set.flip


@pytest.fixture()
def exported(tmp_path):
    torch.manual_seed(0)
    wrapper = tb.build_model(CFG)
    (path,) = tb.export(wrapper, CFG, str(tmp_path))
    assert os.listdir(tmp_path) == ["toy_backbone.pth"]  # no temporary file left behind
    return wrapper, path


@pytest.mark.parametrize("module", [st, mt], ids=["soft_teacher", "mixtraining"])
def test_the_exported_file_loads_into_the_detectors_toy_preset(module, exported):
    wrapper, path = exported
    cfg = replace(module.PRESETS["toy"], weights=path)
    assert module.prerequisites(module.PRESETS["toy"]) == {"runs/toy_backbone/toy_backbone.pth": "toy_backbone"}
    assert module.prerequisites(module.PRESETS["paper"]) == {} == module.prerequisites(replace(cfg, weights="none"))
    body = module.build_model(cfg).student.backbone
    for k, v in wrapper.stages.state_dict().items():
        assert torch.equal(body.stages.state_dict()[k], v), k
    assert not any(p.requires_grad for p in body.stages[0].parameters())  # mmdet frozen_stages=1
    assert all(p.requires_grad for p in body.stages[1:].parameters())
    assert all(p.requires_grad for p in module.build_model(replace(cfg, weights="none")).student.parameters())


@pytest.mark.parametrize("what", ["missing", "not torch", "other keys", "other width"])
def test_a_wrong_or_missing_file_is_one_line_naming_the_training_command(what, exported, tmp_path):
    _, path = exported
    bad = str(tmp_path / "bad.pth")
    if what == "missing":
        bad = str(tmp_path / "nope.pth")
    elif what == "not torch":
        open(bad, "w").write("not a checkpoint")
    elif what == "other keys":
        torch.save({"conv.weight": torch.zeros(1)}, bad)
    else:
        torch.save(tb.build_model(replace(CFG, toy_width=32)).state_dict(), bad)
    cfg = replace(st.PRESETS["toy"], weights=bad)
    with pytest.raises(FileNotFoundError if what == "missing" else ValueError) as info:
        st.build_model(cfg)
    message = str(info.value)
    assert "\n" not in message and os.path.basename(bad) in message
    assert "python train.py --model toy_backbone" in message


def train_here(model, cfg, out):
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.train(model, cfg, out, fresh=True)
    finally:
        torch.set_num_threads(old_threads)


def test_train_py_pre_trains_a_missing_backbone_first(tmp_path, monkeypatch, capsys):
    tiny = replace(CFG, crop_size=32, batch_size=4, max_iters=2, eval_images=4, num_workers=0, log_interval=1)
    monkeypatch.setitem(tb.PRESETS, "toy", tiny)  # the prerequisite's own preset, made tiny
    weights = tmp_path / "backbone" / "toy_backbone.pth"
    cfg = replace(st.PRESETS["toy"], weights=str(weights), image_size=64, train_scales=(64, 80), num_labelled=4,
                  num_unsup=1, eval_images=2, rpn_pre_nms=(200, 100), rpn_post_nms=(50, 50), rois_per_image=32,
                  roi_head_dim=32, max_iters=1)
    train_here("soft_teacher", cfg, tmp_path / "detector")
    assert f"{weights} is missing: training `toy_backbone` first" in capsys.readouterr().out
    assert (tmp_path / "backbone" / "ckpt.pt").is_file() and weights.is_file()
    assert (tmp_path / "detector" / "metrics.json").is_file()


def test_a_short_pre_training_learns_above_chance(monkeypatch):
    """Chance is 10% over the 10 classes. Big objects on 32 px images (the classes and backgrounds of the toy ImageNet)
    make 300 steps on 2,400 images, half a minute, enough to reach ~29% top-1 on held-out images."""
    monkeypatch.setattr(data.ToyObjects, "radius", (0.3, 0.45))
    torch.manual_seed(0)
    cfg = replace(CFG, crop_size=32)
    items = [data.ToyObjects("train", 32)[i] for i in range(2400)]
    images, labels = torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])
    wrapper = tb.build_model(cfg)
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=3e-3, weight_decay=cfg.weight_decay)
    for step in range(300):
        i = torch.arange(step * 32, step * 32 + 32) % len(items)
        loss = wrapper({"image": images[i], "label": labels[i]}, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = evaluation.evaluate_classification(wrapper, data.ToyObjects("val", 32, length=256), "cpu")
    assert metrics["top1"] > 20, metrics
