"""san.py: the attention-bias mechanism, CLIP loading, matching and losses, parameter counts, shapes, and a short
overfit, on a tiny random open_clip CLIP written to a temporary folder (no download)."""
import dataclasses
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import san

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 6, "width": 64, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
VOCAB = ("red square", "blue circle", "green triangle")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one intra-op thread is faster, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg(tiny_clip):
    """A toy-structured Config on a 6-block, 4-head tiny CLIP with random weights saved as a local file."""
    config, weights = tiny_clip(TINY_CLIP)
    return dataclasses.replace(
        san.PRESETS["toy"], clip_model=str(config), clip_pretrained=str(weights),
        class_names=VOCAB, num_classes=3, crop_size=64, side_width=32, side_depth=4, side_heads=2,
        side_image_size=64, num_queries=6, deep_supervision=(3, 4), decoder_dim=32, num_points=256)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return san.build_model(cfg).eval()


def shapes_batch(n=2, size=64):
    """Images with a red square (class 0) and a blue disc (class 1) on grey; the rest is ignore (255)."""
    torch.manual_seed(1)
    image, label = torch.full((n, 3, size, size), 0.2), torch.full((n, size, size), 255)
    for i in range(n):
        y, x = 4 + 6 * i, 6 + 4 * i
        image[i, :, y:y + 24, x:x + 24] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
        label[i, y:y + 24, x:x + 24] = 0
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        disc = (yy - 44) ** 2 + (xx - 40 + 3 * i) ** 2 < 12 ** 2
        image[i][:, disc] = torch.tensor([0.1, 0.2, 0.9])[:, None]
        label[i][disc] = 1
    return {"image": image + 0.02 * torch.randn_like(image), "label": label}


# ---------------------------------------------------------------------------------------------------------------------
# CLIP loading
# ---------------------------------------------------------------------------------------------------------------------
def test_local_json_and_weights_are_loaded_not_random(cfg, model):
    saved = torch.load(cfg.clip_pretrained, weights_only=True)
    state = model.net.clip.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved if k != "visual.positional_embedding")
    assert model.net.tokenizer(["a"]).shape == (1, 16)  # the tokenizer of the registered config: context 16
    assert model.net.clip.visual.transformer.batch_first  # open_clip 3.x: the path recognize() must handle


def test_missing_weights_file_is_a_clear_error(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*train\.py --model toy_clip"):
        san.build_model(dataclasses.replace(cfg, clip_pretrained=str(tmp_path / "nope.pt")))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        san.build_model(dataclasses.replace(cfg, clip_model=str(tmp_path / "missing.json")))


def test_openai_weights_offline_is_a_clear_error_not_a_random_clip(monkeypatch):
    def offline(*args, **kwargs):  # what huggingface_hub raises with no network; nothing is attempted
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(FileNotFoundError) as error:
        san.build_model(san.PRESETS["paper"])
    message = str(error.value)
    assert "'openai'" in message and "ViT-B-16" in message and "--clip_pretrained PATH" in message
    assert "huggingface.co/timm/vit_base_patch16_clip_224.openai" in message


def test_prerequisites_name_the_toy_clip():
    toy = san.PRESETS["toy"]
    assert san.prerequisites(toy) == {"runs/toy_clip/toy_clip.pt": "toy_clip"}
    assert san.prerequisites(san.PRESETS["paper"]) == {} == san.prerequisites(san.PRESETS["paper_l14"])


def test_toy_vocabulary_is_data_py_seen_classes():
    data = pytest.importorskip("data")
    assert san.PRESETS["toy"].class_names == tuple(data.ToyShapes("train", 32, "seen").class_names)
    assert san.PRESETS["toy"].num_classes == len(san.TOY_SEEN_CLASSES)


# ---------------------------------------------------------------------------------------------------------------------
# The mechanism: attention bias in CLIP's recognition blocks
# ---------------------------------------------------------------------------------------------------------------------
def test_attention_bias_mask_layout():
    Q, L = 3, 4
    bias = torch.arange(2 * Q * L, dtype=torch.float32).reshape(2, Q, L) + 1  # (B*heads, Q, L), all non-zero
    mask = san.attention_bias_mask(bias)
    assert mask.shape == (2, Q + 1 + L, Q + 1 + L)
    sos, cls, patches = slice(0, Q), Q, slice(Q + 1, None)
    for m, b in zip(mask, bias):
        assert torch.equal(m[sos, sos], torch.full((Q, Q), -100.0).fill_diagonal_(0))  # an SOS sees only itself
        assert torch.equal(m[sos, cls], torch.full((Q,), -100.0))  # ... and not [CLS]
        assert torch.equal(m[sos, patches], b)  # ... and the patches through the bias
        assert torch.equal(m[Q:, sos], torch.full((1 + L, Q), -100.0))  # CLS/patch rows never see SOS
        assert torch.equal(m[Q:, Q:], torch.zeros(1 + L, 1 + L))  # ... and see each other as in vanilla CLIP


def layer_k_tokens(model, cfg, B=2):
    visual = model.net.clip.visual
    feats, grid = san.clip_features(visual, torch.randn(B, 3, 32, 48), cfg.clip_feature_layers)
    return visual, feats[-1], grid  # (B, 1 + L, C) with L = 4 x 6


def test_recognition_leaves_cls_and_patch_tokens_exactly_as_vanilla_clip(model, cfg):
    visual, tokens, grid = layer_k_tokens(model, cfg)
    k, Q, heads = cfg.clip_feature_layers[-1], 5, model.net.heads
    torch.manual_seed(0)
    bias = 5 * torch.randn(tokens.shape[0] * heads, Q, grid[0] * grid[1])
    x = torch.cat([tokens[:, :1].expand(-1, Q, -1), tokens], dim=1)  # [SOS | CLS | patches], as recognize() builds it
    blocks = visual.transformer.resblocks[k:]
    with torch.no_grad():
        shadow = san.run_blocks(visual.transformer, blocks, x, san.attention_bias_mask(bias))
        vanilla = san.run_blocks(visual.transformer, blocks, tokens)
    assert torch.allclose(shadow[:, Q:], vanilla, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shadow[:, :Q], vanilla[:, :1].expand(-1, Q, -1), atol=1e-3)


def test_sos_outputs_follow_the_bias(model, cfg):
    visual, tokens, grid = layer_k_tokens(model, cfg)
    k, heads = cfg.clip_feature_layers[-1], model.net.heads
    torch.manual_seed(0)
    bias = torch.randn(tokens.shape[0], heads, 4, 8, 12)  # (B, heads, Q, h, w) on a side grid twice CLIP's
    with torch.no_grad():
        a = san.recognize(visual, tokens, bias, k, grid)
        b = san.recognize(visual, tokens, bias + 3 * torch.randn_like(bias), k, grid)
    assert a.shape == (2, 4, TINY_CLIP["embed_dim"]) and torch.allclose(a.norm(dim=-1), torch.ones(2, 4))
    assert (a - b).abs().max() > 1e-2
    # the same by hand, with a bias already on CLIP's grid (max-pooling is then the identity): row b * heads + n of
    # the mask is image b, head n, and its SOS rows hold that head's bias of each query over the patches
    B, Q, L = tokens.shape[0], 4, grid[0] * grid[1]
    bias = torch.randn(B, heads, Q, *grid)
    rows = torch.stack([bias[i, n, q].flatten() for i in range(B) for n in range(heads) for q in range(Q)])
    x = torch.cat([tokens[:, :1].expand(-1, Q, -1), tokens], dim=1)
    with torch.no_grad():
        y = san.run_blocks(visual.transformer, visual.transformer.resblocks[k:], x,
                           san.attention_bias_mask(rows.reshape(B * heads, Q, L)))
        expected = F.normalize(visual.ln_post(y[:, :Q]) @ visual.proj, dim=-1)
        assert torch.allclose(san.recognize(visual, tokens, bias, k, grid), expected, atol=1e-5)


def test_biased_block_matches_a_hand_written_multi_head_attention(model, cfg):
    """Catches a wrong (batch, head) order of the 3-D mask: row b * heads + n must be image b, head n."""
    visual, tokens, grid = layer_k_tokens(model, cfg)
    block, heads, Q = visual.transformer.resblocks[cfg.clip_feature_layers[-1]], model.net.heads, 3
    B, N, C = tokens.shape[0], Q + tokens.shape[1], tokens.shape[2]
    torch.manual_seed(0)
    mask = san.attention_bias_mask(10 * torch.randn(B * heads, Q, grid[0] * grid[1]))
    x = torch.cat([tokens[:, :1].expand(-1, Q, -1), tokens], dim=1)  # (B, N, C)
    with torch.no_grad():
        y = block.ln_1(x)
        q, k, v = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, N, heads, C // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, C/heads)
        scores = q @ k.transpose(-1, -2) / math.sqrt(C // heads) + mask.reshape(B, heads, N, N)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        ref = x + block.attn.out_proj(attn)
        ref = ref + block.mlp(block.ln_2(ref))
        out = san.run_blocks(visual.transformer, [block], x, mask)
    assert torch.allclose(out, ref, atol=1e-4)


def test_gradients_reach_the_side_net_through_frozen_clip_and_never_clip_weights(cfg):
    torch.manual_seed(0)
    wrapper = san.build_model(cfg).train()
    net, batch = wrapper.net, shapes_batch()
    out = net(batch["image"], VOCAB, cfg.deep_supervision)
    losses = wrapper.criterion(out, san.semantic_targets(batch["label"], 3))
    losses["loss_ce"].backward()  # the class loss alone: it reaches the decoder only through CLIP's blocks
    decoder = net.side.decoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.attn_mlp.parameters())
    assert decoder.bias_scaling.weight.grad.abs() > 0 and net.side.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in decoder.pix_mlp.parameters())  # masks do not enter the CE (matching: no grad)
    for name, p in net.clip.named_parameters():
        trainable = name == "visual.positional_embedding"
        assert p.requires_grad == trainable and (p.grad is not None) == trainable, name
    wrapper.zero_grad(set_to_none=True)
    wrapper(batch, 0)["loss"].backward()
    assert all(p.grad is not None for p in wrapper.parameters() if p.requires_grad)
    assert all(p.grad is None for p in wrapper.parameters() if not p.requires_grad)


# ---------------------------------------------------------------------------------------------------------------------
# Matching and losses
# ---------------------------------------------------------------------------------------------------------------------
def test_matcher_with_no_targets_returns_empty_indices():
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_masks": torch.randn(2, 5, 8, 8)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32)}
    indices = san.HungarianMatcher(num_points=64)(outputs, [empty, empty])
    assert [(len(q), len(t)) for q, t in indices] == [(0, 0), (0, 0)]


def test_matcher_hand_checkable_case():
    """Target 0 = left half (class 1), target 1 = right half (class 2). Query 0 predicts the right half and class 2,
    query 2 the left half and class 1, query 1 nothing: the assignment is t0 -> q2, t1 -> q0."""
    left = torch.zeros(16, 16)
    left[:, :8] = 1
    masks = torch.stack([20 * (1 - 2 * left), torch.full((16, 16), -20.0), 20 * (2 * left - 1)])[None]  # (1, 3, h, w)
    logits = torch.tensor([[[0.0, 0, 5, 0], [0, 0, 0, 5], [0, 5, 0, 0]]])  # (1, Q=3, K+1=4)
    targets = [{"labels": torch.tensor([1, 2]), "masks": torch.stack([left, 1 - left])}]
    (q, t), = san.HungarianMatcher(num_points=500)({"pred_logits": logits, "pred_masks": masks}, targets)
    assert dict(zip(t.tolist(), q.tolist())) == {0: 2, 1: 0}


def test_criterion_without_gt_masks_trains_only_the_no_object_class(cfg):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4, requires_grad=True)  # (B, Q, K+1), K = 3
    masks = torch.randn(2, 4, 8, 8, requires_grad=True)
    targets = san.semantic_targets(torch.full((2, 32, 32), 255), 3)
    assert [len(t["labels"]) for t in targets] == [0, 0]
    losses = san.SetCriterion(cfg)({"pred_logits": logits, "pred_masks": masks, "aux_outputs": []}, targets)
    expected = cfg.class_weight * F.cross_entropy(logits.detach().reshape(-1, 4), torch.full((8,), 3))  # all no-object
    assert torch.allclose(losses["loss_ce"], expected) and losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    losses["loss"].backward()
    assert logits.grad.abs().sum() > 0 and masks.grad.abs().sum() == 0


def test_semantic_targets_one_mask_per_present_class_ignore_excluded():
    label = torch.tensor([[[0, 0, 255], [2, 255, 2]]])
    t, = san.semantic_targets(label, 3)
    assert t["labels"].tolist() == [0, 2]
    assert torch.equal(t["masks"], torch.tensor([[[1.0, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 0, 1]]]))


def test_point_sampling_matches_bilinear_interpolation():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    coords = torch.tensor([[[0.125, 0.125], [0.375, 0.125], [0.25, 0.125]]])  # pixel centres (0,0), (0,1), between
    assert torch.allclose(san.point_sample(x, coords), torch.tensor([[[0.0, 1.0, 0.5]]]))
    logits = torch.zeros(1, 1, 8, 8)
    logits[..., :, 4:] = 10.0  # certain on the right, uncertain (|logit| = 0) on the left
    points = san.uncertain_points(logits, 100, 3.0, 0.75)
    assert points.shape == (1, 100, 2) and (points[0, :75, 0] < 0.5).float().mean() > 0.9


def test_losses_are_all_reduced_under_torch_distributed(cfg, model, tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with torch.no_grad():
            losses = model(shapes_batch(), 0)
    finally:
        dist.destroy_process_group()
    assert torch.isfinite(losses["loss"]) and {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0"} <= losses.keys()


# ---------------------------------------------------------------------------------------------------------------------
# Whole model: parameter counts, optimizer groups, vocabulary, shapes, overfit
# ---------------------------------------------------------------------------------------------------------------------
def breakdown(net):
    side, n = net.side, lambda m: sum(p.numel() for p in m.parameters())
    return {"side blocks": n(side.blocks), "patch embed": n(side.patch_embed), "side pos-embed": side.pos_embed.numel(),
            "queries": side.query_embed.numel() + side.query_pos_embed.numel(), "fusion": n(side.fusions),
            "decoder": n(side.decoder), "clip pos-embed": net.clip.visual.positional_embedding.numel(),
            "bg_embed": net.bg_embed.numel()}


def test_trainable_parameters_match_the_official_logs():
    wrapper = san.build_model(san.PRESETS["paper"], pretrained=False)  # ViT-B/16 with random weights, ~5 s
    assert breakdown(wrapper.net) == {"side blocks": 8 * 694_320, "patch embed": 184_560, "side pos-embed": 384_000,
                                      "queries": 48_000, "fusion": 4 * 186_096, "decoder": 1_303_554,
                                      "clip pos-embed": 197 * 768, "bg_embed": 512}
    assert san.count_trainable(wrapper) == 8_370_866  # log: "Total 8.37M"
    with torch.device("meta"):  # ViT-L/14-336 (428M parameters) without allocating it
        clip = open_clip.model.CLIP(**open_clip.get_model_config("ViT-L-14-336"), quick_gelu=True)
        net = san.SAN(san.PRESETS["paper_l14"], clip, tokenizer=None)
    assert net.heads == 16 and san.count_trainable(net) == 9_321_650  # log: "Total 9.32M"


def test_optimizer_groups_follow_the_official_weight_decay_and_clip_lr_rules(model, cfg):
    cfg = dataclasses.replace(cfg, clip_lr_multiplier=0.1)
    (name, opt), = model.configure_optimizers(cfg).items()
    names = {id(p): n for n, p in model.named_parameters()}
    group = {names[id(p)]: g for g in opt.param_groups for p in g["params"]}
    assert name == "adamw" and len(group) == sum(p.requires_grad for p in model.parameters())
    exempt = {n for n, g in group.items() if g["weight_decay"] == 0}
    assert {"net.side.pos_embed", "net.side.query_embed", "net.side.query_pos_embed", "net.side.blocks.0.norm1.weight",
            "net.clip.visual.positional_embedding"} <= exempt
    assert {"net.bg_embed", "net.side.fusions.0.norm.weight", "net.side.blocks.0.qkv.bias"}.isdisjoint(exempt)
    assert all(g["weight_decay"] in (0, cfg.weight_decay) for g in group.values())
    # official SOLVER.CLIP_MULTIPLIER: CLIP's one trainable tensor, its positional embedding, at lr x 0.1
    assert {n for n, g in group.items() if g["lr"] == cfg.lr * 0.1} == {"net.clip.visual.positional_embedding"}
    assert all(g["lr"] == cfg.lr for n, g in group.items() if not n.startswith("net.clip."))
    # at 1.0 (the paper presets) the two groups of earlier versions, so that their checkpoints resume
    (_, opt), = model.configure_optimizers(dataclasses.replace(cfg, clip_lr_multiplier=1.0)).items()
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.weight_decay, 0.0]


def test_text_classifier_averages_normalised_template_embeddings_and_caches(model):
    net = model.net
    net.text_cache.clear()
    w = net.classifier(["red square", "sky"])
    assert w.shape == (3, TINY_CLIP["embed_dim"]) and torch.allclose(w.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        per_template = [F.normalize(net.clip.encode_text(net.tokenizer([t.format(n) for n in ["red square", "sky"]])), dim=-1)
                        for t in san.VILD_TEMPLATES]
    assert len(san.VILD_TEMPLATES) == 14
    assert torch.allclose(w[:2], F.normalize(torch.stack(per_template).mean(0), dim=-1), atol=1e-5)
    assert torch.allclose(w[2], F.normalize(net.bg_embed, dim=-1)[0])
    assert ("red square", "sky") in net.text_cache and len(net.text_cache) == 1


def test_predict_and_proposals_shapes_on_an_odd_size(model, cfg):
    batch = {"image": torch.rand(2, 3, 50, 70)}  # padded to 64 x 96 -> side grid 8 x 12
    scores = model.predict(batch, vocab=["a", "b", "c", "d"])
    assert scores.shape == (2, 4, 50, 70) and torch.isfinite(scores).all()
    assert scores.min() >= 0 and scores.sum(1).max() <= cfg.num_queries  # sum_q p_q(k) sigmoid(m_q)
    p = model.predict_proposals(batch, vocab=["a", "b", "c", "d"])
    assert p["masks"].shape == (2, 6, 50, 70) and p["attn_bias"].shape == (2, model.net.heads, 6, 8, 12)
    assert p["class_probs"].shape == (2, 6, 5) and torch.allclose(p["class_probs"].sum(-1), torch.ones(2, 6))
    with pytest.raises(ValueError, match="class_names is empty"):
        san.SANWrapper(dataclasses.replace(cfg, class_names=()), model.net)(shapes_batch(), 0)


def test_overfits_one_batch(cfg):
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, lr=1e-3)
    wrapper, batch = san.build_model(cfg).train(), shapes_batch()
    opt = wrapper.configure_optimizers(cfg)["adamw"]
    params = [p for p in wrapper.parameters() if p.requires_grad]
    history = []
    for step in range(30):
        loss = wrapper(batch, step)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # the paper's 0.01, as train.py applies it
        opt.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) / 3 < 0.6 * sum(history[:3]) / 3, history
