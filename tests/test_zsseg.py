"""zsseg.py: masked-crop classification, the seen/unseen ensemble, stage-0 prompt learning (only the context trains),
matching with no target, the `_base` layouts, and train.py -> eval.py with --image/--vocab, on a tiny random CLIP."""
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import zsseg

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                             "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
VOCAB = ("red square", "blue circle")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_files(tiny_clip):
    return tiny_clip(TINY_CLIP)


@pytest.fixture(scope="module")
def cfg(clip_files):
    return dataclasses.replace(
        zsseg.PRESETS["toy"], clip_model=str(clip_files[0]), clip_pretrained=str(clip_files[1]), clip_trained_by="",
        class_names=VOCAB, num_classes=2, crop_size=64, conv_dim=32, mask_dim=32, hidden_dim=32, nheads=2,
        dim_feedforward=64, embed_hidden_dim=32, num_queries=4, dec_layers=2, prompt_iters=5)


def batch(n=2, size=64):
    """A red square (class 0) and a blue disc (class 1) on grey; the rest is ignore."""
    image, label = torch.full((n, 3, size, size), 0.3), torch.full((n, size, size), 255)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        image[i, :, 4 + i:28 + i, 6:30] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
        label[i, 4 + i:28 + i, 6:30] = 0
        disc = (yy - 44) ** 2 + (xx - 42) ** 2 < 12 ** 2
        image[i][:, disc] = torch.tensor([0.1, 0.2, 0.9])[:, None]
        label[i][disc] = 1
    return {"image": image, "label": label}


def test_masked_crop_takes_the_tight_box_fills_the_mean_and_resizes():
    image = torch.arange(3 * 6 * 8, dtype=torch.float32).reshape(3, 6, 8) / 200
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[2, 3:6] = True  # an L: rows 2-3, columns 3-5, one corner missing
    mask[3, 3] = True
    mean = torch.tensor([0.1, 0.2, 0.3])
    crop = zsseg.masked_crops(image, mask[None], 2, mean)  # box 2 x 3 -> 2 x 2
    assert crop.shape == (1, 3, 2, 2)
    same = zsseg.masked_crops(image, mask[None], 3, mean)[0]  # 2 x 3 box resized to 3 x 3: check the box itself
    box = torch.where(mask[2:4, 3:6], image[:, 2:4, 3:6], mean.view(3, 1, 1))
    assert torch.allclose(torch.nn.functional.interpolate(box[None], size=(3, 3), mode="bicubic")[0], same)
    assert torch.equal(box[:, 1, 1], mean) and torch.equal(box[:, 0, 0], image[:, 2, 3])  # outside the mask: mean
    flat = torch.zeros(3, 10, 10)
    flat[:, 4:6, 2:9] = torch.tensor([0.5, 0.25, 0.75])[:, None, None]
    out = zsseg.masked_crops(flat, (flat[0] > 0)[None], 5, mean)[0]  # a uniform box resized: still uniform
    assert torch.allclose(out, torch.tensor([0.5, 0.25, 0.75])[:, None, None].expand(3, 5, 5), atol=1e-5)


def test_ensemble_seen_and_unseen_against_hand_computed_numbers():
    p, c, seen = torch.tensor([0.5, 0.2]), torch.tensor([0.1, 0.8]), torch.tensor([True, False])
    out = zsseg.ensemble(p, c, seen, 0.8)
    assert torch.allclose(out, torch.tensor([0.3624, 0.6063]), atol=1e-4)  # 0.5^.8 * 0.1^.2, 0.2^.2 * 0.8^.8


def test_matcher_with_zero_targets():
    out = {"pred_logits": torch.randn(2, 4, 3), "pred_masks": torch.randn(2, 4, 8, 8)}
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32)},
               {"labels": torch.tensor([1]), "masks": torch.ones(1, 32, 32)}]
    (q0, t0), (q1, t1) = zsseg.HungarianMatcher()(out, targets)
    assert len(q0) == len(t0) == 0 and len(q1) == len(t1) == 1 and t1.item() == 0


def test_stage0_trains_only_the_context_then_stage1_only_maskformer(cfg):
    torch.manual_seed(0)
    wrapper = zsseg.build_model(cfg)
    assert not any(p.requires_grad for p in wrapper.clip.parameters())
    losses = wrapper(batch(), step=0)
    losses["loss"].backward()
    grads = {n for n, p in wrapper.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"prompt.ctx"}
    wrapper.zero_grad(set_to_none=True)
    losses = wrapper(batch(), step=cfg.prompt_iters)
    losses["loss"].backward()
    grads = {n for n, p in wrapper.named_parameters() if p.grad is not None}
    assert "prompt.ctx" not in grads and not any(n.startswith("clip.") for n in grads)
    assert "net.non_object" in grads and any(n.startswith("net.backbone.") for n in grads)
    # the prompt loss falls when the context alone is optimised
    opt = torch.optim.AdamW([wrapper.prompt.ctx], lr=0.05)
    first = wrapper(batch(), 0)["loss"].item()
    for _ in range(15):
        opt.zero_grad()
        wrapper(batch(), 0)["loss"].backward()
        opt.step()
    assert wrapper(batch(), 0)["loss"].item() < 0.8 * first


def test_predict_shapes_and_the_seen_rule(cfg):
    torch.manual_seed(0)
    wrapper = zsseg.build_model(cfg).eval()
    p = wrapper.predict_proposals({"image": torch.rand(1, 3, 40, 50)}, vocab=["red square", "blue circle", "x"])
    assert p["masks"].shape == (1, 4, 40, 50) and p["clip_probs"].shape == p["ensemble_probs"].shape == (1, 4, 3)
    invalid = ~p["valid"][0]
    assert torch.all(p["clip_probs"][0, invalid] == 1)
    seen = torch.tensor([True, True, False])  # a vocabulary holding the training one: its names are seen
    expected = zsseg.ensemble(p["class_probs"][..., :-1], p["clip_probs"], seen, cfg.ensemble_weight)
    assert torch.allclose(p["ensemble_probs"], expected)
    assert wrapper.predict({"image": torch.rand(2, 3, 40, 50)}, vocab=["cat"]).shape == (2, 1, 40, 50)


def test_padding_is_the_official_one_normalise_then_zero_pad(cfg):
    """A 170 x 200 image gives the proposals (and training loss) of the same image normalised and zero-padded to
    192 x 224 by hand, the official way: padded pixels are the mean colour, not -mean/std."""
    torch.manual_seed(0)
    wrapper = zsseg.build_model(cfg).eval()
    image, label = torch.rand(1, 3, 170, 200), torch.randint(0, 2, (1, 170, 200))
    by_hand = copy.deepcopy(wrapper.net)
    by_hand.mean.zero_(), by_hand.std.fill_(1)  # this copy takes the hand-normalised input as it is
    x = torch.nn.functional.pad((image - wrapper.net.mean) / wrapper.net.std, (0, 24, 0, 22))  # (1, 3, 192, 224)
    with torch.no_grad():
        ref = by_hand(x, wrapper.text(VOCAB))
    p = wrapper.predict_proposals({"image": image}, vocab=VOCAB)
    masks = torch.nn.functional.interpolate(ref["pred_masks"], scale_factor=4, mode="bilinear")[..., :170, :200]
    assert torch.allclose(p["class_probs"], ref["pred_logits"].softmax(-1), atol=1e-5)
    assert torch.allclose(p["masks"], masks.sigmoid(), atol=1e-5)
    with torch.no_grad():
        loss = wrapper({"image": image, "label": label}, step=cfg.prompt_iters)["loss"]
        labels = torch.nn.functional.pad(label, (0, 24, 0, 22), value=255)
        expected = wrapper.criterion(ref, zsseg.semantic_targets(labels, 2))["loss"]
    assert torch.allclose(loss, expected, rtol=1e-5)


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_coco_stuff_base_layout_lists_label_files(tmp_path):
    """zsseg's prepare script writes no label file for an all-ignore `_base` map: that image is not listed."""
    for stem in ("000000000009", "000000000025"):
        write(tmp_path / f"coco/train2017/{stem}.jpg", np.zeros((4, 4, 3), np.uint8))
    write(tmp_path / "coco/stuffthingmaps_detectron2/train2017_base/000000000009.png",
          np.array([[0, 155, 255, 7]], np.uint8).repeat(4, 0))
    ds = data.real_dataset("coco_stuff_171_base", "train", tmp_path)
    assert len(ds) == 1 and len(ds.class_names) == 156 and "cow" not in ds.class_names
    assert ds[0]["label"][0].tolist() == [0, 155, 255, 7]
    full = data.class_names("coco_stuff_171")
    assert [full[i] for i in data.seen_classes("coco_stuff_171")] == ds.class_names
    write(tmp_path / "VOC2012/JPEGImages/2007_000032.jpg", np.zeros((4, 4, 3), np.uint8))
    write(tmp_path / "VOC2012/annotations_detectron2/train_base/2007_000032.png", np.full((4, 4), 14, np.uint8))
    voc = data.build_dataset("voc_20_base", "train", SimpleNamespace(data_root=str(tmp_path), crop_size=4,
                                                                     base_size=0, scale_range=(1.0, 1.0)))
    assert voc.class_names[-1] == "person" and len(voc.class_names) == 15
    with pytest.raises(FileNotFoundError, match="train_base"):
        data.real_dataset("voc_20_base", "val", tmp_path / "nowhere")


def test_train_then_eval_and_segment_an_image(tmp_path, clip_files):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(script, *args):
        result = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    out = run("train.py", "--model", "zsseg", "--clip_model", clip_files[0], "--clip_pretrained", clip_files[1],
              "--clip_trained_by", "", "--crop_size", 64, "--conv_dim", 32, "--mask_dim", 32, "--hidden_dim", 32,
              "--nheads", 2, "--dim_feedforward", 64, "--embed_hidden_dim", 32, "--num_queries", 4, "--dec_layers", 2,
              "--prompt_iters", 1, "--max_iters", 2, "--batch_size", 2, "--eval_interval", 2, "--num_workers", 0,
              "--out", tmp_path / "run")
    assert "toy_shapes/hIoU" in out
    run("eval.py", "--ckpt", tmp_path / "run" / "ckpt.pt")
    assert "toy_shapes/mIoU_unseen" in json.loads((tmp_path / "run" / "eval_metrics.json").read_text())
    image = np.zeros((50, 70, 3), np.uint8)
    image[10:30, 10:30] = (230, 30, 30)
    Image.fromarray(image).save(tmp_path / "my.png")
    printed = run("eval.py", "--ckpt", tmp_path / "run" / "ckpt.pt", "--image", tmp_path / "my.png",
                  "--vocab", "red square, blue circle,grass", "--out", tmp_path / "seg")
    for name in ("my_overlay.png", "my_proposals.png"):
        assert (tmp_path / "seg" / name).is_file() and name in printed
