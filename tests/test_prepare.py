"""prepare.py against tiny downloads in the official formats, made here: each dataset is prepared into a temporary
root and read back (by data.py where it has a loader), with known labels at known pixels."""
import io
import json
import pickle
import tarfile
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as rle
from scipy.io import savemat

import data
import prepare


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: files in the official formats
# ---------------------------------------------------------------------------------------------------------------------
def encoded(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def jpeg(h, w, seed=0):
    return encoded(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "JPEG")


def png(label):
    return encoded(np.asarray(label, np.uint8), "PNG")


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, payload in members.items():
            z.writestr(name, payload)


def make_tar(path, members):
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as t:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))


def run(capsys, *argv):
    """prepare.main in-process: (exit status, stdout, stderr)."""
    status = prepare.main(list(map(str, argv)))
    out = capsys.readouterr()
    return status, out.out, out.err


def mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def label_of(path):
    return np.array(Image.open(path))


# ---------------------------------------------------------------------------------------------------------------------
# COCO-Stuff-171 with zsseg's base / novel maps and label counts; idempotence
# ---------------------------------------------------------------------------------------------------------------------
def test_coco_stuff_171(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    make_zip(raw / "train2017.zip", {f"train2017/00000000000{i}.jpg": jpeg(4, 6) for i in (1, 2)})
    make_zip(raw / "val2017.zip", {"val2017/000000000003.jpg": jpeg(4, 6)})
    a = np.full((4, 6), 255)
    a[0, :5] = [0, 20, 255, 11, 181]  # person, cow (unseen), unlabeled, an unused id, the last stuff class
    b = np.full((4, 6), 255)  # nothing labelled
    make_zip(raw / "stuffthingmaps_trainval2017.zip", {"train2017/000000000001.png": png(a),
                                                       "train2017/000000000002.png": png(b),
                                                       "val2017/000000000003.png": png(a)})
    status, out, _ = run(capsys, "coco_stuff_171", "--raw", raw, "--data-root", root)
    assert status == 0 and "python train.py --model san --preset paper" in out

    train = data.real_dataset("coco_stuff_171", "train", root)
    assert len(train) == 2  # the all-unlabelled map is written too: data.py pairs every image with a label
    label = train[0]["label"]
    names = train.class_names
    assert names[label[0, 0]] == "person" and names[label[0, 1]] == "cow" and names[label[0, 4]] == "wood"
    assert label[0, 2] == label[0, 3] == data.IGNORE == label[3, 5]
    maps = root / "coco/stuffthingmaps_detectron2"
    base = label_of(maps / "train2017_base/000000000001.png")
    novel = label_of(maps / "train2017_novel/000000000001.png")
    assert base[0, :5].tolist() == [0, 255, 255, 255, 155]  # cow is unseen: ignored in base; wood is base class 155
    assert novel[0, :5].tolist() == [255, 0, 255, 255, 255]  # cow is novel class 0
    assert not (maps / "train2017_base/000000000002.png").exists()  # zsseg leaves out maps with nothing labelled
    counts = json.loads((maps / "train2017_base_label_count.json").read_text())
    assert counts == {"000000000001.png": [0, 155]}
    assert json.loads((maps / "val2017_label_count.json").read_text()) == {"000000000003.png": [0, 19, 170]}

    # A second run changes nothing: first through the record of the finished run, then file by file.
    before = mtimes(root)
    status, out, _ = run(capsys, "coco_stuff_171", "--raw", raw, "--data-root", root)
    assert status == 0 and "already prepared" in out and mtimes(root) == before
    (root / ".prepared/coco_stuff_171.json").unlink()
    (root / "coco/.prepared/train2017.zip.unpacked").unlink()  # as if interrupted after this extraction
    before = mtimes(root)
    assert run(capsys, "coco_stuff_171", "--raw", raw, "--data-root", root)[0] == 0
    after = mtimes(root)
    assert {p: t for p, t in after.items() if ".prepared" not in p.parts} == \
           {p: t for p, t in before.items() if ".prepared" not in p.parts}


def test_missing_truncated_and_out_of_range(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    status, _, err = run(capsys, "coco_stuff_171", "--raw", raw, "--data-root", root)
    assert status == 2 and "train2017.zip not found" in err and "images.cocodataset.org" in err
    (raw / "ADEChallengeData2016.zip").write_bytes(b"PK\x03\x04 only the first bytes of a zip")
    status, _, err = run(capsys, "ade20k_150", "--raw", raw, "--data-root", root)
    assert status == 2 and "incomplete or corrupt" in err and "ADEchallenge" in err
    label = np.zeros((4, 4))
    label[1, 1] = 151  # ADE-150 has 0..150
    make_zip(raw / "ADEChallengeData2016.zip", {
        "ADEChallengeData2016/images/training/ADE_train_00000001.jpg": jpeg(4, 4),
        "ADEChallengeData2016/annotations/training/ADE_train_00000001.png": png(label)})
    status, _, err = run(capsys, "ade20k_150", "--raw", raw, "--data-root", root)
    assert status == 2 and "ADE_train_00000001.png" in err and "[0, 151]" not in err and "[151]" in err


# ---------------------------------------------------------------------------------------------------------------------
# ADE20K-150 and ADE20K-847 (16-bit)
# ---------------------------------------------------------------------------------------------------------------------
def test_ade20k_150(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    label = np.zeros((4, 5))
    label[0, :3] = [1, 150, 0]
    make_zip(raw / "ADEChallengeData2016.zip", {
        f"ADEChallengeData2016/{kind}/{split}/ADE_{s}_00000001.{ext}": payload
        for split, s in (("training", "train"), ("validation", "val"))
        for kind, ext, payload in (("images", "jpg", jpeg(4, 5)), ("annotations", "png", png(label)))})
    assert run(capsys, "ade20k_150", "--raw", raw, "--data-root", root)[0] == 0
    assert (root / "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000001.png").exists()
    val = data.real_dataset("ade20k_150", "val", root)
    assert val[0]["label"][0, :3].tolist() == [0, 149, data.IGNORE]


def ade_seg(ids):
    """The full ADE20K release's *_seg.png: class = R / 10 * 256 + G."""
    ids = np.asarray(ids)
    seg = np.zeros((*ids.shape, 3), np.uint8)
    seg[..., 0], seg[..., 1], seg[..., 2] = ids // 256 * 10, ids % 256, 7  # B holds instances
    return encoded(seg, "PNG")


def test_ade20k_847(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    small = np.full((4, 6), 1)  # 1: an ADE class that is not one of the 847 -> ignored
    small[0, :2] = [2978, 3148]  # wall (label 0), adding machine (label 846)
    big = np.full((520, 600), 312)  # building (label 1); short side 520 > 512: resized to 512 x 591
    big[:260] = 2978
    folder = "ADE20K_2021_17_01/images/ADE/{}/cultural/apse__indoor"
    index = {"folder": [folder.format("training"), folder.format("validation")],
             "filename": ["ADE_train_00000001.jpg", "ADE_val_00000001.jpg"]}
    make_zip(raw / "ADE20K_2021_17_01.zip", {
        "ADE20K_2021_17_01/index_ade20k.pkl": pickle.dumps(index),
        f"{index['folder'][0]}/ADE_train_00000001.jpg": jpeg(4, 6), f"{index['folder'][0]}/ADE_train_00000001_seg.png":
            ade_seg(small),
        f"{index['folder'][1]}/ADE_val_00000001.jpg": jpeg(520, 600), f"{index['folder'][1]}/ADE_val_00000001_seg.png":
            ade_seg(big)})
    assert run(capsys, "ade20k_847", "--raw", raw, "--data-root", root)[0] == 0
    train = data.real_dataset("ade20k_847", "train", root)
    assert train.ignore_index == data.IGNORE_16BIT
    assert train[0]["label"][0, :3].tolist() == [0, 846, data.IGNORE_16BIT]
    val = data.real_dataset("ade20k_847", "val", root)[0]
    assert tuple(val["image"].shape) == (3, 512, 591) and tuple(val["label"].shape) == (512, 591)
    assert val["label"][0, 0] == 0 and val["label"][-1, -1] == 1


# ---------------------------------------------------------------------------------------------------------------------
# PASCAL Context 59 (Detail json) and 459 (.mat), with a corrupt .mat
# ---------------------------------------------------------------------------------------------------------------------
def pcontext_raw(raw):
    raw.mkdir()
    names = ["2008_000001", "2008_000002", "2008_000003"]
    make_tar(raw / "VOCtrainval_03-May-2010.tar", {f"VOCdevkit/VOC2010/JPEGImages/{n}.jpg": jpeg(4, 6) for n in names})
    images, annos = [], []
    for i, (name, phase) in enumerate(zip(names, ["train", "val", "val"])):
        images.append({"image_id": 2008000001 + i, "file_name": f"{name}.jpg", "height": 4, "width": 6,
                       "phase": phase})
        for category, (y, x) in ((2, (0, 0)), (458, (1, 2))):  # aeroplane (label 0), the last class (label 58)
            m = np.zeros((4, 6), np.uint8, order="F")
            m[y, x] = 1
            seg = rle.encode(m)
            seg["counts"] = seg["counts"].decode("ascii")  # as stored in the json
            annos.append({"id": len(annos) + 1, "image_id": 2008000001 + i, "category_id": category,
                          "segmentation": seg})
    (raw / "trainval_merged.json").write_text(json.dumps({"images": images, "annos_segmentation": annos}))
    label = np.zeros((4, 6), np.uint16)
    label[0, :3] = [1, 300, 459]
    make_tar(raw / "trainval.tar.gz", {"trainval/2008_000001.mat": mat_bytes(label),
                                       "trainval/2008_000002.mat": mat_bytes(label),
                                       "trainval/2008_000003.mat": b"MATLAB 5.0 MAT-file, but cut here"})


def mat_bytes(label):
    buf = io.BytesIO()
    savemat(buf, {"LabelMap": label})
    return buf.getvalue()


def test_pcontext_59(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    pcontext_raw(raw)
    assert run(capsys, "pcontext_59", "--raw", raw, "--data-root", root)[0] == 0
    train, val = (data.real_dataset("pcontext_59", s, root) for s in ("train", "val"))
    assert len(train) == 1 and len(val) == 2
    label = train[0]["label"]
    assert label[0, 0] == 0 and label[1, 2] == 58 and label[3, 5] == data.IGNORE  # background is ignored
    assert train.class_names[0] == "aeroplane"


def test_pcontext_459_with_a_corrupt_label(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    pcontext_raw(raw)
    status, out, _ = run(capsys, "pcontext_459", "--raw", raw, "--data-root", root)
    assert status == 0 and "corrupt, skipped" in out and "2008_000003.mat" in out and "1 corrupt file(s)" in out
    assert not (root / ".prepared/pcontext_459.json").exists()  # the next run looks again
    train, val = (data.real_dataset("pcontext_459", s, root) for s in ("train", "val"))
    assert len(train) == 1 and len(val) == 1  # the corrupt one is left out, image included
    assert train[0]["label"][0, :4].tolist() == [0, 299, 458, data.IGNORE_16BIT]


# ---------------------------------------------------------------------------------------------------------------------
# VOC-20 with zsseg's base / novel maps
# ---------------------------------------------------------------------------------------------------------------------
def test_voc_20(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    names = ["2007_000032", "2007_000033", "2007_000039"]
    make_tar(raw / "VOCtrainval_11-May-2012.tar", {
        **{f"VOCdevkit/VOC2012/JPEGImages/{n}.jpg": jpeg(4, 6) for n in names},
        "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt": b"2007_000039\n",
        "VOCdevkit/VOC2012/Annotations/2007_000032.xml": b"<annotation/>"})  # not extracted
    x = np.zeros((4, 6))
    x[0, :4] = [1, 16, 20, 255]  # aeroplane, pottedplant (unseen), tvmonitor (unseen), boundary
    y = np.zeros((4, 6))  # background only: left out, as SAN / zsseg do
    make_zip(raw / "SegmentationClassAug.zip", {"SegmentationClassAug/2007_000032.png": png(x),
                                                "SegmentationClassAug/2007_000033.png": png(y),
                                                "SegmentationClassAug/2007_000039.png": png(x)})
    (raw / "trainaug.txt").write_text("2007_000032\n2007_000033\n")
    assert run(capsys, "voc_20", "--raw", raw, "--data-root", root)[0] == 0
    assert not (root / "VOC2012/Annotations").exists()
    train = data.real_dataset("voc_20", "train", root)
    assert len(train) == 1 and train[0]["label"][0, :5].tolist() == [0, 15, 19, 255, 255]
    out = root / "VOC2012/annotations_detectron2"
    assert label_of(out / "train_base/2007_000032.png")[0, :5].tolist() == [0, 255, 255, 255, 255]
    assert label_of(out / "train_novel/2007_000032.png")[0, :5].tolist() == [255, 0, 4, 255, 255]
    assert json.loads((out / "train_base_label_count.json").read_text()) == {"2007_000032.png": [0]}
    assert json.loads((out / "val_label_count.json").read_text()) == {"2007_000039.png": [0, 15, 19]}


# ---------------------------------------------------------------------------------------------------------------------
# Cityscapes train ids
# ---------------------------------------------------------------------------------------------------------------------
def test_cityscapes(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    label = np.zeros((4, 6))
    label[0, :3] = [7, 26, 33]  # road, car, bicycle
    stem = "{0}/aachen/aachen_000000_000019"
    make_zip(raw / "leftImg8bit_trainvaltest.zip",
             {f"leftImg8bit/{stem.format(s)}_leftImg8bit.png": encoded(np.zeros((4, 6, 3), np.uint8), "PNG")
              for s in ("train", "val")})
    make_zip(raw / "gtFine_trainvaltest.zip", {f"gtFine/{stem.format(s)}_gtFine_labelIds.png": png(label)
                                               for s in ("train", "val")})
    assert run(capsys, "cityscapes", "--raw", raw, "--data-root", root)[0] == 0
    train_ids = root / f"cityscapes/gtFine/{stem.format('train')}_gtFine_labelTrainIds.png"
    assert label_of(train_ids)[0, :4].tolist() == [0, 13, 18, 255]
    train = data.real_dataset("cityscapes", "train", root)
    assert train.items[0][1] == train_ids and train[0]["label"][0, :4].tolist() == [0, 13, 18, 255]


# ---------------------------------------------------------------------------------------------------------------------
# COCO detection: Soft Teacher's semi-supervised splits
# ---------------------------------------------------------------------------------------------------------------------
def coco_detection_raw(raw, num_images=200):
    raw.mkdir(parents=True)
    images = [{"id": 1000 + i, "file_name": f"{1000 + i:012d}.jpg", "height": 4, "width": 6} for i in range(num_images)]
    annotations = [{"id": k, "image_id": 1000 + k % num_images, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4,
                    "iscrowd": 0} for k in range(3 * num_images)]
    train = {"info": {"year": 2017}, "licenses": [], "categories": [{"id": 1, "name": "person"}], "images": images,
             "annotations": annotations}
    make_zip(raw / "annotations_trainval2017.zip", {
        "annotations/instances_train2017.json": json.dumps(train),
        "annotations/instances_val2017.json": json.dumps(dict(train, images=images[:1], annotations=[]))})
    make_zip(raw / "train2017.zip", {"train2017/000000001000.jpg": jpeg(4, 6)})
    make_zip(raw / "val2017.zip", {"val2017/000000001000.jpg": jpeg(4, 6)})


def test_coco_semi_supervised_splits(tmp_path, capsys):
    for run_dir in ("a", "b"):
        coco_detection_raw(tmp_path / run_dir / "raw")
        assert run(capsys, "coco_detection", "--raw", tmp_path / run_dir / "raw", "--data-root",
                   tmp_path / run_dir / "datasets")[0] == 0
    semi = "datasets/coco/annotations/semi_supervised"
    labelled_sets = {}
    for percent in (1, 5, 10):
        for fold in (1, 2, 3, 4, 5):
            name = f"instances_train2017.{fold}@{percent}"
            files = [(tmp_path / r / semi / f"{name}{s}.json").read_bytes() for r in "ab" for s in ("", "-unlabeled")]
            assert files[:2] == files[2:]  # the same on two runs
            labelled, unlabelled = (json.loads(f) for f in files[:2])
            lab_ids = {img["id"] for img in labelled["images"]}
            unl_ids = {img["id"] for img in unlabelled["images"]}
            assert len(lab_ids) == int(percent / 100 * 200) and not lab_ids & unl_ids and len(lab_ids | unl_ids) == 200
            assert {a["image_id"] for a in labelled["annotations"]} == lab_ids  # each image keeps its boxes
            assert len(labelled["annotations"]) + len(unlabelled["annotations"]) == 600
            assert labelled["categories"] == [{"id": 1, "name": "person"}]
            labelled_sets[percent, fold] = lab_ids
            # The draw of SoftTeacher's semi_coco.py (numpy's global seed = fold + offset) with offset 0:
            np.random.seed(fold)
            official = np.random.choice(range(200), size=int(percent / 100 * 200), replace=False)
            assert lab_ids == {1000 + int(i) for i in official}
    assert labelled_sets[10, 1] != labelled_sets[10, 2]  # folds differ


# ---------------------------------------------------------------------------------------------------------------------
# Pose transfer: Market-1501 and DeepFashion in Pose-Transfer's layout
# ---------------------------------------------------------------------------------------------------------------------
def test_market1501(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    top = "Market-1501-v15.09.15"
    make_zip(raw / "Market-1501-v15.09.15.zip", {
        f"{top}/bounding_box_train/0002_c1s1_000451_03.jpg": jpeg(128, 64),
        f"{top}/bounding_box_train/0002_c1s1_000551_01.jpg": jpeg(128, 64, 1),
        f"{top}/bounding_box_test/0003_c1s6_015971_00.jpg": jpeg(128, 64, 2),
        f"{top}/bounding_box_test/Thumbs.db": b"",
        f"{top}/query/0003_c1s6_015971_00.jpg": jpeg(128, 64, 3)})
    keypoints = "[10, 20" + ", -1" * 16 + "]"
    for phase, names in (("train", ["0002_c1s1_000451_03.jpg", "0002_c1s1_000551_01.jpg"]),
                         ("test", ["0003_c1s6_015971_00.jpg"])):
        (raw / f"market-annotation-{phase}.csv").write_text(
            "name:keypoints_y:keypoints_x\n" + "".join(f"{n}:{keypoints}:{keypoints}\n" for n in names))
        (raw / f"market-pairs-{phase}.csv").write_text(f"from,to\n{names[0]},{names[-1]}\n")
    status, out, _ = run(capsys, "market1501", "--raw", raw, "--data-root", root)
    assert status == 0 and "warning" not in out
    market = root / "market_data"
    assert sorted(p.name for p in (market / "train").iterdir()) == ["0002_c1s1_000451_03.jpg",
                                                                    "0002_c1s1_000551_01.jpg"]
    assert [p.name for p in (market / "test").iterdir()] == ["0003_c1s6_015971_00.jpg"]
    assert (market / "market-pairs-train.csv").read_text() == (raw / "market-pairs-train.csv").read_text()
    assert (market / "market-annotation-test.csv").exists()
    (raw / "market-pairs-test.csv").write_text("from;to\n")
    (root / ".prepared/market1501.json").unlink()
    status, _, err = run(capsys, "market1501", "--raw", raw, "--data-root", root)
    assert status == 2 and "market-pairs-test.csv" in err and "'from,to'" in err


def test_deepfashion_with_a_corrupt_image(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    image = np.zeros((256, 256, 3), np.uint8)
    image[:, 40:216] = 200  # the 176 columns Pose-Transfer keeps
    for rel, payload in (("WOMEN/Tees_Tanks/id_00007838/05_7_additional.jpg", encoded(image, "JPEG")),
                         ("MEN/Denim/id_00000080/01_1_front.jpg", encoded(image, "JPEG")),
                         ("MEN/Denim/id_00000080/02_1_front.jpg", b"\xff\xd8 not a whole jpeg")):
        (raw / "img" / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / "img" / rel).write_bytes(payload)
    a, b, c = "fashionWOMENTees_Tanksid0000783805_7additional.jpg", "fashionMENDenimid0000008001_1front.jpg", \
        "fashionMENDenimid0000008002_1front.jpg"
    (raw / "train.lst").write_text(f"{a}\n")
    (raw / "test.lst").write_text(f"{b}\n{c}\n")
    for phase, names in (("train", [a]), ("test", [b])):
        (raw / f"fasion-resize-annotation-{phase}.csv").write_text(
            "name:keypoints_y:keypoints_x\n" + "".join(f"{n}:[1]:[1]\n" for n in names))
        (raw / f"fasion-resize-pairs-{phase}.csv").write_text(f"from,to\n{names[0]},{names[0]}\n")
    status, out, _ = run(capsys, "deepfashion", "--raw", raw, "--data-root", root)
    assert status == 0 and "corrupt, skipped" in out and "02_1_front.jpg" in out and "1 corrupt file(s)" in out
    fashion = root / "fashion_data"
    cropped = np.array(Image.open(fashion / "train" / a))
    assert cropped.shape == (256, 176, 3) and abs(int(cropped.mean()) - 200) <= 2
    assert (fashion / "test" / b).exists() and not (fashion / "test" / c).exists()
    assert (fashion / "fasion-resize-pairs-train.csv").exists() and (fashion / "test.lst").exists()


def test_fashion_name():
    assert prepare.fashion_name("WOMEN/Tees_Tanks/id_00007838/05_7_additional.jpg") == \
        "fashionWOMENTees_Tanksid0000783805_7additional.jpg"


def test_ade847_ids_match_the_class_names():
    ids = prepare.ADE847_IDS_FILE.read_text().split()
    assert len(ids) == len(set(ids)) == len(data.class_names("ade20k_847")) == 847
    assert ids[0] == "2978" and ids[-1] == "3148"  # wall, adding machine (MaskFormer's first and last)


@pytest.mark.parametrize("name", sorted(prepare.DATASETS))
def test_every_dataset_names_its_downloads(tmp_path, capsys, name):
    status, _, err = run(capsys, name, "--raw", tmp_path, "--data-root", tmp_path / "datasets")
    assert status == 2 and "not found" in err and "download" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------------
# A corrupt image in the archives (an error page saved as .jpg / .png): named, counted, skipped with what is made from
# it, on every run; the run completes and a re-run does the same
# ---------------------------------------------------------------------------------------------------------------------
HTML = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n"


def test_check_image_fails_on_what_a_full_decode_fails_on():
    photo = np.zeros((48, 64, 3), np.uint8)
    photo[:, :, 0], photo[:, :, 1] = np.arange(64) * 4, np.arange(48)[:, None] * 5
    jpg, png_file = encoded(photo, "JPEG"), encoded(photo, "PNG")
    damaged = bytearray(png_file)
    damaged[len(png_file) // 2] ^= 0xFF  # in the IDAT chunk: its CRC no longer matches
    cases = {"whole.jpg": jpg, "data_after_the_end.jpg": jpg + b"\0" * 8, "cut.jpg": jpg[:-40], "html.jpg": HTML,
             "whole.png": png_file, "cut.png": png_file[:-30], "damaged.png": bytes(damaged)}
    for name, payload in cases.items():
        try:
            with Image.open(io.BytesIO(payload)) as im:
                im.convert("RGB")  # what data.py does
            decodes = True
        except OSError:
            decodes = False
        try:
            prepare.check_image(payload, name)
            checked = True
        except prepare.Corrupt as e:
            assert str(e).startswith(name + ": ")
            checked = False
        assert checked == decodes == (name.startswith("whole") or name.startswith("data_after")), name


def add_members(path, members):
    """Append members to an archive made by make_zip / make_tar (an uncompressed tar)."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "a") as z:
            for name, payload in members.items():
                z.writestr(name, payload)
    else:
        with tarfile.open(path, "a") as t:
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))


def prepare_twice(capsys, dataset, raw, root, corrupt, absent):
    """Prepare `dataset` twice from downloads holding the corrupt images `corrupt` (archive member names): each run
    completes, names each of them and counts them, writes none of `absent` (paths under root: the image and what is
    made from it) and is not recorded as finished; the second prints the same and changes no file. Returns stdout."""
    outputs = []
    for _ in range(2):
        before = mtimes(root)
        status, out, _ = run(capsys, dataset, "--raw", raw, "--data-root", root)
        assert status == 0 and "is ready under" in out
        assert out.count("corrupt, skipped: ") == len(corrupt) and f"{len(corrupt)} corrupt file(s) skipped" in out
        for member in corrupt:
            assert f"corrupt, skipped: {member} in {raw}" in out
        assert "not an image file (it begins b'<!DOCTYPE html>" in out
        assert [p for p in absent if (root / p).exists()] == []
        assert not (root / ".prepared" / f"{dataset}.json").exists()  # the next run looks again
        outputs.append(out)
    assert outputs[0] == outputs[1] and mtimes(root) == before
    return out


def test_ade20k_150_with_a_corrupt_image(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    top, label = "ADEChallengeData2016", png(np.ones((4, 5)))
    make_zip(raw / "ADEChallengeData2016.zip", {
        f"{top}/images/training/ADE_train_00000001.jpg": jpeg(4, 5), f"{top}/images/training/ADE_train_00000002.jpg":
            HTML, f"{top}/images/validation/ADE_val_00000001.jpg": jpeg(4, 5),
        **{f"{top}/annotations/{n}.png": label for n in ("training/ADE_train_00000001", "training/ADE_train_00000002",
                                                         "validation/ADE_val_00000001")}})
    prepare_twice(capsys, "ade20k_150", raw, root, [f"{top}/images/training/ADE_train_00000002.jpg"],
                  [f"{top}/images/training/ADE_train_00000002.jpg",
                   f"{top}/annotations_detectron2/training/ADE_train_00000002.png"])
    train = data.real_dataset("ade20k_150", "train", root)
    assert [image.name for image, _, _ in train.items] == ["ADE_train_00000001.jpg"]


def test_coco_stuff_171_with_a_corrupt_image_then_replaced(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    make_zip(raw / "train2017.zip", {"train2017/000000000001.jpg": jpeg(4, 6), "train2017/000000000002.jpg": HTML})
    make_zip(raw / "val2017.zip", {"val2017/000000000003.jpg": jpeg(4, 6)})
    a = np.full((4, 6), 255)
    a[0, :2] = [0, 20]  # person, cow (unseen): a map in _base and _novel
    make_zip(raw / "stuffthingmaps_trainval2017.zip", {f"{s}/00000000000{i}.png": png(a) for s, i in
                                                       (("train2017", 1), ("train2017", 2), ("val2017", 3))})
    maps = "coco/stuffthingmaps_detectron2/train2017"
    prepare_twice(capsys, "coco_stuff_171", raw, root, ["train2017/000000000002.jpg"],
                  ["coco/train2017/000000000002.jpg",
                   *(f"{maps}{v}/000000000002.png" for v in ("", "_base", "_novel"))])
    assert len(data.real_dataset("coco_stuff_171", "train", root)) == 1  # listed by its label maps: none orphaned
    counts = root / f"{maps}_base_label_count.json"
    assert json.loads(counts.read_text()) == {"000000000001.png": [0]}
    # The archive downloaded again, whole: the image, its maps and its label count are added, the run recorded.
    make_zip(raw / "train2017.zip", {"train2017/000000000001.jpg": jpeg(4, 6), "train2017/000000000002.jpg":
                                     jpeg(4, 6, 1)})
    status, out, _ = run(capsys, "coco_stuff_171", "--raw", raw, "--data-root", root)
    assert status == 0 and "corrupt" not in out and (root / ".prepared/coco_stuff_171.json").exists()
    assert len(data.real_dataset("coco_stuff_171", "train", root)) == 2
    assert json.loads(counts.read_text()) == {"000000000001.png": [0], "000000000002.png": [0]}


def test_voc_20_with_a_corrupt_image(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    x = np.zeros((4, 6))
    x[0, :2] = [1, 16]  # aeroplane, pottedplant (unseen)
    make_tar(raw / "VOCtrainval_11-May-2012.tar", {
        "VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg": jpeg(4, 6), "VOCdevkit/VOC2012/JPEGImages/2007_000042.jpg":
            HTML, "VOCdevkit/VOC2012/JPEGImages/2007_000039.jpg": jpeg(4, 6),
        "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt": b"2007_000039\n"})
    make_zip(raw / "SegmentationClassAug.zip", {f"SegmentationClassAug/{n}.png": png(x)
                                                for n in ("2007_000032", "2007_000042", "2007_000039")})
    (raw / "trainaug.txt").write_text("2007_000032\n2007_000042\n")
    out = "VOC2012/annotations_detectron2/train"
    prepare_twice(capsys, "voc_20", raw, root, ["VOCdevkit/VOC2012/JPEGImages/2007_000042.jpg"],
                  ["VOC2012/JPEGImages/2007_000042.jpg",
                   *(f"{out}{v}/2007_000042.png" for v in ("", "_base", "_novel"))])
    assert len(data.real_dataset("voc_20", "train", root)) == 1  # listed by its label maps: none orphaned
    assert json.loads((root / f"{out}_base_label_count.json").read_text()) == {"2007_000032.png": [0]}


def test_cityscapes_with_a_corrupt_image(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    good, bad = "train/aachen/aachen_000000_000019", "train/aachen/aachen_000001_000019"
    make_zip(raw / "leftImg8bit_trainvaltest.zip", {
        f"leftImg8bit/{s}_leftImg8bit.png": encoded(np.zeros((4, 6, 3), np.uint8), "PNG")
        for s in (good, "val/lindau/lindau_000000_000019")} | {f"leftImg8bit/{bad}_leftImg8bit.png": HTML})
    make_zip(raw / "gtFine_trainvaltest.zip", {f"gtFine/{s}_gtFine_labelIds.png": png(np.full((4, 6), 7))
                                               for s in (good, bad, "val/lindau/lindau_000000_000019")})
    prepare_twice(capsys, "cityscapes", raw, root, [f"leftImg8bit/{bad}_leftImg8bit.png"],
                  [f"cityscapes/leftImg8bit/{bad}_leftImg8bit.png",
                   f"cityscapes/gtFine/{bad}_gtFine_labelTrainIds.png"])
    assert [image.name for image, _, _ in data.real_dataset("cityscapes", "train", root).items] == \
           ["aachen_000000_000019_leftImg8bit.png"]


def test_coco_detection_with_corrupt_images(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    coco_detection_raw(raw)
    add_members(raw / "train2017.zip", {"train2017/000000001001.jpg": HTML})
    add_members(raw / "val2017.zip", {"val2017/000000001002.jpg": HTML})
    make_zip(raw / "unlabeled2017.zip", {"unlabeled2017/000000009000.jpg": jpeg(4, 6),
                                         "unlabeled2017/000000009001.jpg": HTML})
    info = {"info": {}, "licenses": [], "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (9000, 9001)]}
    make_zip(raw / "image_info_unlabeled2017.zip", {"annotations/image_info_unlabeled2017.json": json.dumps(info)})
    out = prepare_twice(capsys, "coco_detection", raw, root, ["train2017/000000001001.jpg", "val2017/000000001002.jpg",
                                                              "unlabeled2017/000000009001.jpg"],
                        ["coco/train2017/000000001001.jpg", "coco/val2017/000000001002.jpg",
                         "coco/unlabeled2017/000000009001.jpg"])
    assert "2 skipped train2017 / val2017 image(s) are still listed in instances_train2017.json" in out
    ann = root / "coco/annotations"
    # The split files leave out image 1001 and its boxes; every other image is where the full draw puts it.
    for percent, fold in ((1, 1), (10, 3)):
        labelled, unlabelled = (json.loads((ann / f"semi_supervised/instances_train2017.{fold}@{percent}{s}.json")
                                           .read_text()) for s in ("", "-unlabeled"))
        np.random.seed(fold)
        drawn = {1000 + int(i) for i in np.random.choice(range(200), size=2 * percent, replace=False)}
        assert {img["id"] for img in labelled["images"]} == drawn - {1001}
        assert {img["id"] for img in unlabelled["images"]} == set(range(1000, 1200)) - drawn - {1001}
        assert 1001 not in {a["image_id"] for a in labelled["annotations"] + unlabelled["annotations"]}
    unlabelled_set = json.loads((ann / "instances_unlabeled2017.json").read_text())
    assert [img["id"] for img in unlabelled_set["images"]] == [9000]
    # ... where the full setting reads it (the official config's annotations/instances_unlabeled2017.json)
    full = data.build_dataset("coco_detection_semi_full", "train", SimpleNamespace(data_root=str(root), num_unsup=1))
    assert full.unlabelled.dataset.ids == [9000]
    assert json.loads((ann / "semi_supervised/left_out.json").read_text()) == ["train2017/000000001001.jpg",
                                                                                "unlabeled2017/000000009001.jpg"]
    # The archives downloaded again, whole: the split files and the unlabelled set are written again, with them.
    make_zip(raw / "train2017.zip", {f"train2017/00000000{i}.jpg": jpeg(4, 6) for i in (1000, 1001)})
    make_zip(raw / "val2017.zip", {f"val2017/00000000{i}.jpg": jpeg(4, 6) for i in (1000, 1002)})
    make_zip(raw / "unlabeled2017.zip", {f"unlabeled2017/00000000{i}.jpg": jpeg(4, 6) for i in (9000, 9001)})
    status, out, _ = run(capsys, "coco_detection", "--raw", raw, "--data-root", root)
    assert status == 0 and "corrupt" not in out and (root / ".prepared/coco_detection.json").exists()
    assert not (ann / "semi_supervised/left_out.json").exists()
    splits = [json.loads(p.read_text()) for p in (ann / "semi_supervised").glob("instances_train2017.3@10*.json")]
    assert sorted(img["id"] for split in splits for img in split["images"]) == list(range(1000, 1200))
    assert [img["id"] for img in json.loads((ann / "instances_unlabeled2017.json").read_text())["images"]] == \
           [9000, 9001]


def test_market1501_with_a_corrupt_image(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "datasets"
    raw.mkdir()
    top, names = "Market-1501-v15.09.15", ["0002_c1s1_000451_03.jpg", "0002_c1s1_000551_01.jpg"]
    make_zip(raw / "Market-1501-v15.09.15.zip", {f"{top}/bounding_box_train/{names[0]}": jpeg(128, 64),
                                                 f"{top}/bounding_box_train/{names[1]}": HTML,
                                                 f"{top}/bounding_box_test/0003_c1s6_015971_00.jpg": jpeg(128, 64)})
    for phase, pair in (("train", names), ("test", ["0003_c1s6_015971_00.jpg"] * 2)):
        (raw / f"market-annotation-{phase}.csv").write_text("name:keypoints_y:keypoints_x\n" + "".join(
            f"{n}:[1]:[1]\n" for n in sorted(set(pair))))
        (raw / f"market-pairs-{phase}.csv").write_text(f"from,to\n{pair[0]},{pair[1]}\n")
    out = prepare_twice(capsys, "market1501", raw, root, [f"{top}/bounding_box_train/{names[1]}"],
                        [f"market_data/train/{names[1]}"])
    # The csv files are Pose-Transfer's, kept as published (the test pairs are the benchmark): the pair is named.
    assert "warning: 1 image(s) of market-pairs-train.csv are not in" in out and names[1] in out
