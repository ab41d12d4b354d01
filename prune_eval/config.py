"""From a composed config to a validated cell: everything that can be wrong is found here, before
any model is loaded or any job is launched.

- `check_overrides` reads the command line before Hydra does, so an unknown group choice or key is
  one line with "did you mean" and the choices instead of Hydra's multi-line error.
- `plan_cell` resolves a composed config into a `CellSpec`: the method's effective parameters, the
  dictionary of everything that defines the result (`experiment`), and the cell's directory name.
  Configurations that resolve to the same experiment get the same name and share one result.
- `input_problems` looks at the files a cell needs (weights, question files, images), one line per
  problem; `check_quant_backend` at what the CPU can run.

Reading the command line (`check_overrides`, `explain_composition_error`) imports neither torch nor
transformers: a typo costs a fraction of a second, not the seconds those imports take. Everything
that needs them (methods, models, data loaders) is imported inside the functions that use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from prune_eval.data.pope import SPLITS
from prune_eval.errors import PruneEvalError, did_you_mean, unknown_choice
from prune_eval.execution.records import sha256_file
from prune_eval.specs import CellSpec, DataSpec, EvalSpec, MethodSpec, ModelSpec, QuantSpec

if TYPE_CHECKING:  # prune_eval.methods imports torch
    from prune_eval.methods import Method, ModelGeometry

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
LAUNCH_DIR = REPO_ROOT / "launch"
GROUPS = ("model", "method", "quant", "data", "preprocess", "experiment", "launch")


def group_dir(group: str) -> Path:
    return LAUNCH_DIR if group == "launch" else CONF_DIR / group


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in group_dir(group).glob("*.yaml"))


def _override_values(override) -> list[str]:
    from hydra.core.override_parser.types import ValueType

    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:  # glob(...) expands to existing choices only
        return []
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    value = override.value()
    return [] if value is None else [str(override.get_value_element_as_str())]


def check_overrides(arguments: list[str]) -> None:
    """Unknown group choices in command-line overrides, as one line with "did you mean" and choices."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in arguments if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # Hydra's grammar errors are multi-line; keep the first line
        raise PruneEvalError(f"cannot parse overrides: {str(e).strip().splitlines()[0]}") from None
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        if key in GROUPS and not override.is_delete():
            for value in _override_values(override):
                if value != "null" and value not in group_choices(key):
                    raise unknown_choice(key, value, group_choices(key))


def flat_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in node.keys():
        path = f"{prefix}{k}"
        keys.append(path)
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            keys.extend(flat_keys(child, path + "."))
    return keys


def explain_composition_error(error: Exception, overrides: list[str], compose) -> PruneEvalError:
    """Turn Hydra's multi-line composition error into one line; unknown keys get "did you mean".

    `compose(overrides)` composes a config; it is called with the group choices alone to learn
    which keys exist for this job (method.dominant exists for visionzip, not for vanilla).
    """
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    match = re.search(r"Could not override '([^']+)'", str(error)) or re.search(r"Key '([^']+)' is not in struct", str(error))
    if not match:
        return PruneEvalError(f"cannot compose the config for {' '.join(overrides) or '(defaults)'}: {first_line}")
    key = match.group(1)
    group_overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS]
    try:
        base = compose(group_overrides)
        keys = sorted(k for k in flat_keys(base) if not k.startswith("hydra"))
    except Exception:
        keys = []
    head = key.split(".")[0]
    if "." in key:
        keys = [k for k in keys if k.startswith(head + ".")] or keys
    else:
        keys = [k for k in keys if "." not in k]
    where = f" for {head} '{base[head].get('name', '?')}'" if keys and head in GROUPS and head in base else ""
    return PruneEvalError(f"unknown key '{key}'{where}{did_you_mean(key, keys)} keys: {', '.join(keys)}")


def model_geometry(model_cfg) -> ModelGeometry:
    """The model's shapes from its config alone (no weights loaded). `model_cfg`: a ModelSpec or a `model` node.

    A LLaVA checkpoint's config.json is read as JSON (`geometry_from_config_json`); transformers'
    LlavaConfig is imported only for a config that leaves a vision shape to its defaults: planning a
    sweep then imports none of transformers (seconds per sweep, BENCHMARKS.md).
    """
    from prune_eval.methods import ModelGeometry
    from prune_eval.models import checkpoints

    model = ModelSpec.of(model_cfg)
    if model.source == "tiny":
        from prune_eval.models import tiny

        return ModelGeometry.from_config(tiny.build_config(**dict(model.dims)))
    if model.source == "original":  # two config files, LLaVA's flat one and CLIP's
        from prune_eval.models import original

        return ModelGeometry.from_config(original.config_of(model))
    config = checkpoints.check_available(model)
    if config is None:  # a hub checkpoint left to download inside the job: its shapes are not here yet
        raise PruneEvalError(f"config.json of {model.id} is not in the Hugging Face cache")
    geometry = geometry_from_config_json(config)
    if geometry is not None:
        return geometry
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(checkpoints.checkpoint_location(model), revision=model.revision, local_files_only=True)
    return ModelGeometry.from_config(config)


VISION_SHAPE_KEYS = ("image_size", "patch_size", "num_hidden_layers", "num_attention_heads")
# LlamaConfig's defaults (transformers/models/llama/configuration_llama.py, unchanged since transformers 4.x): llava-hf's
# config.json files leave them out of text_config (llava-1.5-7b-hf has no hidden_size there)
LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}


def geometry_from_config_json(config: dict[str, Any]) -> ModelGeometry | None:
    """The geometry LlavaConfig would give for this config.json, or None where that needs
    transformers' own defaults: a vision shape left out (CLIP's defaults differ between
    LlavaConfig's sub-config rules and CLIPVisionConfig's) or a text model other than Llama.
    tests/test_loading.py checks it against LlavaConfig."""
    from prune_eval.methods import ModelGeometry

    vision, text = config.get("vision_config"), config.get("text_config")
    if not isinstance(vision, dict) or not isinstance(text, dict) or any(k not in vision for k in VISION_SHAPE_KEYS):
        return None
    if text.get("model_type", "llama") != "llama":
        return None
    text = {**LLAMA_DEFAULTS, **text}
    return ModelGeometry(
        n_patches=(int(vision["image_size"]) // int(vision["patch_size"])) ** 2,
        vision_layers=int(vision["num_hidden_layers"]),
        vision_heads=int(vision["num_attention_heads"]),
        text_layers=int(text["num_hidden_layers"]),
        text_heads=int(text["num_attention_heads"]),
        text_hidden=int(text["hidden_size"]),
        text_intermediate=int(text["intermediate_size"]),
    )


def _model_identity(model: ModelSpec) -> dict[str, Any]:
    from prune_eval.models import checkpoints

    identity = {"name": model.name, "source": model.source, "tokenization": model.tokenization}
    if model.source == "tiny":
        identity.update(init_seed=int(model.init_seed), dims=dict(model.dims))
    else:
        identity.update(checkpoint=checkpoints.checkpoint_location(model), revision=model.revision)
    if model.source == "original":  # the CLIP tower is a second checkpoint; the tokenizer is the slow sentencepiece one
        identity.update(vision_tower=str(model.vision_tower_path or model.vision_tower),
                        vision_tower_revision=model.vision_tower_revision, tokenizer="sentencepiece-slow")
    if model.source == "toy":  # shipped with the code: the weights' checksum, not where the package is installed, names them
        weights = Path(checkpoints.checkpoint_location(model)) / "model.safetensors"
        identity["weights_sha256"] = sha256_file(weights) if weights.is_file() else None
        if not model.path:
            identity["checkpoint"] = "prune_eval/assets/toy (shipped)"
    return identity


def _data_identity(data_cfg) -> dict[str, Any]:
    identity = {"name": data_cfg.name, "version": str(data_cfg.version), "splits": list(data_cfg.splits)}
    if data_cfg.name == "pope-synthetic":
        identity.update(n_images=int(data_cfg.n_images), seed=int(data_cfg.seed))
    else:
        identity["format"] = "llava" if data_cfg.get("llava_question_file") else "pope"
    return identity


def plan_cell(cfg: DictConfig) -> CellSpec:
    """Validate a composed config and name its cell. Raises PruneEvalError naming the bad value."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _plan_cell(cfg)
    except OmegaConfBaseException as e:  # a deleted key, an interpolation that does not resolve
        raise config_error(cfg, e) from None


def config_error(cfg: DictConfig, error: Exception) -> PruneEvalError:
    """One line for an OmegaConf error met while reading a composed config: the key and its raw value."""
    key = getattr(error, "full_key", None) or "?"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        node = cfg
        for part in key.split("."):
            node = node._get_node(part)
        raw = f"={node._value()}"
    except Exception:
        raw = ""
    return PruneEvalError(f"config key {key}{raw} cannot be used: {first}")


EVAL_NUMBERS = {"batch_size": 1, "max_new_tokens": 1, "part_size": 1, "batch_images": 1, "batch_tokens": 1, "shard_images": 1}  # key: minimum
EVAL_FLAGS = ("fast", "stop_when_decided", "compile", "allow_mixed_numerics")
EVAL_AUTO_FLAGS = ("fast",)  # auto: decided by the device the cell runs on (eval.fast: the fast path on CUDA)
MAX_NEW_TOKENS = 4096  # LLaVA-1.5's context length: no answer can be longer
GROUP_NODES = ("model", "method", "quant", "data", "preprocess", "eval")


def check_run_options(cfg: DictConfig) -> None:
    """Every key resolves, groups are groups, `device` and `eval.*` have allowed values."""
    import torch

    for key in cfg:
        if key != "hydra":  # resolve everything now: a broken ${...} is an error before any job starts
            node = cfg[key]
            if OmegaConf.is_config(node):
                OmegaConf.to_container(node, resolve=True)
    for group in GROUP_NODES:
        if not isinstance(cfg.get(group), DictConfig):
            raise PruneEvalError(f"{group}={cfg.get(group)}; {group} is a group of options, set its keys ({group}.name=..., ...)")
    init_seed = cfg.model.get("init_seed", 0)
    if not isinstance(init_seed, int) or isinstance(init_seed, bool) or init_seed < 0:
        raise PruneEvalError(f"model.init_seed={init_seed}; must be a non-negative whole number")
    device = cfg.get("device", "auto")
    try:
        if device != "auto":
            torch.device(str(device))
    except (RuntimeError, ValueError):
        raise PruneEvalError(f"device={device}; allowed: auto, cpu, cuda, cuda:N") from None
    for key, minimum in EVAL_NUMBERS.items():
        value = cfg.eval.get(key, minimum)
        limit = MAX_NEW_TOKENS if key == "max_new_tokens" else None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (limit and value > limit):
            allowed = f"{minimum}..{limit}" if limit else f"a whole number >= {minimum}"
            raise PruneEvalError(f"eval.{key}={value}; allowed: {allowed}")
    for key in EVAL_FLAGS:
        value = cfg.eval.get(key, False)
        if not isinstance(value, bool) and not (key in EVAL_AUTO_FLAGS and value == "auto"):
            raise PruneEvalError(f"eval.{key}={value}; allowed: true, false" + (", auto" if key in EVAL_AUTO_FLAGS else ""))


def _plan_cell(cfg: DictConfig) -> CellSpec:
    from prune_eval.data import DATASETS, check_data_options
    from prune_eval.data.images import PREPROCESSORS
    from prune_eval.methods import get_method
    from prune_eval.models.checkpoints import SOURCES, source_of
    from prune_eval.models.quant import precision_of

    check_run_options(cfg)
    for group, registry_names in (("data", DATASETS.names()), ("preprocess", PREPROCESSORS.names())):
        if cfg[group].name not in registry_names:
            raise unknown_choice(group, cfg[group].name, registry_names)
    check_data_options(cfg.data)
    if source_of(cfg.model) not in SOURCES:
        raise unknown_choice("model source", cfg.model.get("source"), SOURCES)
    precision = precision_of(cfg.quant)  # validates quant options
    method = get_method(str(cfg.method.name))
    budget = cfg.budget
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise PruneEvalError(f"budget={budget}; must be a positive whole number of visual tokens")
    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0 or seed >= 2**63:
        raise PruneEvalError(f"seed={seed}; must be a non-negative whole number below 2**63")
    model = ModelSpec.from_config(cfg.model)
    geometry = model_geometry(model)
    if budget > geometry.n_patches:
        raise PruneEvalError(f"budget={budget} is larger than the {geometry.n_patches} visual tokens of model '{cfg.model.name}'; allowed: 1..{geometry.n_patches}")
    user_params = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
    params = method.resolve(user_params, budget, geometry)
    uses_seed = method.seed_matters(params)
    experiment = {
        "model": _model_identity(model),
        "quant": OmegaConf.to_container(cfg.quant, resolve=True),
        "preprocess": str(cfg.preprocess.name),
        "data": _data_identity(cfg.data),
        "method": {"name": method.name, "version": method.version, "params": params},
        "seed": seed if uses_seed else None,  # None: every seed resolves to this one cell
        "max_new_tokens": int(cfg.eval.max_new_tokens),
        "numerics": numerics_identity(cfg.eval),
    }
    return CellSpec(
        name=cell_name(experiment, budget), experiment=experiment, method=MethodSpec(method, params, budget, uses_seed),
        geometry=geometry, model=model, data=DataSpec.from_config(cfg.data), preprocess=str(cfg.preprocess.name),
        quant=QuantSpec(str(cfg.quant.name), precision, cfg.quant.get("scope"), experiment["quant"]),
        eval=EvalSpec.from_config(cfg.eval), seed=seed, device=str(cfg.get("device", "auto")),
        config={k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k != "hydra"},
    )


def numerics_identity(eval_cfg) -> dict[str, Any]:
    """The configured settings that can change fp16 predictions without changing the method: the
    evaluation path as configured (`eval.fast`: true, false or auto), that path's batch composition
    (reference: batch_size; fast: batch_images, batch_tokens; both when the path is not fixed, as with
    auto; the shard size, which batches never cross) and compile.
    Part of the cell's identity, so a sweep over them gives cells the report pairs as numerics-only
    comparisons (its numerical floor). What actually ran is in each record part's footer."""
    e = EvalSpec.from_config(eval_cfg)  # its defaults for keys the node leaves out
    # batches never cross a shard (execution.cell), so the shard size is part of the batch composition
    identity: dict[str, Any] = {"fast": e.fast, "compile": bool(e.compile), "shard_images": int(e.shard_images)}
    if e.fast is not True:
        identity["batch_size"] = int(e.batch_size)
    if e.fast is not False:
        identity.update(batch_images=int(e.batch_images), batch_tokens=int(e.batch_tokens))
    return identity


def cell_name(experiment: dict[str, Any], budget: int) -> str:
    """Readable and stable: '<method>-<tokens>_seed<s>_<model>-<quant>-<preprocess>_<data>_<hash>'
    ('anyseed' instead of 'seed<s>' for a method that draws no random numbers: one cell for all seeds).

    The hash covers the whole experiment dict, so any defining difference (a method option, a
    checkpoint path, the splits) gives another directory while the name stays readable.
    """
    method = experiment["method"]
    label = method["name"]
    if "version" in method["params"]:
        label += f"-{method['params']['version']}"
    tokens = method["params"].get("budget", method["params"].get("visual_tokens", budget))  # SparseVLM: its nominal budget
    data = experiment["data"]
    splits = "" if sorted(data["splits"]) == sorted(SPLITS) else "-" + "+".join(data["splits"])
    digest = hashlib.sha256(json.dumps(experiment, sort_keys=True, default=str).encode()).hexdigest()[:8]
    seed = "anyseed" if experiment["seed"] is None else f"seed{experiment['seed']}"  # anyseed: the method draws no random numbers
    return (
        f"{label}-{tokens}_{seed}_{experiment['model']['name']}-{experiment['quant']['name']}-"
        f"{experiment['preprocess']}_{data['name']}-{data['version']}{splits}_{digest}"
    )


def input_problems(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(model lines, data lines): one line per problem with the files this cell reads, each naming
    the command that fetches a missing one: the weights (model.allow_download=true downloads them
    here), the POPE question files (missing, or not the configured version), the images (a count and
    an example path). Images are decoded later, by the cell. A config the model loader cannot even
    read is left to plan_cell's error."""
    from omegaconf.errors import OmegaConfBaseException

    from prune_eval.data import input_problems as data_problems
    from prune_eval.models.checkpoints import check_available

    model: list[str] = []
    try:
        check_available(cfg.model)
    except PruneEvalError as e:
        model.append(str(e))
    except OmegaConfBaseException:
        pass
    try:
        data = data_problems(cfg.data)
    except OmegaConfBaseException:
        data = []
    return model, data


def check_quant_backend(cfg: DictConfig) -> None:
    """On the CPU, the quantization backend can run this model's layer widths (GPU jobs check theirs
    on the GPU node, before loading)."""
    if str(cfg.device) != "cpu":
        return
    import torch

    from prune_eval.models.quant import check_backend, precision_of

    geometry = model_geometry(cfg.model)
    check_backend(precision_of(cfg.quant), torch.device("cpu"), (geometry.text_hidden, geometry.text_intermediate))
