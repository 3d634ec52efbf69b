"""A weighted mixture of token datasets (e.g. web 0.7, code 0.2, math 0.1).

Which component fills each slot of the global sample stream is decided by the rule
of Megatron-LM's blended datasets: slot t goes to the component whose realised count
lags its target share the most (argmax_i w_i * t - n_i). The realised proportions
are therefore within 1/t of the weights at every point, not only on average, and the
assignment does not depend on the world size. Each component walks through its own
epochs with its own seeded permutation (`EpochStream`); the slots of a step are then
shuffled (seeded by step) so that every rank's slice mixes the components.

Position (world-size independent): global samples consumed, per-component counts and
per-component (epoch, consumed). Global index of a sample: its window index in its
component plus the total size of the components before it.
"""
from __future__ import annotations

import numpy as np
import torch

from distreg.data.errors import DataError
from distreg.data.position import EpochStream, rank_slices
from distreg.data.tokens import TokenDataset


class MixtureBatches:
    unit = "tok"
    full_windows = True  # packed windows of every source: all targets valid

    def __init__(self, datasets: list[TokenDataset], names: list[str], weights: list[float], global_batch: int,
                 grad_accum: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if not datasets or len(datasets) != len(names) or len(names) != len(weights):
            raise DataError("data.sources: need one name and weight per dataset")
        if any(w <= 0 for w in weights):
            raise DataError(f"data.sources: weights must be positive (got {weights})")
        vocab = {d.vocab_size for d in datasets}
        if len(vocab) > 1:
            raise DataError(f"data.sources: the datasets have different vocabularies ({sorted(vocab)}): "
                            "tokenize them with one tokenizer")
        self.datasets, self.names = datasets, names
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.vocab_size = vocab.pop()
        # Distinct, seed-derived permutations per component.
        self.streams = [EpochStream(len(d), seed * 7919 + 104_729 * (i + 1), shuffle) for i, d in enumerate(datasets)]
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in datasets])])
        self.counts = np.zeros(len(datasets), dtype=np.int64)
        self.consumed = 0
        self.step = 0

    def _assign(self) -> np.ndarray:
        """The component of each slot of the next global batch (Megatron's rule)."""
        out = np.empty(self.global_batch, dtype=np.int64)
        for j in range(self.global_batch):
            t = self.consumed + j + 1
            i = int(np.argmax(self.weights * t - self.counts))
            self.counts[i] += 1
            out[j] = i
        return out

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        comp = self._assign()
        local = np.empty(self.global_batch, dtype=np.int64)
        for i, stream in enumerate(self.streams):
            slots = np.flatnonzero(comp == i)
            local[slots] = stream.take(len(slots)).numpy()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983 * (self.step + 1))
        order = torch.randperm(self.global_batch, generator=g)
        slots = torch.stack([torch.from_numpy(comp), torch.from_numpy(local)], 1)[order]
        self.consumed += self.global_batch
        self.step += 1
        out = []
        for mb in rank_slices(slots, self.grad_accum, self.rank, self.world_size):
            pairs = mb.tolist()
            windows = np.stack([self.datasets[c].window(k) for c, k in pairs]).astype(np.int64)
            w = torch.from_numpy(windows)
            index = torch.tensor([int(self.offsets[c]) + k for c, k in pairs], dtype=torch.long)
            out.append({"input": w[:, :-1], "target": w[:, 1:], "index": index})
        return out

    @property
    def num_samples(self) -> int:
        """Size of the global sample index space: all components' windows. (No single
        `epoch`: each component has its own, reported as data/epoch/<name>.)"""
        return int(self.offsets[-1])

    def proportions(self) -> dict[str, float]:
        total = max(int(self.counts.sum()), 1)
        return {name: float(c) / total for name, c in zip(self.names, self.counts)}

    def metrics(self) -> dict[str, float]:
        m = {f"data/mix/{name}": p for name, p in self.proportions().items()}
        m.update({f"data/epoch/{name}": float(s.epoch) for name, s in zip(self.names, self.streams)})
        m["data/skipped_shards"] = float(sum(len(d.skipped) for d in self.datasets))
        return m

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "step": self.step, "counts": self.counts.tolist(), "seed": self.seed,
                "names": list(self.names), "sizes": [len(d) for d in self.datasets],
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != list(self.names) or state["sizes"] != [len(d) for d in self.datasets]:
            raise DataError(f"checkpoint data position is for components {state['names']} of sizes {state['sizes']}, "
                            f"not {list(self.names)} of sizes {[len(d) for d in self.datasets]} (different data.sources)")
        self.consumed, self.step = state["consumed"], state["step"]
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
