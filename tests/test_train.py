"""train.py's machinery: command line, schedule, sampler, DDP, checkpoints and resume, on a two-conv fixture model
(tests/fixtures/tiny_seg.py) so that each run takes a second or two."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "fixtures"), "OMP_NUM_THREADS": "1"}


def run(args, **kw):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300, **kw)


def losses(out):
    """{step: loss} from a run's log; a resumed run's later record of a step wins."""
    records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def cli(argv, capsys):
    """Run train.py's command-line parsing in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_help_lists_models_and_config_fields(capsys, monkeypatch):
    code, out, _ = cli(["--help"], capsys)
    assert code == 0 and "ann" in out and "san" in out
    monkeypatch.syspath_prepend(str(REPO / "tests" / "fixtures"))
    code, out, _ = cli(["--model", "tiny_seg", "--help"], capsys)
    assert "--crop_size" in out and "image size" in out  # the field comment is the help


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "ann", "--preset", "huge"], "has no preset 'huge'"),
    (["--model", "ann", "--no_such_field", "1"], "unrecognized arguments: --no_such_field"),
    (["--model", "ann", "--amp", "maybe"], "expected true or false"),
])
def test_bad_command_lines_are_clear_errors(args, message, capsys):
    code, _, err = cli(args, capsys)
    assert code not in (0, None) and message in f"{code} {err}"


def test_flags_override_the_preset():
    args, module, overrides = train.parse_args(["--model", "ann", "--context", "nl", "--pyramid-sizes", "1,2",
                                                "--amp", "true"])
    assert overrides == {"context": "nl", "pyramid_sizes": (1, 2), "amp": True}


def test_lr_schedules():
    cfg = SimpleNamespace(warmup_iters=10, max_iters=100, schedule="poly", poly_power=0.9, lr_steps=(50, 80))
    assert train.lr_factor(cfg, 0) == pytest.approx(0.1) and train.lr_factor(cfg, 9) == pytest.approx(1.0)
    assert train.lr_factor(cfg, 50) == pytest.approx(0.5**0.9)
    cfg.schedule = "cosine"
    assert train.lr_factor(cfg, 50) == pytest.approx(0.5)
    cfg.schedule = "step"
    assert [train.lr_factor(cfg, s) for s in (49, 50, 80)] == pytest.approx([1, 0.1, 0.01])


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_global_batch_independent_of_processes_and_resumable():
    one = take(train.InfiniteSampler(10, 4, 0, 1, seed=3), 4 * 6)  # 6 global batches, crossing passes
    r0 = take(train.InfiniteSampler(10, 4, 0, 2, seed=3), 2 * 6)
    r1 = take(train.InfiniteSampler(10, 4, 1, 2, seed=3), 2 * 6)
    for s in range(6):
        assert one[4 * s:4 * s + 4] == r0[2 * s:2 * s + 2] + r1[2 * s:2 * s + 2]
    assert sorted(one[:10]) == list(range(10))  # each pass is a permutation
    assert take(train.InfiniteSampler(10, 4, 0, 1, seed=3, start_step=2), 8) == one[8:16]


def test_same_seed_same_losses_and_ddp_matches_one_process(tmp_path):
    a, b = run(["--model", "tiny_seg", "--out", tmp_path / "a"]), run(["--model", "tiny_seg", "--out", tmp_path / "b"])
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py",
                          "--model", "tiny_seg", "--out", tmp_path / "ddp"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single, double = losses(tmp_path / "a"), losses(tmp_path / "ddp")
    assert single.keys() == double.keys()
    assert [double[k] for k in single] == pytest.approx([single[k] for k in single], rel=1e-5)


def test_resume_after_kill_gives_the_same_losses(tmp_path):
    args = ["--model", "tiny_seg", "--max_iters", "300", "--ckpt_interval", "10", "--eval_interval", "1000"]
    assert run(args + ["--out", tmp_path / "full"]).returncode == 0
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out", tmp_path / "killed"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "ckpt.pt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert step < 300, "the run finished before it could be killed; make it longer"
    resumed = run(args + ["--out", tmp_path / "killed", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full, again = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert {k: again[k] for k in range(step + 1, 301)} == {k: full[k] for k in range(step + 1, 301)}


def test_non_finite_loss_stops_with_the_loss_dict(tmp_path):
    result = run(["--model", "tiny_seg", "--lr", "1e30", "--max_iters", "50", "--out", tmp_path])
    assert result.returncode != 0
    assert "non-finite loss at step" in result.stderr and "loss=" in result.stderr


def test_checkpoint_errors(tmp_path):
    assert run(["--model", "tiny_seg", "--out", tmp_path]).returncode == 0
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(ValueError, match="checkpoint of model 'tiny_seg', not 'ann'"):
        checkpoint.load_checkpoint(ckpt, "ann")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(corrupt)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by this project"):
        checkpoint.load_checkpoint(tmp_path / "foreign.pt")
    result = subprocess.run([sys.executable, "eval.py", "--ckpt", corrupt], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "not a readable checkpoint" in result.stderr
    result = subprocess.run([sys.executable, "eval.py", "--ckpt", ckpt, "--model", "san"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "checkpoint of model 'tiny_seg', not 'san'" in result.stderr
