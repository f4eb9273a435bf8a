"""ann.py: block shapes, the pyramid-sampling mechanism, zero-init, gradients, OHEM, backbone weights, toy overfit."""
import math
import re
import urllib.error
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F
import torchvision

import ann

TOY = ann.PRESETS["toy"]


def toy_batch(B=2, size=64, K=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(B, 3, size, size, generator=g),
            "label": torch.randint(0, K, (B, size, size), generator=g)}


# ----------------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(1, 3, 6, 8), None])
def test_block_shapes(sizes):
    low, high = torch.randn(2, 16, 10, 12), torch.randn(2, 24, 10, 12)
    assert ann.AFNB(16, 24, 8, 6, 0.05, sizes)(low, high).shape == (2, 24, 10, 12)
    assert ann.APNB(16, 8, 6, 0.05, sizes)(low).shape == (2, 16, 10, 12)
    core = ann.AttentionCore(16, 24, 40, 8, 6, sizes)  # keys from a grid of another size: queries set the output
    assert core(torch.randn(2, 16, 9, 9), high).shape == (2, 40, 10, 12)


@pytest.mark.parametrize("context", ["apnb", "nl", "none"])
def test_toy_network_shapes(context):
    cfg = replace(TOY, context=context)
    net = ann.ANNNet(cfg)
    image = torch.rand(2, 3, 64, 96)
    res4, res5 = net.backbone(image)
    assert res4.shape == (2, 64, 8, 12) and res5.shape == (2, 128, 8, 12)  # output stride 8
    main, aux = net(image)
    assert main.shape == aux.shape == (2, 7, 64, 96) and torch.isfinite(main).all() and torch.isfinite(aux).all()
    assert (net.afnb is None) == (net.apnb is None) == (context == "none")
    wrapper = ann.build_model(cfg).eval()
    scores = wrapper.predict({"image": image})
    assert scores.shape == (2, 7, 64, 96) and torch.allclose(scores.sum(1), torch.ones(2, 64, 96), atol=1e-5)


def test_toy_receptive_field_is_as_documented():
    """Gradient extent of one output position: res4 31 px, res5 47 px, logits 71 px (Backbone docstring)."""
    net = ann.ANNNet(replace(TOY, context="none")).eval()  # eval: BN batch statistics would couple all pixels
    x = torch.randn(1, 3, 128, 128, requires_grad=True)

    def extent(out):
        (grad,) = torch.autograd.grad(out, x)
        rows = grad.abs().sum((0, 1, 3)).nonzero()
        return (rows.max() - rows.min() + 1).item()

    assert extent(net.backbone(x)[0][0, :, 8, 8].sum()) == 31
    assert extent(net.backbone(x)[1][0, :, 8, 8].sum()) == 47
    assert extent(net(x)[0][0, :, 64, 64].sum()) == 71  # + head 3x3 conv (16 px) + bilinear upsampling (8 px)


# ----------------------------------------------------------------------------------------------------------------------
# Mechanism
# ----------------------------------------------------------------------------------------------------------------------
def test_pyramid_sampling_gives_110_anchors():
    x = torch.randn(2, 5, 16, 16)
    anchors = ann.pyramid_sample(x, (1, 3, 6, 8))
    assert anchors.shape == (2, 5, 110)
    assert torch.allclose(anchors[..., 0], x.mean((2, 3)), atol=1e-6)  # the 1x1 level is the global average
    assert torch.allclose(anchors[..., 46:], F.avg_pool2d(x, 2).flatten(2), atol=1e-6)  # the 8x8 level: 2x2 means
    assert ann.pyramid_sample(x, None).shape == (2, 5, 256)  # non-local: every position is an anchor


def test_zero_init_afnb_sees_zeros_and_its_input():
    torch.manual_seed(0)
    afnb = ann.AFNB(16, 24, 8, 8, 0.05).eval()
    assert afnb.attention.W_o.weight.abs().sum() == 0 and afnb.attention.W_o.bias.abs().sum() == 0
    low, high = torch.randn(2, 16, 8, 8), torch.randn(2, 24, 8, 8)
    expected = afnb.fuse(torch.cat([torch.zeros_like(high), high], 1))
    assert torch.equal(afnb(low, high), expected)
    with torch.no_grad():
        afnb.attention.W_o.bias.fill_(0.1)  # once W_o is non-zero the context path shows
    assert not torch.allclose(afnb(low, high), expected)


def test_single_full_size_pyramid_level_reduces_apnb_to_non_local():
    """Pooling an h x h map to h x h is the identity, so pyramid_sizes=(h,) is exactly the non-local block."""
    torch.manual_seed(0)
    nl = ann.AttentionCore(16, 16, 12, 8, 6, pyramid_sizes=None, shared_query_key=True).eval()
    torch.nn.init.normal_(nl.W_o.weight)  # non-zero W_o, else every output is 0
    ap = ann.AttentionCore(16, 16, 12, 8, 6, pyramid_sizes=(7,), shared_query_key=True).eval()
    ap.load_state_dict(nl.state_dict())
    x = torch.randn(2, 16, 7, 7)
    assert torch.allclose(ap(x, x), nl(x, x), atol=1e-5)
    # the non-local block is W_o(softmax(q k^T / sqrt(Ck)) v), written out by hand (shared query/key projection)
    q = nl.key(x).flatten(2).transpose(1, 2)  # (B, N, Ck)
    v = nl.value(x).flatten(2).transpose(1, 2)  # (B, N, Cv)
    context = (torch.softmax(q @ q.transpose(1, 2) / math.sqrt(8), -1) @ v).transpose(1, 2).reshape(2, 6, 7, 7)
    assert torch.allclose(nl(x, x), nl.W_o(context), atol=1e-5)
    ap.pyramid_sizes = (1, 3)  # coarser anchors: a different (asymmetric) attention
    assert not torch.allclose(ap(x, x), nl(x, x), atol=1e-3)


def trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("context", ["apnb", "nl", "none"])
def test_gradients_reach_every_parameter(context):
    """At init W_o = 0 blocks the gradient to the attention's query/key/value projections (by design); after one
    optimizer step every trainable parameter gets a non-zero gradient."""
    torch.manual_seed(0)
    model = ann.build_model(replace(TOY, context=context))
    batch = toy_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(batch, 0)["loss"].backward()
    silent = sorted(n for n, g in trainable_grads(model).items() if g is None or g.abs().sum() == 0)
    projections = sorted(n for n in trainable_grads(model) if re.search(r"attention\.(key|query|value)\.", n))
    assert silent == projections  # only those, and all of those
    opt.step()
    opt.zero_grad()
    model(batch, 1)["loss"].backward()
    silent = [n for n, g in trainable_grads(model).items() if g is None or g.abs().sum() == 0]
    assert silent == [], f"no gradient reaches {silent}"


def test_toy_overfits_one_batch():
    torch.manual_seed(0)
    model = ann.build_model(TOY)
    grid = torch.randint(0, 7, (4, 4, 4))  # a class per 16 x 16 block, its colour the class: learnable, not noise
    label = grid.repeat_interleave(16, 1).repeat_interleave(16, 2)  # (4, 64, 64)
    image = torch.rand(7, 3)[label].permute(0, 3, 1, 2) + 0.05 * torch.randn(4, 3, 64, 64)
    batch = {"image": image, "label": label}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(40):
        loss = model(batch, step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


# ----------------------------------------------------------------------------------------------------------------------
# OHEM cross-entropy against a hand-computed case
# ----------------------------------------------------------------------------------------------------------------------
def ohem_case():
    """6 pixels, 2 classes; true-class probabilities 0.9, 0.8, 0.6, 0.3, 0.1 and one ignored pixel."""
    p = torch.tensor([0.9, 0.8, 0.6, 0.3, 0.1, 0.5])
    label = torch.tensor([1, 0, 1, 0, 1, 255])
    margin = torch.log(p / (1 - p))  # logit of the true class over the other, which has logit 0
    logits = torch.zeros(6, 2)
    logits[torch.arange(6), label.clamp(max=1)] = margin
    return logits.T.reshape(1, 2, 2, 3), label.reshape(1, 2, 3)


@pytest.mark.parametrize("min_kept, kept", [(1, [0.6, 0.3, 0.1]),  # threshold max(0.7, p_[1]=0.3) = 0.7
                                            (3, [0.6, 0.3, 0.1]),  # p_[3] = 0.8, kept: p < 0.8 (strict)
                                            (4, [0.8, 0.6, 0.3, 0.1]),  # p_[4] = 0.9
                                            (99, [0.8, 0.6, 0.3, 0.1])])  # capped at the last valid pixel
def test_ohem_hand_computed(min_kept, kept):
    logits, label = ohem_case()
    expected = sum(-math.log(p) for p in kept) / len(kept)
    assert ann.ohem_cross_entropy(logits, label, 0.7, min_kept).item() == pytest.approx(expected, rel=1e-5)


def test_ohem_class_weights_scale_pixels_but_mean_by_count():
    logits, label = ohem_case()
    w = torch.tensor([1.0, 2.0])  # kept pixels 0.6 (class 1), 0.3 (class 0), 0.1 (class 1)
    expected = (2 * -math.log(0.6) + -math.log(0.3) + 2 * -math.log(0.1)) / 3
    assert ann.ohem_cross_entropy(logits, label, 0.7, 1, w).item() == pytest.approx(expected, rel=1e-5)
    assert ann.ohem_cross_entropy(logits, torch.full_like(label, 255), 0.7, 1).item() == 0.0


def test_training_losses_combine_main_and_aux():
    model = ann.build_model(replace(TOY, use_ohem=False))
    losses = model(toy_batch(), 0)
    assert set(losses) == {"loss", "loss_main", "loss_aux"}
    assert losses["loss"].item() == pytest.approx(losses["loss_main"].item() + 0.4 * losses["loss_aux"].item())


# ----------------------------------------------------------------------------------------------------------------------
# Backbone weights
# ----------------------------------------------------------------------------------------------------------------------
def test_backbone_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet50()
    torch.save(source.state_dict(), tmp_path / "r50.pth")
    backbone = ann.Backbone("resnet50", str(tmp_path / "r50.pth"))
    assert torch.equal(backbone.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    assert torch.equal(backbone.stem[1].running_mean, source.bn1.running_mean)
    assert backbone.layer4[1].conv2.dilation == (4, 4) and backbone.layer3[1].conv2.dilation == (2, 2)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="do not fit"):
        ann.Backbone("resnet50", str(tmp_path / "r18.pth"))


def test_missing_weights_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match=r"ResNet50_Weights\.IMAGENET1K_V1.*--pretrained_backbone PATH"):
        ann.Backbone("resnet50", "ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="no such file"):
        ann.Backbone("resnet50", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="needs ImageNet weights"):
        ann.build_model(replace(ann.PRESETS["paper"], pretrained_backbone=""))


# ----------------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------------
def test_presets_and_config_fields():
    paper = ann.PRESETS["paper"]
    assert (paper.num_classes, paper.crop_size, paper.batch_size, paper.lr, paper.weight_decay, paper.max_iters) == \
        (19, 769, 8, 0.01, 5e-4, 60_000)
    assert (paper.use_ohem, paper.ohem_thresh, paper.ohem_min_kept, paper.aux_weight) == (True, 0.7, 100_000, 0.4)
    assert (ann.PRESETS["ade20k"].num_classes, ann.PRESETS["pcontext"].num_classes) == (150, 59)
    assert sum(s * s for s in paper.pyramid_sizes) == 110
    source = open(ann.__file__).read()
    for f in fields(ann.Config):
        assert re.search(rf"^    {f.name}: (int|float|str|bool|tuple) = .*  # \S", source, re.M), f.name
        for preset in ann.PRESETS.values():
            assert type(getattr(preset, f.name)) is type(getattr(paper, f.name)), f.name


def test_caffe_input_is_computed_the_official_way():
    """input_norm="caffe": the network sees BGR x 255 - mean, computed in that order as the official code does (not
    (x - mean/255) / (1/255), which rounds differently in float32), bit for bit; "imagenet" is (RGB - mean) / std."""
    for norm in ("caffe", "imagenet"):
        model = ann.build_model(replace(ann.PRESETS["toy"], input_norm=norm), pretrained=False)
        model.net = torch.nn.Identity()  # logits() returns what the network would see
        rgb = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(0))
        if norm == "caffe":
            expected = rgb[:, [2, 1, 0]] * 255 - torch.tensor(ann.CAFFE_BGR_MEAN).view(1, 3, 1, 1)
        else:
            expected = (rgb - torch.tensor(ann.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
                ann.IMAGENET_STD).view(1, 3, 1, 1)
        assert torch.equal(model.logits(rgb), expected), norm
