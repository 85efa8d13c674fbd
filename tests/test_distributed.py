"""grad_guard under DDP, FSDP2, FSDP1 and DeepSpeed, run for real on 2 CPU processes (gloo).

Starting processes is the expensive part, so two spawned runs (module-scoped fixtures)
each make several fits, and the tests check their results against a single-process run
on the concatenated batch (same seed). Every spawned run has a deadline: a hang fails
the test instead of stalling CI.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import pytest
import torch

from distributed_helpers import (
    guarded_callbacks,
    is_grad_guard_tag,
    make_module,
    max_relative_difference,
    regression_loader,
    run_ranks,
    scenario,
    states_equal,
)
from helpers import event_dirs, read_scalars

pytestmark = pytest.mark.distributed

REL = 1e-5


def _reference(
    tmp_path: Any, callbacks: list[Any], max_steps: int = 4, **module_kwargs: Any
) -> tuple[dict[str, dict[int, float]], dict[str, torch.Tensor]]:
    """Single-process fit on the concatenated batch (2 x 4 samples): (scalars, weights)."""
    module = make_module(**module_kwargs)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, regression_loader(batch_size=8))
    scalars = {
        k: v for k, v in read_scalars(trainer.logger.log_dir).items() if is_grad_guard_tag(k)
    }
    weights = {k: v.detach().clone() for k, v in module.named_parameters()}
    return scalars, weights


def _weights_difference(actual: dict, expected: dict) -> float:
    """Largest ``||actual - expected|| / ||expected||`` over the weight tensors; fails on
    non-finite weights."""
    assert actual.keys() == expected.keys()
    worst = 0.0
    for name, value in expected.items():
        got = actual[name]
        assert torch.isfinite(got).all(), name
        difference = torch.linalg.vector_norm(got - value) / torch.linalg.vector_norm(value)
        worst = max(worst, difference.item())
    return worst


def _agree(results: list[dict], key: str) -> None:
    first, *others = results
    for other in others:
        assert states_equal(first[key], other[key]), key


def _check_resume(resumes: list[dict]) -> None:
    """1 epoch + checkpoint, then resumed to 2 epochs, against 2 epochs in one go."""
    for resume in resumes:
        first, resumed, straight = resume["first"], resume["resumed"], resume["straight"]
        assert first["steps"] == 4 and resumed["steps"] == straight["steps"] == 8
        assert first["at_end"], "no grad_guard state"
        assert states_equal(resumed["at_start"], first["at_end"])  # restored what was saved
        assert not states_equal(straight["at_start"], first["at_end"])  # which is not trivial
        assert states_equal(resumed["at_end"], straight["at_end"])  # resumed == uninterrupted
    for name in ("first", "resumed"):
        _agree([resume[name] for resume in resumes], "at_end")  # every rank holds the same


# ---------------------------------------------------------------------------- spawned runs


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """Three DDP fits, then FSDP1 on CPU with and without ``use_orig_params``."""
    out = tmp_path_factory.mktemp("run_a")
    parts = ("ddp_monitor", "ddp_nan", "ddp_rollback", "ddp_resume", "fsdp1_orig", "fsdp1_flat")
    ranks = run_ranks(scenario, out, parts=parts, timeout=240)
    return out, {part: [rank[part] for rank in ranks] for part in parts}


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    """Four FSDP2 fits, then the statistics core on hand-made DTensors and flat shards."""
    out = tmp_path_factory.mktemp("run_b")
    parts = ("fsdp2_guarded", "fsdp2_agc", "fsdp2_nonfinite", "fsdp2_resume", "dtensor")
    ranks = run_ranks(scenario, out, parts=parts, timeout=240)
    return out, {part: [rank[part] for rank in ranks] for part in parts}


# ---------------------------------------------------------------------------- DDP


def test_ddp_logged_norms_equal_single_process_run(run_a, tmp_path):
    from grad_guard import GradientNormMonitor

    _, parts = run_a
    ranks = parts["ddp_monitor"]
    expected, weights = _reference(tmp_path, [GradientNormMonitor(histogram_every_n_steps=2)])
    assert {"grad_norm/net.0", "grad_norm/net.4", "grad_guard/total_grad_norm"} <= set(expected)
    worst = max_relative_difference(read_scalars(ranks[0]["log_dir"]), expected)
    assert worst < REL, worst
    for rank in ranks:
        assert _weights_difference(rank["weights"], weights) < REL
    print(f"DDP: logged values vs single process, max relative difference {worst:.1e}")


def test_ddp_only_rank_zero_writes_and_monitoring_needs_no_collective(run_a):
    out, parts = run_a
    rank0, rank1 = parts["ddp_monitor"]
    assert rank0["grad_guard_tags"], "rank 0 logged nothing"
    assert rank1["grad_guard_tags"] == []  # grad_guard never called rank 1's logger
    assert event_dirs(os.path.join(out, "ddp_monitor", "rank0"))
    assert event_dirs(os.path.join(out, "ddp_monitor", "rank1")) == []  # nor wrote histograms
    # the gradients are all-reduced before the hook: monitoring adds no collective
    assert rank0["collectives"] == rank1["collectives"] == {}


def test_ddp_nan_loss_on_one_rank_makes_every_rank_skip(run_a, tmp_path):
    _, parts = run_a
    ranks = parts["ddp_nan"]
    for rank in ranks:
        assert rank["changed"] == {0: True, 1: True, 2: False, 3: True}, rank["changed"]
        assert rank["counts"]["skipped_steps"] == 1
        assert rank["counts"]["nonfinite"] == 1
    _agree(ranks, "weights")
    _agree(ranks, "checkpoint_callbacks")
    assert len(ranks[0]["checkpoint_callbacks"]) == 3  # monitor, detection, clipping
    # finite weights, the same as a single process that skipped step 2
    _, weights = _reference(tmp_path, guarded_callbacks(), nan_loss_at=(0, 2))
    assert _weights_difference(ranks[0]["weights"], weights) < REL
    print(f"DDP: collectives from grad_guard per step {ranks[0]['collectives']}")


def test_ddp_fault_on_rank_1_rolls_back_every_rank(run_a):
    _, parts = run_a
    ranks = parts["ddp_rollback"]
    for rank in ranks:
        assert rank["counts"]["rollbacks"] == 1 and rank["counts"]["nonfinite"] == 1
        assert rank["restored"] == [1], rank["restored"]  # the snapshot taken entering step 1
        assert rank["global_step"] == 4
    _agree(ranks, "weights")  # identical after the rollback, and finite
    assert all(torch.isfinite(w).all() for w in ranks[0]["weights"].values())


def test_ddp_resume_restores_clipping_and_detection_state_on_every_rank(run_a):
    _, parts = run_a
    _check_resume(parts["ddp_resume"])


# ---------------------------------------------------------------------------- FSDP2


def test_fsdp2_norms_and_clipped_result_equal_unsharded_run(run_b, tmp_path):
    _, parts = run_b
    ranks = parts["fsdp2_guarded"]
    expected, weights = _reference(tmp_path, guarded_callbacks(2))
    for required in ("grad_norm/net.4", "grad_guard/total_grad_norm", "grad_guard/clip/post_norm"):
        assert required in expected
    assert all(v > 0.5 for v in expected["grad_guard/clip/pre_norm"].values())  # clipping acts
    worst = max_relative_difference(read_scalars(ranks[0]["log_dir"]), expected)
    assert worst < REL, worst
    weight_difference = max(_weights_difference(r["weights"], weights) for r in ranks)
    assert weight_difference < REL, weight_difference
    assert ranks[1]["grad_guard_tags"] == []
    print(
        f"FSDP2: logged values vs single process, max relative difference {worst:.1e}; "
        f"clipped weights {weight_difference:.1e}"
    )


def test_fsdp2_statistics_cost_one_all_reduce_per_step(run_b):
    _, parts = run_b
    ranks = parts["fsdp2_guarded"]
    for rank in ranks:
        assert rank["pass_collectives"] == {0: 1, 1: 1, 2: 1, 3: 1}, rank["pass_collectives"]
        # all of grad_guard together on a step without logging: the statistics pass, the
        # global-batch loss for the loss rule, and one to agree on the detection decision
        # (flags and counters in one tensor); never one per layer
        for step in (1, 3):
            assert rank["collectives"][step] <= 3, rank["collectives"]
    assert ranks[0]["collectives"] == ranks[1]["collectives"]
    print(f"FSDP2: collectives from grad_guard per step {ranks[0]['collectives']}")


def test_fsdp2_agc_uses_full_unit_norms(run_b, tmp_path):
    from grad_guard import GradientClipping
    from grad_guard.core.clip import AGC

    _, parts = run_b
    ranks = parts["fsdp2_agc"]
    expected, weights = _reference(tmp_path, [GradientClipping(AGC(clip_factor=0.01))])
    assert max(expected["grad_guard/clip/clipped_fraction"].values()) > 0  # AGC acted
    assert max_relative_difference(read_scalars(ranks[0]["log_dir"]), expected) < REL
    for rank in ranks:
        assert _weights_difference(rank["weights"], weights) < REL


def test_fsdp2_nonfinite_shard_on_one_rank_makes_every_rank_skip(run_b, tmp_path):
    _, parts = run_b
    ranks = parts["fsdp2_nonfinite"]
    for rank in ranks:  # only rank 1's shard held the inf; both skipped step 1
        assert rank["changed"] == {0: True, 1: False, 2: True, 3: True}, rank["changed"]
        assert rank["counts"]["skipped_steps"] == 1
    _agree(ranks, "checkpoint_callbacks")
    _, weights = _reference(tmp_path, guarded_callbacks(), inf_grad_at=(0, 1, 2))
    for rank in ranks:
        assert _weights_difference(rank["weights"], weights) < REL


def test_fsdp2_resume_from_distributed_checkpoint_restores_state(run_b):
    out, parts = run_b
    checkpoint = os.path.join(out, "fsdp2_resume", "resume", "epoch1.ckpt")
    assert os.path.isdir(checkpoint)  # sharded: a folder with one file per rank
    _check_resume(parts["fsdp2_resume"])


def test_dtensor_replicated_is_not_double_counted_and_shards_are_summed(run_b):
    _, parts = run_b
    rank0, rank1 = parts["dtensor"]
    assert len(rank0) == 13
    for case, (norms, collectives, expected) in rank0.items():
        other_norms, other_collectives, _ = rank1[case]
        # every rank holds the same norms, bit for bit
        torch.testing.assert_close(norms, other_norms, rtol=0, atol=0, equal_nan=True, msg=case)
        assert collectives == other_collectives, case
        if expected is None:  # a NaN in rank 1's shard: seen by every rank, for every p
            assert not torch.isfinite(norms[1]) and torch.isfinite(norms[0]), case
            assert collectives == 1, case
            continue
        torch.testing.assert_close(norms, expected, rtol=REL, atol=0, msg=case)
        if case.startswith("replicated,"):
            assert collectives == 0, case  # whole on every rank: nothing to reduce
        elif case.startswith(("sharded", "flat")):
            assert collectives == 1, case  # all layers in one all-reduce
    assert rank0["replicated and sharded in one layer"][1] == 1


# ---------------------------------------------------------------------------- FSDP1


def _check_fsdp1(parts: dict[str, list[dict]], tmp_path: Any, rel: float) -> None:
    expected, weights = _reference(tmp_path, guarded_callbacks(2))
    for part in ("fsdp1_orig", "fsdp1_flat"):
        ranks = parts[part]
        for rank in ranks:
            assert rank["layer_names"] == ["net.0", "net.2", "net.4"]  # no wrapper in names
            assert _weights_difference(rank["weights"], weights) < rel  # clipped as 1 process
            assert set(rank["pass_collectives"].values()) == {1}, rank["pass_collectives"]
        worst = max_relative_difference(read_scalars(ranks[0]["log_dir"]), expected)
        assert worst < rel, (part, worst)
        print(f"{part}: logged values vs single process, max relative difference {worst:.1e}")
    # use_orig_params=False gives one norm per FSDP unit, and says so once
    said = [w for w in parts["fsdp1_flat"][0]["warnings"] if "use_orig_params=False" in w]
    assert len(said) == 1, parts["fsdp1_flat"][0]["warnings"]
    assert not any("use_orig_params" in w for w in parts["fsdp1_orig"][0]["warnings"])


def test_fsdp1_on_cpu_norms_and_clipping_equal_unsharded_run(run_a, tmp_path):
    # Lightning's FSDPStrategy with torch's FSDP1 on CPU (a test subclass passes the CPU
    # device Lightning does not): the flat-shard reduction and our clipping, for real
    _, parts = run_a
    _check_fsdp1(parts, tmp_path, REL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy (FSDP1) needs CUDA")
def test_fsdp1_on_gpu_norms_and_clipping_equal_unsharded_run(tmp_path_factory, tmp_path):
    world_size = min(2, torch.cuda.device_count())
    out = tmp_path_factory.mktemp("fsdp1_gpu")
    ranks = run_ranks(
        scenario,
        out,
        world_size=world_size,
        parts=("fsdp1_orig", "fsdp1_flat"),
        accelerator="cuda",
        timeout=300,
    )
    parts = {part: [rank[part] for rank in ranks] for part in ("fsdp1_orig", "fsdp1_flat")}
    _check_fsdp1(parts, tmp_path, 1e-4)  # GPU kernels sum in another order than the CPU


# ---------------------------------------------------------------------------- refusals


def test_deepspeed_is_refused_with_what_to_use_instead():
    from grad_guard.callbacks.strategy import UnsupportedStrategyError, check_strategy

    class DeepSpeedStrategy:  # deepspeed is not installed; the check goes by class name
        pass

    class MyDeepSpeed(DeepSpeedStrategy):
        pass

    for strategy in (DeepSpeedStrategy(), MyDeepSpeed()):
        with pytest.raises(UnsupportedStrategyError, match="per micro-batch") as info:
            check_strategy(strategy)
        message = str(info.value)
        assert "partitions the gradients" in message
        assert "strategy='ddp'" in message and "ModelParallelStrategy" in message
    check_strategy(L.pytorch.strategies.DDPStrategy())  # accepted


def test_deepspeed_refusal_happens_at_setup():
    from grad_guard import GradientAnomalyDetection, GradientNormMonitor
    from grad_guard.callbacks.strategy import UnsupportedStrategyError

    class DeepSpeedStrategy:
        pass

    class FakeTrainer:
        strategy = DeepSpeedStrategy()
        callbacks: list[Any] = []

    for callback in (GradientNormMonitor(), GradientAnomalyDetection()):
        with pytest.raises(UnsupportedStrategyError, match="DeepSpeedStrategy"):
            callback.setup(FakeTrainer(), None, "fit")


def test_agc_is_refused_under_fsdp1():
    from lightning.pytorch.strategies import FSDPStrategy

    from grad_guard import GradGuard, GradientClipping
    from grad_guard.callbacks.strategy import UnsupportedStrategyError, check_strategy
    from grad_guard.core.clip import AGC, ZClip

    for callback in (GradientClipping(AGC()), GradGuard(clipping="agc")):
        with pytest.raises(UnsupportedStrategyError, match="flat slice"):
            check_strategy(FSDPStrategy(), [callback])
    check_strategy(FSDPStrategy(), [GradientClipping(ZClip())])  # norm-based: fine
    check_strategy(L.pytorch.strategies.ModelParallelStrategy(), [GradGuard(clipping="agc")])


def test_empty_shards_count_as_zero_for_every_norm():
    # uneven FSDP sharding leaves some ranks an empty slice; inf-norm of it is an error
    from grad_guard.core.stats import LayerNormComputer

    tensors = [[torch.zeros(0, 3), torch.tensor([3.0, -4.0])], [torch.zeros(0)]]
    for p, expected in ((1.0, 7.0), (2.0, 5.0), (float("inf"), 4.0)):
        norms = LayerNormComputer(2, p)(tensors)
        torch.testing.assert_close(norms, torch.tensor([expected, 0.0]))


def test_fsdp1_shard_group_is_not_used_for_replicated_gradients():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from grad_guard.callbacks.strategy import flat_shard_group

    group = object()

    class Trainer:
        def __init__(self, strategy: Any) -> None:
            self.strategy = strategy
            strategy.model = type("Wrapped", (), {"process_group": group})()

    assert flat_shard_group(Trainer(FSDPStrategy())) is group  # FULL_SHARD: slices
    assert flat_shard_group(Trainer(FSDPStrategy(sharding_strategy="SHARD_GRAD_OP"))) is group
    # NO_SHARD keeps whole gradients on every rank: summing them would count them twice
    assert flat_shard_group(Trainer(FSDPStrategy(sharding_strategy="NO_SHARD"))) is None
    assert flat_shard_group(Trainer(DDPStrategy())) is None
