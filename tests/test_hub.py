"""hubconf.py: torch.hub.load(repo, entry, source="local", weights=...) for every entry.

The released-format files are the ones tests/test_convert.py builds (its fixtures and builders are imported, not
copied). They are small: toy-sized SAN and zsseg heads on a tiny CLIP, ngf-8 PATN generators; the ANN file is at the
paper's size. An entry's keyword arguments replace fields of its paper Config, and the tests pass the small files'
sizes that way (the paper configs themselves are checked on the meta device, shapes only). Every model loaded through
the hub is compared with the one convert.py writes and eval.py loads, prediction for prediction.
"""
import ast
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

import convert
import hubconf
from checkpoint import config_from_checkpoint, load_checkpoint, load_model_module, save_checkpoint
from test_convert import as_pytorch03, official_ann, official_patn, tiny, tiny_patn_cfg, tiny_zsseg  # noqa: F401

REPO = str(Path(__file__).resolve().parents[1])
ENTRIES = ["san_vit_b16", "san_vit_l14_336", "ann_cityscapes", "zsseg_zero_shot", "zsseg_cross_dataset",
           "patn_market", "patn_deepfashion", "soft_teacher_r50_fpn", "mixtraining_r50_fpn"]


@pytest.fixture(autouse=True)
def hub_home(tmp_path, monkeypatch):
    """torch.hub's cache (downloads, trusted-repo list) in a temporary folder: nothing leaks into ~/.cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert torch.hub.get_dir() == str(tmp_path / "torch_home" / "hub")
    return tmp_path / "torch_home" / "hub"


@pytest.fixture
def no_random_init(monkeypatch):
    """torch.nn.init's fills become no-ops while the test builds its models: every weight of a model built to be
    loaded is then read from a file (load_state_dict is strict), so the values never mattered, and the paper-size
    networks (ANN's and zsseg's ResNet-101s) build in a tenth of the time. The files were written before (fixtures)."""
    for name in ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "kaiming_uniform_",
                 "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_"):
        monkeypatch.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)


def hub_load(entry, **kwargs):
    return torch.hub.load(REPO, entry, source="local", **kwargs)


def overrides(entry, cfg):
    """The Config fields of `cfg` that differ from the entry's paper preset: the sizes of a small released file."""
    name, preset = hubconf._ENTRIES[entry][:2]
    paper = convert.released_config(load_model_module(name), preset)
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(paper, f.name)}


def eval_py_model(ckpt_path):
    """The model as eval.py loads a checkpoint (eval.main: load_checkpoint, its config, build, load_state_dict)."""
    ckpt = load_checkpoint(ckpt_path)
    module = load_model_module(ckpt["model_name"])
    wrapper = module.build_model(config_from_checkpoint(module, ckpt), pretrained=False)
    wrapper.load_state_dict(ckpt["model"])
    return wrapper.eval()


def same_predictions(a, b, batch, vocab=None):
    out_a, out_b = a.predict(batch, vocab), b.predict(batch, vocab)
    if isinstance(out_a, list):  # detection: per-image dicts
        return all(torch.allclose(x[k], y[k], atol=1e-6) for x, y in zip(out_a, out_b) for k in x)
    return out_a.shape == out_b.shape and torch.allclose(out_a, out_b, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Released-format files, one per entry: (file, its model's small config, a batch, a vocabulary)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released(tiny, tiny_zsseg, official_ann, tmp_path_factory):  # noqa: F811 (fixtures of test_convert)
    folder = tmp_path_factory.mktemp("released")
    files = {}
    san_cfg, san_official, _ = tiny
    torch.save({"model": san_official, "iteration": 1}, folder / "san_tiny.pth")
    image = {"image": torch.rand(1, 3, 64, 48)}
    for entry in ("san_vit_b16", "san_vit_l14_336"):
        files[entry] = (folder / "san_tiny.pth", san_cfg, image, ["red square", "grass"])
    zs_cfg, zs_official, _ = tiny_zsseg
    no_prompt = {k: v for k, v in zs_official.items() if ".prompt_learner." not in k}  # the ViLD release's layout
    torch.save({"model": zs_official, "iteration": 1}, folder / "zsseg_zero_shot.pth")
    torch.save({"model": no_prompt, "iteration": 1}, folder / "zsseg_cross.pth")
    image = {"image": torch.rand(1, 3, 64, 64)}
    files["zsseg_zero_shot"] = (folder / "zsseg_zero_shot.pth", zs_cfg, image, ["cat", "grass"])
    files["zsseg_cross_dataset"] = (folder / "zsseg_cross.pth", dataclasses.replace(zs_cfg, prompt="vild",
                                                                                    prompt_iters=0),
                                    image, ["cat", "grass"])
    state = {f"module.{k}": v for k, v in official_ann.state_dict().items()}
    torch.save({"state_dict": state, "config_dict": {}, "runner_state": {"performance": np.float64(0.799)}},
               folder / "fs_annn_cityscapes_segohem_latest.pth")
    import ann
    files["ann_cityscapes"] = (folder / "fs_annn_cityscapes_segohem_latest.pth", ann.PRESETS["paper_deepstem"],
                               {"image": torch.rand(1, 3, 47, 61)}, None)
    for entry, kind in (("patn_market", "batch"), ("patn_deepfashion", "instance")):
        torch.save(as_pytorch03(official_patn(kind), kind), folder / f"{entry}_netG.pth")
        files[entry] = (folder / f"{entry}_netG.pth", tiny_patn_cfg(kind), {
            "source": torch.rand(1, 3, 32, 16), "source_pose": torch.rand(1, 18, 32, 16),
            "target_pose": torch.rand(1, 18, 32, 16)}, None)
    return files


@pytest.mark.parametrize("entry", ENTRIES[:7])
def test_entry_loads_the_released_file_as_convert_and_eval_do(entry, released, hub_home, tmp_path, monkeypatch,
                                                               no_random_init):
    src, cfg, batch, vocab = released[entry]
    name, preset = hubconf._ENTRIES[entry][:2]
    module = load_model_module(name)
    monkeypatch.setattr(module, "PRESETS", {**module.PRESETS, "small": cfg})
    convert.convert(name, src, tmp_path / "ckpt.pt", preset="small")  # python convert.py ... --preset small
    reference = eval_py_model(tmp_path / "ckpt.pt")
    by_path = hub_load(entry, weights=str(src), **overrides(entry, cfg))
    by_url = hub_load(entry, weights=src.as_uri(), **overrides(entry, cfg))  # file://: torch.hub's download path
    assert (hub_home / "checkpoints" / src.name).is_file()  # downloaded into torch.hub's cache
    for model in (by_path, by_url):
        assert isinstance(model, type(reference)) and not model.training
        assert model.cfg == reference.cfg
        assert same_predictions(model, reference, batch, vocab)


def test_a_url_is_downloaded_once_and_official_is_the_authors_url(released, hub_home, monkeypatch, no_random_init):
    src, cfg, batch, vocab = released["san_vit_b16"]
    urls = []

    def fake_download(url, dst, progress=True):  # what torch.hub would fetch, without a network
        urls.append((url, progress))
        Path(dst).write_bytes(src.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    for _ in range(2):
        model = hub_load("san_vit_b16", weights="official", **overrides("san_vit_b16", cfg))
    assert urls == [("https://huggingface.co/Mendel192/san/resolve/main/san_vit_b_16.pth", True)]  # then cached
    assert (hub_home / "checkpoints" / "san_vit_b_16.pth").is_file()
    reference = hub_load("san_vit_b16", weights=str(src), **overrides("san_vit_b16", cfg))
    assert same_predictions(model, reference, batch, vocab)
    hub_load("san_vit_l14_336", weights="official", **overrides("san_vit_l14_336", cfg))
    assert urls[-1][0] == "https://huggingface.co/Mendel192/san/resolve/main/san_vit_large_14.pth"


def test_an_architecture_entry_loads_a_train_py_checkpoint(tmp_path):
    import soft_teacher
    import mixtraining
    for entry, module in (("soft_teacher_r50_fpn", soft_teacher), ("mixtraining_r50_fpn", mixtraining)):
        torch.manual_seed(0)
        cfg = module.PRESETS["toy"]
        trained = module.build_model(cfg, pretrained=False)
        path = tmp_path / f"{entry}.pt"
        save_checkpoint(path, model_name=module.__name__, config=dataclasses.asdict(cfg), model=trained.state_dict(),
                        step=7)
        reference = eval_py_model(path)
        batch = {"image": torch.rand(1, 3, 96, 96)}
        for weights in (str(path), path.as_uri()):
            model = hub_load(entry, weights=weights)
            assert model.cfg == cfg and not model.training and same_predictions(model, reference, batch)
            ours = model.state_dict()  # (a random toy detector may detect nothing: the weights, one by one)
            assert all(torch.equal(ours[k], v) for k, v in trained.state_dict().items())
        with pytest.raises(ValueError, match="no released weights convert into this model"):
            hub_load(entry, weights="official")
    with pytest.raises(ValueError, match="is a checkpoint of model 'mixtraining', not 'soft_teacher'"):
        hub_load("soft_teacher_r50_fpn", weights=str(tmp_path / "mixtraining_r50_fpn.pt"))


# ----------------------------------------------------------------------------------------------------------------------
# Errors: the same exception, with the same message, as convert.py
# ----------------------------------------------------------------------------------------------------------------------
def convert_error(name, src, preset, tmp_path):
    with pytest.raises(Exception) as e:
        convert.convert(name, src, tmp_path / "never_written.pt", preset=preset)
    return e.value


def test_a_wrong_corrupt_or_missing_file_is_convert_py_s_error(released, tmp_path, monkeypatch, no_random_init):
    import san
    src, cfg, _, _ = released["san_vit_b16"]
    monkeypatch.setattr(san, "PRESETS", {**san.PRESETS, "small": cfg})
    patn_file = released["patn_market"][0]  # a released file of another model
    corrupt = tmp_path / "san_vit_b_16.pth"
    corrupt.write_bytes(src.read_bytes()[:5000])  # a download cut short
    for wrong in (patn_file, corrupt, tmp_path / "missing.pth"):
        expected = convert_error("san", wrong, "small", tmp_path)
        with pytest.raises(type(expected)) as e:
            hub_load("san_vit_b16", weights=str(wrong), **overrides("san_vit_b16", cfg))
        assert str(e.value) == str(expected)
        if isinstance(expected, (FileNotFoundError, ValueError)):  # convert.py's own errors: no chained traceback
            assert e.value.__cause__ is None and e.value.__suppress_context__
    assert "does not fit SAN" in str(convert_error("san", patn_file, "small", tmp_path))
    assert "\n" not in str(convert_error("san", patn_file, "small", tmp_path))
    with pytest.raises(FileNotFoundError, match="could not download file://"):
        hub_load("san_vit_b16", weights=(tmp_path / "missing.pth").as_uri())


def test_official_on_google_drive_says_where_and_a_bad_field_is_named():
    with pytest.raises(ValueError, match=r"Google Drive link https://drive\.google\.com/.*weights=PATH"):
        hub_load("zsseg_zero_shot", weights="official")
    with pytest.raises(TypeError, match="side_widht not a field of san.Config"):
        hub_load("san_vit_b16", side_widht=96)


def test_a_wrong_entry_name_is_refused():
    with pytest.raises(RuntimeError, match="Cannot find callable san_vit_b17 in hubconf"):
        hub_load("san_vit_b17")


# ----------------------------------------------------------------------------------------------------------------------
# weights=None and the paper configurations (meta device: shapes only, no memory, no time)
# ----------------------------------------------------------------------------------------------------------------------
def test_weights_none_warns_and_gives_a_working_random_model(released):
    src, cfg, batch, vocab = released["patn_market"]
    with pytest.warns(UserWarning, match="patn_market: weights=None, so every weight of the model is random"):
        model = hub_load("patn_market", **overrides("patn_market", cfg))
    assert not model.training and model.predict(batch).shape == (1, 3, 32, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loaded file: no warning
        hub_load("patn_market", weights=str(src), **overrides("patn_market", cfg))


def test_every_entry_builds_its_paper_network(monkeypatch):
    create = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **kw: create(*a, **kw, device="meta"))
    models = {}
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        for entry in ENTRIES:
            models[entry] = hub_load(entry)
    cfg = {entry: m.cfg for entry, m in models.items()}
    assert cfg["san_vit_b16"].clip_model == "ViT-B-16" and cfg["san_vit_l14_336"].clip_model == "ViT-L-14-336"
    assert cfg["san_vit_b16"].test_short_side == 640 and len(cfg["san_vit_b16"].class_names) == 171  # COCO-Stuff
    assert cfg["ann_cityscapes"].backbone == "deepbase_resnet101" and cfg["ann_cityscapes"].input_norm == "caffe"
    for entry, prompt in (("zsseg_zero_shot", "learnable"), ("zsseg_cross_dataset", "vild")):
        assert cfg[entry].backbone == "resnet101c" and cfg[entry].prompt == prompt
        assert len(cfg[entry].class_names) == 156  # the seen classes, as convert.py stores them
    assert (cfg["patn_market"].norm, cfg["patn_market"].image_size) == ("batch", (128, 64))
    assert (cfg["patn_deepfashion"].norm, cfg["patn_deepfashion"].image_size) == ("instance", (256, 176))
    assert cfg["soft_teacher_r50_fpn"].backbone == cfg["mixtraining_r50_fpn"].backbone == "resnet50"
    import san
    assert san.count_trainable(models["san_vit_b16"]) == 8_370_866  # the official logs' 8.37M and 9.32M
    assert san.count_trainable(models["san_vit_l14_336"]) == 9_321_650
    assert all(not m.training for m in models.values())


# ----------------------------------------------------------------------------------------------------------------------
# torch.hub.list / help, dependencies, a light import
# ----------------------------------------------------------------------------------------------------------------------
def test_hub_list_and_help_show_the_entries_papers_and_numbers(hub_home):
    """torch.hub.list/help read a GitHub repo from torch.hub's cache: this checkout stands in for its download."""
    hub_home.mkdir(parents=True)
    (hub_home / "owner_cv-papers_main").symlink_to(REPO)
    assert sorted(torch.hub.list("owner/cv-papers:main", trust_repo=True, verbose=False)) == sorted(ENTRIES)
    doc = torch.hub.help("owner/cv-papers:main", "san_vit_b16", trust_repo=True)
    assert "arXiv 2302.12242" in doc and "ADE-150 27.56" in doc and "huggingface.co/Mendel192/san" in doc
    for entry in ENTRIES:
        doc = torch.hub.help("owner/cv-papers:main", entry, trust_repo=True)
        assert "arXiv" in doc and "weights:" in doc and "Use: model.predict(" in doc, entry
    assert hubconf.dependencies == ["torch", "torchvision", "open_clip", "numpy", "scipy", "PIL"]


def test_importing_hubconf_imports_no_model_file():
    """Only the standard library and torch at the top of hubconf.py: a model file (and open_clip) comes with its
    entry's call."""
    tree = ast.parse(Path(REPO, "hubconf.py").read_text())
    imported = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert imported == {"dataclasses", "os", "urllib.error", "urllib.parse", "warnings", "torch"}


def test_the_docs_pose_snippet_makes_data_py_s_heatmaps():
    """The heatmap function of the pose-transfer page's "in your own code" snippet (pasted by readers who have no
    data.py) gives data.keypoint_heatmaps, the maps the PATN models were converted and tested with."""
    import data
    text = Path(REPO, "docs", "pose_transfer.md").read_text()
    start = text.index("def heatmaps(")
    namespace = {"torch": torch}
    exec(text[start:text.index("\n\n", start)], namespace)
    keypoints = np.random.default_rng(0).uniform(0, 64, (18, 2)) * [2, 1]
    keypoints[3] = -1  # a missing keypoint: an empty channel
    expected = data.keypoint_heatmaps(keypoints, 128, 64, sigma=6.0)
    assert torch.allclose(namespace["heatmaps"](keypoints.tolist()), expected, atol=1e-6)
