"""Released checkpoints -> our files (convert.py and the convert_official_state_dict of san, ann, zsseg, pose_transfer).

No test downloads anything: each builds a state dict under exactly the official key names and shapes (restated here
from the official code: MendelXu/SAN san/model/{san,side_adapter/side_adapter,clip_utils/*,layers}.py; MendelXu/ANN
models/{backbones/resnet,seg/nets/annn,seg/utils/afnb,seg/utils/apnb}.py; MendelXu/zsseg.baseline
mask_former/modeling/{heads,transformer,clip_adapter}/* and detectron2's projects/deeplab/resnet.py; tengteng95/
Pose-Transfer models/{model_variants,networks}.py), with random values, converts it and checks where every tensor lands.
"""
import argparse
import dataclasses
import json
import pickle
import re
import zipfile
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convert
import san

TINY_CLIP = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 6, "width": 64, "head_width": 16,
                                             "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


# ----------------------------------------------------------------------------------------------------------------------
# SAN
# ----------------------------------------------------------------------------------------------------------------------
def official_san_shapes(cfg, clip_shapes, heads, num_classes):
    """{official key: shape} of MendelXu/SAN's detectron2 model for `cfg`, given the open_clip CLIP's {key: shape}."""
    W, Q, E, k, p = cfg.side_width, cfg.num_queries, cfg.decoder_dim, cfg.clip_feature_layers[-1], cfg.side_patch_size
    C = clip_shapes["visual.ln_pre.weight"][0]
    sa = "side_adapter_network."
    shapes = {sa + "vit_model.patch_embed.proj.weight": (W, 3, p, p), sa + "vit_model.patch_embed.proj.bias": (W,),
              sa + "vit_model.pos_embed": (1, (cfg.side_image_size // p) ** 2, W),  # cls token removed
              sa + "query_embed": (1, Q, W), sa + "query_pos_embed": (1, Q, W)}
    for i in range(cfg.side_depth):  # timm's Block
        b = f"{sa}vit_model.blocks.{i}."
        shapes.update({b + "norm1.weight": (W,), b + "norm1.bias": (W,), b + "attn.qkv.weight": (3 * W, W),
                       b + "attn.qkv.bias": (3 * W,), b + "attn.proj.weight": (W, W), b + "attn.proj.bias": (W,),
                       b + "norm2.weight": (W,), b + "norm2.bias": (W,), b + "mlp.fc1.weight": (4 * W, W),
                       b + "mlp.fc1.bias": (4 * W,), b + "mlp.fc2.weight": (W, 4 * W), b + "mlp.fc2.bias": (W,)})
    for j in range(len(cfg.clip_feature_layers)):  # FUSION_MAP "clip i -> side j": layer_j
        f = f"{sa}fusion_layers.layer_{j}.input_proj."
        shapes.update({f + "0.weight": (C,), f + "0.bias": (C,), f + "1.weight": (W, C, 1, 1), f + "1.bias": (W,)})
    for mlp, conv, out in (("query_mlp", False, E), ("pix_mlp", True, E), ("attn_mlp", True, E * heads)):
        for n, (a, b) in enumerate(((W, E), (E, E), (E, out))):
            shapes[f"{sa}mask_decoder.{mlp}.layers.{n}.weight"] = (b, a, 1, 1) if conv else (b, a)
            shapes[f"{sa}mask_decoder.{mlp}.layers.{n}.bias"] = (b,)
    shapes.update({sa + "mask_decoder.bias_scaling.weight": (1, 1), sa + "mask_decoder.bias_scaling.bias": (1,)})
    for key, shape in clip_shapes.items():  # FeatureExtractor, RecWithAttnbiasHead, LearnableBgOvClassifier
        m = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)", key)
        if m and int(m[1]) < k:
            shapes[f"clip_visual_extractor.resblocks.{m[1]}.{m[2]}"] = shape
        elif m:
            shapes[f"clip_rec_head.resblocks.{int(m[1]) - k}.{m[2]}"] = shape
        elif key.startswith(("visual.ln_post", "visual.proj")):
            shapes["clip_rec_head." + key[len("visual."):]] = shape
        elif key.startswith("visual."):
            shapes["clip_visual_extractor." + key[len("visual."):]] = shape
        else:
            shapes["ov_classifier." + key] = shape
    ctx = clip_shapes["positional_embedding"][0]  # the classifier re-registers CLIP's buffers as persistent ones
    shapes["ov_classifier.attn_mask"] = (ctx, ctx)
    shapes["ov_classifier.bg_embed"] = (1, clip_shapes["text_projection"][1])
    shapes["criterion.empty_weight"] = (num_classes + 1,)
    return shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A toy-sized SAN on a tiny random open_clip CLIP, and a random official state dict for it."""
    tmp = tmp_path_factory.mktemp("san")
    (tmp / "tiny_clip.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    clip_state = open_clip.model.CLIP(**TINY_CLIP).state_dict()
    torch.save(clip_state, tmp / "tiny_clip.pt")
    cfg = dataclasses.replace(san.PRESETS["toy"], clip_model=str(tmp / "tiny_clip.json"),
                              clip_pretrained=str(tmp / "tiny_clip.pt"))
    shapes = official_san_shapes(cfg, {k: tuple(v.shape) for k, v in clip_state.items()}, heads=4, num_classes=8)
    g = torch.Generator().manual_seed(1)
    official = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    return cfg, official, tmp


def place_by_hand(cfg, official):
    """Our SAN with the official tensors assigned attribute by attribute (no key table)."""
    wrapper = san.build_model(cfg, pretrained=False)
    net, side, o = wrapper.net, wrapper.net.side, {k.replace("side_adapter_network.", "S."): v for k, v in
                                                   official.items()}
    clip = {}
    k = cfg.clip_feature_layers[-1]
    for key, v in official.items():
        if key.startswith("clip_visual_extractor.resblocks."):
            clip["visual.transformer." + key[len("clip_visual_extractor."):]] = v
        elif key.startswith("clip_visual_extractor."):
            clip["visual." + key[len("clip_visual_extractor."):]] = v
        elif key.startswith("clip_rec_head.resblocks."):
            i, rest = key[len("clip_rec_head.resblocks."):].split(".", 1)
            clip[f"visual.transformer.resblocks.{int(i) + k}.{rest}"] = v
        elif key.startswith("clip_rec_head."):
            clip["visual." + key[len("clip_rec_head."):]] = v
        elif key.startswith("ov_classifier.") and key not in ("ov_classifier.bg_embed", "ov_classifier.attn_mask"):
            clip[key[len("ov_classifier."):]] = v
    net.clip.load_state_dict(clip)
    with torch.no_grad():
        net.bg_embed.copy_(official["ov_classifier.bg_embed"])
        side.patch_embed.weight.copy_(o["S.vit_model.patch_embed.proj.weight"])
        side.patch_embed.bias.copy_(o["S.vit_model.patch_embed.proj.bias"])
        side.pos_embed.copy_(o["S.vit_model.pos_embed"][0])
        side.query_embed.copy_(o["S.query_embed"][0])
        side.query_pos_embed.copy_(o["S.query_pos_embed"][0])
        for i, block in enumerate(side.blocks):
            for ours, theirs in ((block.norm1, "norm1"), (block.qkv, "attn.qkv"), (block.proj, "attn.proj"),
                                 (block.norm2, "norm2"), (block.fc1, "mlp.fc1"), (block.fc2, "mlp.fc2")):
                ours.weight.copy_(o[f"S.vit_model.blocks.{i}.{theirs}.weight"])
                ours.bias.copy_(o[f"S.vit_model.blocks.{i}.{theirs}.bias"])
        for j, fusion in enumerate(side.fusions):
            for ours, n in ((fusion.norm, 0), (fusion.proj, 1)):
                ours.weight.copy_(o[f"S.fusion_layers.layer_{j}.input_proj.{n}.weight"])
                ours.bias.copy_(o[f"S.fusion_layers.layer_{j}.input_proj.{n}.bias"])
        for name in ("query_mlp", "pix_mlp", "attn_mlp"):
            linears = [m for m in getattr(side.decoder, name) if not isinstance(m, nn.ReLU)]
            for n, layer in enumerate(linears):
                layer.weight.copy_(o[f"S.mask_decoder.{name}.layers.{n}.weight"])
                layer.bias.copy_(o[f"S.mask_decoder.{name}.layers.{n}.bias"])
        side.decoder.bias_scaling.weight.copy_(o["S.mask_decoder.bias_scaling.weight"])
        side.decoder.bias_scaling.bias.copy_(o["S.mask_decoder.bias_scaling.bias"])
    return wrapper.eval()


def test_san_conversion_places_every_tensor(tiny):
    cfg, official, _ = tiny
    state = san.convert_official_state_dict({"model": official, "iteration": 59999}, cfg)
    converted = san.build_model(cfg, pretrained=False).eval()
    converted.load_state_dict(state)
    by_hand = place_by_hand(cfg, official)
    for key, value in by_hand.state_dict().items():  # every tensor, then the outputs that use them
        assert torch.equal(state[key], value), key
    image, vocab = torch.rand(1, 3, 96, 80), ["red square", "blue circle", "grass"]
    a, b = converted.net(image, vocab, (cfg.side_depth,)), by_hand.net(image, vocab, (cfg.side_depth,))
    for key in ("pred_masks", "attn_bias", "pred_logits"):  # side adapter outputs, recognition logits
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert a["pred_logits"].shape == (1, cfg.num_queries, len(vocab) + 1)


def test_san_unknown_missing_and_misshaped_keys_are_listed(tiny):
    cfg, official, _ = tiny
    broken = dict(official)
    broken["side_adapter_network.vit_model.cls_token"] = torch.zeros(1, 1, cfg.side_width)
    del broken["side_adapter_network.mask_decoder.bias_scaling.bias"]
    del broken["side_adapter_network.mask_decoder.attn_mlp.layers.2.weight"]
    broken["ov_classifier.bg_embed"] = torch.zeros(1, 7)
    with pytest.raises(ValueError) as e:
        san.convert_official_state_dict(broken, cfg)
    msg = str(e.value)
    assert "1 unknown, 3 missing, 1 mis-shaped" in msg and "side_adapter_network.vit_model.cls_token" in msg
    # a missing key is named as in the released file, which the user holds, and as ours
    assert "side_adapter_network.mask_decoder.bias_scaling.bias (-> net.side.decoder.bias_scaling.bias)" in msg
    assert "side_adapter_network.mask_decoder.attn_mlp.layers.2.weight (-> net.side.decoder.attn_mlp.4.weight)" in msg
    assert "ov_classifier.bg_embed (-> net.bg_embed)" in msg


def test_san_paper_key_list_and_parameter_counts(monkeypatch):
    """The paper-size official key list maps one to one onto our paper preset, shape for shape; the trainable
    parameters (side adapter, background embedding, CLIP's positional embedding) are the official log's 8.37M."""
    create = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **kw: create(*a, **kw, device="meta"))
    for preset, heads, clip_width in (("paper", 12, 768), ("paper_l14", 16, 1024)):
        cfg = san.PRESETS[preset]
        with torch.device("meta"):  # shapes only: no memory, no time
            wrapper = san.build_model(cfg, pretrained=False)
        ours = wrapper.state_dict()
        clip_shapes = {k[len("net.clip."):]: tuple(v.shape) for k, v in ours.items() if k.startswith("net.clip.")}
        official = official_san_shapes(cfg, clip_shapes, heads, 171)
        assert san.official_preset({"clip_visual_extractor.conv1.weight": torch.empty(clip_width, 0)}) == preset
        mapped = {}
        for key, shape in official.items():
            if key in san.OFFICIAL_UNUSED:
                continue
            name = san.official_name_to_ours(key, cfg.clip_feature_layers[-1])
            assert name in ours and ours[name].numel() == torch.Size(shape).numel(), (key, name)
            mapped[name] = key
        assert set(mapped) == set(ours)
        trainable = sum(torch.Size(s).numel() for k, s in official.items()
                        if k.startswith("side_adapter_network.") or k in (
                            "ov_classifier.bg_embed", "clip_visual_extractor.positional_embedding"))
        assert trainable == san.count_trainable(wrapper)
        if preset == "paper":
            assert round(trainable / 1e6, 2) == 8.37  # official training log of san_vit_b_16
            assert len(official) == 442  # the keys of the released san_vit_b_16.pth (papers file)


def test_convert_py_writes_a_checkpoint_that_eval_loads(tiny, monkeypatch):
    cfg, official, tmp = tiny
    src, dst = tmp / "san_tiny.pth", tmp / "out" / "ckpt.pt"
    torch.save({"model": official, "iteration": 1}, src)
    monkeypatch.setattr(san, "PRESETS", {**san.PRESETS, "tiny": cfg})
    assert convert.convert("san", src, dst, preset="tiny") == "tiny"
    with pytest.raises(FileExistsError):
        convert.convert("san", src, dst, preset="tiny")
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    assert ckpt["model_name"] == "san" and ckpt["config"]["clip_model"] == cfg.clip_model
    wrapper = san.build_model(san.Config(**ckpt["config"]), pretrained=False)
    wrapper.load_state_dict(ckpt["model"])
    by_hand = place_by_hand(cfg, official)
    image = {"image": torch.rand(1, 3, 64, 48)}
    assert torch.allclose(wrapper.eval().predict(image, ["a", "b"]), by_hand.predict(image, ["a", "b"]), atol=1e-6)
    import eval as evaluation  # and eval.py segments a photo with it, with any vocabulary
    from PIL import Image
    Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(tmp / "photo.png")
    evaluation.main(["--ckpt", str(dst), "--image", str(tmp / "photo.png"), "--vocab", "cat, grass", "--out", str(tmp)])
    assert (tmp / "photo_overlay.png").is_file() and (tmp / "photo_proposals.png").is_file()


class Numpy1Pickler(pickle._Pickler):
    """Pickles numpy's globals under numpy 1.x's module names (numpy.core.multiarray.scalar, ...), as the released
    files were written, whatever numpy is installed here (numpy 2 would write numpy._core.multiarray.scalar)."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None) or ""
        if not module.startswith("numpy._core"):
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"numpy.core{module[len('numpy._core'):]}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def save_as_numpy1(obj, path):
    """torch.save as PyTorch 1.x did (the legacy format, pickle protocol 2), numpy globals under numpy 1's names."""
    numpy1_pickle = SimpleNamespace(__name__="numpy1_pickle", Pickler=Numpy1Pickler, dump=pickle.dump)
    torch.save(obj, path, pickle_module=numpy1_pickle, _use_new_zipfile_serialization=False)


def test_a_file_pickled_under_numpy_1_loads(tmp_path):
    src = tmp_path / "released.pth"
    save_as_numpy1({"state_dict": {"w": torch.ones(2)}, "runner_state": {
        "performance": np.float64(0.799), "iters": np.int64(60000), "history": np.arange(3.0, dtype=np.float32)}}, src)
    raw = src.read_bytes()
    assert b"numpy.core.multiarray\nscalar\n" in raw and b"numpy.core.multiarray\n_reconstruct\n" in raw
    assert b"numpy._core" not in raw
    state = convert.load_official(src)["runner_state"]
    assert state["performance"] == np.float64(0.799) and state["iters"] == 60000
    assert state["history"].dtype == np.float32 and state["history"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind", ["text", "random bytes", "empty", "zip", "html", "tensor", "dict of strings",
                                  "foreign object"])
def test_a_file_that_is_no_checkpoint_is_a_one_line_error(kind, tmp_path, capsys):
    src = tmp_path / "released.pth"
    if kind == "text":
        src.write_text("this is a text file\nnot a checkpoint\n")
    elif kind == "random bytes":
        src.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        src.write_bytes(b"")
    elif kind == "zip":
        with zipfile.ZipFile(src, "w") as z:
            z.writestr("archive/readme.txt", "hello")
    elif kind == "html":
        src.write_text("<html><body>404 Not Found</body></html>")
    elif kind == "tensor":
        torch.save(torch.zeros(3), src)
    elif kind == "dict of strings":
        torch.save({"model": {"a": "b"}}, src)
    else:
        torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, src)  # a class: never unpickled
    for model in ("san", "ann", "zsseg", "pose_transfer"):
        with pytest.raises(SystemExit) as exit_info:
            convert.main([model, str(src), str(tmp_path / "out" / "ckpt.pt")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {src}") and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
    assert ("objects other than tensors" in err) == (kind == "foreign object")


def test_san_test_protocol_resizes_the_short_side_and_back(tiny):
    cfg, official, _ = tiny
    resized = san.resize_short_side(torch.rand(1, 3, 480, 1000), 640, 2560)
    assert resized.shape[-2:] == (640, 1333)  # detectron2: int(1000 * 640 / 480 + 0.5)
    assert san.resize_short_side(torch.rand(1, 3, 100, 1000), 640, 2560).shape[-2:] == (256, 2560)  # long side cap
    wrapper = place_by_hand(dataclasses.replace(cfg, test_short_side=96), official)
    scores = wrapper.predict({"image": torch.rand(1, 3, 40, 60)}, ["a", "b"])
    assert scores.shape == (1, 2, 40, 60)


def test_san_training_crops_are_padded_with_grey_128():
    import data
    assert san.PRESETS["paper"].pad_value == 128  # official MaskFormerSemanticDatasetMapper: F.pad(..., value=128)
    image, label = torch.full((3, 30, 40), 200, dtype=torch.uint8), torch.ones(30, 40, dtype=torch.int64)
    t = data.TrainTransform(crop_size=64, base_size=0, scale_range=(1.0, 1.0), pad_value=128)
    out_image, out_label = t(image, label)
    pad = out_label == data.IGNORE
    assert pad.sum() == 64 * 64 - 30 * 40
    assert torch.allclose(out_image[:, pad], torch.tensor(128 / 255)) and (out_image[:, ~pad] != 128 / 255).all()


# ----------------------------------------------------------------------------------------------------------------------
# ANN: a plain-PyTorch restatement of the official modules (MendelXu/ANN at f4eabeb), their names and their forward
# ----------------------------------------------------------------------------------------------------------------------
def bn_relu(c):  # ModuleHelper.BNReLU
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())


class OfficialBottleneck(nn.Module):  # models/backbones/resnet/resnet_models.py
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def nostride_dilate(m, dilate):  # DilatedResnetBackbone._nostride_dilate
    if isinstance(m, nn.Conv2d):
        if m.stride == (2, 2):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilate // 2,) * 2, (dilate // 2,) * 2
        elif m.kernel_size == (3, 3):
            m.dilation, m.padding = (dilate,) * 2, (dilate,) * 2


class OfficialDilatedDeepbaseResNet101(nn.Module):  # deepbase_resnet101_dilated8, multi_grid (1, 1, 1)
    def __init__(self):
        super().__init__()
        from collections import OrderedDict
        self.prefix = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, 3, 2, 1, bias=False)), ("bn1", nn.BatchNorm2d(64)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(64, 64, 3, 1, 1, bias=False)), ("bn2", nn.BatchNorm2d(64)), ("relu2", nn.ReLU()),
            ("conv3", nn.Conv2d(64, 128, 3, 1, 1, bias=False)), ("bn3", nn.BatchNorm2d(128)), ("relu3", nn.ReLU())]))
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.inplanes = 128
        self.layer1, self.layer2 = self.make_layer(64, 3), self.make_layer(128, 4, 2)
        self.layer3, self.layer4 = self.make_layer(256, 23, 2), self.make_layer(512, 3, 2)
        self.layer3.apply(lambda m: nostride_dilate(m, 2))
        for block in self.layer4:
            block.apply(lambda m: nostride_dilate(m, 4))

    def make_layer(self, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
        layers = [OfficialBottleneck(self.inplanes, planes, stride, down)]
        self.inplanes = planes * 4
        return nn.Sequential(*layers, *[OfficialBottleneck(self.inplanes, planes) for _ in range(1, blocks)])

    def forward(self, x):
        x = self.layer2(self.layer1(self.maxpool(self.prefix(x))))
        res4 = self.layer3(x)
        return res4, self.layer4(res4)


class OfficialAttention(nn.Module):  # afnb/apnb _SelfAttentionBlock with PSPModule (1, 3, 6, 8)
    def __init__(self, low, high, key, value, out, shared):
        super().__init__()
        self.kc, self.vc = key, value
        self.f_key = nn.Sequential(nn.Conv2d(low, key, 1), bn_relu(key))
        self.f_query = self.f_key if shared else nn.Sequential(nn.Conv2d(high, key, 1), bn_relu(key))
        self.f_value, self.W = nn.Conv2d(low, value, 1), nn.Conv2d(value, out, 1)

    def forward(self, low, high):
        n, _, h, w = high.shape
        psp = lambda x: torch.cat([F.adaptive_avg_pool2d(x, s).view(n, x.shape[1], -1) for s in (1, 3, 6, 8)], -1)
        value = psp(self.f_value(low)).permute(0, 2, 1)
        query = self.f_query(high).view(n, self.kc, -1).permute(0, 2, 1)
        sim = F.softmax(self.kc ** -0.5 * torch.matmul(query, psp(self.f_key(low))), dim=-1)
        context = torch.matmul(sim, value).permute(0, 2, 1).contiguous().view(n, self.vc, h, w)
        return self.W(context)


class OfficialAFNB(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([OfficialAttention(1024, 2048, 256, 256, 2048, shared=False)])
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(4096, 2048, 1), nn.BatchNorm2d(2048), nn.Dropout2d(0.05))

    def forward(self, low, high):
        return self.conv_bn_dropout(torch.cat([self.stages[0](low, high), high], 1))


class OfficialAPNB(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([OfficialAttention(512, 512, 256, 256, 512, shared=True)])
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(1024, 512, 1), bn_relu(512), nn.Dropout2d(0.05))

    def forward(self, x):
        return self.conv_bn_dropout(torch.cat([self.stages[0](x, x), x], 1))


class OfficialANN(nn.Module):  # models/seg/nets/annn.py asymmetric_non_local_network
    def __init__(self, num_classes=19):
        super().__init__()
        self.backbone, self.fusion = OfficialDilatedDeepbaseResNet101(), OfficialAFNB()
        self.context = nn.Sequential(nn.Conv2d(2048, 512, 3, 1, 1), bn_relu(512), OfficialAPNB())
        self.cls = nn.Conv2d(512, num_classes, 1)
        self.dsn = nn.Sequential(nn.Conv2d(1024, 512, 3, 1, 1), bn_relu(512), nn.Dropout2d(0.05),
                                 nn.Conv2d(512, num_classes, 1))

    def forward(self, x_):  # x_: BGR 0-255 minus the mean
        res4, res5 = self.backbone(x_)
        aux = F.interpolate(self.dsn(res4), x_.shape[2:], mode="bilinear", align_corners=True)
        x = F.interpolate(self.cls(self.context(self.fusion(res4, res5))), x_.shape[2:], mode="bilinear",
                          align_corners=True)
        return aux, x


@pytest.fixture(scope="module")
def official_ann():
    torch.manual_seed(0)
    net = OfficialANN().eval()
    with torch.no_grad():  # random BN statistics and a non-zero W, so that every tensor matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, nn.Conv2d):
                m.weight.mul_(0.5 if m.kernel_size == (1, 1) else 1.0)
        for stage in (net.fusion.stages[0], net.context[2].stages[0]):
            nn.init.normal_(stage.W.weight, std=0.01), nn.init.normal_(stage.W.bias, std=0.01)
    return net


def test_ann_released_model_converts_and_matches_the_official_forward(official_ann, tmp_path):
    state = {f"module.{k}": v for k, v in official_ann.state_dict().items()}  # saved from DataParallel
    assert "module.context.2.stages.0.f_query.1.0.running_var" in state  # the shared module is saved twice
    src, dst = tmp_path / "fs_annn_cityscapes_segohem_latest.pth", tmp_path / "ann" / "ckpt.pt"
    save_as_numpy1({"state_dict": state, "config_dict": {}, "runner_state": {"performance": np.float64(0.799)}}, src)
    assert convert.convert("ann", src, dst) == "paper_deepstem"  # preset told from the deep stem
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    import ann
    cfg = ann.Config(**ckpt["config"])
    ours = ann.build_model(cfg, pretrained=False).eval()
    ours.load_state_dict(ckpt["model"])
    n_official = sum(p.numel() for p in official_ann.parameters())  # parameters() counts the shared f_key once
    assert n_official == sum(p.numel() for p in ours.parameters())
    rgb = torch.rand(1, 3, 47, 61)  # odd sizes: the ceil-mode max-pool matters
    bgr = rgb.flip(1) * 255 - torch.tensor(ann.CAFFE_BGR_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        aux_official, main_official = official_ann(bgr)
        main, aux = ours.logits(rgb)
    assert torch.allclose(main, main_official, atol=1e-4, rtol=1e-4)
    assert torch.allclose(aux, aux_official, atol=1e-4, rtol=1e-4)


def test_ann_bad_keys_are_listed(official_ann):
    import ann
    state = dict(official_ann.state_dict())
    state["context.2.stages.0.f_query.0.weight"] = state["context.2.stages.0.f_query.0.weight"] + 1  # not shared
    del state["cls.bias"]
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        ann.convert_official_state_dict(state, ann.PRESETS["paper_deepstem"])
    msg = str(e.value)
    assert "2 unknown, 1 missing" in msg and "head.weight" in msg and "cls.bias (-> net.classifier.bias)" in msg
    assert "f_query.0.weight (differs from its f_key twin)" in msg


def test_ann_deepstem_imagenet_weights_load_from_a_local_file(official_ann, tmp_path):
    """CSAIL's 3x3resnet101-imagenet.pth layout: the official loader puts conv1..3/bn1..3 under `prefix.`."""
    import ann
    imagenet = {k.removeprefix("prefix."): v for k, v in official_ann.backbone.state_dict().items()}
    imagenet.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(imagenet, tmp_path / "3x3resnet101-imagenet.pth")
    backbone = ann.Backbone("deepbase_resnet101", str(tmp_path / "3x3resnet101-imagenet.pth"))
    ours = backbone.state_dict()
    for key, value in official_ann.backbone.state_dict().items():
        assert torch.equal(ours[key.replace("prefix.", "stem.")], value), key


# ----------------------------------------------------------------------------------------------------------------------
# PATN: a plain-PyTorch restatement of the official generator's layout (tengteng95/Pose-Transfer
# models/model_variants.py PATNetwork / PATNModel / PATBlock, networks.py get_norm_layer), its names and its forward
# ----------------------------------------------------------------------------------------------------------------------
def official_norm(kind):  # get_norm_layer: affine BatchNorm (Market) or InstanceNorm without affine (DeepFashion)
    return nn.BatchNorm2d if kind == "batch" else (lambda c: nn.InstanceNorm2d(c, affine=False))


class OfficialPATBlock(nn.Module):
    def __init__(self, dim, norm, bias, dropout, cated):
        super().__init__()
        c = 2 * dim if cated else dim

        def branch(cin, attention):
            layers = [nn.ReflectionPad2d(1), nn.Conv2d(cin, cin, 3, bias=bias), norm(cin), nn.ReLU(True)]
            layers += [nn.Dropout(0.5)] if dropout else []
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(cin, dim, 3, bias=bias)]
            return nn.Sequential(*layers, *([] if attention else [norm(dim)]))

        self.conv_block_stream1, self.conv_block_stream2 = branch(dim, False), branch(c, True)

    def forward(self, x1, x2):
        x1_out, x2_out = self.conv_block_stream1(x1), self.conv_block_stream2(x2)
        out = x1 + x1_out * torch.sigmoid(x2_out)
        return out, torch.cat((x2_out, out), 1)


class OfficialPATNModel(nn.Module):
    def __init__(self, ngf, kind, dropout, n_blocks, pose_nc=36):
        super().__init__()
        norm, bias = official_norm(kind), kind == "instance"

        def down(cin):
            layers = [nn.ReflectionPad2d(3), nn.Conv2d(cin, ngf, 7, bias=bias), norm(ngf), nn.ReLU(True)]
            for mult in (1, 2):
                layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, 2, 1, bias=bias), norm(ngf * mult * 2),
                           nn.ReLU(True)]
            return nn.Sequential(*layers)

        self.stream1_down, self.stream2_down = down(3), down(pose_nc)
        self.att = nn.ModuleList(OfficialPATBlock(4 * ngf, norm, bias, dropout, i > 0) for i in range(n_blocks))
        up = []
        for mult in (4, 2):
            up += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, 2, 1, output_padding=1, bias=bias),
                   norm(ngf * mult // 2), nn.ReLU(True)]
        self.stream1_up = nn.Sequential(*up, nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh())

    def forward(self, x1, x2):
        x1, x2 = self.stream1_down(x1), self.stream2_down(x2)
        for block in self.att:
            x1, x2 = block(x1, x2)
        return self.stream1_up(x1)


class OfficialPATNetwork(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.model = OfficialPATNModel(*args, **kwargs)

    def forward(self, image, poses):
        return self.model(image, poses)


def official_patn(kind, ngf=8, n_blocks=3, dropout=True, seed=0):
    """A small official-layout generator with random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = OfficialPATNetwork(ngf, kind, dropout, n_blocks).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
    return net


def as_pytorch03(net, kind):
    """The state dict as PyTorch 0.3 saved it: BatchNorm without num_batches_tracked; InstanceNorm with its (unused)
    running_mean / running_var buffers."""
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    if kind == "instance":
        for name, m in net.named_modules():
            if isinstance(m, nn.InstanceNorm2d):
                state[f"{name}.running_mean"] = torch.rand(m.num_features)
                state[f"{name}.running_var"] = torch.rand(m.num_features) + 0.5
    return state


def tiny_patn_cfg(kind):
    import pose_transfer
    preset = "market" if kind == "batch" else "deepfashion"
    return dataclasses.replace(pose_transfer.PRESETS[preset], ngf=8, ndf=8, n_blocks=3, image_size=(32, 16),
                               pool_size=2)


@pytest.mark.parametrize("kind", ["batch", "instance"])
def test_patn_released_generator_converts_and_matches_the_official_forward(kind):
    import pose_transfer
    official = official_patn(kind)
    state = as_pytorch03(official, kind)
    assert pose_transfer.official_preset(state) == ("market" if kind == "batch" else "deepfashion")
    cfg = tiny_patn_cfg(kind)
    converted = pose_transfer.convert_official_state_dict(state, cfg)
    ours = pose_transfer.build_model(cfg, pretrained=False).eval()
    ours.load_state_dict(converted)
    m, g = official.model, ours.generator  # specific tensors, placed by hand
    assert torch.equal(g.image_encoder[1].weight, m.stream1_down[1].weight)
    assert torch.equal(g.pose_encoder[7].weight, m.stream2_down[7].weight)
    assert torch.equal(g.blocks[2].conv_P[6].weight, m.att[2].conv_block_stream1[6].weight)  # after the dropout
    assert torch.equal(g.blocks[1].conv_S[6].weight, m.att[1].conv_block_stream2[6].weight)
    assert g.blocks[1].conv_S[6].weight.shape == (32, 64, 3, 3)  # a later block's pose branch: 2C -> C
    assert torch.equal(g.decoder[7].bias, m.stream1_up[7].bias)
    if kind == "batch":
        assert torch.equal(g.blocks[0].conv_P[2].running_var, m.att[0].conv_block_stream1[2].running_var)
        filled = [k for k in converted if k.startswith("generator.") and k.endswith("num_batches_tracked")]
        assert len(filled) == 3 + 3 + 3 * 3 + 2 and all(converted[k] == 0 for k in filled)  # Market: filled
    else:
        assert not any("running" in k for k in converted if k.startswith("generator."))  # DeepFashion: dropped
        assert any(k.endswith("running_mean") for k in state)
    image, poses = torch.rand(2, 3, 32, 16) * 2 - 1, torch.rand(2, 36, 32, 16)
    with torch.no_grad():
        expected = official(image, poses)
        got = ours.generator(image, poses[:, :18], poses[:, 18:])
    assert torch.allclose(got, expected, atol=1e-5)


def test_patn_dropout_modules_and_their_order_match_the_official_generator():
    """Each branch of a block owns its Dropout (18 in the 9-block generator, as the official's), and in train mode,
    under the same seed, the converted generator draws its dropout masks as the official does: same output."""
    import pose_transfer
    with torch.device("meta"):
        official = OfficialPATNetwork(64, "batch", True, 9)
        ours = pose_transfer.PATNGenerator(pose_transfer.PRESETS["market"])
    count = lambda net: sum(isinstance(m, nn.Dropout) for m in net.modules())  # noqa: E731 (modules() dedups)
    assert count(official) == count(ours) == 18
    official, cfg = official_patn("batch"), tiny_patn_cfg("batch")
    ours = pose_transfer.build_model(cfg, pretrained=False)
    ours.load_state_dict(pose_transfer.convert_official_state_dict(as_pytorch03(official, "batch"), cfg))
    official.train(), ours.train()
    image, poses = torch.rand(2, 3, 32, 16) * 2 - 1, torch.rand(2, 36, 32, 16)
    torch.manual_seed(7)
    expected = official(image, poses)
    torch.manual_seed(7)
    got = ours.generator(image, poses[:, :18], poses[:, 18:])
    assert torch.allclose(got, expected, atol=1e-5)


def test_patn_paper_key_list_maps_one_to_one():
    """The full-size official generators (ngf 64, 9 blocks, dropout) map key for key, shape for shape, onto the whole
    generator of our market and deepfashion presets."""
    import pose_transfer
    for kind, preset in (("batch", "market"), ("instance", "deepfashion")):
        with torch.device("meta"):
            official = OfficialPATNetwork(64, kind, True, 9)
            ours = pose_transfer.build_model(pose_transfer.PRESETS[preset], pretrained=False).state_dict()
        state = as_pytorch03(official, "batch")  # shapes only (no InstanceNorm statistics: what the tool leaves)
        assert pose_transfer.official_preset(state) == preset
        mapped = {pose_transfer.official_name_to_ours(k): v.shape for k, v in state.items()}
        generator = {k: v.shape for k, v in ours.items()
                     if k.startswith("generator.") and not k.endswith("num_batches_tracked")}
        assert mapped == generator
        assert sum(v.numel() for k, v in state.items() if "running" not in k) == sum(
            p.numel() for p in pose_transfer.PATNGenerator(pose_transfer.PRESETS[preset]).parameters())


def test_patn_bad_keys_are_listed():
    import pose_transfer
    cfg = tiny_patn_cfg("batch")
    state = as_pytorch03(official_patn("batch"), "batch")
    del state["model.stream1_up.7.bias"]
    state["model.att.3.conv_block_stream1.1.weight"] = torch.zeros(32, 32, 3, 3)  # a 4th block: cfg has 3
    state["model.stream1_down.1.weight"] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(ValueError) as e:
        pose_transfer.convert_official_state_dict(state, cfg)
    msg = str(e.value)
    assert "1 unknown, 2 missing, 1 mis-shaped" in msg and "model.att.3.conv_block_stream1.1.weight" in msg
    assert "model.stream1_up.7.bias (-> generator.decoder.7.bias)" in msg  # missing: the released name, and ours
    assert "model.stream1_down.1.weight (-> generator.image_encoder.1.weight)" in msg
    no_dropout = as_pytorch03(official_patn("batch", dropout=False), "batch")  # second convs at index 5, not 6
    with pytest.raises(ValueError, match="--no_dropout"):
        pose_transfer.convert_official_state_dict(no_dropout, cfg)
    assert pose_transfer.convert_official_state_dict(no_dropout, dataclasses.replace(cfg, dropout=0.0))


def test_convert_py_writes_a_pose_transfer_checkpoint(tmp_path, monkeypatch):
    import pose_transfer
    official = official_patn("instance")
    src, dst = tmp_path / "latest_net_netG.pth", tmp_path / "patn" / "ckpt.pt"
    torch.save(as_pytorch03(official, "instance"), src)
    monkeypatch.setattr(pose_transfer, "PRESETS", {**pose_transfer.PRESETS, "tiny": tiny_patn_cfg("instance")})
    assert convert.convert("pose_transfer", src, dst, preset="tiny") == "tiny"
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    model = pose_transfer.build_model(pose_transfer.Config(**ckpt["config"]), pretrained=False).eval()
    model.load_state_dict(ckpt["model"])  # strict, as eval.py loads it
    batch = {"source": torch.rand(1, 3, 32, 16), "source_pose": torch.rand(1, 18, 32, 16),
             "target_pose": torch.rand(1, 18, 32, 16)}
    with torch.no_grad():
        expected = (official(batch["source"] * 2 - 1, torch.cat([batch["source_pose"], batch["target_pose"]], 1))
                    .clamp(-1, 1) + 1) / 2
    assert torch.allclose(model.predict(batch), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# zsseg: the released detectron2 MaskFormer checkpoints, key names and shapes restated from MendelXu/zsseg.baseline
# (heads/pixel_decoder.py BasePixelDecoder, transformer/{transformer_predictor, zero_shot_transformer_predictor,
# transformer}.py, clip_adapter/{adapter, text_prompt}.py, criterion.py) and detectron2's projects/deeplab/resnet.py
# ----------------------------------------------------------------------------------------------------------------------
def official_zsseg_shapes(cfg, clip_shapes, learned_prompt, num_classes=156):
    """{official key: shape} of a released zsseg model for `cfg` (R101c backbone), given the CLIP's {key: shape}."""
    shapes = {}

    def conv_norm(name, cout, cin, k):  # detectron2 Conv2d(bias=False, norm=FrozenBN)
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes.update({f"{name}.norm.{b}": (cout,) for b in ("weight", "bias", "running_mean", "running_var")})

    conv_norm("backbone.stem.conv1", 64, 3, 3), conv_norm("backbone.stem.conv2", 64, 64, 3)
    conv_norm("backbone.stem.conv3", 128, 64, 3)
    cin = 128
    for stage, blocks, width in ((2, 3, 64), (3, 4, 128), (4, 23, 256), (5, 3, 512)):
        for i in range(blocks):
            b = f"backbone.res{stage}.{i}"
            if i == 0:
                conv_norm(f"{b}.shortcut", 4 * width, cin, 1)
            conv_norm(f"{b}.conv1", width, cin if i == 0 else 4 * width, 1)
            conv_norm(f"{b}.conv2", width, width, 3), conv_norm(f"{b}.conv3", 4 * width, width, 1)
        cin = 4 * width
    C, M, E, Q, FF = cfg.conv_dim, cfg.mask_dim, cfg.hidden_dim, cfg.num_queries, cfg.dim_feedforward
    pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
    for i, (cin, k) in enumerate(((256, 1), (512, 1), (1024, 1), (2048, 3)), start=1):  # Conv2d(bias=False, GN)
        if i < 4:
            shapes.update({f"{pd}adapter_{i}.weight": (C, cin, 1, 1), f"{pd}adapter_{i}.norm.weight": (C,),
                           f"{pd}adapter_{i}.norm.bias": (C,)})
        shapes.update({f"{pd}layer_{i}.weight": (C, C if i < 4 else cin, 3, 3), f"{pd}layer_{i}.norm.weight": (C,),
                       f"{pd}layer_{i}.norm.bias": (C,)})
    shapes.update({pd + "mask_features.weight": (M, C, 3, 3), pd + "mask_features.bias": (M,),
                   pr + "query_embed.weight": (Q, E), pr + "input_proj.weight": (E, 2048, 1, 1),
                   pr + "input_proj.bias": (E,)})
    for i in range(cfg.dec_layers):  # DETR TransformerDecoderLayer
        d = f"{pr}transformer.decoder.layers.{i}."
        for attn in ("self_attn", "multihead_attn"):
            shapes.update({f"{d}{attn}.in_proj_weight": (3 * E, E), f"{d}{attn}.in_proj_bias": (3 * E,),
                           f"{d}{attn}.out_proj.weight": (E, E), f"{d}{attn}.out_proj.bias": (E,)})
        shapes.update({d + "linear1.weight": (FF, E), d + "linear1.bias": (FF,), d + "linear2.weight": (E, FF),
                       d + "linear2.bias": (E,)})
        shapes.update({f"{d}norm{n}.{p}": (E,) for n in (1, 2, 3) for p in ("weight", "bias")})
    shapes.update({pr + "transformer.decoder.norm.weight": (E,), pr + "transformer.decoder.norm.bias": (E,)})
    D, H = clip_shapes["text_projection"][1], cfg.embed_hidden_dim
    for n, (a, b) in enumerate(((E, E), (E, E), (E, M))):
        shapes.update({f"{pr}mask_embed.layers.{n}.weight": (b, a), f"{pr}mask_embed.layers.{n}.bias": (b,)})
    for n, (a, b) in enumerate(((E, H), (H, D))):
        shapes.update({f"{pr}class_embed.layers.{n}.weight": (b, a), f"{pr}class_embed.layers.{n}.bias": (b,)})
    shapes.update({f"clip_adapter.clip_model.{k}": s for k, s in clip_shapes.items()})
    shapes.update({"clip_adapter.non_object_embedding": (1, D), "clip_adapter.pixel_mean": (1, 3, 1, 1),
                   "clip_adapter.pixel_std": (1, 3, 1, 1), "criterion.empty_weight": (num_classes + 1,)})
    if learned_prompt:  # LearnablePromptExtractor: PROMPT_SHAPE (16, 0), so no suffix_prompt; 4 token-embedding buffers
        width = clip_shapes["token_embedding.weight"][1]
        shapes["clip_adapter.prompt_learner.prefix_prompt"] = (cfg.prompt_ctx, width)
        shapes.update({f"clip_adapter.prompt_learner.{s}_signal": (1, width) for s in ("start", "dot", "end", "pad")})
    return shapes


def official_r101c(o, x):
    """detectron2's DeepLab ResNet-101 forward (FrozenBN; stride in the 3x3; res5 dilations 1, 2, 4 at stride 2),
    on the official tensors `o` -> [res2, res3, res4, res5]."""
    def conv_norm(x, name, stride=1, padding=0, dilation=1, relu=True):
        x = F.conv2d(x, o[name + ".weight"], None, stride, padding, dilation)
        n = name + ".norm."
        x = F.batch_norm(x, o[n + "running_mean"], o[n + "running_var"], o[n + "weight"], o[n + "bias"], False, 0, 1e-5)
        return F.relu(x) if relu else x

    for i, stride in ((1, 2), (2, 1), (3, 1)):
        x = conv_norm(x, f"backbone.stem.conv{i}", stride, 1)
    x, feats = F.max_pool2d(x, 3, 2, 1), []
    for stage, blocks in ((2, 3), (3, 4), (4, 23), (5, 3)):
        for i in range(blocks):
            b, stride = f"backbone.res{stage}.{i}.", 2 if i == 0 and stage > 2 else 1
            dilation = (1, 2, 4)[i] if stage == 5 else 1
            out = conv_norm(conv_norm(x, b + "conv1"), b + "conv2", stride, dilation, dilation)
            out = conv_norm(out, b + "conv3", relu=False)
            x = F.relu(out + (conv_norm(x, b + "shortcut", stride, relu=False) if i == 0 else x))
        feats.append(x)
    return feats


@pytest.fixture(scope="module")
def tiny_zsseg(tmp_path_factory):
    """A small zsseg head on the real R101c and a tiny random CLIP, and a random released-layout state dict for it."""
    import zsseg
    tmp = tmp_path_factory.mktemp("zsseg")
    (tmp / "tiny_clip.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    clip_state = open_clip.model.CLIP(**TINY_CLIP).state_dict()
    cfg = dataclasses.replace(
        zsseg.PRESETS["paper_coco_r101c"], clip_model=str(tmp / "tiny_clip.json"), clip_pretrained="unused",
        clip_quick_gelu=False, prompt_ctx=4, conv_dim=64, mask_dim=32, hidden_dim=64, num_queries=8, dec_layers=2,
        nheads=4, dim_feedforward=128, embed_hidden_dim=96)
    shapes = official_zsseg_shapes(cfg, {k: tuple(v.shape) for k, v in clip_state.items()}, learned_prompt=True)
    g = torch.Generator().manual_seed(1)
    official = {}
    for k, s in shapes.items():
        if k.endswith("norm.running_var"):
            official[k] = torch.rand(s, generator=g) + 0.5
        elif ".norm." in k and k.startswith("backbone.") and k.endswith("weight"):
            official[k] = torch.rand(s, generator=g) * 0.3 + 0.1  # keeps 33 residual blocks' activations moderate
        elif len(s) == 4 and k.startswith("backbone."):
            official[k] = torch.randn(s, generator=g) * (2 / (s[1] * s[2] * s[3])) ** 0.5
        else:
            official[k] = torch.randn(s, generator=g) * 0.1
    return cfg, official, tmp


def test_zsseg_released_model_converts_every_tensor_to_its_place(tiny_zsseg):
    import zsseg
    cfg, official, _ = tiny_zsseg
    assert zsseg.official_preset(official) == "paper_coco_r101c"
    state = zsseg.convert_official_state_dict({"model": official, "iteration": 59999}, cfg)
    used = {k: v for k, v in official.items() if not zsseg.OFFICIAL_UNUSED.fullmatch(k)}
    assert len(used) == len(official) - 7  # empty_weight, pixel_mean / std, the learned prompt's 4 token buffers
    assert {v.data_ptr() for v in state.values()} == {v.data_ptr() for v in used.values()}  # one to one
    wrapper = zsseg.build_model(cfg, pretrained=False).eval()
    wrapper.load_state_dict(state)
    net, o = wrapper.net, {k.replace("sem_seg_head.", "H.").replace("transformer.decoder.", "D."): v
                           for k, v in official.items()}
    for ours, theirs in (  # specific tensors, by attribute
            (net.pixel_decoder.top[0].weight, o["H.pixel_decoder.layer_4.weight"]),
            (net.pixel_decoder.lateral[0][1].weight, o["H.pixel_decoder.adapter_1.norm.weight"]),
            (net.pixel_decoder.output[2][0].weight, o["H.pixel_decoder.layer_3.weight"]),
            (net.pixel_decoder.mask_features.bias, o["H.pixel_decoder.mask_features.bias"]),
            (net.input_proj.weight, o["H.predictor.input_proj.weight"]),
            (net.query_embed.weight, o["H.predictor.query_embed.weight"]),
            (net.layers[1].cross_attn.in_proj_weight, o["H.predictor.D.layers.1.multihead_attn.in_proj_weight"]),
            (net.layers[0].self_attn.out_proj.bias, o["H.predictor.D.layers.0.self_attn.out_proj.bias"]),
            (net.layers[1].ffn[0].weight, o["H.predictor.D.layers.1.linear1.weight"]),
            (net.layers[0].ffn[3].bias, o["H.predictor.D.layers.0.linear2.bias"]),
            (net.layers[1].norms[2].weight, o["H.predictor.D.layers.1.norm3.weight"]),
            (net.decoder_norm.bias, o["H.predictor.D.norm.bias"]),
            (net.mask_embed.layers[2].weight, o["H.predictor.mask_embed.layers.2.weight"]),
            (net.class_embed.layers[1].weight, o["H.predictor.class_embed.layers.1.weight"]),
            (net.non_object, o["clip_adapter.non_object_embedding"]),
            (wrapper.prompt.ctx, o["clip_adapter.prompt_learner.prefix_prompt"]),
            (wrapper.clip.visual.conv1.weight, o["clip_adapter.clip_model.visual.conv1.weight"]),
            (wrapper.clip.token_embedding.weight, o["clip_adapter.clip_model.token_embedding.weight"]),
            (net.backbone.stem.bn3.running_var, o["backbone.stem.conv3.norm.running_var"]),
            (net.backbone.layer4[0].downsample[1].bias, o["backbone.res5.0.shortcut.norm.bias"])):
        assert torch.equal(ours, theirs)
    image = torch.rand(1, 3, 64, 96)  # the backbone, against detectron2's DeepLab ResNet on the official tensors
    x = (image - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = zsseg.backbone_features(net.backbone, x), official_r101c(official, x)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert ours[-1].shape == (1, 2048, 2, 3)  # res5 at stride 32 (multi-grid dilation, not output stride 16)


def test_zsseg_paper_key_lists_map_one_to_one(monkeypatch):
    """Both released layouts at full size (R101c, ViT-B/16 CLIP, the paper head) map key for key and shape for shape
    onto our presets paper_coco_r101c (learned prompt) and paper_cross_r101c (ViLD)."""
    import zsseg
    create = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **kw: create(*a, **kw, device="meta"))
    for preset, learned in (("paper_coco_r101c", True), ("paper_cross_r101c", False)):
        cfg = zsseg.PRESETS[preset]
        with torch.device("meta"):
            ours = zsseg.build_model(cfg, pretrained=False).state_dict()
        clip_shapes = {k[len("clip."):]: tuple(v.shape) for k, v in ours.items() if k.startswith("clip.")}
        official = official_zsseg_shapes(cfg, clip_shapes, learned, num_classes=156)
        assert zsseg.official_preset({k: torch.empty(s, device="meta") for k, s in official.items()}) == preset
        mapped = {zsseg.official_name_to_ours(k): s for k, s in official.items()
                  if not zsseg.OFFICIAL_UNUSED.fullmatch(k)}
        assert mapped == {k: tuple(v.shape) for k, v in ours.items()}


def test_zsseg_bad_keys_are_listed(tiny_zsseg):
    import zsseg
    cfg, official, _ = tiny_zsseg
    broken = dict(official)
    broken["_region_clip_adapter.non_object_embedding"] = torch.zeros(1, 64)  # SEPERATE_ADAPTER: not ours
    del broken["sem_seg_head.predictor.transformer.decoder.norm.bias"]
    del broken["backbone.res4.0.conv2.norm.running_var"]  # a rule with an index shift (res4 = layer3)
    broken["clip_adapter.non_object_embedding"] = torch.zeros(1, 7)
    with pytest.raises(ValueError) as e:
        zsseg.convert_official_state_dict(broken, cfg)
    msg = str(e.value)
    assert "1 unknown, 3 missing, 1 mis-shaped" in msg and "_region_clip_adapter.non_object_embedding" in msg
    assert "sem_seg_head.predictor.transformer.decoder.norm.bias (-> net.decoder_norm.bias)" in msg
    assert "backbone.res4.0.conv2.norm.running_var (-> net.backbone.layer3.0.bn2.running_var)" in msg
    assert "clip_adapter.non_object_embedding (-> net.non_object)" in msg
    with pytest.raises(ValueError, match="need backbone='resnet101c'"):  # our torchvision ResNet has a 7x7 stem
        zsseg.convert_official_state_dict(official, dataclasses.replace(cfg, backbone="resnet101"))
    assert zsseg.official_preset({"backbone.stem.conv1.weight": torch.empty(64, 3, 7, 7)}) is None  # R50 basic stem


def test_convert_py_writes_a_zsseg_checkpoint_that_segments(tiny_zsseg, monkeypatch):
    import zsseg
    cfg, official, tmp = tiny_zsseg
    src, dst = tmp / "zsseg_released.pth", tmp / "out" / "ckpt.pt"
    torch.save({"model": official, "iteration": 1}, src)
    monkeypatch.setattr(zsseg, "PRESETS", {**zsseg.PRESETS, "tiny": cfg})
    assert convert.convert("zsseg", src, dst, preset="tiny") == "tiny"
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    assert len(ckpt["config"]["class_names"]) == 156  # the seen COCO-Stuff vocabulary, stored with the weights
    wrapper = zsseg.build_model(zsseg.Config(**ckpt["config"]), pretrained=False).eval()
    wrapper.load_state_dict(ckpt["model"])  # strict, as eval.py loads it
    assert wrapper.predict({"image": torch.rand(1, 3, 64, 64)}, ["cat", "grass"]).shape == (1, 2, 64, 64)
