"""`distreg export hf`: a distreg checkpoint -> a Hugging Face Llama directory.

    distreg export hf CONFIG --checkpoint PATH --out DIR [--dtype fp32|bf16|fp16]
        [--max-shard-size 5GB] [--set key=value ...]

CONFIG gives the model (any strategy's checkpoint: ddp / fsdp2 DCP, ZeRO-1/2/3, or a
state-dict file such as `model.pt` of `prune dsnot` / `adapters merge`). Written to DIR:
`config.json` (LlamaConfig), `model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`,
`generation_config.json`, the tokenizer files when the run's data was tokenized with a
`tokenizer.json` (`distreg.interop.hf_tokenizer`) and `distreg_export.json` (source
checkpoint, step, dtype). The export is recorded in the run's MLflow run (a small JSON
artifact and tags holding the path, never the weights).

Memory is bounded by one output shard: parameters are read from the checkpoint one at a
time (`distreg.interop.weight_source`), permuted / cast, collected until the shard is
full, written, and dropped. Peak ~ max_shard_size + a few fp32 copies of the largest tensor (the
embedding), whatever the depth; `export_plan` estimates it without reading any weight.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from distreg.config import RunConfig
from distreg.interop.hf_config import (
    CONFIG_FILE,
    INDEX_FILE,
    HFFormatError,
    check_exportable,
    hf_config_dict,
    hf_name,
    rotary_heads,
    to_hf_layout,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MANIFEST = "distreg_export.json"
READ_COPIES = 4


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 1000000")
    unit = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * unit)


@dataclass
class ExportPlan:
    shards: list[list[str]]  # distreg parameter names per output file, in model order
    shard_bytes: list[int]
    largest_tensor_fp32_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Tensors alive at once: one output shard, plus up to READ_COPIES fp32-sized
        buffers of the tensor being read and cast (DCP's read holds the file bytes and the
        deserialised tensor while it copies into ours; then permute / cast). Independent
        of the model's depth (benchmarks/hf_export_memory.py measures it)."""
        return max(self.shard_bytes) + READ_COPIES * self.largest_tensor_fp32_bytes

    def file_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"


def export_plan(shapes: dict[str, torch.Size], dtype: str, max_shard_size: int) -> ExportPlan:
    """Greedy split in model order; a tensor larger than the limit gets a file of its own."""
    itemsize = DTYPES[dtype].itemsize
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shape in shapes.items():
        nbytes = shape.numel() * itemsize
        if shards[-1] and sizes[-1] + nbytes > max_shard_size:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    largest = max(s.numel() for s in shapes.values()) * 4
    return ExportPlan(shards, sizes, largest)


def model_args(cfg: RunConfig):
    """LlamaArgs and the parameter shapes (model order) of CONFIG's model, built on meta."""
    from distreg.models import build_model

    if cfg.model.kind != "llama":
        raise HFFormatError(f"HF export: model.kind={cfg.model.kind!r}; only Llama models export to HF")
    model = build_model(cfg.model, 0, "meta")
    check_exportable(model.args)
    return model.args, {name: p.shape for name, p in model.named_parameters()}


def export_hf(cfg: RunConfig, checkpoint: str, out: str, dtype: str = "fp32", max_shard_size: int = 5 * 2**30,
              record: bool = True) -> dict:
    """Write the HF directory; returns the manifest (also written as distreg_export.json)."""
    from safetensors.torch import save_file

    from distreg.interop.hf_tokenizer import export_tokenizer
    from distreg.interop.weight_source import open_weights

    args, shapes = model_args(cfg)
    if "://" in out and not out.startswith("file://"):
        raise HFFormatError(f"--out {out}: export to a local directory, then copy it (e.g. `aws s3 sync`)")
    out = out.removeprefix("file://")
    if os.path.isdir(out) and os.listdir(out):
        raise HFFormatError(f"--out {out}: directory is not empty; export into a new directory")
    source = open_weights(checkpoint)
    missing = [n for n in shapes if n not in source.shapes]
    if missing:
        raise HFFormatError(f"{source.path}: no tensor {missing[0]} in the checkpoint ({len(missing)} missing); "
                            "does CONFIG describe the model that was trained?")
    for name, shape in shapes.items():
        if tuple(source.shapes[name]) != tuple(shape):
            raise HFFormatError(f"{source.path}: tensor {name} has shape {tuple(source.shapes[name])}, "
                                f"CONFIG's model has {tuple(shape)}")
    plan = export_plan(shapes, dtype, max_shard_size)
    os.makedirs(out, exist_ok=True)
    weight_map, total = {}, 0
    for i, names in enumerate(plan.shards):
        tensors = {}
        for name in names:  # one fp32 source tensor alive at a time besides the shard
            value = to_hf_layout(source.get(name), rotary_heads(name, args))
            tensors[hf_name(name)] = value.to(DTYPES[dtype]).contiguous()
        file = plan.file_name(i)
        save_file(tensors, os.path.join(out, file + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(out, file + ".tmp"), os.path.join(out, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({t: file for t in tensors})
        del tensors
    _write_json(out, INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    tokenizer = export_tokenizer(cfg, out, args.max_seq_len)
    eos, bos = tokenizer.get("eos_token_id"), tokenizer.get("bos_token_id")
    _write_json(out, "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    manifest = {"out": os.path.abspath(out), "source_checkpoint": source.path, "step": source.step, "dtype": dtype,
                "files": len(plan.shards), "total_bytes": total, "peak_bytes_estimate": plan.peak_bytes,
                "tokenizer": tokenizer.get("source"), "architecture": "LlamaForCausalLM"}
    _write_json(out, MANIFEST, manifest)
    _write_json(out, CONFIG_FILE, hf_config_dict(args, HF_DTYPE_NAMES[dtype], eos, bos))  # last: the dir is complete
    if record:
        from distreg.interop.hf_record import record_export

        manifest["mlflow_run_id"] = record_export(cfg, manifest)
    return manifest


def _write_json(out: str, name: str, value: dict) -> None:
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)




def add_commands(sub) -> None:
    """`distreg export hf ...`"""
    p = sub.add_parser("hf", help="a checkpoint as a Hugging Face Llama directory (safetensors, config.json)")
    p.add_argument("config", help="YAML config of the run that wrote the checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", required=True, help="step dir, checkpoint root (latest step) or state-dict file")
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--no-mlflow", action="store_true", help="do not record the export in MLflow")
    p.set_defaults(fn=_run)


def _run(args) -> int:
    import sys

    from distreg.config import ConfigError, load_config
    from distreg.runtime.weights import CheckpointError

    cfg = load_config(args.config, args.overrides)
    try:
        size = parse_size(args.max_shard_size)
        manifest = export_hf(cfg, args.checkpoint, args.out, args.dtype, size, record=not args.no_mlflow)
    except (HFFormatError, CheckpointError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"distreg export hf: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    return 0
