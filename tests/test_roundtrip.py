"""The user's path end to end: `train.py` for a few iterations in a subprocess, then `eval.py` on its checkpoint
(ANN on the toy data; SAN on a tiny random CLIP, including single-image segmentation with a free vocabulary)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import bench

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script, *args):
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_ann_train_then_eval(tmp_path):
    out = run("train.py", "--model", "ann", "--max_iters", 2, "--batch_size", 2, "--eval_interval", 2,
              "--num_workers", 0, "--out", tmp_path)
    assert "ann done. Final metrics" in out and "toy_context/mIoU" in out
    for name in ("ckpt.pt", "metrics.json", "loss.png", "predictions.png", "log.jsonl", "config.json"):
        assert (tmp_path / name).is_file(), name
    trained = json.loads((tmp_path / "metrics.json").read_text())
    run("eval.py", "--ckpt", tmp_path / "ckpt.pt", "--model", "ann")
    evaluated = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert evaluated["toy_context/mIoU"] == trained["toy_context/mIoU"]  # the same model, rebuilt from the file


def test_san_train_then_eval_and_segment_an_image(tmp_path, tiny_clip):
    config, weights = tiny_clip({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 6, "width": 32,
                                                                 "head_width": 16, "patch_size": 8},
                                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                              "layers": 1}})
    out = run("train.py", "--model", "san", "--clip_model", config, "--clip_pretrained", weights,
              "--clip_trained_by", "", "--crop_size", 64, "--side_image_size", 64, "--side_width", 32,
              "--side_heads", 2, "--num_queries", 4, "--decoder_dim", 32, "--num_points", 128,
              "--max_iters", 2, "--batch_size", 2, "--eval_interval", 2, "--num_workers", 0, "--out", tmp_path / "run")
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
    # bench.py --compare reads the same run: its accuracy columns are the run's metrics, its parameter count SAN's
    table = bench.compare_runs(tmp_path / "run", tmp_path / "run", n=2).splitlines()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[0] == "san" and table[3].startswith(table[2].rsplit("|", 2)[0])  # all but the timing
    assert cells[1:4] == [f"{metrics[f'toy_shapes/{k}']:.1f}" for k in ("mIoU_seen", "mIoU_unseen", "hIoU")]
    assert float(cells[5]) > 0
