"""pose_transfer.py (PATN / APATN) and its data and metrics: heatmaps, the PATB, the discriminators' inputs, the
official SSIM and limb mask, the 41.37M generator, three optimizers through train.py (resume included), and the
train.py -> eval.py round trip."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import eval as evaluation
import pose_transfer as pt
import train

REPO = Path(__file__).resolve().parents[1]
# A few seconds per run: 32 x 16 people, 2 blocks of 4 ngf channels.
TINY = dataclasses.replace(pt.PRESETS["toy"], image_size=(32, 16), heatmap_sigma=1.5, ngf=2, ndf=2, n_blocks=2,
                           n_layers_d=1, batch_size=2, max_iters=4, lr_decay_from=2, pool_size=3, log_interval=1,
                           ckpt_interval=2, toy_val_pairs=4)


def tiny_batch(B=2, H=32, W=16, keypoints=None):
    ds = data.ToyPeople("val", (H, W), 1.5, length=B)
    items = [ds[i] for i in range(B)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    if keypoints is not None:  # every keypoint of both poses replaced
        for which in ("source", "target"):
            batch[f"{which}_keypoints"] = keypoints.expand(B, 18, 2).clone()
            batch[f"{which}_pose"] = data.keypoint_heatmaps(keypoints, H, W, 1.5)[None].expand(B, -1, -1, -1)
    return batch


def test_heatmap_peak_at_the_keypoint_and_empty_channel_when_missing():
    kp = torch.full((18, 2), -1.0)
    kp[1] = torch.tensor([10.0, 5.0])
    kp[2] = torch.tensor([-1.0, 7.0])  # y missing only: still missing
    heat = data.keypoint_heatmaps(kp, 32, 16, sigma=6.0)
    assert heat.shape == (18, 32, 16)
    assert heat[1].max() == 1.0 and (heat[1] == 1.0).nonzero().tolist() == [[10, 5]]
    assert heat[1, 16, 5].item() == pytest.approx(np.exp(-0.5), rel=1e-6)  # one sigma away
    assert heat[0].abs().sum() == 0 and heat[2].abs().sum() == 0


def test_patb_shapes_and_a_zero_mask_leaves_the_image_code_unchanged():
    C = 8
    first, later = pt.PATB(C, True, "instance", True, 0.0), pt.PATB(C, False, "instance", True, 0.0)
    f_P, f_S = torch.randn(2, C, 6, 4), torch.randn(2, C, 6, 4)
    p1, s1 = first(f_P, f_S)
    assert p1.shape == (2, C, 6, 4) and s1.shape == (2, 2 * C, 6, 4)  # the pose code grows by concatenation
    p2, s2 = later(p1, s1)
    assert p2.shape == (2, C, 6, 4) and s2.shape == (2, 2 * C, 6, 4)
    assert torch.equal(s1[:, C:], p1)  # Eq. 3: the updated image code is fed back
    last = first.conv_S[-1]  # the conv whose sigmoid is the mask
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-1e4)  # mask = sigmoid(-1e4) = 0
    p0, _ = first(f_P, f_S)
    assert torch.equal(p0, f_P) and first.last_mask.max() == 0
    with torch.no_grad():
        last.bias.fill_(1e4)  # mask = 1: a full residual step
    p_full, _ = first(f_P, f_S)
    assert torch.allclose(p_full, f_P + first.conv_P(f_P))


def test_apatb_starts_as_a_patb():
    torch.manual_seed(0)
    a = pt.APATB(8, False, "instance", True, 0.0)
    p = pt.PATB(8, False, "instance", True, 0.0)
    p.load_state_dict(a.state_dict(), strict=False)
    f_P, f_S = torch.randn(1, 8, 6, 4), torch.randn(1, 16, 6, 4)
    assert all(torch.equal(x, y) for x, y in zip(a(f_P, f_S), p(f_P, f_S)))  # gamma = 0 at the start
    with torch.no_grad():
        a.gamma.fill_(1.0)
    assert not torch.equal(a(f_P, f_S)[0], p(f_P, f_S)[0])


def test_discriminator_inputs_and_official_parameter_count():
    model = pt.build_model(TINY)
    assert model.disc_appearance.model[0][1].in_channels == 6  # (image, condition image)
    assert model.disc_shape.model[0][1].in_channels == 3 + 18  # (image, target heatmaps)
    market = pt.PATNGenerator(pt.PRESETS["market"])  # ngf 64, 9 blocks, inputs 3 and 36 channels
    assert market.image_encoder[1].in_channels == 3 and market.pose_encoder[1].in_channels == 36
    assert round(sum(p.numel() for p in market.parameters()) / 1e6, 2) == 41.37


def test_ssim_hand_checked_and_the_data_range_quirk():
    target, generated = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 50, np.uint8)
    # Flat images: only the luminance term, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = (0.01 * range)^2,
    # range = 1 (a flat generated image has max - min = 0; officially a division by zero).
    c1 = 0.01**2
    assert evaluation.pose_ssim(generated, target) == pytest.approx((2 * 100 * 50 + c1) / (100**2 + 50**2 + c1))
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(0)
    target = rng.integers(100, 111, (16, 16, 3)).astype(np.uint8)
    generated = rng.integers(100, 111, (16, 16, 3)).astype(np.uint8)  # range 10, not 255: the quirk matters
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=2)
    quirk = structural_similarity(target, generated, data_range=int(generated.max()) - int(generated.min()), **kw)
    assert evaluation.pose_ssim(generated, target) == pytest.approx(quirk)
    assert abs(quirk - structural_similarity(target, generated, data_range=255, **kw)) > 0.01


def test_mask_ssim_limb_mask_for_known_keypoints():
    kp = np.full((18, 2), -1.0)
    kp[1], kp[2] = (10, 10), (10, 20)  # neck and right shoulder: one horizontal limb, 10 px long
    mask = evaluation.limb_mask(kp, 32, 32)
    assert mask[10, 10:21].all() and mask[7:14, 15].all()  # the quadrilateral, half-width 4, around the limb
    assert not mask[4, 15] and not mask[16, 15] and not mask[10, 26] and not mask[20, 15]
    assert mask[10, 7] and mask[10, 23] and not mask[10, 5]  # disks of radius 4 at the joints (strictly inside)
    assert np.array_equal(mask[:21], mask[:21][::-1])  # symmetric about the limb
    assert not evaluation.limb_mask(np.full((18, 2), -1.0), 32, 32).any()  # nobody: an empty mask


def test_person_with_no_visible_keypoints_trains_without_nan():
    model = pt.build_model(TINY)
    batch = tiny_batch(keypoints=torch.full((18, 2), -1.0))
    assert batch["target_pose"].abs().sum() == 0
    for name, opt in model.configure_optimizers(TINY).items():
        losses = model(batch, 0, optimizer=name)
        opt.zero_grad()
        losses["loss"].backward()
        assert all(torch.isfinite(v) for v in losses.values())
        assert all(torch.isfinite(p.grad).all() for g in opt.param_groups for p in g["params"] if p.grad is not None)
        opt.step()


def test_generator_call_trains_only_the_generator():
    model = pt.build_model(TINY)
    model(tiny_batch(), 0, optimizer="generator")["loss"].backward()
    assert all(p.grad is not None for p in model.generator.parameters())
    assert all(p.grad is None for d in (model.disc_appearance, model.disc_shape) for p in d.parameters())


def test_vgg_weights_from_a_local_file_and_clear_errors(tmp_path):
    state = {"features.0.weight": torch.randn(64, 3, 3, 3), "features.0.bias": torch.randn(64),
             "features.2.weight": torch.randn(64, 64, 3, 3), "features.2.bias": torch.randn(64)}
    torch.save(state, tmp_path / "vgg19.pth")
    vgg = pt.VGGConv12(str(tmp_path / "vgg19.pth"))
    assert torch.equal(vgg.layers[2].weight, state["features.2.weight"])
    assert not any(p.requires_grad for p in vgg.parameters())
    with pytest.raises(FileNotFoundError, match="no VGG19 weights file"):
        pt.VGGConv12(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="lambda_perceptual 0"):
        pt.VGGConv12("NO_SUCH_WEIGHTS")


def test_three_optimizers_stepped_checkpointed_and_resumed(tmp_path, monkeypatch):
    """G, D_A, D_S each stepped every iteration; a run killed after its step-2 checkpoint and resumed ends on exactly
    the weights (image pools included), optimizer states and losses of an unstopped run."""
    monkeypatch.chdir(REPO)
    full = train.train("pose_transfer", TINY, tmp_path / "full")
    ckpt = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    assert list(ckpt["optimizers"]) == ["generator", "disc_appearance", "disc_shape"]
    for state in ckpt["optimizers"].values():
        assert all(s["step"] == 4 for s in state["state"].values())
    assert int(ckpt["model"]["pool_appearance.count"]) == 3  # the pool filled up (batch 2, pool 3)

    class Killed(Exception):
        pass

    save = train.save_checkpoint

    def save_then_die(path, **state):
        save(path, **state)
        raise Killed

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train.train("pose_transfer", TINY, tmp_path / "killed")
    monkeypatch.setattr(train, "save_checkpoint", save)
    again = train.train("pose_transfer", TINY, tmp_path / "killed", resume=True)
    resumed = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)
    for k in ckpt["model"]:
        assert torch.equal(ckpt["model"][k], resumed["model"][k]), k
    assert again == full


def test_train_then_eval_round_trip_and_one_image(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = tmp_path / "run"
    flags = [f"--{f.name}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for f in dataclasses.fields(TINY) for v in [getattr(TINY, f.name)]
             if v != getattr(pt.PRESETS["toy"], f.name)]
    r = subprocess.run([sys.executable, "train.py", "--model", "pose_transfer", "--out", str(out), *flags],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "predictions.png").is_file()
    trained = json.loads((out / "metrics.json").read_text())
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(out / "ckpt.pt")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    again = json.loads((out / "eval_metrics.json").read_text())
    assert set(again) == {"toy_people/SSIM", "toy_people/L1", "toy_people/mask-SSIM"}
    assert again == pytest.approx(trained)
    item = data.ToyPeople("val", (32, 16), 1.5)[0]
    from PIL import Image
    Image.fromarray(evaluation.to_uint8(item["source"])).resize((32, 64)).save(tmp_path / "person.png")
    kp = {"source": (item["source_keypoints"] * 2).tolist(), "target": (item["target_keypoints"] * 2).tolist()}
    (tmp_path / "kp.json").write_text(json.dumps(kp))
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(out / "ckpt.pt"), "--source",
                        str(tmp_path / "person.png"), "--target-pose", str(tmp_path / "kp.json")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(out / "person_posed.png").size == (16, 32)
    (tmp_path / "bad.json").write_text('{"target": []}')
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(out / "ckpt.pt"), "--source",
                        str(tmp_path / "person.png"), "--target-pose", str(tmp_path / "bad.json")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "expected" in r.stderr and "Traceback" not in r.stderr


def test_pose_datasets_read_the_official_layout_and_name_what_is_missing(tmp_path):
    root = tmp_path / "market_data"
    (root / "test").mkdir(parents=True)
    from PIL import Image
    for name in ("0001_c1s1_001.jpg", "0001_c2s1_002.jpg"):
        Image.new("RGB", (64, 128), (200, 10, 10)).save(root / "test" / name)
    ys, xs = [20] + [-1] * 17, [30] + [-1] * 17
    (root / "market-annotation-test.csv").write_text(
        "name:keypoints_y:keypoints_x\n" + "".join(f"{n}:{ys}:{xs}\n" for n in ("0001_c1s1_001.jpg",
                                                                                "0001_c2s1_002.jpg")))
    (root / "market-pairs-test.csv").write_text("from,to\n0001_c1s1_001.jpg,0001_c2s1_002.jpg\n")
    cfg = dataclasses.replace(pt.PRESETS["market"], data_root=str(tmp_path))
    ds = data.build_dataset("market", "val", cfg)
    item = ds[0]
    assert len(ds) == 1 and item["source"].shape == (3, 128, 64) and item["target_pose"].shape == (18, 128, 64)
    assert item["target_pose"][0, 20, 30] == 1.0 and item["target_pose"][1:].abs().sum() == 0
    with pytest.raises(FileNotFoundError, match="market-annotation-train.csv"):
        data.build_dataset("market", "train", cfg)
