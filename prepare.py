"""Turn the official dataset downloads into the layouts that data.py (and the paper presets) read.

    python prepare.py DATASET --raw DOWNLOAD_DIR --data-root DATASETS

DOWNLOAD_DIR holds the files exactly as their sites publish them (docs/datasets.md, "Preparing the datasets", lists
them); DATASETS is the --data-root of train.py / eval.py. The layouts are those of the official preparation scripts
(detectron2 / MaskFormer / SAN / zsseg.baseline / SoftTeacher / Pose-Transfer), written without their dependencies
(no detectron2, mmcv, Detail API, cityscapesScripts, cv2).

Safe to re-run: a finished dataset is recorded in DATASETS/.prepared/<dataset>.json and skipped; an interrupted run
resumes, because every file is written to "<name>.part" and renamed only when complete. Bad input is a clear error:
a missing or truncated archive names the file and where it is published; a corrupt image or label is reported and
skipped, with a count; a label value outside the dataset's range stops the run and names the file and the values.
Every image is checked as it is copied (check_image, cheap enough that unpacking stays I/O-bound); a skipped image's
label maps are not written, and a run that skipped files is not recorded, so the next one checks them again.

Contents: 1. files, archives and checks -> 2. label maps per dataset -> 3. COCO detection splits -> 4. pose transfer
-> 5. the command line.
"""
import argparse
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import data

# Where each download is published (named in the error when it is missing).
SOURCES = {
    "train2017.zip": "http://images.cocodataset.org/zips/train2017.zip",
    "val2017.zip": "http://images.cocodataset.org/zips/val2017.zip",
    "annotations_trainval2017.zip": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
    "unlabeled2017.zip": "http://images.cocodataset.org/zips/unlabeled2017.zip",
    "image_info_unlabeled2017.zip": "http://images.cocodataset.org/annotations/image_info_unlabeled2017.zip",
    "stuffthingmaps_trainval2017.zip": "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                                       "stuffthingmaps_trainval2017.zip (github.com/nightrome/cocostuff)",
    "ADEChallengeData2016.zip": "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    "ADE20K_2021_17_01.zip": "https://ade20k.csail.mit.edu (registration; the full ADE20K release 2021_17_01)",
    "VOCtrainval_03-May-2010.tar": "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
    "trainval_merged.json": "https://codalabuser.blob.core.windows.net/public/trainval_merged.json (PASCAL in Detail)",
    "trainval.tar.gz": "https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz (the 459-class .mat labels)",
    "VOCtrainval_11-May-2012.tar": "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "SegmentationClassAug.zip": "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip "
                                "(DrSleep/tensorflow-deeplab-resnet: VOC2012 + SBD labels)",
    "trainaug.txt": "https://gist.githubusercontent.com/sun11/2dbda6b31acc7c6292d14a872d0c90b7/raw/"
                    "5f5a5270089239ef2f6b65b1cc55208355b5acca/trainaug.txt (10,582 names)",
    "leftImg8bit_trainvaltest.zip": "https://www.cityscapes-dataset.com/downloads/ (registration)",
    "gtFine_trainvaltest.zip": "https://www.cityscapes-dataset.com/downloads/ (registration)",
    "Market-1501-v15.09.15.zip": "https://zheng-lab.cecs.anu.edu.au/Project/project_reid.html (Market-1501)",
    "img.zip": "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html, In-shop Img/img.zip (ask "
               "the maintainers for the password; unzip -P PASSWORD img.zip -d DOWNLOAD_DIR gives img/)",
}
POSE_TRANSFER_DRIVE = "the Google Drive of the tengteng95/Pose-Transfer README " \
                      "(drive.google.com/open?id=1YMsYXc41dR3k8YroXeWGh9zweNUQmZBw)"
for _name in ("market-annotation-train.csv", "market-annotation-test.csv", "market-pairs-train.csv",
              "market-pairs-test.csv", "fasion-resize-annotation-train.csv", "fasion-resize-annotation-test.csv",
              "fasion-resize-pairs-train.csv", "fasion-resize-pairs-test.csv"):
    SOURCES[_name] = POSE_TRANSFER_DRIVE
SOURCES["train.lst"] = SOURCES["test.lst"] = "tengteng95/Pose-Transfer, fashion_data/{train,test}.lst, or " \
                                             + POSE_TRANSFER_DRIVE


class PrepareError(Exception):
    """A user-facing problem (missing download, bad label values): printed in one or two lines, exit status 1."""


class Corrupt(Exception):
    """An image or label file that cannot be decoded: reported, counted and skipped."""


# ----------------------------------------------------------------------------------------------------------------------
# 1. Files, archives and checks
# ----------------------------------------------------------------------------------------------------------------------
def need(raw, name):
    """The download `name` in `raw`, or a PrepareError saying where it is published."""
    path = raw / name
    if not path.exists():
        raise PrepareError(f"{name} not found in {raw}: download it from {SOURCES.get(name, 'its official site')}")
    return path


def part(path):
    return path.with_name(path.name + ".part")  # never matches a "*.png" / "*.jpg" a loader globs for


def save_array(array, path, fmt):
    """Write a label map (uint8 PNG, uint16 TIFF) or an image atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(part(path), format=fmt)
    os.replace(part(path), path)


def save_text(text, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    part(path).write_text(text)
    os.replace(part(path), path)


def save_json(obj, path):
    save_text(json.dumps(obj), path)


def copy(src, dst):
    if dst.exists():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, part(dst))
    os.replace(part(dst), dst)
    return True


def unpack(raw, name, dest, place=lambda member: member, check=lambda rel: False):
    """Extract the archive raw/name under dest, once (a marker file records a finished extraction); returns the paths
    of the images it skipped as corrupt, already reported.

    place(member name) -> path relative to dest, or None to leave the member out. check(that path) -> whether the
    member is an image to check (check_image, on the bytes just read): a corrupt one is not written, and the marker is
    then not written either, so the next run checks it again. A file already there with the member's size is kept (it
    was checked when written), so an interrupted extraction resumes; every file is written under a temporary name first.
    """
    marker = dest / ".prepared" / f"{name}.unpacked"
    if marker.exists():
        return []
    archive = need(raw, name)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                members = [(i.filename, i.file_size, i) for i in z.infolist() if not i.is_dir()]
                bad = _extract(members, lambda i: z.open(i), dest, place, check, archive)
        else:
            with tarfile.open(archive) as t:
                members = ((m.name, m.size, m) for m in t if m.isfile())
                bad = _extract(members, t.extractfile, dest, place, check, archive)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise PrepareError(f"{archive} is incomplete or corrupt ({e}): download it again from "
                           f"{SOURCES.get(name, 'its official site')}") from None
    except RuntimeError as e:  # zipfile: an encrypted member without password
        raise PrepareError(f"{archive}: {e}; extract it yourself into {raw} first") from None
    if not bad:
        save_text("done\n", marker)
    return bad


def _extract(members, open_member, dest, place, check, archive):
    bad = []
    for member, size, handle in tqdm(members, desc=f"unpack {archive.name}", unit=" files", mininterval=1):
        rel = place(member)
        if rel is None or rel.startswith("/") or ".." in Path(rel).parts:
            continue
        target = dest / rel
        if target.exists() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_member(handle) as src:
            if check(rel):
                payload = src.read()  # an image: a few MB at most
                try:
                    check_image(payload, f"{member} in {archive}")
                except Corrupt as e:
                    bad.append(target)
                    tqdm.write(f"corrupt, skipped: {e}")
                    target.unlink(missing_ok=True)  # an earlier version of the file is not kept either
                    continue
                part(target).write_bytes(payload)
            else:
                with open(part(target), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        os.replace(part(target), target)
    return bad


def read_label(path):
    """A label map as a numpy array with its stored values (uint8 or uint16), or Corrupt."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im)
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise Corrupt(f"{path}: {e}") from None


def read_image(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise Corrupt(f"{path}: {e}") from None


def check_image(payload, name):
    """Corrupt unless `payload`, the bytes of the image file `name` (already read), is a whole image: every image that
    prepare.py copies is checked here, once. A full decode (read_image: 3 ms for a 640 x 480 JPEG) would make
    unpacking COCO CPU-bound; this fails on what it fails on, cheaply. A JPEG has no checksum but ends with the
    end-of-image marker, which its coded data cannot hold, so a truncated one lacks it: a JPEG that parses and ends
    with it is whole (0.05 ms); any other JPEG (data after the marker, or truncated) is decoded at 1/8 scale, which
    still parses every byte (1 ms). A PNG's chunk CRCs are checked without inflating it (Image.verify: 1 ms for 2 MB,
    a full decode 100 ms)."""
    try:
        with Image.open(io.BytesIO(payload)) as im:
            if im.format == "PNG":
                im.verify()
            elif not (im.format == "JPEG" and payload.endswith(b"\xff\xd9")):
                im.draft("RGB", (max(im.width // 8, 1), max(im.height // 8, 1)))  # JPEG only; others decode whole
                im.load()
    except UnidentifiedImageError:
        raise Corrupt(f"{name}: not an image file (it begins {payload[:24]!r})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise Corrupt(f"{name}: {e}") from None


def check_values(values, allowed, path, what):
    """Stop the run if `values` (a label map) holds a value outside `allowed` (a set or a boolean lookup table)."""
    found = np.unique(values)
    if isinstance(allowed, np.ndarray):
        bad = found[(found < 0) | (found >= len(allowed)) | ~allowed[np.clip(found, 0, len(allowed) - 1)]]
    else:
        bad = np.array([v for v in found if int(v) not in allowed])
    if len(bad):
        raise PrepareError(f"{path}: label values {bad.tolist()[:20]} outside {what}; is this the right download?")


def skipped_stems(bad, folder):
    """The stems (paths under `folder`, without suffix) of the skipped images `bad` that lie under `folder`."""
    return {p.relative_to(folder).with_suffix("").as_posix() for p in bad if folder in p.parents}


def lut(mapping, size=256, fill=data.IGNORE, dtype=np.uint8):
    """Lookup table raw value -> label from {raw: label}; every other raw value -> fill."""
    table = np.full(size, fill, dtype)
    table[list(mapping)] = list(mapping.values())
    return table


def convert_labels(jobs, read, outputs, desc, fmt="PNG", drop=()):
    """Write each label map of `jobs` once per output, skipping files already written.

    jobs: [(source path, output file name)]; read(source) -> raw array (raises Corrupt, PrepareError);
    outputs: [(folder, table, skip_empty)]: the label is table[raw]; skip_empty leaves out maps with no labelled
    pixel (the zsseg `_base` / `_novel` convention); drop: the output names whose image was skipped as corrupt, whose
    maps are not written (nor kept): data.py would pair them with a missing image. Returns the list of corrupt
    sources, already reported.
    """
    bad = []
    for src, name in tqdm(jobs, desc=desc, unit=" files", mininterval=1):
        if name in drop:
            for folder, _, _ in outputs:
                (folder / name).unlink(missing_ok=True)
            continue
        todo = [(folder / name, table, skip) for folder, table, skip in outputs if not (folder / name).exists()]
        if not todo:
            continue
        try:
            raw = read(src)
        except Corrupt as e:
            bad.append(src)
            tqdm.write(f"corrupt, skipped: {e}")
            continue
        for dst, table, skip_empty in todo:
            label = table[raw]
            if skip_empty and (label == data.IGNORE).all():
                continue
            save_array(label, dst, fmt)
    return bad


def label_count(folder, out, ignore=data.IGNORE):
    """zsseg's <gt_dir>_label_count.json: {"<name>.png": [the classes present, sorted]} for prompt learning. Written
    again, reading only the new maps, when the folder's maps are no longer those it lists (a skipped image's map
    written after a re-download)."""
    names = sorted(p.name for p in folder.glob("*.png"))
    counts = json.loads(out.read_text()) if out.exists() else {}
    if list(counts) == names:
        return
    counts = {name: counts[name] if name in counts else
              [int(v) for v in np.unique(read_label(folder / name)) if v != ignore]
              for name in tqdm(names, desc=f"count {out.name}", unit=" files", mininterval=1)}
    save_json(counts, out)


CORRUPT = []  # the corrupt files of this run (prepare() records a dataset as done only when there are none)


def report_corrupt(bad):
    CORRUPT.extend(bad)
    if bad:
        print(f"{len(bad)} corrupt file(s) skipped (listed above as 'corrupt, skipped'); re-download the archive that "
              f"holds them, or train without them.")


# ----------------------------------------------------------------------------------------------------------------------
# 2. Semantic segmentation: label maps in the detectron2 / MaskFormer / SAN / zsseg / mmseg layouts
# ----------------------------------------------------------------------------------------------------------------------
# COCO-Stuff: stuffthingmaps hold COCO category ids - 1 (0..181, 255 = unlabeled); 11 thing ids are never used. The
# 171 used ids, in order, are the 171 classes (zsseg.baseline / MaskFormer datasets/prepare_coco_stuff_164k_sem_seg.py).
COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_IDS = [i for i in range(182) if i not in COCO_UNUSED_IDS]
# zsseg's 15 unseen classes (the SPNet / ZS3 split), as stuffthingmaps ids: cow, giraffe, suitcase, frisbee, skateboard,
# carrot, scissors, cardboard, clouds, grass, playingfield, river, road, tree, wall-concrete.
COCO_NOVEL_IDS = (20, 24, 32, 33, 40, 56, 86, 99, 105, 123, 144, 147, 148, 168, 171)
COCO_BASE_IDS = [i for i in COCO_IDS if i not in COCO_NOVEL_IDS]
# VOC: 0 background, 1..20 classes, 255 boundary; zsseg's unseen: pottedplant, sheep, sofa, train, tvmonitor.
VOC_NOVEL_IDS = (16, 17, 18, 19, 20)
VOC_BASE_IDS = [i for i in range(1, 21) if i not in VOC_NOVEL_IDS]
# PASCAL Context 59: the raw PASCAL-in-Detail category ids of background (0) and the 59 classes, sorted; their rank
# is the label (background -> 0 -> 255 after "- 1"). SAN / mmseg pascal_context converters.
PCONTEXT_59_IDS = sorted([0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162,
                          420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72,
                          458, 34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115])
# ADE20K full (847): the ADE object-class id of each of the 847 classes, in label order, extracted with `ast` from
# MaskFormer's datasets/prepare_ade20k_full_sem_seg.py (ADE20K_SEM_SEG_FULL_CATEGORIES).
ADE847_IDS_FILE = data.CLASS_NAME_DIR / "ade20k_847_ade_ids.txt"


def prepare_coco_stuff_171(raw, root):
    coco = root / "coco"
    skipped = []
    for name in ("train2017.zip", "val2017.zip"):
        skipped += unpack(raw, name, coco, check=lambda rel: rel.endswith(".jpg"))
    unpack(raw, "stuffthingmaps_trainval2017.zip", coco / "stuffthingmaps")
    allowed = set(range(182)) | {255}
    full = lut({k: i for i, k in enumerate(COCO_IDS)})
    base = lut({k: i for i, k in enumerate(COCO_BASE_IDS)})
    novel = lut({k: i for i, k in enumerate(COCO_NOVEL_IDS)})
    out, bad = coco / "stuffthingmaps_detectron2", list(skipped)
    for split in ("train2017", "val2017"):
        sources = sorted((coco / "stuffthingmaps" / split).glob("*.png"))
        if not sources:
            raise PrepareError(f"no label maps in {coco / 'stuffthingmaps' / split}: is "
                               f"{raw / 'stuffthingmaps_trainval2017.zip'} complete?")

        def read(path):
            label = read_label(path)
            check_values(label, allowed, path, "COCO-Stuff's 0..181 and 255")
            return label
        # The full maps are written for every image (data.py pairs labels with images); the _base / _novel maps
        # leave out the images without a labelled pixel, as zsseg.baseline does.
        bad += convert_labels([(p, p.name) for p in sources], read,
                              [(out / split, full, False), (out / f"{split}_base", base, True),
                               (out / f"{split}_novel", novel, True)], f"labels {split}",
                              drop={s + ".png" for s in skipped_stems(skipped, coco / split)})
    label_count(out / "train2017_base", out / "train2017_base_label_count.json")
    label_count(out / "val2017", out / "val2017_label_count.json")
    report_corrupt(bad)
    return [coco / "train2017", coco / "val2017", *(out / f"{s}{v}" for s in ("train2017", "val2017")
                                                    for v in ("", "_base", "_novel")),
            out / "train2017_base_label_count.json", out / "val2017_label_count.json"]


def prepare_voc_20(raw, root):
    skipped = unpack(raw, "VOCtrainval_11-May-2012.tar", root,
                     lambda m: m[len("VOCdevkit/"):] if m.startswith(("VOCdevkit/VOC2012/JPEGImages/",
                                                                       "VOCdevkit/VOC2012/ImageSets/Segmentation/"))
                     else None, check=lambda rel: rel.startswith("VOC2012/JPEGImages/"))
    voc = root / "VOC2012"
    unpack(raw, "SegmentationClassAug.zip", voc,
           lambda m: m if m.startswith("SegmentationClassAug/") and m.endswith(".png") else None)
    copy(need(raw, "trainaug.txt"), voc / "train.txt")
    val_list = voc / "ImageSets/Segmentation/val.txt"
    if not val_list.exists():
        raise PrepareError(f"{raw / 'VOCtrainval_11-May-2012.tar'} holds no VOC2012/ImageSets/Segmentation/val.txt: "
                           f"download it again from {SOURCES['VOCtrainval_11-May-2012.tar']}")
    copy(val_list, voc / "val.txt")
    allowed = set(range(21)) | {255}
    full = lut({k: k - 1 for k in range(1, 21)})
    base = lut({k: i for i, k in enumerate(VOC_BASE_IDS)})
    novel = lut({k: i for i, k in enumerate(VOC_NOVEL_IDS)})
    out, bad = voc / "annotations_detectron2", list(skipped)

    def read(path):
        if not path.exists():
            raise PrepareError(f"{path} not found: {raw / 'SegmentationClassAug.zip'} lacks a listed name")
        label = read_label(path)
        check_values(label, allowed, path, "VOC's 0..20 and 255")
        return label
    for split in ("train", "val"):
        names = (voc / f"{split}.txt").read_text().split()
        # SAN / zsseg skip the maps with no labelled pixel, in every split (data.py lists VOC by its label files).
        bad += convert_labels([(voc / "SegmentationClassAug" / f"{n}.png", f"{n}.png") for n in names], read,
                              [(out / split, full, True), (out / f"{split}_base", base, True),
                               (out / f"{split}_novel", novel, True)], f"labels {split}",
                              drop={s + ".png" for s in skipped_stems(skipped, voc / "JPEGImages")})
    label_count(out / "train_base", out / "train_base_label_count.json")
    label_count(out / "val", out / "val_label_count.json")
    report_corrupt(bad)
    return [voc / "JPEGImages", *(out / f"{s}{v}" for s in ("train", "val") for v in ("", "_base", "_novel")),
            out / "train_base_label_count.json", out / "val_label_count.json"]


def prepare_ade20k_150(raw, root):
    skipped = unpack(raw, "ADEChallengeData2016.zip", root,
                     check=lambda rel: rel.startswith("ADEChallengeData2016/images/") and rel.endswith(".jpg"))
    ade = root / "ADEChallengeData2016"
    reduce_zero = lut({k: k - 1 for k in range(1, 151)})  # 0 (other) -> 255 (detectron2 prepare_ade20k_sem_seg.py)
    bad = list(skipped)

    def read(path):
        label = read_label(path)
        check_values(label, set(range(151)), path, "ADE20K's 0..150")
        return label
    for split in ("training", "validation"):
        sources = sorted((ade / "annotations" / split).glob("*.png"))
        if not sources:
            raise PrepareError(f"no label maps in {ade / 'annotations' / split}: is {raw / 'ADEChallengeData2016.zip'}"
                               f" complete?")
        bad += convert_labels([(p, p.name) for p in sources], read,
                              [(ade / "annotations_detectron2" / split, reduce_zero, False)], f"labels {split}",
                              drop={s + ".png" for s in skipped_stems(skipped, ade / "images" / split)})
    report_corrupt(bad)
    return [ade / "images", ade / "annotations_detectron2"]


def _resize_short_side(image, label, max_size=512):
    """MaskFormer's ADE-847 resize: a short side above 512 becomes 512 (bilinear image, nearest label), as cv2's
    INTER_LINEAR / INTER_NEAREST do (torch's un-antialiased bilinear and its 'nearest' follow the same sampling)."""
    h, w = label.shape
    if min(h, w) <= max_size:
        return image, label
    size = (max_size, round(w / h * max_size)) if w >= h else (round(h / w * max_size), max_size)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    image = F.interpolate(x, size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255).byte()
    label = F.interpolate(torch.from_numpy(label.astype(np.int64))[None, None].float(), size, mode="nearest")
    return image.permute(1, 2, 0).numpy(), label[0, 0].long().numpy()


def prepare_ade20k_847(raw, root):
    unpack(raw, "ADE20K_2021_17_01.zip", root)
    ade = root / "ADE20K_2021_17_01"
    index_file = ade / "index_ade20k.pkl"
    if not index_file.exists():
        raise PrepareError(f"{index_file} not found: is {raw / 'ADE20K_2021_17_01.zip'} the full ADE20K release?")
    with open(index_file, "rb") as f:
        index = pickle.load(f)  # the release's own index (a trusted file: pickle runs code)
    ids = [int(v) for v in ADE847_IDS_FILE.read_text().split()]
    table = lut({k: i for i, k in enumerate(ids)}, size=26 * 256, fill=data.IGNORE_16BIT, dtype=np.uint16)
    bad = []
    for folder, name in tqdm(list(zip(index["folder"], index["filename"])), desc="ADE-847", unit=" images",
                             mininterval=1):
        split = "validation" if name.split("_")[1] == "val" else "training"
        out_image = ade / "images_detectron2" / split / name
        out_label = ade / "annotations_detectron2" / split / (Path(name).stem + ".tif")
        if out_image.exists() and out_label.exists():
            continue
        src = root / folder / name
        try:
            image = np.array(read_image(src))
            seg = read_label(src.with_name(src.stem + "_seg.png"))
            if seg.ndim != 3 or seg.shape[:2] != image.shape[:2]:
                raise Corrupt(f"{src.stem}_seg.png: expected an RGB map of the image's size, got {seg.shape}")
        except Corrupt as e:
            bad.append(src)
            tqdm.write(f"corrupt, skipped: {e}")
            continue
        ade_class = (seg[..., 0] // 10).astype(np.int64) * 256 + seg[..., 1]  # the release's class encoding: R/10*256+G
        image, ade_class = _resize_short_side(image, ade_class)
        save_array(table[ade_class], out_label, "TIFF")  # classes outside the 847 -> 65535 (ignored)
        save_array(image, out_image, "JPEG")  # PIL's default quality, as MaskFormer's script saves them
    report_corrupt(bad)
    return [ade / "images_detectron2", ade / "annotations_detectron2"]


def _detail_images(raw):
    """The train / val images of PASCAL Context, with their segmentation annotations, from the PASCAL-in-Detail file
    trainval_merged.json (what the Detail API's getImgs(phase) and getMask read)."""
    path = need(raw, "trainval_merged.json")
    try:
        with open(path) as f:
            detail = json.load(f)
        images = {img["image_id"]: dict(img, annos=[]) for img in detail["images"]}
        for ann in detail["annos_segmentation"]:  # file order = the order getMask paints them, later on top
            images[ann["image_id"]]["annos"].append(ann)
    except (ValueError, KeyError) as e:
        raise PrepareError(f"{path} is incomplete or not the PASCAL-in-Detail file ({e!r}): download it again from "
                           f"{SOURCES['trainval_merged.json']}") from None
    return {phase: [img for img in images.values() if img["phase"] == phase] for phase in ("train", "val")}


def _detail_mask(img):
    """Detail.getMask(img): each segmentation's category id painted where its RLE mask is set."""
    from pycocotools import mask as rle
    mask = np.zeros((img["height"], img["width"]), np.int64)
    for ann in img["annos"]:
        seg = ann["segmentation"]
        if isinstance(seg.get("counts"), list):  # uncompressed RLE
            seg = rle.frPyObjects(seg, *seg["size"])
        mask[rle.decode(seg) > 0] = ann["category_id"]
    return mask


def prepare_pcontext_59(raw, root):
    unpack(raw, "VOCtrainval_03-May-2010.tar", root,
           lambda m: m if m.startswith("VOCdevkit/VOC2010/JPEGImages/") else None)
    jpegs = root / "VOCdevkit/VOC2010/JPEGImages"
    table = lut({k: i - 1 for i, k in enumerate(PCONTEXT_59_IDS) if i > 0}, size=max(PCONTEXT_59_IDS) + 1)
    allowed = np.zeros(len(table), bool)
    allowed[PCONTEXT_59_IDS] = True
    bad, out = [], root / "pcontext"
    for split, images in _detail_images(raw).items():
        for img in tqdm(images, desc=f"PC-59 {split}", unit=" images", mininterval=1):
            name = img["file_name"]
            out_label = out / split / "label" / (Path(name).stem + ".png")
            if not out_label.exists():
                mask = _detail_mask(img)
                check_values(mask, allowed, f"trainval_merged.json, image {name}", "the 59 classes + background")
                save_array(table[mask], out_label, "PNG")
            try:
                _copy_checked(jpegs / name, out / split / "image" / name)
            except Corrupt as e:
                bad.append(jpegs / name)
                tqdm.write(f"corrupt, skipped: {e}")
                out_label.unlink()  # no label without its image
    report_corrupt(bad)
    return [out / "train", out / "val"]


def _copy_checked(src, dst):
    """Copy an image that decodes (a truncated JPEG is Corrupt)."""
    if dst.exists():
        return
    if not src.exists():
        raise Corrupt(f"{src}: missing from the archive")
    payload = src.read_bytes()
    check_image(payload, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part(dst).write_bytes(payload)
    os.replace(part(dst), dst)


def prepare_pcontext_459(raw, root):
    from scipy.io import loadmat
    unpack(raw, "VOCtrainval_03-May-2010.tar", root,
           lambda m: m if m.startswith("VOCdevkit/VOC2010/JPEGImages/") else None)
    jpegs, mats = root / "VOCdevkit/VOC2010/JPEGImages", root / "VOCdevkit/VOC2010/trainval"
    unpack(raw, "trainval.tar.gz", mats.parent,
           lambda m: m if m.startswith("trainval/") and m.endswith(".mat") else None)
    table = np.full(460, data.IGNORE_16BIT, np.uint16)
    table[1:] = np.arange(459)  # SAN: LabelMap - 1 as uint16, so 0 (unlabelled) -> 65535
    bad, out = [], root / "pcontext_full"
    for split, images in _detail_images(raw).items():
        for img in tqdm(images, desc=f"PC-459 {split}", unit=" images", mininterval=1):
            name = img["file_name"]
            src, out_label = mats / (Path(name).stem + ".mat"), out / split / "label" / (Path(name).stem + ".tif")
            try:
                if not out_label.exists():
                    try:
                        label = np.asarray(loadmat(src)["LabelMap"]).astype(np.int64)  # uint16 or double
                    except FileNotFoundError:
                        raise PrepareError(f"{src.name} not found: is {raw / 'trainval.tar.gz'} complete?") from None
                    except Exception as e:  # scipy raises several types for a damaged .mat
                        raise Corrupt(f"{src}: {e!r}") from None
                    check_values(label, set(range(460)), src, "PASCAL Context's 0..459")
                    _copy_checked(jpegs / name, out / split / "image" / name)
                    save_array(table[label], out_label, "TIFF")
            except Corrupt as e:
                bad.append(src)
                tqdm.write(f"corrupt, skipped: {e}")
    report_corrupt(bad)
    return [out / "train", out / "val"]


def prepare_cityscapes(raw, root):
    city = root / "cityscapes"
    skipped = unpack(raw, "leftImg8bit_trainvaltest.zip", city, check=lambda rel: rel.endswith("_leftImg8bit.png"))
    unpack(raw, "gtFine_trainvaltest.zip", city)
    # cityscapesScripts' createTrainIdLabelImgs paints the same polygons with train ids that *_labelIds.png holds
    # as label ids, so mapping the label ids through labels.py's id -> trainId table (data.py) gives the same file.
    bad = list(skipped)
    allowed = set(range(34)) | {255}  # labelIds 0..33; -1 (license plate) is never painted

    def read(path):
        label = read_label(path)
        check_values(label, allowed, path, "Cityscapes' label ids 0..33")
        return label
    for split in ("train", "val"):
        sources = sorted((city / "gtFine" / split).rglob("*_gtFine_labelIds.png"))
        if not sources:
            raise PrepareError(f"no *_gtFine_labelIds.png in {city / 'gtFine' / split}: is "
                               f"{raw / 'gtFine_trainvaltest.zip'} complete?")
        jobs = [(p, p.relative_to(city / "gtFine" / split).as_posix().replace("_labelIds", "_labelTrainIds"))
                for p in sources]
        drop = {s.replace("_leftImg8bit", "_gtFine_labelTrainIds.png")
                for s in skipped_stems(skipped, city / "leftImg8bit" / split)}
        bad += convert_labels(jobs, read, [(city / "gtFine" / split, data.CITYSCAPES_ID_TO_TRAIN_ID.astype(np.uint8),
                                            False)], f"train ids {split}", drop=drop)
    report_corrupt(bad)
    return [city / "leftImg8bit", city / "gtFine"]


# ----------------------------------------------------------------------------------------------------------------------
# 3. COCO detection with the semi-supervised splits of Soft Teacher (STAC protocol)
# ----------------------------------------------------------------------------------------------------------------------
SEMI_PERCENTS, SEMI_FOLDS = (1, 5, 10), (1, 2, 3, 4, 5)


def semi_supervised_split(num_images, percent, fold):
    """Indices of the labelled images of fold `fold` at `percent` %: int(percent / 100 * N) of the N images of
    instances_train2017.json, drawn without replacement by numpy with seed = fold. SoftTeacher's
    tools/dataset/semi_coco.py draws the same way with seed fold + offset; with offset 0 the indices are the same."""
    rng = np.random.RandomState(fold)
    return set(rng.choice(num_images, size=int(percent / 100.0 * num_images), replace=False).tolist())


def prepare_coco_detection(raw, root):
    coco = root / "coco"
    full = (raw / "unlabeled2017.zip").exists() and (raw / "image_info_unlabeled2017.zip").exists()
    skipped = []
    for name in ("train2017.zip", "val2017.zip", "unlabeled2017.zip")[:3 if full else 2]:
        skipped += unpack(raw, name, coco, check=lambda rel: rel.endswith(".jpg"))
    for name in ("annotations_trainval2017.zip", "image_info_unlabeled2017.zip")[:2 if full else 1]:
        unpack(raw, name, coco)
    ann_dir, out = coco / "annotations", coco / "annotations" / "semi_supervised"
    # data.py's CocoDetection reads every image its json lists. The json files written here (the splits, the
    # unlabelled set) leave out the skipped images and their boxes; the published instances_{train,val}2017.json are
    # kept as they are (val2017's metric is defined on all of its images). left_out.json records what the written
    # files leave out: when that changes (a re-download), they are written again.
    left_out = sorted(p.relative_to(coco).as_posix() for p in skipped if p.parent.name != "val2017")
    record = out / "left_out.json"
    if (json.loads(record.read_text()) if record.exists() else []) != left_out:
        for path in [*out.glob("instances_train2017.*-unlabeled.json"), ann_dir / "instances_unlabeled2017.json"]:
            path.unlink(missing_ok=True)  # the file that marks each one written
        if left_out:
            save_json(left_out, record)
        else:
            record.unlink(missing_ok=True)
    todo = [(p, f) for p in SEMI_PERCENTS for f in SEMI_FOLDS
            if not (out / f"instances_train2017.{f}@{p}-unlabeled.json").exists()]
    if todo:
        path = ann_dir / "instances_train2017.json"
        try:
            train = json.loads(path.read_text())
            images = train["images"]
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise PrepareError(f"{path} is missing or damaged ({e!r}): download annotations_trainval2017.zip again "
                               f"from {SOURCES['annotations_trainval2017.zip']}") from None
        gone = {img["id"] for img in images if f"train2017/{img['file_name']}" in left_out}
        for percent, fold in tqdm(todo, desc="semi-supervised splits", unit=" splits"):
            chosen = semi_supervised_split(len(images), percent, fold)  # drawn over all images, skipped ones too
            labelled_ids = {images[i]["id"] for i in chosen}
            for suffix, keep in (("", True), ("-unlabeled", False)):  # the unlabelled one last: it marks the split done
                split = {key: train[key] for key in ("info", "licenses", "categories")}
                split["images"] = [img for img in images if (img["id"] in labelled_ids) == keep
                                   and img["id"] not in gone]
                split["annotations"] = [a for a in train["annotations"] if (a["image_id"] in labelled_ids) == keep
                                        and a["image_id"] not in gone]
                save_json(split, out / f"instances_train2017.{fold}@{percent}{suffix}.json")
    written = [coco / "train2017", coco / "val2017", ann_dir / "instances_val2017.json", out]
    # The full setting's unlabelled set (optional): unlabeled2017 images + COCO categories, no annotations.
    if full:
        target = ann_dir / "instances_unlabeled2017.json"
        if not target.exists():
            info = json.loads((ann_dir / "image_info_unlabeled2017.json").read_text())
            categories = json.loads((ann_dir / "instances_val2017.json").read_text())["categories"]
            info["images"] = [img for img in info["images"] if f"unlabeled2017/{img['file_name']}" not in left_out]
            save_json(dict(info, annotations=[], categories=categories), target)
        written += [coco / "unlabeled2017", target]
    else:
        print("unlabeled2017.zip and image_info_unlabeled2017.zip not in --raw: the full setting's unlabelled set "
              "(annotations/instances_unlabeled2017.json) was not written; the partial splits were.")
    listed = [p for p in skipped if p.parent.name != "unlabeled2017"]
    if listed:
        print(f"{len(listed)} skipped train2017 / val2017 image(s) are still listed in instances_train2017.json / "
              f"instances_val2017.json (kept as published; the semi-supervised splits leave them out): training on all "
              f"of train2017 or evaluating on val2017 stops at the first of them with data.py's 'cannot read' until "
              f"they are replaced.")
    report_corrupt(skipped)
    return written


# ----------------------------------------------------------------------------------------------------------------------
# 4. Pose transfer: Market-1501 and DeepFashion in Pose-Transfer's layout (heatmaps are computed on the fly)
# ----------------------------------------------------------------------------------------------------------------------
def _check_csv(path, header, sep):
    first = path.read_text().split("\n", 1)[0].strip()
    if first.split(sep) != header:
        raise PrepareError(f"{path}: the first line is {first!r}, expected {sep.join(header)!r}: not the "
                           f"Pose-Transfer file?")


def _copy_tables(raw, out, annotations, pairs):
    for name in annotations:
        _check_csv(need(raw, name), ["name", "keypoints_y", "keypoints_x"], ":")
    for name in pairs:
        _check_csv(need(raw, name), ["from", "to"], ",")
    for name in (*annotations, *pairs):
        copy(raw / name, out / name)
    for name in pairs:  # every image of a pair must be in place
        phase = "train" if "train" in name else "test"
        lines = (out / name).read_text().split("\n")[1:]
        missing = {n for line in lines if line.strip() for n in line.strip().split(",")
                   if not (out / phase / n).exists()}
        if missing:
            print(f"warning: {len(missing)} image(s) of {name} are not in {out / phase}, e.g. {sorted(missing)[:3]}")


def prepare_market1501(raw, root):
    out = root / "market_data"

    def place(member):  # Market-1501-v15.09.15/bounding_box_{train,test}/<name>.jpg -> {train,test}/<name>.jpg
        parts = Path(member).parts
        folders = {"bounding_box_train": "train", "bounding_box_test": "test"}
        if len(parts) >= 2 and parts[-2] in folders and parts[-1].endswith(".jpg"):
            return f"{folders[parts[-2]]}/{parts[-1]}"
        return None
    report_corrupt(unpack(raw, "Market-1501-v15.09.15.zip", out, place, check=lambda rel: True))
    _copy_tables(raw, out, ["market-annotation-train.csv", "market-annotation-test.csv"],
                 ["market-pairs-train.csv", "market-pairs-test.csv"])
    return [out / "train", out / "test", *sorted(out.glob("market-*.csv"))]


def fashion_name(rel):
    """Pose-Transfer's flat DeepFashion name: WOMEN/Tees_Tanks/id_00007838/05_7_additional.jpg ->
    fashionWOMENTees_Tanksid0000783805_7additional.jpg (the id loses its '_', the file keeps only its first '_')."""
    gender, category, identity, file = Path(rel).parts[-4:]
    head, *rest = file.split("_")
    return "fashion" + gender + category + identity.replace("_", "") + head + "_" + "".join(rest)


def prepare_deepfashion(raw, root):
    out = root / "fashion_data"
    if (raw / "img.zip").exists() or not (raw / "img").is_dir():  # or the img/ that `unzip -P` gave
        unpack(raw, "img.zip", raw)  # In-shop's img.zip
    for name in ("train.lst", "test.lst"):
        copy(need(raw, name), out / name)
    phase = {n: p for p in ("train", "test") for n in (out / f"{p}.lst").read_text().split() if n.endswith(".jpg")}
    sources = sorted((raw / "img").rglob("*.jpg"))
    bad, found = [], set()
    for src in tqdm(sources, desc="DeepFashion", unit=" images", mininterval=1):
        name = fashion_name(src.relative_to(raw / "img"))
        if name not in phase:
            continue
        found.add(name)
        dst = out / phase[name] / name
        if dst.exists():
            continue
        try:
            image = read_image(src)
        except Corrupt as e:
            bad.append(src)
            tqdm.write(f"corrupt, skipped: {e}")
            continue
        if image.size != (256, 256):
            raise PrepareError(f"{src} is {image.size[0]}x{image.size[1]}: expected the 256x256 images of In-shop "
                               f"Img/img.zip (not img_highres)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        image.crop((40, 0, 216, 256)).save(part(dst), format="JPEG")  # 176 x 256, PIL's default quality as official
        os.replace(part(dst), dst)
    if len(found) < len(phase):
        print(f"warning: {len(phase) - len(found)} image(s) named in train.lst / test.lst are not in {raw / 'img'}")
    report_corrupt(bad)
    _copy_tables(raw, out, ["fasion-resize-annotation-train.csv", "fasion-resize-annotation-test.csv"],
                 ["fasion-resize-pairs-train.csv", "fasion-resize-pairs-test.csv"])
    return [out / "train", out / "test", *sorted(out.glob("fasion-*.csv")), out / "train.lst", out / "test.lst"]


# ----------------------------------------------------------------------------------------------------------------------
# 5. The command line
# ----------------------------------------------------------------------------------------------------------------------
DATASETS = {  # name -> (function, the command that uses it)
    "coco_stuff_171": (prepare_coco_stuff_171, "python train.py --model san --preset paper --data-root {root}"),
    "ade20k_150": (prepare_ade20k_150, "python train.py --model ann --preset ade20k --data-root {root}"),
    "ade20k_847": (prepare_ade20k_847, "python eval.py --ckpt runs/san/ckpt.pt --data-root {root}  (SAN evaluates "
                                       "ADE-847 with its paper preset)"),
    "pcontext_59": (prepare_pcontext_59, "python train.py --model ann --preset pcontext --data-root {root}"),
    "pcontext_459": (prepare_pcontext_459, "python eval.py --ckpt runs/san/ckpt.pt --data-root {root}  (SAN evaluates "
                                           "PC-459 with its paper preset)"),
    "voc_20": (prepare_voc_20, "python eval.py --ckpt runs/san/ckpt.pt --data-root {root}  (SAN evaluates VOC-20 with "
                               "its paper preset; zsseg trains on annotations_detectron2/train_base)"),
    "cityscapes": (prepare_cityscapes, "python train.py --model ann --preset paper --data-root {root}"),
    "coco_detection": (prepare_coco_detection,
                       "python train.py --model soft_teacher --preset paper --data-root {root}"),
    "market1501": (prepare_market1501, "python train.py --model pose_transfer --preset paper --data-root {root}"),
    "deepfashion": (prepare_deepfashion, "python train.py --model pose_transfer --preset paper --data-root {root}  "
                                         "(the DeepFashion preset)"),
}


def prepare(name, raw, root):
    """Prepare dataset `name` from the downloads in `raw` under `root`; returns the list of paths written (from the
    record of an earlier run when it finished)."""
    raw, root = Path(raw).expanduser().resolve(), Path(root).expanduser().resolve()
    record = root / ".prepared" / f"{name}.json"
    if record.exists():
        print(f"{name}: already prepared (remove {record} to check it again)")
        return [Path(p) for p in json.loads(record.read_text())]
    if not raw.is_dir():
        raise PrepareError(f"--raw {raw} is not a folder: it should hold the downloads of {name}")
    CORRUPT.clear()
    written = DATASETS[name][0](raw, root)
    if not CORRUPT:  # else the next run looks at every file again
        save_json([str(p) for p in written], record)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--raw", required=True, help="folder holding the downloads, as their sites publish them")
    parser.add_argument("--data-root", default="datasets", help="where the prepared datasets go (train.py's)")
    args = parser.parse_args(argv)
    try:
        written = prepare(args.dataset, args.raw, args.data_root)
    except PrepareError as e:
        print(f"error: prepare.py {args.dataset}: {e}", file=sys.stderr)
        return 2  # a user mistake: exit status 2, as train.py and eval.py
    print(f"{args.dataset} is ready under {Path(args.data_root).resolve()}:")
    for path in written:
        print(f"  {path}")
    print("use it with:\n  " + DATASETS[args.dataset][1].format(root=args.data_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
