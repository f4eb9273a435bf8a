"""data.py: the synthetic datasets, and the real loaders against tiny fixture folders in the exact real layouts."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import IGNORE, IGNORE_16BIT

H, W = 30, 40  # fixture image size


def cfg(root, crop=64, base=0, scale=(1.0, 1.0)):
    return SimpleNamespace(data_root=str(root), crop_size=crop, base_size=base, scale_range=scale)


def write_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_label(path, values, dtype=np.uint8):
    """A (H, W) label map made of vertical stripes of `values`; PNG for uint8, 16-bit TIFF (mode I;16) for uint16."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.array(values, dtype)[np.arange(W) * len(values) // W][None].repeat(H, 0)
    Image.fromarray(label).save(path)
    return label


def stripes(values):
    return torch.tensor(values)[torch.arange(W) * len(values) // W]


# ----------------------------------------------------------------------------------------------------------------------
# Class names
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,count", [("cityscapes", 19), ("ade20k_150", 150), ("pcontext_59", 59),
                                        ("coco_stuff_171", 171), ("voc_20", 20), ("pcontext_459", 459),
                                        ("ade20k_847", 847)])
def test_class_name_counts(name, count):
    names = data.class_names(name)
    assert len(names) == count and len(set(names)) == count and all(names)


def test_class_names_verbatim():
    coco, ade = data.class_names("coco_stuff_171"), data.class_names("ade20k_150")
    assert coco[:3] == ["person", "bicycle", "car"] and coco[-1] == "wood"
    assert {"potted plant", "tv", "sky-other", "wall-concrete", "building-other"} <= set(coco)
    assert ade[:4] == ["wall", "building", "sky", "floor"] and ade[8] == "window "  # trailing space, as in detectron2
    assert data.class_names("voc_20")[15:] == ["pottedplant", "sheep", "sofa", "train", "tv"]
    assert data.class_names("pcontext_59")[:4] == ["aeroplane", "bag", "bed", "bedclothes"]
    assert data.class_names("pcontext_459")[:3] == ["accordion", "aeroplane", "air conditioner"]
    assert data.class_names("ade20k_847")[:2] == ["wall", "building, edifice"]
    assert data.class_names("ade20k_847")[-1] == "adding machine, totalizer, totaliser"
    assert data.class_names("cityscapes")[6:8] == ["traffic light", "traffic sign"]


# ----------------------------------------------------------------------------------------------------------------------
# Real layouts: pairing and label mapping
# ----------------------------------------------------------------------------------------------------------------------
def test_cityscapes_train_ids_and_label_ids(tmp_path):
    city = tmp_path / "cityscapes"
    for i, c in enumerate(["bremen", "aachen"]):
        write_image(city / f"leftImg8bit/val/{c}/{c}_000000_000019_leftImg8bit.png", i)
    write_label(city / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png", [0, 18, 255])
    write_label(city / "gtFine/val/bremen/bremen_000000_000019_gtFine_labelIds.png", [7, 33, 0, 14, 26])
    write_label(city / "gtFine/val/bremen/bremen_000000_000019_gtFine_color.png", [1])  # not a label map: unused
    ds = data.build_dataset("cityscapes", "val", cfg(tmp_path))
    assert len(ds) == 2 and ds.class_names[0] == "road" and ds.ignore_index == IGNORE
    assert [p.name for p, _, _ in ds.items] == ["aachen_000000_000019_leftImg8bit.png",
                                                "bremen_000000_000019_leftImg8bit.png"]  # sorted by city
    a, b = ds[0], ds[1]
    assert a["image"].shape == (3, H, W) and a["image"].dtype == torch.float32 and 0 <= a["image"].min() <= 1
    assert a["label"].dtype == torch.int64 and torch.equal(a["label"][0], stripes([0, 18, 255]))  # train ids as stored
    assert torch.equal(b["label"][0], stripes([0, 18, IGNORE, IGNORE, 13]))  # labelIds 7, 33, 0 (unlabeled), 14, 26


def test_ade20k_150_both_layouts_prefers_detectron2(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for stem in ["ADE_val_00000002", "ADE_val_00000001"]:
        write_image(ade / f"images/validation/{stem}.jpg")
        write_label(ade / f"annotations/validation/{stem}.png", [0, 1, 150])
    ds = data.build_dataset("ade20k_150", "val", cfg(tmp_path))  # only the official zip's annotations/ so far
    assert len(ds) == 2 and ds.items[0][0].name == "ADE_val_00000001.jpg"
    assert torch.equal(ds[0]["label"][0], stripes([IGNORE, 0, 149]))  # reduce_zero_label
    for stem in ["ADE_val_00000002", "ADE_val_00000001"]:
        write_label(ade / f"annotations_detectron2/validation/{stem}.png", [0, 5, 149, 255])
    ds = data.build_dataset("ade20k_150", "val", cfg(tmp_path))
    assert torch.equal(ds[1]["label"][0], stripes([0, 5, 149, 255]))  # already label - 1: passed through


def test_pcontext_59_both_layouts(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2010"
    for stem in ["2008_000002", "2008_000003", "2008_000007"]:
        write_image(voc / f"JPEGImages/{stem}.jpg")
        write_label(voc / f"SegmentationClassContext/{stem}.png", [0, 1, 59])
    (voc / "ImageSets/SegmentationContext").mkdir(parents=True)
    (voc / "ImageSets/SegmentationContext/val.txt").write_text("2008_000007\n2008_000002\n")
    ds = data.build_dataset("pcontext_59", "val", cfg(tmp_path))  # mmseg layout: only the listed images
    assert [p.stem for p, _, _ in ds.items] == ["2008_000007", "2008_000002"] and len(ds.class_names) == 59
    assert torch.equal(ds[0]["label"][0], stripes([IGNORE, 0, 58]))
    write_image(tmp_path / "pcontext/val/image/2008_000002.jpg")
    write_label(tmp_path / "pcontext/val/label/2008_000002.png", [0, 58, 255])
    ds = data.build_dataset("pcontext_59", "val", cfg(tmp_path))  # the SAN layout wins when both exist
    assert len(ds) == 1 and torch.equal(ds[0]["label"][0], stripes([0, 58, 255]))


def test_coco_stuff_171_passes_labels_through(tmp_path):
    write_image(tmp_path / "coco/train2017/000000000009.jpg")
    write_label(tmp_path / "coco/stuffthingmaps_detectron2/train2017/000000000009.png", [0, 91, 170, 255])
    ds = data.real_dataset("coco_stuff_171", "train", tmp_path)
    assert len(ds) == 1 and torch.equal(ds[0]["label"][0], stripes([0, 91, 170, 255]))


def test_voc_20_split_is_its_label_folder(tmp_path):
    for i, stem in enumerate(["2007_000032", "2007_000033", "2007_000039"]):
        write_image(tmp_path / f"VOC2012/JPEGImages/{stem}.jpg", i)
    write_label(tmp_path / "VOC2012/annotations_detectron2/val/2007_000033.png", [0, 19, 255])
    ds = data.real_dataset("voc_20", "val", tmp_path)
    assert [p.stem for p, _, _ in ds.items] == ["2007_000033"] and ds.class_names[-1] == "tv"
    assert torch.equal(ds[0]["label"][0], stripes([0, 19, 255]))


@pytest.mark.parametrize("name,image,label", [
    ("pcontext_459", "pcontext_full/val/image/2008_000002.jpg", "pcontext_full/val/label/2008_000002.tif"),
    ("ade20k_847", "ADE20K_2021_17_01/images_detectron2/validation/ADE_val_00000001.jpg",
     "ADE20K_2021_17_01/annotations_detectron2/validation/ADE_val_00000001.tif")])
def test_16bit_tif_labels_keep_values_above_255(tmp_path, name, image, label):
    write_image(tmp_path / image)
    stored = write_label(tmp_path / label, [0, 255, 300, 458, 65535], np.uint16)
    assert Image.open(tmp_path / label).mode == "I;16" and stored.max() == 65535
    ds = data.real_dataset(name, "val", tmp_path)
    assert ds.ignore_index == IGNORE_16BIT and len(ds.class_names) > 255
    assert torch.equal(ds[0]["label"][0], stripes([0, 255, 300, 458, IGNORE_16BIT]))  # 255 is a class here


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------
def test_missing_root_draws_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.build_dataset("ade20k_150", "val", cfg(tmp_path))
    msg = str(e.value)
    assert f"{tmp_path.resolve()}/ADEChallengeData2016/\n├── images/{{training,validation}}/<name>.jpg" in msg
    assert "annotations_detectron2/{training,validation}/<name>.png" in msg and "prepare_ade20k_sem_seg.py" in msg
    assert "annotations/{training,validation}/<name>.png" in msg  # the second, mmseg, layout too
    with pytest.raises(FileNotFoundError, match="prepare_ade20k_full_sem_seg.py"):
        data.real_dataset("ade20k_847", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="tools/dataset_converters/cityscapes.py"):
        data.real_dataset("cityscapes", "train", tmp_path)


def test_empty_folder_and_missing_label_are_named(tmp_path):
    (tmp_path / "pcontext_full/val/image").mkdir(parents=True)
    (tmp_path / "pcontext_full/val/label").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no '\*\.jpg' files in .*pcontext_full/val/image(.|\n)*16-bit"):
        data.real_dataset("pcontext_459", "val", tmp_path)
    write_image(tmp_path / "pcontext_full/val/image/2008_000002.jpg")
    with pytest.raises(FileNotFoundError) as e:
        data.real_dataset("pcontext_459", "val", tmp_path)
    assert str(tmp_path.resolve() / "pcontext_full/val/image/2008_000002.jpg") in str(e.value)
    assert str(tmp_path.resolve() / "pcontext_full/val/label/2008_000002.tif") + " MISSING" in str(e.value)


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="coco_stuff_171"):
        data.build_dataset("coco", "val", cfg("."))
    with pytest.raises(ValueError):
        data.real_dataset("voc_20", "test", ".")


# ----------------------------------------------------------------------------------------------------------------------
# Training transforms
# ----------------------------------------------------------------------------------------------------------------------
def test_train_transform_pads_with_ignore(tmp_path):
    write_image(tmp_path / "coco/train2017/a.jpg")
    write_label(tmp_path / "coco/stuffthingmaps_detectron2/train2017/a.png", [3, 7])
    torch.manual_seed(0)
    item = data.build_dataset("coco_stuff_171", "train", cfg(tmp_path, crop=64))[0]
    image, label = item["image"], item["label"]
    assert type(image) is torch.Tensor and type(label) is torch.Tensor  # plain tensors, not tv_tensors
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert label.shape == (64, 64) and label.dtype == torch.int64
    assert (label == IGNORE).sum() == 64 * 64 - H * W and (label == 3).sum() == (label == 7).sum() == H * W / 2
    assert (image[:, label == IGNORE] == 0).all()  # padded image pixels are 0 (photometric jitter keeps 0 at 0)


def test_train_transform_scales_crops_and_keeps_16bit_values():
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    label = stripes([0, 300, 65535])[None].repeat(H, 1)
    torch.manual_seed(0)
    t = data.TrainTransform(crop_size=24, base_size=60, scale_range=(0.5, 2.0), aspect_range=(0.9, 1.1),
                            ignore_index=IGNORE_16BIT)
    for _ in range(5):
        out_image, out_label = t(image, label)
        assert out_image.shape == (3, 24, 24) and out_label.shape == (24, 24) and out_label.dtype == torch.int64
        assert set(out_label.unique().tolist()) <= {0, 300, 65535}  # nearest: no new label values
    t = data.TrainTransform(crop_size=100, base_size=60, scale_range=(1.0, 1.0), ignore_index=IGNORE_16BIT)
    out_image, out_label = t(image, stripes([1, 2])[None].repeat(H, 1))  # short side 30 -> 60: 60 x 80
    assert (out_label != IGNORE_16BIT).sum() == 60 * 80 and (out_label == IGNORE_16BIT).sum() == 100 * 100 - 60 * 80


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic data (section 1)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda seed: data.ToyContext("train", 64, seed=seed),
                                  lambda seed: data.ToyShapes("val", 64, seed=seed)])
def test_toy_data_is_determined_by_seed(make):
    a, b, c = make(0)[3], make(0)[3], make(1)[3]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])


def test_toy_shapes_seen_split():
    everything, seen = data.ToyShapes("train", 64, "all"), data.ToyShapes("train", 64, "seen")
    assert len(everything.seen_classes) == 9 and len(everything.class_names) == 13 and len(seen.class_names) == 9
    assert seen.class_names[-1] == everything.class_names[-1] == "background"  # seen stuff, as in COCO-Stuff
    unseen = [everything.class_names.index(n) for n in data.UNSEEN_SHAPE_CLASSES]
    assert seen.class_names == [everything.class_names[i] for i in everything.seen_classes]
    found_unseen = False
    for i in range(12):
        full, base = everything[i]["label"], seen[i]["label"]
        assert (full != IGNORE).all() and (full == 12).any()  # every pixel labelled, the background included
        assert ((base < 9) | (base == IGNORE)).all()
        is_unseen = torch.isin(full, torch.tensor(unseen))
        found_unseen |= bool(is_unseen.any())
        assert (base[is_unseen] == IGNORE).all()  # unseen pixels are ignored ...
        kept = base != IGNORE  # ... and the seen ones are relabelled in TOY_SEGMENTATION_CLASSES order
        assert torch.equal(torch.tensor(everything.seen_classes)[base[kept]], full[kept])
    assert found_unseen  # the check above was not vacuous


def test_toy_captions_name_the_background_of_empty_scenes_only():
    train = [data.ToyShapesCaptions("train", 32)[i] for i in range(100)]
    empty = [item for item in train if not item["classes"]]
    assert 2 <= len(empty) <= 20 and all("background" in item["caption"] for item in empty)
    assert not any("background" in item["caption"] for item in train if item["classes"])
    assert all(data.ToyShapesCaptions("val", 32)[i]["classes"] for i in range(50))  # zero-shot val: objects only


def test_toy_captions_name_one_to_three_objects_at_the_segmenters_scales():
    ds = data.ToyShapesCaptions("train", 64)
    items = [ds[i] for i in range(240)]
    assert {len(it["classes"]) for it in items} == {0, 1, 2, 3}
    for it in items:
        names = [data.SHAPE_CLASSES[k] for k in dict.fromkeys(it["classes"])]
        assert all(n in it["caption"] for n in names) and it["caption"].count(" and a ") == max(len(names) - 1, 0)
    # object pixels (bright; the background is dark grey): from small objects, as SAN's half-resolution scenes show
    # them to CLIP, to one filling most of the image, as zsseg's crop of one mask does
    covered = [(it["image"].max(0).values > 0.45).float().mean().item() for it in items if len(it["classes"]) == 1]
    assert min(covered) < 0.1 and max(covered) > 0.4, (min(covered), max(covered))
    scene = data.ToyShapes("val", 128)  # the segmentation toy: objects of radius 128/7 to 128/3.5 px
    areas = [(scene[i]["label"] == k).sum().item() for i in range(30) for k in scene[i]["label"].unique() if k < 12]
    # a triangle of radius r covers 1.3 r^2, a circle 3.1 r^2, a square 5.5 r^2 (a front object may hide part of one)
    assert np.median(areas) > 2 * (128 / 7) ** 2 and max(areas) < 5.6 * (128 / 3.5) ** 2, (np.median(areas), max(areas))


def test_toy_caption_hard_negatives_bind_the_same_words_differently():
    assert data.swap_attributes(["red square", "blue circle"]) == ["red circle", "blue square"]
    assert data.swap_attributes(["red square", "red circle"]) is None and data.swap_attributes(["red square"]) is None
    items = [data.ToyShapesCaptions("train", 32)[i] for i in range(80)]
    with_negative = [it for it in items if it["negative"]]
    assert len(with_negative) > 10
    for it in with_negative:
        words = [sorted(it[k].replace(".", " ").split()) for k in ("negative", "caption")]
        assert words[0] == words[1] and it["negative"] != it["caption"]
        names = {data.SHAPE_CLASSES[k] for k in it["classes"]}
        assert any(n not in names for n in data.SHAPE_CLASSES if n in it["negative"])  # names an absent object


def test_render_shapes_radius_range():
    for lo, hi in ((0.1, 0.12), (0.4, 0.45)):
        _, label, drawn = data.render_shapes(np.random.default_rng(0), 64, 1, radius=(lo, hi))
        area = (label == drawn[0]).sum().item()  # a triangle (1.3 r^2), circle (3.1 r^2) or square (5.5 r^2)
        assert 1.2 * (lo * 64) ** 2 < area < 5.6 * (hi * 64) ** 2, (lo, area)


def test_toy_context_objects_follow_the_cue_colour():
    ds = data.ToyContext("val", 64)
    colours = torch.tensor(data.ToyContext.CUE_COLOURS)  # (3 colours, RGB)
    seen_colours = set()
    for i in range(9):
        item = ds[i]
        image, label = item["image"], item["label"]
        cue = image[:, label == IGNORE].mean(1)  # the cue patch is the only ignored region
        c = int((colours - cue).norm(dim=1).argmin())
        seen_colours.add(c)
        objects = label[(label > 0) & (label != IGNORE)]
        assert len(objects) and torch.isin(objects, torch.tensor([1 + c, 4 + c])).all()
    assert len(seen_colours) > 1
