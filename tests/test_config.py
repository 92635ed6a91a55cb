"""The config: every shipped YAML loads, overrides apply, and mistakes name the key and the fix."""

from pathlib import Path

import pytest

from ftkit.config import VALID_KEYS, load_config
from ftkit.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.lora.r >= 1 and cfg.train.learning_rate > 0


def test_llama3_config_is_a_real_qlora_recipe():
    cfg = load_config(REPO / "configs" / "llama3_alpaca.yaml")
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert cfg.data.path == "yahma/alpaca-cleaned"
    assert cfg.quant.load_in_4bit and cfg.quant.bnb_4bit_quant_type == "nf4" and cfg.quant.bnb_4bit_use_double_quant
    assert cfg.quant.bnb_4bit_compute_dtype == "bfloat16"
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cfg.train.optim == "paged_adamw_8bit"
    # TRL's defaults (2e-5, 1024) are wrong for QLoRA; the recipe must not inherit them.
    assert 1e-4 <= cfg.train.learning_rate <= 3e-4 and cfg.data.max_length != 1024


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            "train.max_steps=10",
            "train.learning_rate=1e-4",
            "lora.target_modules=[q_proj,v_proj]",
            "data.system_prompt=null",
        ],
    )
    assert cfg.train.max_steps == 10 and cfg.train.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.system_prompt is None


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.learning_rat=1e-4", ["train.learning_rat", "train.learning_rate"]),
        ("lora.rank=8", ["lora.rank", "lora.r"]),
        ("trian.max_steps=3", ["trian", "train"]),
        ("train.r=8", ["train.r", "lora.r"]),
        ("lora.r=abc", ["lora.r", "abc"]),
        ("lora.r=0", ["lora.r", "greater than or equal to 1"]),
        ("train.learning_rate=-1", ["train.learning_rate"]),
        ("quant.load_in_8bit=true", ["load_in_4bit", "load_in_8bit"]),
        ("max_steps=3", ["'max_steps'", "train.max_steps=VALUE"]),
        ("foo=3", ["section.key"]),
    ],
)
def test_bad_override_names_key(override, words):
    with pytest.raises(UserError) as e:
        load_config(REPO / "configs" / "demo.yaml", [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize(
    "name, ours",
    [
        ("lora_rank", "lora.r"),
        ("lora_r", "lora.r"),
        ("lora_alpha", "lora.lora_alpha"),
        ("base_model", "model.name_or_path"),
        ("model_name_or_path", "model.name_or_path"),
        ("dataset", "data.path"),
        ("datasets", "data.path"),
        ("sequence_len", "data.max_length"),
        ("cutoff_len", "data.max_length"),
        ("max_seq_length", "data.max_length"),
        ("val_set_size", "data.eval_size"),
        ("micro_batch_size", "train.per_device_train_batch_size"),
        ("num_epochs", "train.num_train_epochs"),
        ("resume_from_checkpoint", "train.resume"),
        ("output_dir", "paths.output_dir"),
        ("learning_rate", "train.learning_rate"),
    ],
)
def test_names_from_other_tools_point_at_ours(tmp_path, name, ours):
    """The same name, wherever it is written, finds the project's key: bare override, wrong section, YAML top
    level, YAML in a section, and a flag."""
    from ftkit.cli import build_parser, parse_args

    sec = "train" if not ours.startswith("train.") else "data"
    for over in (f"{name}=1", f"{sec}.{name}=1"):
        with pytest.raises(UserError, match=f"'(\\w+\\.)?{name}'; this project calls it {ours}"):
            load_config(REPO / "configs" / "demo.yaml", [over])
    for text in (f"{name}: 1\n", f"{sec}:\n  {name}: 1\n"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(UserError, match=f"this project calls it {ours}"):
            load_config(tmp_path / "c.yaml")
    with pytest.raises(UserError, match=f"this project calls it {ours}"):
        parse_args(build_parser("x"), [f"--{name}", "1"])


def test_every_alias_names_a_real_key():
    from ftkit.config import ALIASES

    assert set(ALIASES.values()) <= set(VALID_KEYS)


def test_overrides_as_flags_in_both_forms():
    """--section.key=value and --section.key value are overrides, in order after the positional ones; the
    stage's own flags and a negative number as a value still parse."""
    from ftkit.cli import build_parser, parse_args

    p = build_parser("x")
    p.add_argument("--overwrite", action="store_true")
    a = parse_args(
        p,
        ["--config", "c.yaml", "lora.r=4", "--train.max_steps", "5", "--overwrite", "--lora.r=8"]
        + ["--train.max_grad_norm", "-1"],
    )
    assert a.overwrite and a.config == "c.yaml"
    assert a.overrides == ["lora.r=4", "train.max_steps=5", "lora.r=8", "train.max_grad_norm=-1"]
    cfg = load_config(REPO / "configs" / "demo.yaml", a.overrides[:3])
    assert cfg.train.max_steps == 5 and cfg.lora.r == 8
    with pytest.raises(UserError, match="needs a value"):
        parse_args(p, ["--train.max_steps", "--overwrite"])
    with pytest.raises(UserError, match="unrecognized arguments: --bogus"):
        parse_args(p, ["--bogus"])


def test_unknown_key_in_yaml_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  rr: 8\n")
    with pytest.raises(UserError, match=r"unknown config key 'lora.rr'.*did you mean 'lora.r'"):
        load_config(p)


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(UserError, match="invalid YAML at line"):
        load_config(p)


def test_missing_config_file():
    with pytest.raises(UserError, match="not found"):
        load_config("nope.yaml")


def test_keys_match_library_arguments():
    import inspect

    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    lora = set(inspect.signature(LoraConfig).parameters)
    bnb = set(inspect.signature(BitsAndBytesConfig).parameters)
    sft = set(inspect.signature(SFTConfig).parameters)
    for k in VALID_KEYS:
        sec, leaf = k.split(".")
        if sec == "lora":
            assert leaf in lora, k
        if sec == "quant":
            assert leaf in bnb, k
    for leaf in (
        "learning_rate",
        "max_steps",
        "save_steps",
        "seed",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "optim",
        "warmup_steps",
        "eval_steps",
    ):
        assert leaf in sft


def test_a_stage_without_config_follows_the_paths_latest_given_on_the_command_line(tmp_path, monkeypatch):
    from ftkit.paths import RunDir, save_resolved_config, stage_config, write_latest

    monkeypatch.chdir(tmp_path)  # no runs/latest here: only the named pointer can find the run
    pointer, run = tmp_path / "mine" / "latest", RunDir(tmp_path / "runs" / "a")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"paths.output_dir={run.root}", f"paths.latest={pointer}"])
    run.root.mkdir(parents=True)
    save_resolved_config(cfg, run.config)
    write_latest(cfg, run)
    got_cfg, got_run = stage_config(None, [f"paths.latest={pointer}"])
    assert got_run.root == run.root.resolve() and got_cfg.paths.output_dir == str(run.root)
    with pytest.raises(UserError, match="no recent run found"):
        stage_config(None, [])


def test_a_moved_run_is_the_folder_its_config_sits_in(tmp_path, caplog):
    """A run folder moved or copied after training: its saved config.yaml still names the old paths.output_dir,
    and a later stage given that config must act on the folder it found it in, not write into the old one."""
    from ftkit.paths import RunDir, save_resolved_config, stage_config

    old, new = RunDir(tmp_path / "old"), RunDir(tmp_path / "moved")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"paths.output_dir={old.root}"])
    new.root.mkdir()
    save_resolved_config(cfg, new.config)
    new.manifest.write_text("{}")
    got_cfg, got_run = stage_config(str(new.config), [])
    assert got_run.root == new.root and got_cfg.paths.output_dir == str(new.root)
    assert "the run has moved" in caplog.text and not old.root.exists()
    # an explicit paths.output_dir still wins, and a plain YAML (not inside a run) names its run as before
    got_cfg, got_run = stage_config(str(new.config), [f"paths.output_dir={old.root}"])
    assert got_run.root == old.root
    got_cfg, got_run = stage_config(str(REPO / "configs" / "demo.yaml"), [])
    assert got_run.root == Path(got_cfg.paths.output_dir) == Path("runs/demo")


def test_attention_values_are_transformers_own_and_each_loads():
    """Every name transformers registers is accepted (the project's own sdpa_varlen is not a user choice), and
    each accepted one that needs no missing package builds a model in transformers; the others say which
    package is missing."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ftkit.attention import VARLEN_ATTN
    from ftkit.config import attention_values, check_attn_implementation

    ours = set(attention_values())
    assert ours == {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()} - {VARLEN_ATTN}
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    built = 0
    for attn in sorted(ours):
        try:
            check_attn_implementation(attn)
        except UserError as e:
            assert "flash_attention" in attn and "pip install flash-attn" in str(e), (attn, str(e))
            continue
        if attn.startswith("paged|"):
            continue  # paged attention is for continuous-batching generation, built the same way as its base
        m = LlamaForCausalLM._from_config(LlamaConfig(**tiny), attn_implementation=attn)
        assert m.config._attn_implementation == attn
        built += 1
    assert built >= 3  # eager, sdpa, flex_attention at least
    with pytest.raises(UserError, match="not a value transformers accepts"):
        check_attn_implementation(VARLEN_ATTN)


@pytest.mark.parametrize(
    "value, trackers",
    [
        (None, ["tensorboard"]),  # the default
        ("none", ["none"]),
        ("wandb", ["wandb"]),
        ("tensorboard,wandb", ["tensorboard", "wandb"]),
        ("[tensorboard, mlflow]", ["tensorboard", "mlflow"]),
        ("[]", ["none"]),
    ],
)
def test_report_to_is_a_list_as_in_transformers(value, trackers):
    over = [] if value is None else [f"train.report_to={value}"]
    assert load_config(REPO / "configs" / "demo.yaml", over).train.report_to == trackers


@pytest.mark.parametrize(
    "override, forms",
    [
        ("train.use_liger_kernel=maybe", ["a valid boolean", "'auto'"]),
        ("lora.target_modules=5", ["list", "all-linear"]),
    ],
)
def test_a_union_keys_error_names_the_key_and_every_form_it_takes(override, forms):
    # pydantic locates a union's failure in its member ('train.use_liger_kernel.bool'): not a key the user can set
    key = override.split("=")[0]
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and f"{key}=VALUE" in msg and f"{key}." not in msg, msg
    assert all(f in msg for f in forms), msg
