"""`model.*` from an HF directory's config.json when `model.init_from: hf://DIR`.

Without `model.preset`, every dimension left unset is taken from config.json (hidden
size, layers, heads, KV heads, intermediate size, vocab, RMSNorm eps, RoPE theta, and
max_seq_len from max_position_embeddings). A value set in the YAML (or by the preset)
must equal config.json's: a mismatch is a config error naming both. `max_seq_len` is
only filled, never compared: it is the length of distreg's RoPE tables (a run may train
on a shorter context than the published model supports).
"""
from __future__ import annotations

import posixpath
from pathlib import Path

from distreg.config import ConfigError, ModelConfig
from distreg.interop.hf_config import CONFIG_FILE, MODEL_FIELDS, HFFormatError, read_hf_config


def model_config_from_hf(model: ModelConfig, given: dict, source: str) -> ModelConfig:
    from distreg.models.llama import PRESETS

    directory = model.init_from.removeprefix("hf://")
    path = posixpath.join(directory, CONFIG_FILE)
    if model.kind != "llama":
        raise ConfigError(f"{source}: model.init_from={model.init_from} needs model.kind=llama (got {model.kind})")
    if model.moe_num_experts or model.ffn_activation != "swiglu":
        raise ConfigError(f"{source}: model.init_from={model.init_from}: HF Llama checkpoints have a dense SwiGLU "
                          f"feed-forward; model.moe_num_experts={model.moe_num_experts}, "
                          f"model.ffn_activation={model.ffn_activation}")
    try:
        hf = read_hf_config(directory)
    except HFFormatError as e:
        raise ConfigError(f"{source}: model.init_from: {e}") from None
    preset = given.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{source}: model.preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
    preset_values = PRESETS[preset] if preset else {}
    update: dict = {} if preset else {"preset": None}
    for key, (field, read) in MODEL_FIELDS.items():
        theirs = read(hf)
        if given.get(key) is not None:
            ours, where = given[key], f"model.{key}={given[key]}"
        elif key in preset_values:
            ours, where = preset_values[key], f"model.preset={preset} has {key}={preset_values[key]}"
        else:
            update[key] = theirs
            continue
        if ours != theirs:
            raise ConfigError(f"{source}: {where} but {path} has {field}={theirs}")
    if given.get("max_seq_len") is None and "max_seq_len" not in preset_values:
        update["max_seq_len"] = int(hf.get("max_position_embeddings", 2048))
    if "://" not in directory or directory.startswith("file://"):  # Ray workers run elsewhere: absolute
        update["init_from"] = "hf://" + str(Path(directory.removeprefix("file://")).resolve())
    return model.model_copy(update=update)
