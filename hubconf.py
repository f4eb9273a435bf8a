"""torch.hub entry points: each paper's model in one line, with the authors' released weights converted on the fly.

    import torch
    print(torch.hub.list("OWNER/REPO"))                      # the entries below
    print(torch.hub.help("OWNER/REPO", "san_vit_b16"))       # what it is, its paper and published numbers
    model = torch.hub.load("OWNER/REPO", "san_vit_b16", weights="official")   # downloads SAN's file once
    model = torch.hub.load("path/to/checkout", "patn_market", source="local", weights="latest_net_netG.pth")

An entry builds its model file's paper preset (`build_model(cfg, pretrained=False)`), fills it from the released file
through convert.py (`convert.convert_released`: convert.py's reader, then the model file's own key table), and returns
the model in eval mode, the object `eval.py` runs: call `model.predict(batch, vocab=...)` as its docstring says.
`weights=` takes a local path; an http(s):// or file:// URL, downloaded once into torch.hub's checkpoint cache
(<torch.hub.get_dir()>/checkpoints, with its progress bar, as torch.hub.load_state_dict_from_url caches; the file is
then read by convert.py rather than by load_state_dict_from_url's own torch.load, so that a wrong or corrupt file
stops with convert.py's one-line message); "official" where the authors host the file at a direct URL (SAN); or None,
the architecture with random weights (a warning says so). Other keyword arguments replace fields of the paper Config
(e.g. `test_short_side=0` to segment at the native size); the released weights need the paper's network sizes.

A missing, wrong or corrupt file raises the exception convert.py prints (FileNotFoundError or ValueError, one line).
Importing this file is light: a model file (and open_clip) is imported when its entry is called.
"""
import dataclasses
import os
import urllib.error
import urllib.parse
import warnings

import torch

dependencies = ["torch", "torchvision", "open_clip", "numpy", "scipy", "PIL"]

_SAN_HUB = "https://huggingface.co/Mendel192/san/resolve/main/"  # the official README's links, as direct downloads
_ANN_DRIVE = "https://drive.google.com/open?id=1lw4g41l8tX3XZsdW3WuDGDSxiI77Fw13"
_ZSSEG_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
_PATN_DRIVE = "https://drive.google.com/open?id=1YMsYXc41dR3k8YroXeWGh9zweNUQmZBw"
# entry -> (model file, paper preset, direct URL of the released file, or else the page a browser gets it from);
# neither: an architecture-only entry (its weights= takes a checkpoint of this project's train.py)
_ENTRIES = {
    "san_vit_b16": ("san", "paper", _SAN_HUB + "san_vit_b_16.pth", None),
    "san_vit_l14_336": ("san", "paper_l14", _SAN_HUB + "san_vit_large_14.pth", None),
    "ann_cityscapes": ("ann", "paper_deepstem", None, f"the official README's Google Drive link {_ANN_DRIVE}"),
    "zsseg_zero_shot": ("zsseg", "paper_coco_r101c", None, "the official README's Google Drive link "
                        + _ZSSEG_DRIVE.format("1jDmR4fL5Wm0UyMDd5LhsOl6T2RX2X9R5")),
    "zsseg_cross_dataset": ("zsseg", "paper_cross_r101c", None, "the official README's Google Drive link "
                            + _ZSSEG_DRIVE.format("1pb6UeXoMPy5xdEBtFcQYLOBKZt0xufKY")),
    "patn_market": ("pose_transfer", "market", None, f"market_PATN/ in the official README's Google Drive folder "
                    f"{_PATN_DRIVE}"),
    "patn_deepfashion": ("pose_transfer", "deepfashion", None, f"fashion_PATN/ in the official README's Google "
                         f"Drive folder {_PATN_DRIVE}"),
    "soft_teacher_r50_fpn": ("soft_teacher", "paper", None, None),  # docs/soft_teacher.md says why not converted
    "mixtraining_r50_fpn": ("mixtraining", "paper", None, None),
}


def _download(url):
    """The file at `url` in torch.hub's checkpoint cache (downloaded once, with a progress bar) -> its path."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, cached, progress=True)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            kind = FileNotFoundError if isinstance(reason, FileNotFoundError) else ConnectionError
            advice = "" if url.startswith("file:") else "; download it yourself and pass weights=PATH"
            raise kind(f"could not download {url} ({reason}){advice}") from None
    return cached


def _local_path(entry, weights):
    """weights= -> a local file: "official" is the authors' direct URL; a URL is downloaded into torch.hub's cache."""
    url, page = _ENTRIES[entry][2:]
    if weights == "official":
        if page:
            raise ValueError(f"{entry}: the authors' file is on {page}, which needs a browser: download it and pass "
                             "weights=PATH")
        if not url:
            raise ValueError(f"{entry}: no released weights convert into this model (docs/soft_teacher.md says why); "
                             "weights= takes a checkpoint written by this project's train.py")
        weights = url
    return _download(weights) if "://" in str(weights) else os.fspath(weights)


def _load(entry, weights, config):
    """The entry's model in eval mode: the paper preset with `config` fields replaced, weights from `weights`."""
    import convert  # convert.py and checkpoint.py import torch only; the model file comes with load_model_module
    from checkpoint import config_from_checkpoint, load_checkpoint, load_model_module
    name, preset, url, page = _ENTRIES[entry]
    module = load_model_module(name)
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(module.Config)})
    if unknown:
        raise TypeError(f"{entry}: {', '.join(unknown)} not a field of {name}.Config (keyword arguments other than "
                        f"weights replace Config fields; see {name}.py)")
    try:
        if weights is None:
            warnings.warn(f"{entry}: weights=None, so every weight of the model is random (nothing was read or "
                          f"downloaded); torch.hub.help(..., {entry!r}) says which weights= to pass", stacklevel=3)
            cfg, state = convert.released_config(module, preset, **config), None
        elif url or page:  # the authors' file, read and converted by convert.py
            _, cfg, state = convert.convert_released(name, _local_path(entry, weights), preset, **config)
        else:  # architecture only: a checkpoint of ours, loaded as eval.py loads it
            ckpt = load_checkpoint(_local_path(entry, weights), name)
            cfg, state = dataclasses.replace(config_from_checkpoint(module, ckpt), **config), ckpt["model"]
        model = module.build_model(cfg, pretrained=False)
    except (FileNotFoundError, ConnectionError, ValueError) as e:  # convert.py's message, without its inner frames
        raise type(e)(str(e)) from None
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Open-vocabulary semantic segmentation: model.predict({"image": (B, 3, H, W) RGB in [0, 1]}, vocab=[K names])
# -> (B, K, H, W) class scores; vocab=None uses the training vocabulary (COCO-Stuff) stored in model.cfg.class_names
# ----------------------------------------------------------------------------------------------------------------------
def san_vit_b16(weights=None, **config):
    """SAN, Side Adapter Network, ViT-B/16 CLIP: open-vocabulary semantic segmentation (san.py, preset "paper").

    Paper: Xu, Zhang, Wei, Hu, Bai, "Side Adapter Network for Open-Vocabulary Semantic Segmentation", CVPR 2023,
    arXiv 2302.12242; official code MendelXu/SAN. Trained on COCO-Stuff-171; any vocabulary at test time.
    Published (official log of this file, mIoU): COCO-171 41.93, VOC-20 93.95, PC-59 54.07, ADE-150 27.56,
    PC-459 16.71, ADE-847 10.21 (paper Table 2: ADE-847 10.1, PC-459 12.6, ADE-150 27.5, PC-59 53.8, VOC-20 94.0).
    weights: "official" downloads san_vit_b_16.pth from huggingface.co/Mendel192/san (once, cached); or a local path
    or URL of that file; None = random weights. The file holds the whole CLIP: nothing else is downloaded.
    Use: model.predict({"image": img[None]}, vocab=["cat", "sofa", "wall"]) -> (1, 3, H, W) scores; argmax(1) labels.
    Images are resized to short side 640 inside (the official test protocol; test_short_side=0 keeps the size)."""
    return _load("san_vit_b16", weights, config)


def san_vit_l14_336(weights=None, **config):
    """SAN, Side Adapter Network, ViT-L/14-336 CLIP: open-vocabulary semantic segmentation (san.py, "paper_l14").

    Paper: Xu, Zhang, Wei, Hu, Bai, "Side Adapter Network for Open-Vocabulary Semantic Segmentation", CVPR 2023,
    arXiv 2302.12242; official code MendelXu/SAN. Trained on COCO-Stuff-171; any vocabulary at test time.
    Published (official log of this file, mIoU): COCO-171 45.57, VOC-20 95.18, PC-59 57.53, ADE-150 31.93,
    PC-459 20.83, ADE-847 12.96.
    weights: "official" downloads san_vit_large_14.pth from huggingface.co/Mendel192/san (once, cached); or a local
    path or URL of that file; None = random weights. The file holds the whole CLIP: nothing else is downloaded.
    Use: model.predict({"image": img[None]}, vocab=["cat", "sofa", "wall"]) -> (1, 3, H, W) scores; argmax(1) labels.
    Images are resized to short side 640 inside (the official test protocol; test_short_side=0 keeps the size)."""
    return _load("san_vit_l14_336", weights, config)


def zsseg_zero_shot(weights=None, **config):
    """zsseg (SimBaseline), zero-shot model: MaskFormer proposals on R101c classified by CLIP ViT-B/16 crops, learned
    prompts; COCO-Stuff 156 seen classes (zsseg.py, preset "paper_coco_r101c").

    Paper: Xu, Zhang, Wei, Lin, Cao, Hu, Bai, "A Simple Baseline for Open-Vocabulary Semantic Segmentation with
    Pre-trained Vision-language Model", ECCV 2022, arXiv 2112.14757; official code MendelXu/zsseg.baseline.
    Published: COCO-Stuff seen / unseen / harmonic mIoU 39.3 / 36.3 / 37.8 (paper); this released model 37.7 / 36.8
    seen / unseen (official issue #21).
    weights: the local path of the file behind the official README's Google Drive link
    https://drive.google.com/file/d/1jDmR4fL5Wm0UyMDd5LhsOl6T2RX2X9R5/view?usp=sharing (Drive needs a browser, so
    there is no "official" download); None = random weights.
    Use: model.predict({"image": img[None]}, vocab=[...]) -> (1, K, H, W) scores; vocab=None: the 156 seen classes."""
    return _load("zsseg_zero_shot", weights, config)


def zsseg_cross_dataset(weights=None, **config):
    """zsseg (SimBaseline), cross-dataset model: MaskFormer proposals on R101c classified by CLIP ViT-B/16 crops, ViLD
    prompts, 120k iterations on the 156 seen COCO-Stuff classes (zsseg.py, preset "paper_cross_r101c").

    Paper: Xu, Zhang, Wei, Lin, Cao, Hu, Bai, "A Simple Baseline for Open-Vocabulary Semantic Segmentation with
    Pre-trained Vision-language Model", ECCV 2022, arXiv 2112.14757; official code MendelXu/zsseg.baseline.
    Published: mIoU ADE-847 7.0, ADE-150 20.5, PC-59 47.7, VOC-20 88.4 (the paper, as cited by SAN).
    weights: the local path of the file behind the official README's Google Drive link
    https://drive.google.com/file/d/1pb6UeXoMPy5xdEBtFcQYLOBKZt0xufKY/view?usp=sharing (Drive needs a browser, so
    there is no "official" download); None = random weights.
    Use: model.predict({"image": img[None]}, vocab=[...]) -> (1, K, H, W) scores; vocab=None: the 156 seen classes."""
    return _load("zsseg_cross_dataset", weights, config)


# ----------------------------------------------------------------------------------------------------------------------
# Closed-vocabulary semantic segmentation
# ----------------------------------------------------------------------------------------------------------------------
def ann_cityscapes(weights=None, **config):
    """ANN, Asymmetric Non-local Network, Cityscapes model: deep-stem ResNet-101 (dilated, stride 8) + AFNB + APNB,
    19 classes (ann.py, preset "paper_deepstem").

    Paper: Zhu, Xu, Bai, Huang, Bai, "Asymmetric Non-local Neural Networks for Semantic Segmentation", ICCV 2019,
    arXiv 1908.07678; official code MendelXu/ANN. Published: 79.9 mIoU, Cityscapes val, single scale.
    weights: the local path of fs_annn_cityscapes_segohem_latest.pth, from the official README's Google Drive link
    https://drive.google.com/open?id=1lw4g41l8tX3XZsdW3WuDGDSxiI77Fw13 (Drive needs a browser, so there is no
    "official" download); None = random weights.
    Use: model.predict({"image": img[None]}) -> (1, 19, H, W) softmax scores (RGB in [0, 1]; the model flips to the
    official BGR input inside), whole image, as the official ss_test; the 19 Cityscapes train classes in their usual
    order (road, sidewalk, building, wall, fence, pole, traffic light, ..., bicycle)."""
    return _load("ann_cityscapes", weights, config)


# ----------------------------------------------------------------------------------------------------------------------
# Pose transfer: model.predict({"source": (B, 3, H, W) in [0, 1], "source_pose", "target_pose": (B, 18, H, W)
# keypoint heatmaps}) -> (B, 3, H, W) the person of `source` in the target pose
# ----------------------------------------------------------------------------------------------------------------------
def patn_market(weights=None, **config):
    """PATN, Progressive Pose Attention Transfer, Market-1501 generator, 128 x 64 (pose_transfer.py, "market").

    Paper: Zhu, Huang, Shi, Yu, Wang, Bai, "Progressive Pose Attention Transfer for Person Image Generation", CVPR
    2019, arXiv 1904.03349; official code tengteng95/Pose-Transfer. Published: SSIM 0.311, IS 3.323, mask-SSIM
    0.811, mask-IS 3.773 (paper); the released model on PyTorch 0.4 / 1.1, official issues #27 / #31: SSIM 0.281,
    IS 3.16.
    weights: the local path of latest_net_netG.pth in market_PATN/ of the official README's Google Drive folder
    https://drive.google.com/open?id=1YMsYXc41dR3k8YroXeWGh9zweNUQmZBw (Drive needs a browser, so there is no
    "official" download); None = random weights. The release holds the generator only: the discriminators and VGG
    layers of the returned wrapper are random and unused by predict.
    Use: model.predict({"source": img[None], "source_pose": hs[None], "target_pose": ht[None]}) -> (1, 3, 128, 64) in
    [0, 1]; hs, ht: (18, 128, 64) Gaussian heatmaps (sigma 6 px) of the COCO-18 keypoints, as data.keypoint_heatmaps."""
    return _load("patn_market", weights, config)


def patn_deepfashion(weights=None, **config):
    """PATN, Progressive Pose Attention Transfer, DeepFashion generator, 256 x 176 (pose_transfer.py, "deepfashion").

    Paper: Zhu, Huang, Shi, Yu, Wang, Bai, "Progressive Pose Attention Transfer for Person Image Generation", CVPR
    2019, arXiv 1904.03349; official code tengteng95/Pose-Transfer. Published: SSIM 0.773, IS 3.209 (paper; SSIM after
    the official 40-px white re-padding).
    weights: the local path of latest_net_netG.pth in fashion_PATN/ of the official README's Google Drive folder
    https://drive.google.com/open?id=1YMsYXc41dR3k8YroXeWGh9zweNUQmZBw (Drive needs a browser, so there is no
    "official" download); None = random weights. The release holds the generator only: the discriminators and VGG
    layers of the returned wrapper are random and unused by predict.
    Use: model.predict({"source": img[None], "source_pose": hs[None], "target_pose": ht[None]}) -> (1, 3, 256, 176)
    in [0, 1]; hs, ht: (18, 256, 176) Gaussian heatmaps (sigma 6 px) of the COCO-18 keypoints, as
    data.keypoint_heatmaps."""
    return _load("patn_deepfashion", weights, config)


# ----------------------------------------------------------------------------------------------------------------------
# Object detection, architecture only: model.predict({"image": (B, 3, H, W) in [0, 1]}) -> per image {"boxes" (N, 4)
# xyxy pixels, "labels" (N,) 0..79, "scores" (N,)}
# ----------------------------------------------------------------------------------------------------------------------
def soft_teacher_r50_fpn(weights=None, **config):
    """Soft Teacher's detector: Faster R-CNN R50-FPN (torchvision) with mmdet's settings, the student and its EMA
    teacher (soft_teacher.py, preset "paper"). Architecture only: the authors' mmdet checkpoints are not converted
    (docs/soft_teacher.md, Released weights, says why).

    Paper: Xu, Zhang, Hu, Wang, Wang, Wei, Bai, Liu, "End-to-End Semi-Supervised Object Detection with Soft Teacher",
    ICCV 2021, arXiv 2106.09018; official code microsoft/SoftTeacher. Published, COCO val2017 mAP: 10% labelled
    34.04 (supervised 26.94), 5% 30.74, 1% 20.46; full COCO + unlabeled2017 44.5 (supervised 40.9).
    weights: None = random weights (train it with `python train.py --model soft_teacher --preset paper`); or the path
    or URL of a checkpoint of soft_teacher written by this project's train.py (its stored config is used).
    Use: model.predict({"image": img[None]}) -> [{"boxes", "labels", "scores"}], the student's detections."""
    return _load("soft_teacher_r50_fpn", weights, config)


def mixtraining_r50_fpn(weights=None, **config):
    """MixTraining's detector: Faster R-CNN R50-FPN (torchvision) with mmdet's settings, the student and its EMA
    teacher (mixtraining.py, preset "paper"). Architecture only: the authors' mmdet checkpoints are not converted
    (docs/soft_teacher.md, Released weights, says why).

    Paper: Xu, Zhang, Wei, Lin, Cao, Lin, Hu, Bai, "Bootstrap Your Object Detector via Mixed Training", NeurIPS 2021,
    arXiv 2111.03056; official code MendelXu/MixTraining. Published: COCO mAP 41.7 -> 44.0 (Faster R-CNN R50-FPN, no
    extra data).
    weights: None = random weights (train it with `python train.py --model mixtraining --preset paper`); or the path
    or URL of a checkpoint of mixtraining written by this project's train.py (its stored config is used).
    Use: model.predict({"image": img[None]}) -> [{"boxes", "labels", "scores"}], the student's detections."""
    return _load("mixtraining_r50_fpn", weights, config)


if __name__ == "__main__":  # python hubconf.py: the entries of a local checkout (torch.hub.list/help need GitHub)
    for _name in _ENTRIES:
        print(f"{_name}: {' '.join(globals()[_name].__doc__.split(chr(10) + chr(10))[0].split())}")
