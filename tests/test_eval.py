"""eval.py's metrics against hand-computed confusion matrices."""
import numpy as np
import pytest
import torch

import eval as evaluation


def test_confusion_matrix_skips_ignored_pixels():
    label = torch.tensor([[0, 1, 1], [2, 255, 2]])
    pred = torch.tensor([[0, 1, 0], [2, 1, 1]])
    conf = evaluation.confusion_matrix(pred, label, 3)
    assert conf.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


def test_segmentation_metrics_by_hand():
    # rows: ground truth, columns: prediction. Class 2 is never in the ground truth but predicted once;
    # class 3 is neither present nor predicted and must be left out.
    conf = torch.tensor([[3, 1, 0, 0],
                         [0, 4, 1, 0],
                         [0, 0, 0, 0],
                         [0, 0, 0, 0]])
    m = evaluation.segmentation_metrics(conf, ["a", "b", "c", "d"])
    iou_a, iou_b = 3 / (4 + 3 - 3), 4 / (5 + 5 - 4)  # tp / (gt + pred - tp)
    assert m["IoU/a"] == pytest.approx(100 * iou_a) and m["IoU/b"] == pytest.approx(100 * iou_b)
    assert m["IoU/c"] == 0 and "IoU/d" not in m
    assert m["mIoU"] == pytest.approx(100 * (iou_a + iou_b) / 3)  # c counts as 0, d does not count
    assert m["mACC"] == pytest.approx(100 * (3 / 4 + 4 / 5) / 2)
    assert m["pACC"] == pytest.approx(100 * 7 / 9)
    assert m["fwIoU"] == pytest.approx(100 * (4 / 9 * iou_a + 5 / 9 * iou_b))


def test_seen_unseen_harmonic():
    conf = torch.diag(torch.tensor([10, 10, 10, 10]))
    conf[2, 3] = 10  # class 2 (unseen): IoU 1/2; class 3 (unseen): IoU 1/2
    m = evaluation.segmentation_metrics(conf, seen=[0, 1])
    assert m["mIoU_seen"] == pytest.approx(100) and m["mIoU_unseen"] == pytest.approx(50)
    assert m["hIoU"] == pytest.approx(2 * 100 * 50 / 150)


def coco_case(detections):
    """Two images, two classes (category ids 1, 2). Image 1: a large class-1 box and a small class-2 box; image 2: a
    second large class-1 box. Boxes xywh."""
    images = [{"id": 1, "height": 200, "width": 200}, {"id": 2, "height": 200, "width": 200}]
    truths = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100], "area": 10000, "iscrowd": 0},
              {"image_id": 1, "category_id": 2, "bbox": [150, 150, 20, 20], "area": 400, "iscrowd": 0},
              {"image_id": 2, "category_id": 1, "bbox": [50, 50, 100, 100], "area": 10000, "iscrowd": 0}]
    coco = evaluation.coco_from_boxes(images, truths, num_classes=2)
    return evaluation.coco_box_metrics(coco, detections, [1, 2])


def test_coco_box_map_perfect_detections():
    found = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100], "score": 0.9},
             {"image_id": 1, "category_id": 2, "bbox": [150, 150, 20, 20], "score": 0.8},
             {"image_id": 2, "category_id": 1, "bbox": [50, 50, 100, 100], "score": 0.7}]
    assert coco_case(found) == pytest.approx({"AP": 100, "AP50": 100, "AP75": 100, "APs": 100, "APm": -1, "APl": 100})
    assert coco_case([]) == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def test_coco_box_map_by_hand():
    """Class 1: the image-1 box found exactly (score 0.9), a false positive (0.8), the image-2 box missed: precision 1
    up to recall 1/2, so 51 of COCO's 101 recall points have precision 1 -> AP 100 * 51/101 at every IoU threshold.
    Class 2: found with IoU 0.72 (height 14.4 of 20): a hit at the IoU thresholds 0.50 ... 0.70 (5 of 10), a miss at
    0.75 ... 0.95 -> AP 50, AP50 100, AP75 0. The mean over the two classes; APs is class 2's, APl class 1's."""
    found = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100], "score": 0.9},
             {"image_id": 2, "category_id": 1, "bbox": [0, 150, 40, 40], "score": 0.8},
             {"image_id": 1, "category_id": 2, "bbox": [150, 150, 20, 14.4], "score": 0.8}]
    class1 = 100 * 51 / 101
    expected = {"AP": (class1 + 50) / 2, "AP50": (class1 + 100) / 2, "AP75": (class1 + 0) / 2, "APs": 50.0,
                "APm": -1.0, "APl": class1}
    got = coco_case(found)
    assert got == pytest.approx(expected, abs=1e-6)


def test_toy_shape_classes_are_drawn_in_their_own_colours():
    """predictions.png: a reader maps a region to its object by colour (a blue square is blue, not a palette red), the
    three shapes of a colour are told apart by shade and by the legend's marker; other names keep the palette."""
    import data
    names = [*data.TOY_SEGMENTATION_CLASSES, "cat"]
    colours = evaluation.class_colours(names)
    assert colours.shape == (len(names), 3)
    for k, name in enumerate(data.SHAPE_CLASSES):
        own, drawn = np.asarray(data.COLOURS[name.split()[0]]), colours[k]
        assert (drawn - drawn.mean()) @ (own - own.mean()) > 0, name  # the same hue, lighter or darker
    for colour in data.COLOURS:  # square, circle, triangle of one colour: three different shades
        shades = {tuple(colours[names.index(f"{colour} {s}")].round(3)) for s in data.SHAPES}
        assert len(shades) == 3, colour
    assert tuple(colours[names.index("cat")]) == tuple(evaluation.palette(len(names))[names.index("cat")])
    markers = [h.get_marker() for h in evaluation.legend_handles(["red square", "red circle", "green triangle"],
                                                                colours[:3])]
    assert markers == ["s", "o", "^"]
    label = torch.tensor([[names.index("blue square"), 255]])
    rgb = evaluation.colourise(label, len(names), colours)
    assert tuple(rgb[0, 0]) == tuple(colours[names.index("blue square")]) and tuple(rgb[0, 1]) == (0, 0, 0)
