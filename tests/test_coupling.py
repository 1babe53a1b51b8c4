"""Each coupling block alone: the reverse inverts the forward, the log-det is that of the numerical
Jacobian (both block kinds, both directions), and the DIA block is FrEIA's AffineCouplingOneSided."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from moleflow.models.coupling import DIABlock, DIASubnet, MoLECouplingBlock

D = 6  # tiny: the full Jacobian of a 2x2 grid is 24 x 24


def _perturbed(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _mole_block(context: int) -> tuple[MoLECouplingBlock, list]:
    """A MoLE block in float64 with two LoRA experts, every weight (experts, context conv) non-trivial;
    returns the block and expert 1's picked tensors."""
    torch.manual_seed(0)
    block = MoLECouplingBlock(D, rank=2, alpha=1.0, clamp=1.9, scale_context_kernel=context, permutation_seed=3)
    for _ in range(2):
        for layer in block.subnet.lora_layers():
            layer.add_expert()
    block = block.double()
    _perturbed(block, 1)
    return block, block.subnet.experts(1)


def _dia_block(swap: bool) -> tuple[DIABlock, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    block = DIABlock(D, clamp=1.9, swap=swap)
    subnet = DIASubnet(block.split, D - block.split, hidden=5).double()
    _perturbed(subnet, 2)
    return block, tuple(subnet.parameters())


# Each case: (block(x, rev) -> (y, log_det), shape of x): a MoLE block on a 2x2 patch grid (its
# context conv mixes patches), a DIA block on rows of patch vectors.
CASES: dict[str, Callable[[], tuple[Callable[[Tensor, bool], tuple[Tensor, Tensor]], tuple[int, ...]]]] = {}


def _case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


@_case("mole_context")
def _mole_context():
    block, picked = _mole_block(context=3)
    return (lambda x, rev: block(x, picked, rev=rev)), (1, 2, 2, D)


@_case("mole_plain")
def _mole_plain():
    block, picked = _mole_block(context=0)
    return (lambda x, rev: block(x, picked, rev=rev)), (1, 2, 2, D)


@_case("dia")
def _dia():
    block, weights = _dia_block(swap=False)
    return (lambda x, rev: block(x, weights, rev=rev)), (4, D)


@_case("dia_swapped")
def _dia_swapped():
    block, weights = _dia_block(swap=True)
    return (lambda x, rev: block(x, weights, rev=rev)), (4, D)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rev", [False, True])
def test_inverse_of_each_direction_is_the_identity(case: str, rev: bool) -> None:
    run, shape = CASES[case]()
    x = 2.0 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y, log_det = run(x, rev)
    back, log_det_back = run(y, not rev)
    assert not torch.allclose(y, x)  # the block does something
    assert (back - x).abs().max().item() < 1e-4
    torch.testing.assert_close(log_det_back, -log_det, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rev", [False, True])
def test_log_det_is_that_of_the_numerical_jacobian(case: str, rev: bool) -> None:
    """Summed over the patches (rows), the per-patch log-dets are log|det| of the whole Jacobian; for a
    row-wise block (DIA) each row's own Jacobian gives its own log-det."""
    run, shape = CASES[case]()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    jac = torch.autograd.functional.jacobian(lambda v: run(v.reshape(shape), rev)[0].reshape(-1), x.reshape(-1))
    sign, expected = torch.linalg.slogdet(jac)
    _, log_det = run(x, rev)
    assert sign != 0 and log_det.abs().max().item() > 1e-3  # a Jacobian that is not the identity's
    torch.testing.assert_close(log_det.sum(), expected, rtol=1e-10, atol=1e-10)
    if case.startswith("dia"):
        for i in range(shape[0]):
            row = torch.autograd.functional.jacobian(lambda v: run(v[None], rev)[0][0], x[i])
            torch.testing.assert_close(log_det[i], torch.linalg.slogdet(row)[1], rtol=1e-10, atol=1e-10)


class _FrEIASubnet(nn.Module):
    """The DIA subnet as FrEIA calls it: subnet(x1) = [s_net(x1) / c ; t_net(x1)] (the DIA blocks ran
    inside FrEIA's AffineCouplingOneSided until the coupling base was ours)."""

    def __init__(self, subnet: DIASubnet, clamp: float) -> None:
        super().__init__()
        self.subnet, self.clamp = subnet, clamp

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.subnet.s_net(x) / self.clamp, self.subnet.t_net(x)], dim=-1)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("rev", [False, True])
def test_dia_block_is_freia_affine_coupling_one_sided_bit_for_bit(swap: bool, rev: bool) -> None:
    from FrEIA.modules import AffineCouplingOneSided
    dim, clamp = 16, 1.9
    block = DIABlock(dim, clamp=clamp, swap=swap)
    torch.manual_seed(0)
    subnet = DIASubnet(block.split, dim - block.split, hidden=8)
    _perturbed(subnet, 3)
    freia = AffineCouplingOneSided([(dim,)], subnet_constructor=lambda c_in, c_out: _FrEIASubnet(subnet, clamp),
                                   clamp=clamp, clamp_activation="TANH", split_len=block.split)
    x = torch.randn(50, dim, generator=torch.Generator().manual_seed(7))
    cut = dim // 2 if swap else 0  # odd blocks swapped the halves around FrEIA's coupling
    swapped = torch.cat([x[:, cut:], x[:, :cut]], dim=-1)
    with torch.no_grad():
        (y_freia,), log_det_freia = freia([swapped], rev=rev)
        y, log_det = block(x, tuple(subnet.parameters()), rev=rev)
    back = dim - cut if swap else 0
    assert torch.equal(y, torch.cat([y_freia[:, back:], y_freia[:, :back]], dim=-1))
    assert torch.equal(log_det, log_det_freia)
