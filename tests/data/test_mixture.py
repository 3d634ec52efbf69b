"""Weighted mixture of token datasets: proportions, determinism, rank invariance,
resume across world size, config wiring."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distreg.data.mixture import MixtureBatches
from distreg.data.tokens import TokenDataset, write_token_shards

WEIGHTS = {"web": 0.7, "code": 0.2, "math": 0.1}
SEQ = 4


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    """Three token datasets whose tokens tell them apart: web 0-99, code 100-199, math 200-299
    (sizes 50, 20 and 7 windows: the small ones cycle through several epochs)."""
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for k, (name, n) in enumerate({"web": 50, "code": 20, "math": 7}.items()):
        toks = 100 * k + np.arange(n * SEQ + 1) % 100
        out[name] = str(root / name)
        write_token_shards(out[name], [toks], vocab_size=300)
    return out


def _streams(corpora, world=1, accum=1, seed=0, global_batch=16) -> list[MixtureBatches]:
    datasets = [TokenDataset(corpora[n], SEQ) for n in WEIGHTS]
    return [MixtureBatches(datasets, list(WEIGHTS), list(WEIGHTS.values()), global_batch, accum, r, world, seed)
            for r in range(world)]


def _step(streams) -> list[tuple[int, tuple[int, ...]]]:
    """(global index, input tokens) of every sample of one step, in global order."""
    per_rank = [s.next_step() for s in streams]
    out = []
    for m in range(len(per_rank[0])):
        for r in range(len(streams)):
            b = per_rank[r][m]
            out += [(int(i), tuple(x.tolist())) for i, x in zip(b["index"], b["input"])]
    return out


def test_realised_proportions_match_weights(corpora):
    [src] = _streams(corpora)
    seen = {n: 0 for n in WEIGHTS}
    for _ in range(50):
        for b in src.next_step():
            for tokens in b["input"]:
                seen[list(WEIGHTS)[int(tokens[0]) // 100]] += 1  # which corpus, from the tokens themselves
    total = sum(seen.values())
    assert total == 800
    m = src.metrics()
    for name, w in WEIGHTS.items():
        assert seen[name] / total == pytest.approx(w, abs=0.01)
        assert m[f"data/mix/{name}"] == pytest.approx(seen[name] / total)
    assert m["data/epoch/math"] >= 10 and m["data/epoch/web"] >= 10  # 80 of 7, 560 of 50
    assert m["data/skipped_shards"] == 0


def test_deterministic_given_seed_and_each_component_epoch_is_a_permutation(corpora):
    one, two, other = _streams(corpora, seed=1), _streams(corpora, seed=1), _streams(corpora, seed=2)
    steps = [_step(one) for _ in range(6)]
    assert steps == [_step(two) for _ in range(6)]
    assert steps != [_step(other) for _ in range(6)]
    # math (7 windows, global indices 70..76) is drawn 1-2 times a step: its first 7 draws are one epoch.
    math = [i for s in steps for i, _ in s if i >= 70][:7]
    assert sorted(math) == list(range(70, 77))
    # The global index names the window: web window k holds tokens 4k.. (mod 100).
    i, tokens = next((i, t) for s in steps for i, t in s if i < 50)
    assert tokens == tuple((SEQ * i + np.arange(SEQ)) % 100)


def test_same_global_batches_and_resume_on_other_world_sizes(corpora):
    straight = _streams(corpora)
    expected = [_step(straight) for _ in range(8)]
    for world, accum in ((2, 1), (4, 2)):
        assert _step(_streams(corpora, world, accum)) == expected[0]
    first = _streams(corpora)
    for _ in range(3):
        _step(first)
    state = first[0].state_dict()
    resumed = _streams(corpora, world=4, accum=2)
    for s in resumed:
        s.load_state_dict(state)
    assert [_step(resumed) for _ in range(5)] == expected[3:]
    with pytest.raises(Exception, match="different data.sources"):
        _streams(corpora)[0].load_state_dict({**state, "names": ["web", "math", "code"]})


def test_built_from_config(corpora, tmp_path):
    from distreg.config import load_config
    from distreg.data import build_data, check_data

    sources = [{"name": n, "path": corpora[n], "weight": w} for n, w in WEIGHTS.items()]
    cfg = load_config(None, ["data.kind=mixture", f"data.sources={sources}", f"data.seq_len={SEQ}",
                             "train.global_batch_size=8", "scaling.num_workers=2"])
    check_data(cfg)
    src = build_data(cfg, 1, 2)
    [batch] = src.next_step()
    assert isinstance(src, MixtureBatches) and batch["input"].shape == (4, SEQ) and batch["index"].dtype == torch.long
    assert src.num_samples == 50 + 20 + 7  # the global index space, for per-sample stores


def test_trainer_reports_realised_proportions(corpora, tmp_path):
    from distreg.config import load_config
    from distreg.runtime.trainer import Trainer

    sources = [{"name": n, "path": corpora[n], "weight": w} for n, w in WEIGHTS.items()]
    cfg = load_config(None, ["data.kind=mixture", f"data.sources={sources}", f"data.seq_len={SEQ}",
                             "model.vocab_size=300", "train.global_batch_size=10", "train.max_steps=2",
                             "scaling.num_workers=1", "strategy.name=ddp", f"run_dir={tmp_path}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one intra-op thread is faster here
    try:
        trainer = Trainer(cfg, track=False)
        assert all(np.isfinite(v) for v in trainer.fit().losses.values())
    finally:
        torch.set_num_threads(threads)
    m = trainer.data.metrics()  # the Trainer logs these to MLflow every step
    assert m["data/mix/web"] == pytest.approx(0.7) and m["data/mix/math"] == pytest.approx(0.1)


def test_appending_a_source_resumes_each_stream_and_starts_a_new_segment(corpora, tmp_path):
    """The documented rule (mixture.py): existing components continue their own streams
    exactly; the new one starts at its epoch 0; blending restarts at the change, so the
    realised proportions follow the new weights from there on."""
    old_weights = {"web": 0.8, "code": 0.2}
    old = MixtureBatches([TokenDataset(corpora[n], SEQ) for n in old_weights], list(old_weights),
                         list(old_weights.values()), 10, 1, 0, 1, seed=4)
    for _ in range(3):
        old.next_step()
    state = old.state_dict()
    # The samples web and code would give next, in stream order, from the old run's streams.
    web_next = old.streams[0].take(100).tolist()
    code_next = old.streams[1].take(30).tolist()

    new = MixtureBatches([TokenDataset(corpora[n], SEQ) for n in WEIGHTS], list(WEIGHTS), list(WEIGHTS.values()),
                         10, 1, 0, 1, seed=4)
    new.load_state_dict(state)
    drawn = {"web": [], "code": [], "math": []}
    for _ in range(10):
        [b] = new.next_step()
        for i in b["index"].tolist():  # global index: web 0-49, code 50-69, math 70-76
            name = "web" if i < 50 else "code" if i < 70 else "math"
            drawn[name].append(i - {"web": 0, "code": 50, "math": 70}[name])
    total = sum(len(v) for v in drawn.values())
    for name, w in WEIGHTS.items():
        assert len(drawn[name]) == pytest.approx(w * total, abs=1)  # exact for the segment since the change
    # Within a step the slots are shuffled; as sets per prefix, each stream continued where it stopped.
    assert sorted(drawn["web"]) == sorted(web_next[: len(drawn["web"])])
    assert sorted(drawn["code"]) == sorted(code_next[: len(drawn["code"])])
    assert sorted(drawn["math"][:7]) == list(range(7))  # the new source: its first epoch
    assert new.state_dict()["segment_start"] == 30 and new.metrics()["data/mix/math"] == pytest.approx(0.1)
