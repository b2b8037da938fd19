"""Padded micro-batches for one data-parallel rank, and what the model is called with."""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import torch

from scalora_dist.data.formats import IGNORE_INDEX, DataError


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model is called with. Packed rows carry per-example `position_ids` and no
    attention mask: transformers then keeps every example to itself (a block-diagonal mask
    for sdpa and eager, varlen kernels for flash_attention_2). `attention_mask` stays in
    the batch to count the real tokens."""
    if "position_ids" in batch:
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def count_tokens(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(labelled tokens, real tokens) of some micro-batches: the loss is over the labelled
    ones (labels shift by one, so a sequence's first label never counts)."""
    labelled = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return labelled, sum(int(b["attention_mask"].sum()) for b in batches)


class BatchLoader:
    """Padded micro-batches of a tokenised dataset for one data-parallel rank.

    Ordering rule. Epoch e uses the permutation `torch.randperm(n, generator=
    torch.Generator().manual_seed(seed + e))` of the n examples (identity when
    shuffle=False). That order is cut into global batches of G = micro_batch_size *
    world_size consecutive examples; in global batch j, rank k takes the examples at
    positions [k*b, (k+1)*b) (b = micro_batch_size), i.e. micro-batch number j*W + k of the
    flat order. So at every step the W ranks together see exactly the examples that one rank
    with micro_batch_size b*W sees (same seed), in the same order when concatenated by rank.

    drop_last=True (training): an incomplete final global batch is dropped, so every rank
    gets n // G micro-batches per epoch. drop_last=False (evaluation): the r leftover
    examples form one more, smaller global batch, split into near-equal contiguous parts
    (rank k gets positions [k*r//W, (k+1)*r//W)); when r < W some ranks get nothing and
    so one micro-batch fewer than the others.

    Batches: `input_ids` (b, T) right-padded with pad_token_id to the longest example of the
    batch, `attention_mask` (1 real, 0 pad) and `labels` (-100 on padding), all int64.

    Position. `state_dict()` is {"epoch", "position"}: micro-batches this rank has already
    taken in that epoch; `load_state_dict` resumes exactly there. `__iter__` yields the rest
    of the current epoch and then moves to the next one; `next_batch` never ends.
    """

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        pad_token_id: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world_size {world_size}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; pass the tokenizer's pad (or eos) id")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = int(pad_token_id)
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: list[int] = []
        self._n = len(dataset)
        if self.batches_per_epoch() == 0:
            g = micro_batch_size * world_size
            if drop_last:
                need = f"one global batch of {g} (micro_batch_size {micro_batch_size} x {world_size} ranks)"
            else:
                need = f"one example on each of {world_size} ranks"
            raise DataError(f"the dataset has {self._n} examples, too few for {need}")

    # -- layout ---------------------------------------------------------------------------

    def batches_per_epoch(self) -> int:
        """Micro-batches this rank gets per epoch."""
        g = self.micro_batch_size * self.world_size
        full, rest = divmod(self._n, g)
        if self.drop_last or rest == 0:
            return full
        lo, hi = self._tail_bounds(rest)
        return full + (1 if hi > lo else 0)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def _tail_bounds(self, rest: int) -> tuple[int, int]:
        k, w = self.rank, self.world_size
        return k * rest // w, (k + 1) * rest // w

    def _indices(self, epoch: int, position: int) -> list[int]:
        if self._order_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(self._n, generator=gen).tolist()
            else:
                self._order = list(range(self._n))
            self._order_epoch = epoch
        b, g = self.micro_batch_size, self.micro_batch_size * self.world_size
        base = position * g
        if base + g <= self._n:
            lo, hi = self.rank * b, (self.rank + 1) * b
        else:
            lo, hi = self._tail_bounds(self._n - base)
        return self._order[base + lo : base + hi]

    # -- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.collate(self._indices(self.epoch, self.position))
        self.position += 1
        if self.position == self.batches_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if isinstance(self.dataset, datasets.Dataset):
            rows = self.dataset[indices]
            ids, labels = rows["input_ids"], rows.get("labels") or rows["input_ids"]
            positions = rows.get("position_ids")
        else:
            items = [self.dataset[i] for i in indices]
            ids = [it["input_ids"] for it in items]
            labels = [it.get("labels", it["input_ids"]) for it in items]
            positions = [it["position_ids"] for it in items] if "position_ids" in items[0] else None
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        label_t = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels)):
            input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            attention[i, : len(x)] = 1
            label_t[i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}
        if positions is not None:
            # padding after the last example of a row is one more sequence of its own
            position_t = torch.arange(width, dtype=torch.long).repeat(len(ids), 1)
            for i, p in enumerate(positions):
                position_t[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
                position_t[i, len(p) :] -= len(p)
            batch["position_ids"] = position_t
        return batch

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if self.position >= self.batches_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
