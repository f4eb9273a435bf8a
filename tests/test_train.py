"""train.py's machinery: command line, schedule, sampler, batches, DDP, several optimizers and resume, on fixture
models (tests/fixtures/tiny_seg.py, tiny_gan.py) so that each run takes a second or two. Kills, resumes on a real
toy and user mistakes: test_errors.py."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


@pytest.mark.parametrize("model", ["san", "zsseg", "ann", "soft_teacher", "mixtraining", "pose_transfer"])
def test_help_of_every_model(model, capsys):
    code, out, _ = cli(["--model", model, "--help"], capsys)
    assert code == 0 and "--max_iters" in out  # a '%' in a field comment ("25% positives") once broke argparse


def test_flags_override_the_preset():
    args, module, overrides = train.parse_args(["--model", "ann", "--context", "nl", "--pyramid-sizes", "1,2",
                                                "--amp", "true"])
    assert overrides == {"context": "nl", "pyramid_sizes": (1, 2), "amp": True}


def test_lr_schedules():
    cfg = SimpleNamespace(warmup_iters=10, warmup_ratio=0.0, max_iters=100, schedule="poly", poly_power=0.9,
                          lr_steps=(50, 80))
    assert train.lr_factor(cfg, 0) == pytest.approx(0.1) and train.lr_factor(cfg, 9) == pytest.approx(1.0)
    assert train.lr_factor(cfg, 50) == pytest.approx(0.5**0.9)
    cfg.schedule = "cosine"
    assert train.lr_factor(cfg, 50) == pytest.approx(0.5)
    cfg.schedule = "step"
    assert [train.lr_factor(cfg, s) for s in (49, 50, 80)] == pytest.approx([1, 0.1, 0.01])


def test_warmup_ratio_is_mmcv_linear_warmup_in_the_detection_paper_presets():
    """mmcv's linear warm-up: factor r + (1 - r) i / warmup_iters from r at step 0, the detection papers' r = 0.001;
    without a ratio (0, the trainer's default: the toys, the other models) the ramp is (i + 1) / warmup_iters."""
    import mixtraining
    import soft_teacher
    cfg = SimpleNamespace(warmup_iters=500, warmup_ratio=0.001, max_iters=1000, schedule="step", lr_steps=())
    firsts = [train.lr_factor(cfg, i) for i in (0, 1, 2, 250, 499, 500)]
    assert firsts == pytest.approx([0.001, 0.001 + 0.999 / 500, 0.001 + 2 * 0.999 / 500, 0.5005, 0.998002, 1.0])
    for preset in (soft_teacher.PRESETS["paper"], soft_teacher.PRESETS["paper_full"], mixtraining.PRESETS["paper"]):
        opts = train.trainer_settings(preset)
        assert train.lr_factor(opts, 0) == pytest.approx(0.001) and opts.warmup_iters == 500
    for preset in (soft_teacher.PRESETS["toy"], mixtraining.PRESETS["toy"]):  # unchanged: from 1 / warmup_iters
        opts = train.trainer_settings(preset)
        ramp = [train.lr_factor(opts, i) for i in (0, 1)]
        assert ramp == pytest.approx([1 / opts.warmup_iters, 2 / opts.warmup_iters])
    assert train.trainer_settings(soft_teacher.Config(train_dataset="x")).warmup_ratio == 0.0
    assert train.TRAINER_DEFAULTS["warmup_ratio"] == 0.0  # models without the field: the same ramp as before


def take(sampler, n):
    """The first n dataset indices the sampler yields."""
    it = iter(sampler)
    return [next(it)[0] for _ in range(n)]


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
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "--model", "tiny_seg", "--out", tmp_path / "ddp"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single, double = losses(tmp_path / "a"), losses(tmp_path / "ddp")
    assert single.keys() == double.keys()
    assert [double[k] for k in single] == pytest.approx([single[k] for k in single], rel=1e-5)


def test_linear_schedule_and_trainer_defaults():
    cfg = SimpleNamespace(warmup_iters=0, warmup_ratio=0.0, max_iters=10, schedule="linear", lr_decay_from=6)
    assert [train.lr_factor(cfg, s) for s in (0, 5, 6, 8, 9)] == pytest.approx([1, 1, 1, 0.5, 0.25])
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    try:
        import tiny_gan
    finally:
        sys.path.pop(0)
    opts = train.trainer_settings(tiny_gan.Config())  # a Config without momentum, grad_clip, seed, ...
    assert (opts.lr, opts.schedule, opts.batch_size) == (1e-2, "linear", 4)  # its own fields
    assert (opts.momentum, opts.grad_clip, opts.seed, opts.eval_datasets) == (0.9, 0.0, 0, ())  # the defaults
    assert opts.eval_interval == opts.max_iters  # no interval given: evaluate once, at the end


def test_collate_keeps_ragged_values_as_lists_and_recurses_into_streams():
    item = lambda h, n: {"image": torch.zeros(3, h, 5), "boxes": torch.zeros(n, 4), "id": h}  # noqa: E731
    batch = train.collate([{"sup": item(4, 1), "unsup": [item(4, 0)]}, {"sup": item(6, 2), "unsup": [item(8, 3)]}])
    assert isinstance(batch["sup"]["image"], list) and [t.shape[1] for t in batch["sup"]["image"]] == [4, 6]
    assert [len(b) for b in batch["sup"]["boxes"]] == [1, 2] and batch["sup"]["id"] == [4, 6]
    assert len(batch["unsup"]) == 2 and batch["unsup"][1][0]["image"].shape == (3, 8, 5)
    same = train.collate([{"image": torch.zeros(3, 4, 4)}, {"image": torch.ones(3, 4, 4)}])
    assert same["image"].shape == (2, 3, 4, 4)
    moved = train.to_device(batch, torch.device("cpu"))
    assert torch.is_tensor(moved["unsup"][1][0]["boxes"])


class Killed(Exception):
    pass


def test_two_optimizers_are_stepped_checkpointed_and_resumed(tmp_path, monkeypatch):
    """tiny_gan: a generator and a discriminator, each stepped on its own loss every iteration; a run stopped right
    after its step-2 checkpoint and resumed ends on exactly the weights and optimizer states of an unstopped run."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "fixtures"))
    monkeypatch.chdir(REPO)
    train.main(["--model", "tiny_gan", "--out", str(tmp_path / "full")])
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    assert set(full["optimizers"]) == {"generator", "discriminator"}
    for state in full["optimizers"].values():  # both were stepped every iteration
        assert all(s["step"] == 6 for s in state["state"].values())
    records = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert {"loss_generator", "loss_discriminator", "loss_adv", "loss_l1"} <= records[0].keys()

    save = train.save_checkpoint

    def save_then_die(path, **state):  # a kill right after the step-2 checkpoint
        save(path, **state)
        raise Killed

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train.main(["--model", "tiny_gan", "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main(["--model", "tiny_gan", "--out", str(tmp_path / "killed"), "--resume"])
    again = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)
    for k in full["model"]:
        assert torch.equal(full["model"][k], again["model"][k]), k
    for name in full["optimizers"]:
        for i, s in full["optimizers"][name]["state"].items():
            assert torch.equal(s["exp_avg"], again["optimizers"][name]["state"][i]["exp_avg"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_two_optimizers_under_ddp_match_one_process(tmp_path):
    one = run(["--model", "tiny_gan", "--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "--model", "tiny_gan", "--out", tmp_path / "ddp"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    read = lambda out: [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(read(tmp_path / "one"), read(tmp_path / "ddp")):
        for key in ("loss_generator", "loss_discriminator"):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
