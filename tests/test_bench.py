"""bench.py: the ANN efficiency table runs at a small size, counts FLOPs right, and the toy table reads run folders."""
import json
from dataclasses import asdict, replace

import pytest
import torch

import ann
import bench


def test_ann_block_table_prints_ratios_and_counts_flops_right(capsys):
    rows = bench.main(["--model", "ann", "--device", "cpu", "--size", "16x32", "--runs", "1"])
    out = capsys.readouterr().out
    assert "| NL / APNB |" in out and "| APNB |" in out and "1x2048x16x32" in out
    for row in rows.values():
        assert row["gflops"] == pytest.approx(row["analytic"], rel=1e-6) and row["peak_mib"] > 0 and row["ms"] > 0
    # at 128x256 our count is the official one minus the shared projection applied a second time (17.18 GMAC)
    n = 128 * 256
    assert bench.ann_analytic_gmacs(2048, 256, 256, 2048, n, n, False) == pytest.approx(618.5 - 17.18, abs=0.1)
    assert bench.ann_analytic_gmacs(2048, 256, 256, 2048, n, 110, False) == pytest.approx(70.6 - 17.18, abs=0.1)


def test_attention_flops_are_counted_on_the_fast_path_too():
    """One nn.MultiheadAttention layer in eval mode under no_grad (its fused fast path) and a bare
    F.scaled_dot_product_attention on CPU, against hand-computed FLOPs (2 x multiply-adds)."""
    B, L, E, heads = 2, 50, 64, 4
    layer, x = torch.nn.MultiheadAttention(E, heads, batch_first=True).eval(), torch.randn(B, L, E)
    # q, k, v projections 3 L E^2, q k^T and the weighted sum of v 2 L^2 E, output projection L E^2 (per image)
    expected = 2 * B * (3 * L * E * E + 2 * L * L * E + L * E * E)
    for need_weights in (False, True):
        r = bench.measure(lambda: layer(x, x, x, need_weights=need_weights), torch.device("cpu"), runs=1)
        assert r["gflops"] * 1e9 == pytest.approx(expected, rel=1e-9)
    q, k, v = torch.randn(B, heads, L, 16), torch.randn(B, heads, 30, 16), torch.randn(B, heads, 30, 8)
    r = bench.measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), torch.device("cpu"), 1)
    assert r["gflops"] * 1e9 == pytest.approx(2 * B * heads * L * 30 * (16 + 8), rel=1e-9)
    assert torch.backends.mha.get_fastpath_enabled()  # the fast path is back on for the timed passes


def test_live_peak_counts_tensors_alive_together():
    x = torch.randn(256, 256)  # made before: not counted, nor are views of it
    with torch.no_grad(), bench.LivePeak() as tracker:
        a = x @ x  # 256 KiB
        b = a.softmax(-1)  # 256 KiB, both alive
        view = x.t()  # no new memory
        del a
        c = b * 2  # b and c alive
        del b, c, view
    assert tracker.peak == 2 * 256 * 256 * 4 and tracker.live == 0


def test_toy_table_reads_runs(tmp_path, capsys):
    for context, miou in (("none", 40.0), ("nl", 90.0), ("apnb", 89.5)):
        run = tmp_path / context
        run.mkdir()
        cfg = replace(ann.PRESETS["toy"], context=context, crop_size=64)
        (run / "config.json").write_text(json.dumps({"model": "ann", **asdict(cfg)}))
        (run / "metrics.json").write_text(json.dumps({"toy_context/mIoU": miou, "toy_context/pACC": 99.0}))
    table = bench.main(["--model", "ann", "--device", "cpu", "--toy-table", *(str(tmp_path / c) for c in
                                                                             ("none", "nl", "apnb"))])
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["none", "nl", "apnb"]
    assert [float(r[1]) for r in rows] == [40.0, 90.0, 89.5]
    none, nl, apnb = (float(r[2]) for r in rows)
    assert none == 0 and 0 < apnb and 0 < nl
    assert "| apnb |" in capsys.readouterr().out


def test_a_run_without_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "half").mkdir()  # a run killed before it finished: no metrics.json
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "pose_transfer", "--toy-table", str(tmp_path / "half")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "no config.json" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_clip_probe_names_regions_at_every_split(tmp_path, capsys):
    """`--clip-probe` on a small random toy CLIP of 4 blocks: splits k = 1, 2, 3; at each, every object of the scenes
    is counted once per scene size and once in "all", every scene's background once; a lone object's scene has
    nothing to paint over, so its two answers agree."""
    import toy_clip
    cfg = replace(toy_clip.PRESETS["toy"], vision_width=32, vision_heads=2, vision_layers=4, text_width=32,
                  text_layers=1, text_heads=2, embed_dim=16)
    torch.manual_seed(0)
    toy_clip.export(toy_clip.build_model(cfg), cfg, tmp_path)
    results = bench.main(["--model", "san", "--clip-probe", str(tmp_path), "--images", "12"])
    assert list(results) == [1, 2, 3]
    for counts in results.values():
        by_size = {k: v for k, v in counts.items() if k not in ("all", "background")}
        assert set(by_size) <= {1, 2, 3} and 1 in by_size and len(by_size) >= 2
        assert counts["all"] == tuple(map(sum, zip(*by_size.values())))  # (objects, right in scene, right alone)
        total, scene, alone = by_size[1]
        assert scene == alone and all(0 <= r <= t for t, *rs in counts.values() for r in rs)
        assert counts["background"][0] == 12  # every toy scene has background
    out = capsys.readouterr().out
    assert "| 3 | " in out and "background" in out


def test_clip_probe_without_a_toy_clip_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "san", "--clip-probe", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "python train.py --model toy_clip --out" in err
    assert len(err.strip().splitlines()) == 1
