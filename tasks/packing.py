"""Sequence packing: short examples share one `max_length` row, each attending only to itself.

    datums = packed_datums(examples, max_length)      # training: one Datum per row, with `segment_ids`
    tc.forward_backward(datums, "cross_entropy")       # the engine keeps each sequence to itself

    bins = pack_indices([len(t) for t, _ in examples], max_length)         # which examples share a row
    packed = pack_examples([examples[i] for i in bin_] ...)                 # tokens, targets, weights, ...
    lp_per_seq = packed_target_logprobs(model, packed)                     # == unpacked, per token

Features:
- `pack_indices`: first-fit decreasing (deterministic: ties keep input order) of input lengths
  (`len(tokens) - 1`, the next-token shift) into rows of at most `max_length` input tokens.
- `pack_examples`: per row `tokens_B_T`, `targets_B_T`, `weights_B_T`, `position_ids_B_T` (restart at 0 for
  each sequence) and `segment_ids_B_T` (-1 = padding), plus where each sequence sits.
- `block_causal_mask`: the `B x 1 x T x T` boolean mask (causal within a segment, nothing across), which
  Hugging Face models accept as `attention_mask` together with `position_ids`.
- `packed_target_logprobs`: the reference forward over a packed batch; its per-token logprobs equal the
  unpacked ones (tests/test_data_packing.py), so packing changes throughput, not the loss.
- `packed_datums`: the engine's form: one `Datum` per row (no padding inside it) whose `loss_fn_inputs`
  carry `target_tokens`, `weights` and `segment_ids` (0, 1, ... per sequence); `Engine.target_logprobs`
  (generic and fast path) turns them into a block-causal mask and per-sequence positions, so the loss and
  gradients of a packed batch are those of its sequences (tests/test_packing_train.py). `recipes/sft.py`
  packs each step's batch with it when `data.packing` is on.

Trade-off: packing bins each step's own batch (same examples, same order, same loss as unpacked: resume and
the seeded permutation are unaffected), so fewer forward rows, but not a global bin of the whole dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def pack_indices(lengths: list[int], max_length: int) -> list[list[int]]:
    """Example indices grouped into rows whose input lengths (`length - 1`) sum to at most `max_length`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        need = lengths[i] - 1
        if need > max_length:
            raise ValueError(f"example {i}: {need} input tokens exceed max_length={max_length}")
        for b, free in enumerate(room):
            if need <= free:
                bins[b].append(i)
                room[b] -= need
                break
        else:
            bins.append([i])
            room.append(max_length - need)
    return [sorted(b) for b in bins]


@dataclass
class PackedBatch:
    tokens_B_T: torch.Tensor
    targets_B_T: torch.Tensor
    weights_B_T: torch.Tensor
    position_ids_B_T: torch.Tensor
    segment_ids_B_T: torch.Tensor  # -1 on padding
    spans: list[tuple[int, int, int]]  # (row, start, length) of each input example, in input order


def pack_examples(examples: list[tuple[list[int], list[float]]], max_length: int, pad_id: int = 0,
                  bins: list[list[int]] | None = None) -> PackedBatch:
    """Pack (tokens, weights) examples (next-token shifted as in `datum_from_tokens_weights`) into rows."""
    bins = bins if bins is not None else pack_indices([len(t) for t, _ in examples], max_length)
    B, T = len(bins), max((sum(len(examples[i][0]) - 1 for i in b) for b in bins), default=0)
    tokens_B_T = torch.full((B, T), pad_id, dtype=torch.long)
    targets_B_T = torch.zeros((B, T), dtype=torch.long)
    weights_B_T = torch.zeros((B, T), dtype=torch.float32)
    position_ids_B_T = torch.zeros((B, T), dtype=torch.long)
    segment_ids_B_T = torch.full((B, T), -1, dtype=torch.long)
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(examples)
    for row, b in enumerate(bins):
        pos = 0
        for seg, i in enumerate(b):
            toks, w = examples[i]
            n = len(toks) - 1
            tokens_B_T[row, pos:pos + n] = torch.tensor(toks[:-1])
            targets_B_T[row, pos:pos + n] = torch.tensor(toks[1:])
            weights_B_T[row, pos:pos + n] = torch.tensor(w[1:], dtype=torch.float32)
            position_ids_B_T[row, pos:pos + n] = torch.arange(n)
            segment_ids_B_T[row, pos:pos + n] = seg
            spans[i] = (row, pos, n)
            pos += n
    return PackedBatch(tokens_B_T, targets_B_T, weights_B_T, position_ids_B_T, segment_ids_B_T, spans)


def block_causal_mask(segment_ids_B_T: torch.Tensor) -> torch.Tensor:
    """`B x 1 x T x T` bool: query t sees key s iff s <= t and both are in the same (non-padding) segment;
    a padding query sees itself only (a row of all-False makes softmax NaN). The engine's own mask."""
    from training_core.fast_train import block_causal_mask as engine_mask
    from training_core.fast_train import segment_runs

    return engine_mask(segment_runs(segment_ids_B_T))[:, None]


def packed_datums(examples: list[tuple[list[int], list[float]]], max_length: int,
                  bins: list[list[int]] | None = None) -> list[Any]:
    """(tokens, weights) examples packed into engine datums of at most `max_length` input tokens each.

    Each datum concatenates its examples' next-token-shifted inputs; `segment_ids` numbers them 0, 1, ...
    The sum of the datums' cross-entropy losses is the sum of the examples' (same tokens, same weights).
    """
    from training_core.types import Datum, ModelInput, TensorData

    bins = bins if bins is not None else pack_indices([len(t) for t, _ in examples], max_length)
    out = []
    for b in bins:
        toks: list[int] = []
        tgts: list[int] = []
        ws: list[float] = []
        segs: list[int] = []
        for seg, i in enumerate(b):
            t, w = examples[i]
            toks += t[:-1]
            tgts += t[1:]
            ws += w[1:]
            segs += [seg] * (len(t) - 1)
        out.append(Datum(model_input=ModelInput.from_ints(toks), loss_fn_inputs={
            "target_tokens": TensorData(data=[int(x) for x in tgts], dtype="int64", shape=[len(tgts)]),
            "weights": TensorData(data=[float(x) for x in ws], dtype="float32", shape=[len(ws)]),
            "segment_ids": TensorData(data=segs, dtype="int64", shape=[len(segs)])}))
    return out


def packed_target_logprobs(model: Any, packed: PackedBatch) -> list[torch.Tensor]:
    """Per-example target logprobs (input order) from one forward over the packed rows."""
    logits_B_T_V = model(input_ids=packed.tokens_B_T, attention_mask=block_causal_mask(packed.segment_ids_B_T),
                         position_ids=packed.position_ids_B_T).logits
    V = logits_B_T_V.shape[-1]
    lp_B_T = -torch.nn.functional.cross_entropy(logits_B_T_V.float().reshape(-1, V),
                                                packed.targets_B_T.reshape(-1), reduction="none"
                                                ).reshape(packed.targets_B_T.shape)
    return [lp_B_T[row, s:s + n] for row, s, n in packed.spans]


def packing_efficiency(lengths: list[int], max_length: int) -> dict[str, float]:
    """Rows and padding share unpacked (one example per row, padded to the longest) vs packed."""
    bins = pack_indices(lengths, max_length)
    real = sum(n - 1 for n in lengths)
    longest = max(n - 1 for n in lengths)
    return {"rows_unpacked": len(lengths), "rows_packed": len(bins),
            "pad_share_unpacked": 1 - real / (len(lengths) * longest),
            "pad_share_packed": 1 - real / (len(bins) * max(sum(lengths[i] - 1 for i in b) for b in bins))}
