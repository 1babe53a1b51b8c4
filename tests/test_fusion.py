"""--compile_flow: the fusable functions trace as graphs that serve every block and every task.

On the CPU the tests trace with a counting backend that runs the captured graph as is (no
compiler), so the values must equal the plain pass bit for bit and the graph count shows what
would be compiled; the compiled (Inductor) kernels are checked on a GPU in test_gpu.py.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

import pytest
import torch

from moleflow import precompile
from moleflow.build import build_flow, build_trainer
from moleflow.config.ablation import AblationConfig
from moleflow.extractors.features import FeatureSet
from moleflow.models import fusion
from moleflow.models.loss import moleflow_loss
from moleflow.models.mole_nf import MoLESpatialAwareNF
from moleflow.trainer.continual_trainer import MoLEContinualTrainer


def _model(tasks: int, **kwargs) -> MoLESpatialAwareNF:
    torch.manual_seed(0)
    model = MoLESpatialAwareNF(dim=16, num_coupling_layers=3, lora_rank=4, dia_hidden_ratio=0.5, **kwargs)
    for _ in range(tasks):
        model.add_task()
    with torch.no_grad():  # experts, adapters and DIA blocks that really differ between tasks
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _config(**settings) -> AblationConfig:
    """A small flow (D 16, batch 4), without the compile-ahead child unless asked."""
    return AblationConfig(**{"feature_dim": 16, "lora_rank": 2, "num_coupling_layers": 2, "num_epochs": 1,
                             "batch_size": 4, "compile_ahead": False, "compile_flow": True, **settings})


def _trainer(**settings) -> MoLEContinualTrainer:
    """A CPU trainer of the ``_config`` flow."""
    cfg = _config(**settings)
    torch.manual_seed(0)
    return build_trainer(cfg, build_flow(cfg, 16), torch.device("cpu"), logging.getLogger("test_fusion"))


def _features(images: int) -> FeatureSet:
    patches = torch.randn(images, 4, 4, 16)
    return FeatureSet(patches, patches.mean(dim=(1, 2)), torch.zeros(images), None)


def _trace_on_the_cpu(monkeypatch: pytest.MonkeyPatch, dynamic: Optional[bool],
                      record: Callable[[torch.fx.GraphModule, list], object]) -> Iterator[list]:
    """Fusion on for CPU tensors, with a backend that appends ``record(graph, example inputs)`` for
    each graph it is given and runs the graph as is."""
    graphs: list = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(record(gm, example_inputs))
        return gm.forward

    monkeypatch.setattr(fusion, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(fusion, "COMPILE_OPTIONS", {"backend": backend, "dynamic": dynamic})
    fusion.reset_compiled()
    yield graphs
    fusion.reset_compiled()


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """The graphs traced, each compiled for its exact shapes."""
    yield from _trace_on_the_cpu(monkeypatch, False, lambda gm, inputs: gm)


def test_fusion_is_off_on_the_cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(2)
    x = torch.randn(2, 4, 4, 16)

    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called for CPU tensors")

    monkeypatch.setattr(torch, "compile", no_compile)
    with torch.no_grad():
        plain = model(x, 1)
        with fusion.fusion(True):
            fused = model(x, 1)
    assert torch.equal(plain[0], fused[0]) and torch.equal(plain[1], fused[1])


@pytest.mark.parametrize("kwargs", [{}, {"adapter": "film"}])
def test_traced_flow_equals_plain_and_does_not_grow_with_tasks(traced: list, kwargs: dict) -> None:
    model = _model(3, **kwargs).eval()
    x = torch.randn(3, 4, 4, 16)
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        plain = [model(x, t) for t in range(3)] + [model(x, ids)]
        with fusion.fusion(True):
            fused = [model(x, t) for t in range(3)] + [model(x, ids)]
            count = len(traced)
            model.add_task()
            model(x, 3)
            model(x, torch.tensor([3, 1, 0]))
    for (z0, ld0), (z1, ld1) in zip(plain, fused):
        assert torch.equal(z0, z1) and torch.equal(ld0, ld1)
    # condition, coupling block (one graph for all 3 blocks), DIA, each for one expert and per image
    assert count == 6
    assert len(traced) == count  # a 4th task reuses every graph


def _task_gradients(model: MoLESpatialAwareNF, task: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """Only ``task``'s own parameters train; returns x -> their gradients of the loss on x."""
    model.requires_grad_(False)
    params = model.task_parameters(task)
    for p in params:
        p.requires_grad_(True)

    def grads(x: torch.Tensor) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        moleflow_loss(*model(x, task)).backward()
        return [p.grad.clone() for p in params]

    return grads


def test_traced_training_gradients_equal_plain(traced: list) -> None:
    grads = _task_gradients(_model(2), 1)
    x = torch.randn(2, 4, 4, 16)
    plain = grads(x)
    with fusion.fusion(True):
        fused = grads(x)
        assert traced, "nothing was traced"
    for a, b in zip(plain, fused):
        assert torch.equal(a, b)


def test_the_first_task_trains_unfused_and_later_tasks_fused(traced: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --compile_flow task 0 (the only task whose shared weights train) traces nothing; with
    --no_compile_ahead the run starts no child process."""
    monkeypatch.setattr(precompile.CompileAhead, "start", lambda *args: pytest.fail("compile-ahead child started"))
    trainer = _trainer()
    ahead = precompile.CompileAhead(_config(), torch.device("cpu"), logging.getLogger("test_fusion"))
    counts = []
    with fusion.fusion(True):
        for task in range(2):
            ahead.before_task(task, (4, 4, 4, 16))
            trainer.train_task(task, _features(8))
            counts.append(len(traced))
    assert counts[0] == 0 and counts[1] > 0 and ahead.report is None


def test_a_function_that_cannot_be_compiled_runs_plainly(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A compiler failure is logged once and the pass goes on without fusion, with the same values."""
    def failing(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fusion, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(fusion, "COMPILE_OPTIONS", {"backend": failing})
    fusion.reset_compiled()
    model = _model(2).eval()
    x = torch.randn(2, 4, 4, 16)
    log = logging.getLogger("test_fusion_fallback")
    try:
        with torch.no_grad():
            plain = model(x, 1)
            with caplog.at_level(logging.WARNING, logger="test_fusion_fallback"), fusion.fusion(True, log):
                fused = model(x, 1)
                again = model(x, 1)
    finally:
        fusion.reset_compiled()
    assert torch.equal(plain[0], fused[0]) and torch.equal(plain[1], again[1])
    assert "could not be compiled" in caplog.text and "coupling_forward" in caplog.text
    assert caplog.text.count("coupling_forward could not") == 1


@pytest.fixture
def traced_like_a_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """With the run's automatic dynamic shapes: for each graph, whether a size among its inputs is
    symbolic."""
    yield from _trace_on_the_cpu(monkeypatch, None,
                                 lambda gm, inputs: any(isinstance(e, torch.SymInt) for e in inputs))


def test_static_shapes_compile_for_the_exact_shape_after_symbolic_ones(traced_like_a_run: list) -> None:
    """Scoring at two batch sizes makes the batch size symbolic; a training step inside
    static_shapes() still gets graphs for its exact shape, with the same values as unfused."""
    model = _model(2)
    grads = _task_gradients(model, 1)
    x = torch.randn(4, 4, 4, 16)
    plain = grads(x)
    with fusion.fusion(True):
        with torch.no_grad():
            model(torch.randn(2, 4, 4, 16), 1)
            model(torch.randn(3, 4, 4, 16), 1)
        scoring = list(traced_like_a_run)
        with fusion.static_shapes():
            fused = grads(x)
        training = traced_like_a_run[len(scoring):]
        with fusion.static_shapes():
            grads(torch.randn(4, 4, 4, 16))
    assert any(scoring) and training and not any(training)
    assert len(traced_like_a_run) == len(scoring) + len(training)  # the same shape reuses them
    for a, b in zip(plain, fused):
        assert torch.equal(a, b)


@pytest.mark.parametrize("images", [8, 10])
def test_training_compiles_full_batches_for_their_shape_and_runs_a_last_smaller_batch_unfused(
        traced_like_a_run: list, images: int) -> None:
    trainer = _trainer(num_epochs=2)
    with fusion.fusion(True):
        for task in range(3):
            trainer.train_task(task, _features(images))
            if task == 0:
                _score_at_two_batch_sizes(trainer.model)
                scoring = len(traced_like_a_run)
    training = traced_like_a_run[scoring:]
    assert any(traced_like_a_run[:scoring])
    # condition, coupling block, DIA, loss: one graph each, for the full batch only, reused by task 2
    assert len(training) == 4 and not any(training)


def _score_at_two_batch_sizes(model: MoLESpatialAwareNF) -> None:
    """Scoring between tasks, as a run evaluates: fused calls get symbolic batch sizes from here on."""
    with torch.no_grad():
        model(torch.randn(2, 4, 4, 16), 0)
        model(torch.randn(3, 4, 4, 16), 0)


@pytest.fixture
def traced_code(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """With the run's automatic dynamic shapes: each graph's code and its inputs' shapes and
    requires_grad (what torch's compile caches key a graph on, with its settings)."""
    def record(gm: torch.fx.GraphModule, inputs: list) -> str:
        return repr((gm.code, [(tuple(t.shape), t.requires_grad) if isinstance(t, torch.Tensor) else t
                               for t in inputs]))
    yield from _trace_on_the_cpu(monkeypatch, None, record)


def test_compile_ahead_traces_the_graphs_that_later_tasks_train_with(traced_code: list,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The compile-ahead child's pass (run here in-process) traces exactly the graphs that task 1 of
    a run traces after task 0's evaluation; and the run starts the child at task 0 and waits for it
    at task 1 (a real child process; on the CPU it runs its pass plainly)."""
    trainer = _trainer(compile_ahead=True)
    config = _config(compile_ahead=True)
    ahead = precompile.CompileAhead(config, torch.device("cpu"), logging.getLogger("test_fusion"))
    with fusion.fusion(True), caplog.at_level(logging.INFO, logger="test_fusion"):
        ahead.before_task(0, (4, 4, 4, 16))
        trainer.train_task(0, _features(8))
        assert ahead.report is None
        _score_at_two_batch_sizes(trainer.model)
        scoring = len(traced_code)
        ahead.before_task(1, (4, 4, 4, 16))
        trainer.train_task(1, _features(8))
    run = sorted(traced_code[scoring:])
    assert ahead.report is not None and ahead.report["seconds"] > 0
    assert "a child process compiled the later tasks' training step" in caplog.text
    fusion.reset_compiled()
    del traced_code[:]
    precompile.compile_training_step(config, (4, 4, 4, 16), torch.device("cpu"))
    assert len(run) == 4 and sorted(traced_code) == run


def test_a_failing_compile_ahead_child_is_one_warning_and_no_report(caplog: pytest.LogCaptureFixture) -> None:
    ahead = precompile.CompileAhead(_config(), torch.device("cpu"), logging.getLogger("test_precompile"))
    with caplog.at_level(logging.INFO, logger="test_precompile"):
        ahead.start((4, 4, 4, 15))  # D 15: no flow
        ahead.wait()
    assert ahead.report is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "failed (exit 1: " in caplog.text and "--no_compile_ahead" in caplog.text


def test_the_compile_ahead_report_is_the_last_output_line_or_none() -> None:
    report = '{"seconds": 2.5, "gpu_peak_reserved_gib": 0.5}'
    assert precompile._last_report(f"a library's print\n{report}\n") == {"seconds": 2.5, "gpu_peak_reserved_gib": 0.5}
    for output in ("", "not json", '{"seconds": 2.5}', "[1, 2]"):
        assert precompile._last_report(output) is None
