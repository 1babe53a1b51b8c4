"""Properties that make the method work, on tiny tensors (CPU, seconds)."""

from __future__ import annotations

import logging

import pytest
import torch

from moleflow.config.ablation import PRESETS, AblationConfig, apply_overrides
from moleflow.models.coupling import DIABlock, DIASubnet, MoLECouplingBlock
from moleflow.models.lora import LoRALinear
from moleflow.models.loss import moleflow_loss, patch_nll, tail_k
from moleflow.build import build_flow, build_trainer
from moleflow.models.mole_nf import MoLESpatialAwareNF
from moleflow.models.routing import PrototypeRouter
from moleflow.trainer.continual_trainer import MoLEContinualTrainer, lr_factor
from moleflow.extractors.features import FeatureSet

D = 16


def _perturb(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its initial value so no expert is trivially the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _model(tasks: int = 2, dtype=torch.float64, **kwargs) -> MoLESpatialAwareNF:
    torch.manual_seed(0)
    model = MoLESpatialAwareNF(D, num_coupling_layers=3, lora_rank=4, **kwargs).to(dtype)
    for _ in range(tasks):
        model.add_task()
    _perturb(model)
    return model


@pytest.mark.parametrize("task_id", [0, 1, 2])
def test_reverse_of_forward_is_identity(task_id):
    model = _model(tasks=3)
    x = torch.randn(2, 5, 4, D, dtype=torch.float64)
    z, log_det = model.flow(x, task_id)
    x_back, log_det_rev = model.flow(z, task_id, rev=True)
    assert (x_back - x).abs().max().item() < 1e-4
    torch.testing.assert_close(log_det_rev, -log_det)


def test_reverse_identity_float32_whole_model():
    model = _model(tasks=2, dtype=torch.float32)
    feats = torch.randn(3, 6, 6, D)
    z, _ = model(feats, 1)
    x_back, _ = model.flow(z, 1, rev=True)
    assert (x_back - model.condition(feats, 1)).abs().max().item() < 1e-4


def test_log_det_matches_numerical_jacobian():
    """Sum of per-patch log-dets == log|det| of the full Jacobian over a 2x2 grid (context convs included)."""
    model = _model(tasks=2)
    x = torch.randn(1, 2, 2, D, dtype=torch.float64)

    def flat_flow(v):
        return model.flow(v.reshape(1, 2, 2, D), 1)[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(flat_flow, x.reshape(-1))
    _, expected = torch.linalg.slogdet(jac)
    _, log_det = model.flow(x, 1)
    torch.testing.assert_close(log_det.sum(), expected, atol=1e-8, rtol=1e-8)


def test_per_patch_log_det_single_patch():
    model = _model(tasks=1)
    x = torch.randn(1, 1, 1, D, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: model.flow(v.reshape(1, 1, 1, D), 0)[0].reshape(-1),
                                             x.reshape(-1))
    torch.testing.assert_close(model.flow(x, 0)[1].reshape(()), torch.linalg.slogdet(jac)[1])


def test_coupling_log_scale_is_clamped():
    block = MoLECouplingBlock(D, rank=2, alpha=1.0, clamp=1.9, scale_context_kernel=0, permutation_seed=0)
    for layer in block.subnet.lora_layers():
        layer.add_expert()
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(1e3)
    _, log_det = block(torch.randn(1, 2, 2, D) * 100, block.subnet.experts(0))
    assert log_det.abs().max().item() <= 1.9 * (D // 2) + 1e-3


def test_new_expert_starts_as_base():
    layer = LoRALinear(8, 6, rank=3)
    layer.add_expert()
    x = torch.randn(4, 8)
    assert torch.equal(layer(x, 0), layer.base(x))
    assert torch.count_nonzero(layer.lora_B[0]) == 0 and torch.count_nonzero(layer.task_bias[0]) == 0
    assert torch.count_nonzero(layer.lora_A[0]) > 0

    block = DIABlock(D, clamp=1.9, swap=True)
    v = torch.randn(5, D)
    y, log_det = block(v, tuple(DIASubnet(block.split, D - block.split, 8).parameters()))
    assert torch.equal(y, v) and torch.equal(log_det, torch.zeros(5))

    model = _model(tasks=1, dtype=torch.float32)
    model.add_task()  # fresh task 1, untouched
    for layer in model.lora_layers():
        assert torch.count_nonzero(layer.lora_B[1]) == 0 and torch.count_nonzero(layer.task_bias[1]) == 0
    flat = torch.randn(7, D)
    out, ld = model._dia(flat.reshape(7, 1, 1, D), 1, rev=False)
    assert torch.equal(out.reshape(7, D), flat) and torch.equal(ld, torch.zeros(7, 1, 1))


def test_task_ids_must_exist():
    model = _model(tasks=1)
    with pytest.raises(IndexError):
        model(torch.randn(1, 2, 2, D, dtype=torch.float64), 1)


def _features(n: int, shift: float, seed: int) -> FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(n, 4, 4, D, generator=gen) + shift
    return FeatureSet(patches=patches, router=patches.mean(dim=(1, 2)), labels=torch.zeros(n, dtype=torch.long),
                      masks=None)


def _trainer(**overrides) -> MoLEContinualTrainer:
    cfg = apply_overrides(AblationConfig(), {"feature_dim": D, "num_coupling_layers": 2, "lora_rank": 4,
                                             "num_epochs": 2, "batch_size": 4, "warmup_epochs": 1, **overrides})
    return build_trainer(cfg, build_flow(cfg, D), torch.device("cpu"), logging.getLogger("test-trainer"))


def test_shared_frozen_and_old_expert_bit_identical_after_later_tasks():
    trainer = _trainer()
    model = trainer.model
    trainer.train_task(0, _features(12, 0.0, 0))
    shared_after_0 = {n: p.detach().clone() for n, p in model.named_parameters()
                      if any(p is q for q in model.shared_parameters())}
    probe = torch.randn(3, 4, 4, D)
    with torch.no_grad():
        scores_0 = patch_nll(*model(probe, 0)).clone()
    task0_params = [p.detach().clone() for p in model.task_parameters(0)]
    trainer.train_task(1, _features(12, 3.0, 1))
    trainer.train_task(2, _features(12, -3.0, 2))
    for name, p in model.named_parameters():
        if name in shared_after_0:
            assert torch.equal(p, shared_after_0[name]), f"shared parameter {name} changed"
    for before, after in zip(task0_params, model.task_parameters(0)):
        assert torch.equal(before, after)
    with torch.no_grad():
        assert torch.equal(patch_nll(*model(probe, 0)), scores_0)
    # later tasks did train their own parameters
    assert any(torch.count_nonzero(layer.lora_B[1]) > 0 for layer in model.lora_layers())


def test_slow_stage_unfreezes_last_blocks():
    trainer = _trainer(enable_slow_stage=True, num_epochs=4, slow_stage_start=0.5, slow_blocks_k=1)
    model = trainer.model
    trainer.train_task(0, _features(8, 0.0, 0))
    first = model.blocks[0].subnet.scale1.base.weight.detach().clone()
    last_base = model.blocks[-1].subnet.scale1.base.weight.detach().clone()
    trainer.train_task(1, _features(8, 2.0, 1))
    assert torch.equal(first, model.blocks[0].subnet.scale1.base.weight)
    assert not torch.equal(last_base, model.blocks[-1].subnet.scale1.base.weight)


def test_baseline_nf_fine_tunes_shared_weights():
    trainer = _trainer(**PRESETS["baseline_nf"])
    model = trainer.model
    trainer.train_task(0, _features(8, 0.0, 0))
    before = model.blocks[0].subnet.scale1.base.weight.detach().clone()
    trainer.train_task(1, _features(8, 2.0, 1))
    assert not torch.equal(before, model.blocks[0].subnet.scale1.base.weight)
    assert model.task_parameters(1) == []


def test_non_finite_batches_are_skipped_then_stop():
    from moleflow.trainer.continual_trainer import TrainingError
    trainer = _trainer()
    bad = _features(8, 0.0, 0)
    bad.patches[:] = float("nan")
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.train_task(0, bad)


def test_lr_schedule_warmup_and_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)


def test_loss_by_hand():
    z = torch.zeros(1, 1, 2, 2)
    z[0, 0, 1] = 2.0
    log_det = torch.tensor([[[0.5, -0.5]]])
    nll = patch_nll(z, log_det)
    const = torch.log(torch.tensor(2 * torch.pi)).item()
    torch.testing.assert_close(nll, torch.tensor([[[const - 0.5, 4.0 + const + 0.5]]]))
    plain = moleflow_loss(z, log_det, tail_aware=False, lambda_logdet=0.0)
    torch.testing.assert_close(plain, nll.mean())
    tail = moleflow_loss(z, log_det, tail_weight=0.5, tail_ratio=0.5, lambda_logdet=0.0)
    torch.testing.assert_close(tail, 0.5 * nll.mean() + 0.5 * nll.max())
    reg = moleflow_loss(z, log_det, tail_aware=False, lambda_logdet=1.0)
    torch.testing.assert_close(reg, nll.mean() + 0.25)
    assert tail_k(784, 0.02) == 15 and tail_k(10, 0.02) == 1


def test_router_separable_clusters_and_shrinkage():
    gen = torch.Generator().manual_seed(0)
    dim, n = 64, 20  # fewer samples than dimensions: the plain covariance is singular
    centres = [torch.zeros(dim), torch.full((dim,), 3.0), torch.linspace(-3, 3, dim)]
    for mahalanobis in (True, False):
        router = PrototypeRouter(mahalanobis=mahalanobis)
        for c in centres:
            router.add_task(c + torch.randn(n, dim, generator=gen))
        test = torch.cat([c + torch.randn(10, dim, generator=gen) for c in centres])
        truth = torch.arange(3).repeat_interleave(10)
        assert torch.equal(router.route(test), truth)
    proto = router.prototypes[0]
    assert 0.0 < proto.shrinkage <= 1.0
    assert torch.isfinite(proto.precision).all()
    cov = torch.linalg.inv(proto.precision.double())
    assert torch.linalg.eigvalsh(cov).min() > 0


@pytest.mark.parametrize("n,dim", [(240, 96), (20, 64), (500, 8), (3, 20)])
def test_ledoit_wolf_matches_scikit_learn(n: int, dim: int) -> None:
    from sklearn.covariance import LedoitWolf
    from moleflow.models.routing import ledoit_wolf
    gen = torch.Generator().manual_seed(n + dim)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 4.0, dim, dtype=torch.float64)
    x = x + torch.linspace(-2.0, 2.0, dim, dtype=torch.float64)
    reference = LedoitWolf(assume_centered=False).fit(x.numpy())
    covariance, shrinkage = ledoit_wolf(x)
    assert shrinkage == pytest.approx(reference.shrinkage_, abs=1e-12)
    torch.testing.assert_close(covariance, torch.from_numpy(reference.covariance_), rtol=0, atol=1e-12)


def test_permutation_gradient_is_the_inverse_gather():
    from moleflow.models.kernels import permute_last_dim
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    out = permute_last_dim(x, perm, torch.argsort(perm))
    assert torch.equal(out, x[..., perm])
    g = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, g)
    (plain,) = torch.autograd.grad(x[..., perm], x, g)
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv_gradients_equal_autograds(bias: bool) -> None:
    """The context conv's input gradient (the flipped kernel's convolution) and its kernel and bias
    gradients equal autograd's for nn.Conv2d; with the kernel frozen only the input gets one."""
    from moleflow.models.kernels import depthwise_conv2d
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=bias).double()
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64, requires_grad=True)
    ours = depthwise_conv2d(x, conv)
    plain = conv(x)
    assert torch.equal(ours, plain)
    g = torch.randn_like(ours)
    wanted = [x, conv.weight] + ([conv.bias] if bias else [])
    for a, b in zip(torch.autograd.grad(ours, wanted, g), torch.autograd.grad(plain, wanted, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    conv.requires_grad_(False)
    out = depthwise_conv2d(x, conv)
    assert out.grad_fn is not None
    (only,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(only, torch.autograd.grad(conv(x), x, g)[0], rtol=0, atol=1e-12)


def test_router_sees_a_task_added_after_routing():
    """Prototypes are cached per device; adding a task must reach the next route() call."""
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 6, generator=gen), torch.randn(30, 6, generator=gen) + 5.0
    router = PrototypeRouter()
    router.add_task(a)
    probe = torch.full((1, 6), 5.0)
    assert router.route(probe).item() == 0  # one task: everything goes to it
    router.add_task(b)
    assert router.route(probe).item() == 1
    restored = PrototypeRouter.from_state(router.state())
    assert torch.equal(restored.distances(probe), router.distances(probe))


def test_mahalanobis_beats_euclidean_on_anisotropic_tasks():
    gen = torch.Generator().manual_seed(1)
    dim = 8
    scale_a = torch.ones(dim); scale_a[0] = 20.0  # task A: huge spread along axis 0
    a = torch.randn(200, dim, generator=gen) * scale_a
    b = torch.randn(200, dim, generator=gen) + torch.tensor([0.0, 4.0] + [0.0] * (dim - 2))
    probe = torch.zeros(1, dim); probe[0, 0] = 10.0  # far along A's long axis: belongs to A
    maha, eucl = PrototypeRouter(True), PrototypeRouter(False)
    for r in (maha, eucl):
        r.add_task(a)
        r.add_task(b)
    assert maha.route(probe).item() == 0
    assert eucl.route(probe).item() == 1


def _param_names(cfg: AblationConfig) -> set[str]:
    model = build_flow(cfg, D)
    model.add_task()
    return {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in ("full",)])
def test_every_preset_changes_the_model_or_protocol(preset):
    base = apply_overrides(AblationConfig(), {"feature_dim": D, "num_coupling_layers": 2, "lora_rank": 2})
    cfg = apply_overrides(base, PRESETS[preset])
    assert cfg != base
    model_fields = {"use_lora", "use_dia", "use_task_adapter", "use_pos_embed", "use_spatial_context",
                    "use_scale_context", "use_whitening_adapter"}
    if model_fields & set(PRESETS[preset]):
        torch.manual_seed(0)
        names_base = _param_names(base)
        names_cfg = _param_names(cfg)
        if preset == "wo_pos_embed":
            assert names_base == names_cfg
            m1, m2 = build_flow(base, D), build_flow(cfg, D)
            m1.add_task(); m2.add_task()
            m2.load_state_dict(m1.state_dict())
            x = torch.randn(1, 3, 3, D)
            assert not torch.allclose(m1(x, 0)[0], m2(x, 0)[0])
        else:
            assert names_base != names_cfg


@pytest.mark.parametrize("switch,marker", [
    ("use_lora", "lora_A"), ("use_dia", "dia."), ("use_task_adapter", "adapters."),
    ("use_spatial_context", "mixer."), ("use_scale_context", "context_conv"),
])
def test_switch_removes_its_parameters(switch, marker):
    base = apply_overrides(AblationConfig(), {"feature_dim": D, "num_coupling_layers": 2, "lora_rank": 2})
    assert any(marker in n for n in _param_names(base))
    assert not any(marker in n for n in _param_names(apply_overrides(base, {switch: False})))


def test_whitening_vs_film_adapter():
    base = apply_overrides(AblationConfig(), {"feature_dim": D, "num_coupling_layers": 1, "lora_rank": 2})
    assert any("gamma_raw" in n for n in _param_names(base))
    film = _param_names(apply_overrides(base, {"use_whitening_adapter": False}))
    assert any("adapters.0.norm" in n for n in film) and not any("gamma_raw" in n for n in film)


def test_whitening_adapter_init_and_bounds():
    model = build_flow(apply_overrides(AblationConfig(), {"feature_dim": D, "num_coupling_layers": 1}), D)
    model.add_task(); model.add_task()
    g0 = 0.5 + 1.5 * torch.sigmoid(model.adapters[0].gamma_raw)
    g1 = 0.5 + 1.5 * torch.sigmoid(model.adapters[1].gamma_raw)
    assert torch.allclose(g0, torch.full((D,), 1.0), atol=0.01)
    assert torch.allclose(g1, torch.full((D,), 1.25))
    with torch.no_grad():
        model.adapters[0].gamma_raw.fill_(100.0)
        model.adapters[0].beta_raw.fill_(100.0)
    out = model.adapters[0](torch.randn(4, D))
    assert out.abs().max() < 2.0 * 5 + 2.0


def test_main_configuration_parameter_counts():
    model = build_flow(AblationConfig(), 768)
    model.add_task()
    shared = sum(p.numel() for p in model.shared_parameters())
    per_task = sum(p.numel() for p in model.task_parameters(0))
    assert shared == 8_928_007
    assert per_task == 3_706_368


def test_score_patches_uses_each_images_own_expert():
    """Mixed experts in one call, chunked: every image scored as if alone with its own expert."""
    from moleflow.evaluation.evaluator import score_patches
    from moleflow.models.loss import patch_nll
    model = _model(tasks=3).float()
    for layer in model.lora_layers():  # experts that really differ
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.05)
    x = torch.randn(11, 5, 4, D)
    experts = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 1, 2, 0])
    got = score_patches(model, x, experts, batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        alone = torch.stack([patch_nll(*model(x[i:i + 1], int(experts[i])))[0] for i in range(len(x))])
        other = torch.stack([patch_nll(*model(x[i:i + 1], (int(experts[i]) + 1) % 3))[0] for i in range(len(x))])
    torch.testing.assert_close(got, alone)
    assert not torch.allclose(got, other)


@pytest.mark.parametrize("kwargs", [{}, {"adapter": "film"}, {"lora_rank": 0}, {"dia_n_blocks": 0, "adapter": None}])
def test_one_pass_with_an_expert_per_image_equals_each_image_alone(kwargs):
    """forward(x, ids): image b through task ids[b]'s expert, adapter and DIA, as if scored alone."""
    settings = {"num_coupling_layers": 3, "lora_rank": 4, **kwargs}
    model = MoLESpatialAwareNF(D, **settings).double()
    for _ in range(3):
        model.add_task()
    gen = torch.Generator().manual_seed(4)
    for t in range(3):  # every task's own parameters away from their identity start
        for p in model.task_parameters(t):
            p.data.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(5, 4, 3, D, dtype=torch.float64, generator=gen)
    ids = torch.tensor([2, 0, 1, 1, 2])
    with torch.no_grad():
        z, log_det = model(x, ids)
        alone = [model(x[i:i + 1], int(ids[i])) for i in range(len(x))]
    torch.testing.assert_close(z, torch.cat([a[0] for a in alone]), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det, torch.cat([a[1] for a in alone]), rtol=0, atol=1e-12)
    with pytest.raises(IndexError, match="out of range"):
        model(x, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="reverse"):
        model.flow(x, ids, rev=True)
