"""A weighted mixture of token datasets (e.g. web 0.7, code 0.2, math 0.1), each
component anywhere fsspec reaches (different buckets, stores or disks).

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

Changing a running mixture (resume with a config whose `data.sources` differ):
  - sources may be *appended* (existing ones keep their names, order and data) and
    weights may change; removing, renaming, reordering or changing a source's data is
    refused (it would silently re-map the global sample index of per-sample state);
  - every existing component continues its own stream exactly where it stopped (same
    epoch, same permutation, next sample); a new component starts at its epoch 0;
  - the blending starts a new *segment* at the resume step: counts restart at zero, so
    from the change on the realised proportions follow the new weights within 1/t
    (t counted from the change), rather than over-drawing the new source to make up
    for the steps it was absent. `data/mix/<name>` reports the current segment.
  - global indices of existing components are unchanged (new ones are appended).

Read-ahead: the next `readahead_steps` steps are planned ahead (the blending is
deterministic) and their windows requested from remote shards; `state_dict` is the
position after the last step returned.
"""
from __future__ import annotations

import copy
from collections import deque

import numpy as np
import torch

from distreg.data.errors import DataError
from distreg.data.position import EpochStream, rank_slices
from distreg.data.tokens import TokenDataset


class MixtureBatches:
    unit = "tok"
    full_windows = True  # packed windows of every source: all targets valid

    def __init__(self, datasets: list[TokenDataset], names: list[str], weights: list[float], global_batch: int,
                 grad_accum: int, rank: int, world_size: int, seed: int, shuffle: bool = True,
                 readahead_steps: int = 2):
        if not datasets or len(datasets) != len(names) or len(names) != len(weights):
            raise DataError("data.sources: need one name and weight per dataset")
        if any(w <= 0 for w in weights):
            raise DataError(f"data.sources: weights must be positive (got {weights})")
        vocab = {d.vocab_size for d in datasets}
        if len(vocab) > 1:
            raise DataError(f"data.sources: the datasets have different vocabularies ({sorted(vocab)}): "
                            "tokenize them with one tokenizer")
        self.datasets, self.names = datasets, names
        self.raw_weights = [float(w) for w in weights]
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.readahead_steps = readahead_steps if any(d.remote for d in datasets) else 0
        self.vocab_size = vocab.pop()
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in datasets])])
        self._reset_position()

    def _stream(self, i: int) -> EpochStream:
        # Distinct, seed-derived permutations per component (by position: appending a
        # source leaves the others' permutations unchanged).
        return EpochStream(len(self.datasets[i]), self.seed * 7919 + 104_729 * (i + 1), self.shuffle)

    def _reset_position(self) -> None:
        self.streams = [self._stream(i) for i in range(len(self.datasets))]
        self.counts = np.zeros(len(self.datasets), dtype=np.int64)
        self.consumed = 0  # global samples drawn
        self.segment_start = 0  # `consumed` when the current mixture (sources, weights) began
        self.step = 0
        self._ahead: deque = deque()
        self._committed = self._position()

    def _position(self) -> dict:
        return {"consumed": self.consumed, "step": self.step, "counts": self.counts.tolist(), "seed": self.seed,
                "segment_start": self.segment_start, "names": list(self.names), "weights": self.raw_weights,
                "sizes": [len(d) for d in self.datasets], "streams": [s.state_dict() for s in self.streams]}

    def _assign(self) -> np.ndarray:
        """The component of each slot of the next global batch (Megatron's rule, over
        the current segment)."""
        out = np.empty(self.global_batch, dtype=np.int64)
        for j in range(self.global_batch):
            t = self.consumed - self.segment_start + j + 1
            i = int(np.argmax(self.weights * t - self.counts))
            self.counts[i] += 1
            out[j] = i
        return out

    def _plan_step(self) -> None:
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
        mbs = [mb.tolist() for mb in rank_slices(slots, self.grad_accum, self.rank, self.world_size)]
        fetches = [[self.datasets[c].prefetch([k]) for c, k in pairs] for pairs in mbs]
        self._ahead.append((self._position(), mbs, fetches))

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        while len(self._ahead) < 1 + self.readahead_steps:
            self._plan_step()
        self._committed, mbs, fetches = self._ahead.popleft()
        out = []
        for pairs, fetched in zip(mbs, fetches):
            windows = np.stack([self.datasets[c].window(k, f[0] if f else None)
                                for (c, k), f in zip(pairs, fetched)]).astype(np.int64)
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
        """Realised proportions over the current segment (since the last mixture change),
        as of the last step returned."""
        counts = np.asarray(self._committed["counts"])
        total = max(int(counts.sum()), 1)
        return {name: float(c) / total for name, c in zip(self.names, counts)}

    def metrics(self) -> dict[str, float]:
        m = {f"data/mix/{name}": p for name, p in self.proportions().items()}
        m.update({f"data/epoch/{name}": float(s["epoch"]) for name, s in zip(self.names, self._committed["streams"])})
        m["data/skipped_shards"] = float(sum(len(d.skipped) for d in self.datasets))
        return m

    def state_dict(self) -> dict:
        return copy.deepcopy(self._committed)

    def close(self) -> None:
        """Stop the read-ahead; the next `next_step` plans again from the last step returned."""
        self.load_state_dict(self.state_dict())
        for d in self.datasets:
            d.close()

    def load_state_dict(self, state: dict) -> None:
        old_names, old_sizes = list(state["names"]), list(state["sizes"])
        k = len(old_names)
        if self.names[:k] != old_names or [len(d) for d in self.datasets[:k]] != old_sizes:
            raise DataError(f"checkpoint data position is for components {old_names} of sizes {old_sizes}, "
                            f"not {list(self.names)} of sizes {[len(d) for d in self.datasets]} (different data.sources: "
                            f"sources may only be appended; existing ones keep name, order and data)")
        self._reset_position()
        self.consumed, self.step = state["consumed"], state["step"]
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
        old_weights = state.get("weights", self.raw_weights[:k])
        if k == len(self.names) and list(old_weights) == self.raw_weights:
            self.counts = np.asarray(state["counts"], dtype=np.int64)
            self.segment_start = state.get("segment_start", 0)
        else:  # a new mixture: a new blending segment from here (module docstring)
            self.segment_start = self.consumed
        self._committed = self._position()
