"""eval.py's metrics against hand-computed confusion matrices."""
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
