"""Every mistake a user makes gets one clear message and a non-zero exit, never a traceback; no command overwrites an
earlier run; a run killed at any moment (mid-training, mid-save) resumes to the weights of an uninterrupted run.

The command-line table runs train.py's and eval.py's main() in-process (a traceback there is an exception escaping
main, which fails the test); the cases that need a real process (a DataLoader worker's error, SIGKILL) run one."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluation
import train

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
ENV = {**os.environ, "PYTHONPATH": str(FIXTURES), "OMP_NUM_THREADS": "1"}


def train_here(*argv, fixtures=True):
    """train.py's main(argv) in this process (no interpreter start-up), from the repository folder, on one thread as
    the subprocesses (float sums in another order would make bitwise comparisons of weights fail)."""
    old_path, old_cwd, old_threads = list(sys.path), os.getcwd(), torch.get_num_threads()
    try:
        if fixtures:
            sys.path.insert(0, str(FIXTURES))
        os.chdir(REPO)
        torch.set_num_threads(1)
        train.main([str(a) for a in argv])
    finally:
        sys.path[:], _ = old_path, os.chdir(old_cwd)
        torch.set_num_threads(old_threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny_seg run (6 iterations, a second): its folder."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_here("--model", "tiny_seg", "--out", out)
    return out


def cityscapes(root, corrupt=False):
    """A one-image Cityscapes layout under root; with corrupt=True the image file is truncated garbage."""
    image = root / "cityscapes/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    label = root / "cityscapes/gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    for p in (image, label):
        p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(label)
    if corrupt:
        image.write_bytes(image.read_bytes()[:30])
    return image


def call(main, argv, capsys, monkeypatch):
    """main(argv) in-process -> (exit status, stdout + stderr)."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out + err


# (script, arguments, a phrase the message must contain); {run} is a finished tiny_seg run, {tmp} an empty folder
MISTAKES = [
    ("train", ["--model", "nope"], "unknown model 'nope'"),
    ("train", ["--model", "ann", "--preset", "huge"], "has no preset 'huge'"),
    ("train", ["--model", "ann", "--max_iters", "abc"], "--max-iters: expected an int, got 'abc'"),
    ("train", ["--model", "ann", "--lr", "fast"], "--lr: expected a float, got 'fast'"),
    ("train", ["--model", "ann", "--pyramid_sizes", "1,x"], "expected comma-separated ints"),
    ("train", ["--model", "ann", "--amp", "maybe"], "expected true or false"),
    ("train", ["--model", "ann", "--no_such_field", "1"], "unrecognized arguments: --no_such_field"),
    ("train", ["--model", "tiny_seg", "--resume", "--fresh"], "choose one"),
    ("train", ["--model", "tiny_seg", "--resume", "--out", "{tmp}/none"], "no checkpoint at"),
    ("train", ["--model", "tiny_seg", "--out", "{run}"], "already holds a run"),
    ("train", ["--model", "tiny_seg", "--train_dataset", "nope", "--out", "{tmp}/a"], "unknown dataset 'nope'"),
    ("train", ["--model", "tiny_seg", "--train_dataset", "cityscapes", "--data_root", "{tmp}/missing", "--out",
               "{tmp}/b"], "Expected layout"),
    ("train", ["--model", "tiny_seg", "--batch_size", "0", "--out", "{tmp}/c"], "batch_size"),
    ("train", ["--model", "tiny_seg", "--lr", "1e30", "--max_iters", "50", "--out", "{tmp}/d"],
     "non-finite loss at step"),
    ("train", ["--model", "san", "--clip_model", "{tmp}/no_clip.json", "--clip_trained_by", "", "--out", "{tmp}/e"],
     "no_clip.json' not found"),
    ("train", ["--model", "ann", "--preset", "paper", "--data_root", "{tmp}/missing", "--out", "{tmp}/f"],
     "cityscapes/leftImg8bit"),
    ("eval", ["--ckpt", "{tmp}/missing.pt"], "no checkpoint at"),
    ("eval", ["--ckpt", "{tmp}/corrupt.pt"], "not a readable checkpoint"),
    ("eval", ["--ckpt", "{tmp}/foreign.pt"], "not a checkpoint written by this project"),
    ("eval", ["--ckpt", "{run}/ckpt.pt", "--model", "san"], "checkpoint of model 'tiny_seg', not 'san'"),
    ("eval", ["--ckpt", "{run}/ckpt.pt", "--image", "{tmp}/missing.png"], "no image at"),
    ("eval", ["--ckpt", "{run}/ckpt.pt", "--image", "{tmp}/notes.txt"], "cannot read"),
    ("eval", ["--ckpt", "{run}/ckpt.pt", "--image", "{tmp}/ok.png", "--vocab", "cat,dog"], "fixed set of 7 classes"),
    ("eval", ["--ckpt", "{run}/ckpt.pt", "--image", "{tmp}/ok.png", "--vocab", " , "], "--vocab is empty"),
    ("eval", ["--ckpt", "{run}/ckpt.pt", "--vocab", "cat"], "give --image too"),
    ("eval", ["--ckpt", "{run}/ckpt.pt", "--data-root", "{tmp}/missing"], None),  # toy data: the root is unused
]


@pytest.mark.parametrize("script, argv, phrase", MISTAKES, ids=[" ".join(a)[:60] for _, a, _ in MISTAKES])
def test_a_mistake_is_one_clear_message(script, argv, phrase, trained, tmp_path, capsys, monkeypatch):
    ckpt = (trained / "ckpt.pt").read_bytes()
    (tmp_path / "corrupt.pt").write_bytes(ckpt[:1000])
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ok.png")
    argv = [a.format(run=trained, tmp=tmp_path) for a in argv]
    main = train.main if script == "train" else evaluation.main
    if phrase is None:  # a case that must succeed
        main(argv)
        return
    code, output = call(main, argv, capsys, monkeypatch)
    assert code == 2, output
    assert phrase in output
    assert "Traceback" not in output and "weights_only=False" not in output
    assert len(output.strip().splitlines()) <= 3 or "Expected layout" in output, output  # a line or two (+ usage)


def test_a_corrupt_file_in_a_loader_worker_names_the_file(tmp_path):
    image = cityscapes(tmp_path / "data", corrupt=True)
    result = subprocess.run([sys.executable, "train.py", "--model", "tiny_seg", "--train_dataset", "cityscapes",
                             "--data_root", tmp_path / "data", "--num_workers", "1", "--out", tmp_path / "run"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"error: cannot read {image}" in result.stderr and "the run stops" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_rerun_never_overwrites_and_fresh_moves_the_old_run_aside(tmp_path, capsys):
    out = tmp_path / "run"
    train_here("--model", "tiny_seg", "--out", out)
    first = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit):
        train_here("--model", "tiny_seg", "--out", out)
    message = capsys.readouterr().err
    assert "already holds a run" in message and "--resume" in message and "--fresh" in message
    assert (out / "ckpt.pt").read_bytes() == first  # untouched
    train_here("--model", "tiny_seg", "--out", out, "--fresh", "--max_iters", "4")
    assert (tmp_path / "run.1" / "ckpt.pt").read_bytes() == first  # the earlier run, moved aside whole
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


def final_weights(folder):
    state = torch.load(Path(folder) / "ckpt.pt", weights_only=True)
    return state["step"], state["model"]


def kill_when(proc, condition, timeout=120):
    start = time.time()
    while not condition() and proc.poll() is None and time.time() - start < timeout:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_weights(a, b):
    (step_a, wa), (step_b, wb) = final_weights(a), final_weights(b)
    assert step_a == step_b and wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_killed_mid_save_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL while a checkpoint is being written (a 64 MiB buffer makes each write last): the half-written
    ckpt.pt.tmp is never read, the previous ckpt.pt is intact, and the resumed run ends on the same weights."""
    args = ["--model", "tiny_seg", "--max_iters", "12", "--ckpt_interval", "4", "--ballast_mb", "64"]
    train_here(*args, "--out", tmp_path / "full")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out", killed], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait for the second save to start (the first has been renamed to ckpt.pt)
    kill_when(proc, lambda: (killed / "ckpt.pt").exists() and (killed / "ckpt.pt.tmp").exists())
    assert (killed / "ckpt.pt.tmp").exists(), "the run was not caught mid-save"
    assert final_weights(killed)[0] == 4  # the last whole checkpoint
    train_here(*args, "--out", killed, "--resume")
    assert_same_weights(tmp_path / "full", killed)


def test_a_real_toy_with_loader_workers_resumes_to_the_same_weights(tmp_path):
    """ANN's toy (BatchNorm, dropout, 2 loader workers), killed after its first checkpoint, then resumed."""
    args = ["--model", "ann", "--crop_size", "64", "--batch_size", "2", "--max_iters", "6", "--ckpt_interval", "2",
            "--eval_interval", "1000", "--num_workers", "2", "--log_interval", "1"]
    train_here(*args, "--out", tmp_path / "full", fixtures=False)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out", killed], cwd=REPO,
                            env={**ENV, "PYTHONPATH": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: (killed / "ckpt.pt").exists())
    assert final_weights(killed)[0] < 6, "the run finished before it could be killed"
    train_here(*args, "--out", killed, "--resume", fixtures=False)
    assert_same_weights(tmp_path / "full", killed)
