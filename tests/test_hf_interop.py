"""Hugging Face Llama interop, single process: distreg -> `distreg export hf` ->
transformers gives the same logits (tiny, llama-small, GQA); a model saved by
transformers -> `model.init_from: hf://` -> the same logits; fp32 round trips are
bitwise; sliced reads (local safe_open and fsspec byte ranges) equal the full tensors;
pruned weights keep their exact zeros; bad inputs are one-line errors naming the file
and tensor; the tokenizer and the MLflow reference travel with the export.
(Multi-rank import / export: tests/test_hf_interop_dist.py.)"""
from __future__ import annotations

import json
import os

import pytest
import torch

from distreg.config import ConfigError, load_config
from distreg.interop.hf_config import HFFormatError, from_hf_layout, hf_name, rotary_heads, to_hf_layout
from distreg.interop.hf_export import export_hf, export_plan
from distreg.interop.hf_import import load_hf_into
from distreg.interop.safetensors_dir import SafetensorsDir
from distreg.models import build_model

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

GQA = {"model.n_kv_heads": 1}  # llama-tiny: 4 query heads share 1 KV head
# llama-small's width, heads and head_dim (64) at 2 of its 8 layers and a 4096 vocab (of
# 32000): 10M instead of 58M parameters, to keep the test cheap on 2 shared cores.
SMALL = {"model.preset": "llama-small", "model.n_layers": 2, "model.vocab_size": 4096}


def config(run_dir, **overrides):
    return load_config(None, [f"{k}={v}" for k, v in {"run_dir": run_dir, "data.path": f"{run_dir}/no-data",
                                                       **overrides}.items()])


def hf_state(directory) -> dict[str, torch.Tensor]:
    files = json.load(open(os.path.join(directory, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for file in sorted(set(files.values())):
        out.update(load_file(os.path.join(directory, file)))
    return out


def exported(tmp_path, name, overrides=(), seed=3, dtype="fp32", shard=100_000, state=None):
    cfg = config(str(tmp_path / name), **dict(overrides))
    model = build_model(cfg.model, seed)
    if state is not None:
        model.load_state_dict(state)
    torch.save(model.state_dict(), tmp_path / f"{name}.pt")
    out = str(tmp_path / f"{name}-hf")
    with pytest.warns(UserWarning, match="no tokenizer"):
        manifest = export_hf(cfg, str(tmp_path / f"{name}.pt"), out, dtype, shard, record=False)
    return cfg, model, out, manifest


def logits_diff(model, directory, vocab, seq=48):
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model.eval()(tokens) - hf(tokens).logits).abs().max().item()


@pytest.mark.parametrize("name,overrides", [("tiny", {}), ("gqa", GQA),
                                             ("small", SMALL)])
def test_export_gives_transformers_the_same_logits_and_imports_back_bitwise(tmp_path, name, overrides):
    cfg, model, out, manifest = exported(tmp_path, name, overrides, shard=100_000 if name != "small" else 2**24)
    assert manifest["files"] > 1 and os.path.exists(os.path.join(out, "model-00001-of-%05d.safetensors" % manifest["files"]))
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    a = model.args
    assert (hf_cfg["hidden_size"], hf_cfg["num_hidden_layers"], hf_cfg["num_attention_heads"],
            hf_cfg["num_key_value_heads"], hf_cfg["intermediate_size"], hf_cfg["vocab_size"]) == (
        a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size)
    assert logits_diff(model, out, a.vocab_size) <= 1e-5
    # fp32 round trip distreg -> HF -> distreg, bitwise
    back = build_model(cfg.model, seed=99)
    load_hf_into(back, out)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_rotary_permutation_is_what_makes_logits_agree(tmp_path):
    """Without the q/k permutation the logits differ: the check above can fail."""
    _, model, out, _ = exported(tmp_path, "perm", GQA)
    state = hf_state(out)
    for name, _ in model.named_parameters():
        heads = rotary_heads(name, model.args)
        if heads is not None:
            state[hf_name(name)] = from_hf_layout(state[hf_name(name)], heads)  # undo: distreg's layout
    from safetensors.torch import save_file

    os.remove(os.path.join(out, "model.safetensors.index.json"))
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(out, f))
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    assert logits_diff(model, out, model.args.vocab_size) > 1e-3


def save_transformers_model(directory, tie=False, **dims):
    torch.manual_seed(1)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tie,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    kw.update(dims)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    hf.save_pretrained(directory, max_shard_size="100KB")
    return hf


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_model_imports_with_the_same_logits(tmp_path, tie):
    hf_dir = str(tmp_path / "hf")
    hf = save_transformers_model(hf_dir, tie)
    cfg = config(str(tmp_path / "run"), **{"model.init_from": f"hf://{hf_dir}", "model.preset": "null"})
    assert (cfg.model.dim, cfg.model.n_kv_heads, cfg.model.ffn_dim, cfg.model.norm_eps, cfg.model.rope_theta,
            cfg.model.max_seq_len) == (64, 2, 160, 1e-6, 500000.0, 128)
    model = build_model(cfg.model, seed=5)
    load_hf_into(model, cfg.model.init_from)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    if tie:
        assert torch.equal(model.output.weight, model.tok_embeddings.weight)
        return
    # HF -> distreg -> HF: every tensor bitwise
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.warns(UserWarning, match="no tokenizer"):
        export_hf(cfg, str(tmp_path / "m.pt"), str(tmp_path / "again"), record=False)
    original, again = hf_state(hf_dir), hf_state(str(tmp_path / "again"))
    assert set(again) == set(original)
    for key, value in original.items():
        assert torch.equal(again[key], value), key


def test_bf16_checkpoint_imports_into_fp32_exactly(tmp_path):
    hf_dir = str(tmp_path / "hf16")
    hf = save_transformers_model(str(tmp_path / "hf32"))
    hf.to(torch.bfloat16).save_pretrained(hf_dir)
    cfg = config(str(tmp_path / "run"), **{"model.init_from": f"hf://{hf_dir}", "model.preset": "null"})
    model = build_model(cfg.model, seed=5)
    load_hf_into(model, hf_dir)
    hf_params = dict(hf.named_parameters())
    assert torch.equal(model.layers[1].feed_forward.w2.weight, hf_params["model.layers.1.mlp.down_proj.weight"].float())
    assert torch.equal(model.layers[0].attention.wk.weight,
                       from_hf_layout(hf_params["model.layers.0.self_attn.k_proj.weight"].float(), 2))


def test_sliced_reads_equal_the_full_tensor_locally_and_over_fsspec(tmp_path):
    """Arbitrary flat ranges (ZeRO-3 partitions, FSDP2 row blocks, empty) of every tensor,
    read through safe_open (local) and byte ranges (memory:// fsspec)."""
    import fsspec

    from distreg.interop.hf_import import _read_flat

    _, model, out, _ = exported(tmp_path, "slices", GQA)
    fs = fsspec.filesystem("memory")
    for f in os.listdir(out):
        fs.pipe(f"/hfslices/{f}", open(os.path.join(out, f), "rb").read())
    g = torch.Generator().manual_seed(0)
    readers = [SafetensorsDir(out), SafetensorsDir("memory://hfslices")]
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        for start, stop in [(0, flat.numel()), (0, 0), *sorted(torch.randint(0, flat.numel(), (3, 2), generator=g).sort(1)[0].tolist())]:
            for files in readers:
                got = _read_flat(files, hf_name(name), p.shape, rotary_heads(name, model.args), start, stop - start)
                assert torch.equal(got, flat[start:stop]), (name, start, stop, files.directory)
    remote = build_model(config(str(tmp_path / "x"), **GQA).model, seed=7)
    load_hf_into(remote, "memory://hfslices")
    for key, value in model.state_dict().items():
        assert torch.equal(remote.state_dict()[key], value), key


def test_pruned_model_keeps_its_zeros_in_fp32_and_bf16(tmp_path):
    cfg = config(str(tmp_path / "p"))
    model = build_model(cfg.model, 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("layers."):  # 50% magnitude pruning of the decoder linears
                p[p.abs() < p.abs().median()] = 0.0
    masks = {hf_name(n): to_hf_layout(p.detach() == 0, rotary_heads(n, model.args)) for n, p in model.named_parameters()}
    for dtype in ("fp32", "bf16"):
        _, _, out, _ = exported(tmp_path, f"pruned-{dtype}", dtype=dtype, state=model.state_dict())
        for key, value in hf_state(out).items():
            assert torch.equal(value == 0, masks[key]), (dtype, key)
            if dtype == "bf16":
                assert value.dtype == torch.bfloat16
    assert sum(int(m.sum()) for m in masks.values()) > 0.4 * sum(p.numel() for n, p in model.named_parameters()
                                                                  if n.startswith("layers.") and p.dim() == 2)


def test_7b_export_plan_bounds_memory_by_one_shard():
    """The 7B preset, on meta: bf16 shards of at most the limit, and a peak estimate
    (one shard + buffers of the largest tensor) that does not grow with the depth."""
    def plan(n_layers, shard):
        model = build_model(load_config(None, ["model.preset=llama2-7b", f"model.n_layers={n_layers}"]).model, 0, "meta")
        shapes = {n: p.shape for n, p in model.named_parameters()}
        return export_plan(shapes, "bf16", shard), sum(p.numel() for p in model.parameters()) * 2

    p, total = plan(32, 5 * 2**30)
    assert len(p.shards) == 3 and max(p.shard_bytes) <= 5 * 2**30 and sum(p.shard_bytes) == total
    assert p.largest_tensor_fp32_bytes == 32000 * 4096 * 4
    p1, total1 = plan(32, 2**30)
    p2, total2 = plan(64, 2**30)
    assert p1.peak_bytes == p2.peak_bytes < total1 / 4 and total2 > 1.9 * total1


def test_bad_inputs_are_one_line_errors_naming_file_and_tensor(tmp_path):
    hf_dir = str(tmp_path / "hf")
    save_transformers_model(hf_dir)
    run = str(tmp_path / "run")

    def error_of(fn, kind=HFFormatError):
        with pytest.raises(kind) as e:
            fn()
        assert "\n" not in str(e.value)
        return str(e.value)

    # not an HF Llama directory
    msg = error_of(lambda: config(run, **{"model.init_from": f"hf://{tmp_path}"}), ConfigError)
    assert f"{tmp_path}/config.json: not found" in msg
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert "not an HF Llama" in error_of(lambda: config(run, **{"model.init_from": f"hf://{gpt}"}), ConfigError)
    # config mismatch: both values named
    msg = error_of(lambda: config(run, **{"model.init_from": f"hf://{hf_dir}", "model.preset": "llama-tiny"}), ConfigError)
    assert "model.preset=llama-tiny has ffn_dim=176" in msg and "intermediate_size=160" in msg
    msg = error_of(lambda: config(run, **{"model.init_from": f"hf://{hf_dir}", "model.moe_num_experts": 2}), ConfigError)
    assert "dense SwiGLU" in msg and "moe_num_experts=2" in msg
    # tensor shape mismatch: config.json edited to disagree with the tensors
    hf_cfg = json.load(open(f"{hf_dir}/config.json"))
    json.dump({**hf_cfg, "intermediate_size": 128}, open(f"{hf_dir}/config.json", "w"))
    cfg = config(run, **{"model.init_from": f"hf://{hf_dir}", "model.preset": "null"})
    msg = error_of(lambda: load_hf_into(build_model(cfg.model, 0), hf_dir))
    assert ".safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape (160, 64)" in msg and "(128, 64)" in msg
    json.dump(hf_cfg, open(f"{hf_dir}/config.json", "w"))
    # a missing shard
    weight_map = json.load(open(f"{hf_dir}/model.safetensors.index.json"))["weight_map"]
    shard = weight_map["model.layers.1.mlp.down_proj.weight"]
    os.remove(f"{hf_dir}/{shard}")
    cfg = config(run, **{"model.init_from": f"hf://{hf_dir}", "model.preset": "null"})
    msg = error_of(lambda: load_hf_into(build_model(cfg.model, 0), hf_dir))
    assert f"{hf_dir}/{shard}: shard missing" in msg and "model.layers.1" in msg
    # export: MoE / Dice refused, a checkpoint of another model named
    for overrides, text in (({"model.moe_num_experts": 2}, "MoE models"), ({"model.ffn_activation": "dice"}, "dice")):
        assert text in error_of(lambda: export_hf(config(run, **overrides), "x", str(tmp_path / "o"), record=False))
    torch.save(build_model(config(run, **GQA).model, 0).state_dict(), tmp_path / "gqa.pt")
    msg = error_of(lambda: export_hf(config(run), str(tmp_path / "gqa.pt"), str(tmp_path / "o2"), record=False))
    assert "gqa.pt: tensor layers.0.attention.wk.weight has shape (16, 64), CONFIG's model has (32, 64)" in msg


def test_tokenizer_files_and_mlflow_reference_via_the_cli(tmp_path):
    """A corpus tokenized with a tokenizer.json: `distreg export hf` (CLI) copies it, so
    AutoTokenizer encodes like distreg did; the export is recorded in the run's MLflow."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from distreg.cli import main
    from distreg.data.tokenize import tokenize_corpus

    words = ["<eos>", "[UNK]"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text("w1 w2 w3\nw4 w5 w39\n")
    tokenize_corpus(str(tmp_path / "corpus.txt"), str(tmp_path / "tokens"), str(tmp_path / "tokenizer.json"),
                    eos_token="<eos>")
    run = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"run_dir: {run}\ndata: {{path: {tmp_path / 'tokens'}}}\nmodel: {{vocab_size: {len(words)}}}\n")
    model = build_model(load_config(cfg_file).model, 0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "export"
    assert main(["export", "hf", str(cfg_file), "--checkpoint", str(tmp_path / "model.pt"), "--out", str(out),
                 "--dtype", "bf16"]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("w4 w5 w39")["input_ids"] == [6, 7, 41] and hf_tok.eos_token == "<eos>"
    assert json.load(open(out / "config.json"))["eos_token_id"] == 0
    from mlflow.tracking import MlflowClient

    from distreg.tracking.mlflow_tracker import default_tracking_uri

    client = MlflowClient(default_tracking_uri(str(run)))
    [found] = client.search_runs([client.get_experiment_by_name("distreg").experiment_id])
    assert found.data.tags["hf_export.path"] == str(out) and found.data.tags["hf_export.dtype"] == "bf16"
    assert found.data.tags["hf_export.source_checkpoint"] == str(tmp_path / "model.pt")
    assert [a.path for a in client.list_artifacts(found.info.run_id, "hf_export")] == ["hf_export/step_file.json"]
    # a second export into the same directory is refused (exit 2, one line)
    assert main(["export", "hf", str(cfg_file), "--checkpoint", str(tmp_path / "model.pt"), "--out", str(out)]) == 2
