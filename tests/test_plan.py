"""The training plan as a table: hardware x data x config -> plan, with no model loaded (ftkit/plan.py).

The rule under test: by default the optimizer sees per_device_train_batch_size x gradient_accumulation_steps x
world size rows a step at the YAML's learning rate, whatever the hardware; the plan only chooses how those rows
run, and every value that differs from the YAML is a Change with a reason. The throughput mode changes the
rows a step and the learning rate only when asked for (train.packing=true), and says so.
"""

import pytest
from helpers import REPO
from transformers import LlamaConfig

from ftkit.config import load_config
from ftkit.errors import UserError
from ftkit.estimate import REFERENCE_MODEL
from ftkit.plan import Hardware, make_plan

LLAMA = LlamaConfig(**REFERENCE_MODEL)
ALPACA_LENGTHS = [60 + (i * 37) % 400 for i in range(1000)]  # 60..459 tokens, mean ~260
H200 = dict(device="cuda", gpu_name="NVIDIA H200", gpu_memory=150e9, liger_installed=True, host_memory=120e9)
CPU = dict(device="cpu")


def plan_for(hw: dict, *over: str, config: str = "llama3_alpaca.yaml", lengths=ALPACA_LENGTHS, eval_rows=20):
    cfg = load_config(REPO / "configs" / config, list(over))
    before = cfg.model_dump()
    plan = make_plan(cfg, Hardware(**hw), lengths, LLAMA, eval_rows=eval_rows)
    assert cfg.model_dump() == before, "make_plan must not change the config"
    return plan


def changed(plan, key):
    return next((c for c in plan.changes if c.key == key), None)


@pytest.mark.parametrize(
    "hw, world, rows_micro, accum, gc",
    [
        (H200, 1, 16, 1, False),  # one large GPU: 8 x 2 run as 16 x 1, no recompute
        # 24 GB: 16 rows fit in one micro-batch only with recompute, which the estimate (and the H200: 5,432 vs
        # 3,780 tok/s, benchmarks/results/h200_yaml_batch.json) finds faster than two micro-batches without it
        (dict(H200, gpu_memory=24e9), 1, 16, 1, True),
        (dict(H200, gpu_memory=10e9), 1, 8, 2, True),  # 10 GB: the YAML's split, with recompute
        (dict(H200, gpu_memory=8e9), 1, 2, 8, True),  # 8 GB: smaller micro-batches, still 16 rows
        (dict(H200, world_size=4), 4, 16, 1, False),  # 4 processes: 4 x the rows, as DDP always did
        (CPU, 1, 8, 2, False),  # CPU: the YAML's split
    ],
)
def test_the_optimizer_gets_the_yamls_rows(hw, world, rows_micro, accum, gc):
    p = plan_for(hw)
    assert p.rows_per_step == 8 * 2 * world
    assert p.learning_rate == 2e-4 and p.lr_factor == 1.0
    assert (p.per_device_train_batch_size, p.gradient_accumulation_steps, p.gradient_checkpointing) == (
        rows_micro,
        accum,
        gc,
    )
    assert p.per_device_train_batch_size * p.gradient_accumulation_steps == 16
    assert not p.packing and p.padding_free
    if rows_micro != 8:
        c = changed(p, "train.per_device_train_batch_size")
        assert c and c.asked == 8 and c.planned == rows_micro and f"same {16 * world} rows a step" in c.reason
    else:
        assert changed(p, "train.per_device_train_batch_size") is None


def test_cpu_plan_keeps_the_measured_cpu_path():
    p = plan_for(CPU)
    assert p.attn_implementation == "sdpa_varlen" and not p.use_liger_kernel and p.upcast_frozen_fp32
    assert {c.key for c in p.changes} >= {
        "train.padding_free",
        "model.attn_implementation",
        "train.upcast_frozen_fp32",
        "train.use_liger_kernel",
    }


def test_an_architecture_without_sdpa_trains_with_eager_attention():
    """Gemma 2 has no SDPA path in transformers >= 5.24 (SDPA cannot soft-cap its attention logits): sdpa, the
    default, becomes eager, not the SDPA-based varlen attention, and padding-free rows stay on."""
    from transformers import Gemma2Config

    from ftkit.attention import sdpa_supported

    gemma2 = Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26)
    if sdpa_supported(gemma2):  # transformers before 5.24 ran Gemma 2 through SDPA (without the soft-cap)
        pytest.skip("this transformers has an SDPA path for Gemma 2")
    cfg = load_config(REPO / "configs" / "llama3_alpaca.yaml")
    p = make_plan(cfg, Hardware(**CPU), ALPACA_LENGTHS, gemma2, eval_rows=20)
    c = changed(p, "model.attn_implementation")
    assert p.attn_implementation == "eager" and p.padding_free and c.planned == "eager" and "soft-cap" in c.reason


def test_a_gpu_that_only_fits_with_recompute_turns_it_on():
    p = plan_for(dict(H200, gpu_memory=8e9), "data.max_length=512")
    assert p.gradient_checkpointing and p.rows_per_step == 16
    assert "does not fit without recompute" in changed(p, "train.gradient_checkpointing").reason


def test_regrouping_can_be_turned_off_and_explicit_switches_are_kept():
    p = plan_for(
        H200, "train.regroup_micro_batches=false", "train.gradient_checkpointing=true", "train.use_liger_kernel=false"
    )
    assert (p.per_device_train_batch_size, p.gradient_accumulation_steps) == (8, 2)
    assert p.gradient_checkpointing and not p.use_liger_kernel
    assert changed(p, "train.gradient_checkpointing") is None and changed(p, "train.use_liger_kernel") is None


def test_fsdp_activation_checkpointing_replaces_ours_and_says_so():
    p = plan_for(dict(H200, fsdp=True, fsdp_activation_checkpointing=True), "train.gradient_checkpointing=true")
    assert not p.gradient_checkpointing
    assert "FSDP" in changed(p, "train.gradient_checkpointing").reason


def test_throughput_mode_is_explicit_and_says_what_it_changes():
    p = plan_for(H200, "train.packing=true", "train.pack_tokens=16384")
    assert p.packing and p.per_device_train_batch_size == 1 and p.tokens_per_micro_batch == 16384
    mean = sum(ALPACA_LENGTHS) / len(ALPACA_LENGTHS)
    assert p.rows_per_step == pytest.approx(16384 / mean * 2, rel=0.01)
    assert p.learning_rate == pytest.approx(2e-4 * p.rows_per_step / 16, rel=0.01)  # linear, the measured rule
    assert changed(p, "train.learning_rate").reason.startswith("train.lr_scaling=linear")
    assert changed(p, "rows a step").asked == 16
    text = p.describe()
    assert "train.learning_rate: 0.0002 ->" in text and "rows a step: 16 ->" in text
    sqrt = plan_for(H200, "train.packing=true", "train.lr_scaling=sqrt")
    assert sqrt.learning_rate == pytest.approx(2e-4 * (sqrt.rows_per_step / 16) ** 0.5, rel=0.01)
    none = plan_for(H200, "train.packing=true", "train.lr_scaling=none")
    assert none.learning_rate == 2e-4


def test_the_default_plan_says_every_value_runs_as_asked_when_nothing_changes():
    p = plan_for(
        H200,
        "train.padding_free=false",
        "train.use_liger_kernel=false",
        "train.gradient_checkpointing=false",
        "train.tiled_mlp=false",
        "train.activation_offloading=false",
        "train.regroup_micro_batches=false",
    )
    assert p.changes == () and "every value runs as the YAML says" in p.describe()
    assert p.attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "hw, over, message",
    [
        (H200, ["train.packing=true", "train.pack_tokens=1000000"], "throughput mode"),
        (dict(H200, gpu_memory=4e9), [], "does not fit this GPU"),
        (CPU, ["train.use_liger_kernel=true"], "needs a CUDA GPU"),
        (dict(H200, liger_installed=False), ["train.use_liger_kernel=true"], "liger-kernel package is not installed"),
    ],
)
def test_plans_that_cannot_run_are_refused_before_any_model_loads(hw, over, message):
    with pytest.raises(UserError, match=message):
        plan_for(hw, *over)


@pytest.mark.parametrize(
    "over, message",
    [
        (["train.packing=auto"], "train.packing=auto is gone"),
        (["train.lr_scaling=cubic"], "train.lr_scaling"),
    ],
)
def test_config_refuses_unknown_modes(over, message):
    with pytest.raises(UserError, match=message):
        load_config(REPO / "configs" / "llama3_alpaca.yaml", over)


def test_data_smaller_than_one_step_is_said():
    p = plan_for(CPU, lengths=[100] * 5)
    c = changed(p, "rows a step")
    assert p.rows_per_step == 5 and c.asked == 16 and "only 5 rows" in c.reason


def test_huge_batches_plan_quickly():
    from ftkit.config import MAX_ROWS_A_BATCH as most

    p = plan_for(
        H200,
        f"train.per_device_train_batch_size={most}",
        f"train.gradient_accumulation_steps={most}",
        "data.max_length=16",
        lengths=[],
    )
    assert p.rows_per_step == most * most


def test_evaluation_and_row_length_are_the_plans():
    """What TRL is told besides the batches: whether the held-out rows are evaluated, in what micro-batches, and
    its max_length; a reason wherever that differs from the YAML."""
    plan = plan_for(H200)  # padding-free rows: TRL gets no max_length, the rows come cut to data.max_length
    assert (plan.eval_steps, plan.per_device_eval_batch_size, plan.max_length) == (200, 8, None)
    assert not changed(plan, "train.eval_steps") and not changed(plan, "train.per_device_eval_batch_size")
    assert plan_for(H200, "train.padding_free=false").max_length == 512
    packed = plan_for(H200, "train.packing=true", "train.pack_tokens=16384")
    assert (packed.per_device_eval_batch_size, packed.max_length) == (1, 16384)
    assert "TRL packs the held-out rows too" in changed(packed, "train.per_device_eval_batch_size").reason
    none = plan_for(H200, eval_rows=0)
    assert none.eval_steps is None and "no held-out rows" in changed(none, "train.eval_steps").reason
    assert plan_for(H200, eval_rows=None).eval_steps == 200  # not known (a dry run without the data): as asked
    assert plan_for(H200, "train.eval_steps=null", eval_rows=0).eval_steps is None


def test_sft_config_copies_the_plan(tmp_path):
    """TRL's arguments take evaluation, the eval micro-batch and max_length from the plan, whatever the YAML says."""
    import dataclasses

    from ftkit.paths import RunDir
    from ftkit.train import sft_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    plan = make_plan(cfg, Hardware(**CPU), [100, 200, 50, 80], LLAMA, eval_rows=20)
    odd = dataclasses.replace(plan, per_device_eval_batch_size=3, max_length=77, gradient_checkpointing=True)
    args = sft_config(cfg, RunDir(tmp_path), odd)
    assert (args.eval_strategy, args.eval_steps, args.metric_for_best_model) == ("steps", 50, "eval_loss")
    assert (args.per_device_eval_batch_size, args.max_length) == (3, 77)
    # transformers 5.24 calls it activation_checkpointing and keeps the old name as a mirror of it
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    args = sft_config(cfg, RunDir(tmp_path), dataclasses.replace(plan, eval_steps=None))
    assert (args.eval_strategy, args.eval_steps, args.metric_for_best_model) == ("no", None, None)


# -- kernels chosen by measurement (ftkit/kernel_table.py) ---------------------------------------------------
def kernel_rows(*pairs, tokens=3302):
    return [
        {"tokens_per_micro_batch": tokens, "on_tokens_per_s": on, "off_tokens_per_s": off, "source": f"run {i}"}
        for i, (on, off) in enumerate(pairs)
    ]


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A kernel table of the test's own, in place of benchmarks/results/kernel_table.json."""
    import json

    from ftkit import kernel_table

    path = tmp_path / "kernel_table.json"
    monkeypatch.setattr(kernel_table, "TABLE", path)

    def write(rows_by_gpu: dict):
        path.write_text(json.dumps({gpu: {"liger": rows} for gpu, rows in rows_by_gpu.items()}))

    return write


def test_liger_stays_off_where_the_gpus_table_measured_it_slower(table):
    table({"NVIDIA H200": kernel_rows((7534, 8720), (6425, 8132), (9000, 8800))})
    p = plan_for(H200)  # the YAML's 16 rows of ~260 tokens: about 4.2k tokens a micro-batch, near 3302
    c = changed(p, "train.use_liger_kernel")
    assert not p.use_liger_kernel and c.planned is False
    assert "no faster" in c.reason and "7534 vs 8720" in c.reason and "x0.86" in c.reason, c.reason


def test_liger_turns_on_where_the_gpus_table_measured_it_faster(table):
    table({"NVIDIA H200": kernel_rows((9422, 7296), (8762, 7670), (7000, 7100))})
    p = plan_for(H200)
    c = changed(p, "train.use_liger_kernel")
    assert p.use_liger_kernel and c.planned is True and "measured faster" in c.reason and "x1.14" in c.reason


def test_an_unknown_gpu_gets_liger_off_and_a_hint_to_calibrate(table):
    table({"NVIDIA H200": kernel_rows((9422, 7296))})
    p = plan_for(dict(H200, gpu_name="NVIDIA A100-SXM4-80GB"))
    c = changed(p, "train.use_liger_kernel")
    assert not p.use_liger_kernel
    assert "'NVIDIA A100-SXM4-80GB'" in c.reason and "train_throughput.py --only liger_ab" in c.reason
    # a measured GPU at a shape far from the planned one is treated the same way
    table({"NVIDIA H200": kernel_rows((9422, 7296), tokens=65536)})
    c = changed(plan_for(H200), "train.use_liger_kernel")
    assert c.planned is False and "[65536]" in c.reason and "--calibrate" in c.reason


def test_an_explicit_liger_choice_is_honoured_whatever_the_table_says(table):
    table({"NVIDIA H200": kernel_rows((7534, 8720))})
    p = plan_for(H200, "train.use_liger_kernel=true")
    assert p.use_liger_kernel and changed(p, "train.use_liger_kernel") is None
    table({"NVIDIA H200": kernel_rows((9422, 7296))})
    p = plan_for(H200, "train.use_liger_kernel=false")
    assert not p.use_liger_kernel and changed(p, "train.use_liger_kernel") is None


def test_liger_goes_on_for_memory_where_the_plan_fits_only_with_it(table):
    # one 300k-token row: never measured on and off at that size, but without liger's kernels its activations
    # do not fit the GPU, so speed is not the question
    table({"NVIDIA H200": kernel_rows((7534, 8720))})
    long_row = ["train.packing=false", "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1"]
    p = plan_for(H200, *long_row, config="llama3_alpaca_h200.yaml", lengths=[300_000])
    c = changed(p, "train.use_liger_kernel")
    assert p.use_liger_kernel and p.fits and c.reason.startswith("on for memory"), c.reason
    assert "not near 300000" in c.reason  # the speed verdict it overrides is kept in the reason
    # a row that fits either way keeps the measured choice
    p = plan_for(H200, *long_row, config="llama3_alpaca_h200.yaml", lengths=[3000])
    assert not p.use_liger_kernel and "no faster" in changed(p, "train.use_liger_kernel").reason
