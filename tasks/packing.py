"""Sequence packing: short examples share one `max_length` row, each attending only to itself.

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

Engine status: training_core's `Engine.target_logprobs` builds a 2-D padding mask and no position ids, and
`fast_train` has its own causal attention, so the training loop cannot send packed rows yet; the engine change
is to read `segment_ids` from a datum's `loss_fn_inputs` (optional) and, when present, pass
`attention_mask=block_causal_mask(segment_ids_B_T)` and `position_ids=positions(segment_ids_B_T)` to the model
(and a block mask to `fast_train._attention`). Until then this module is the data-layer half, with parity.
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
    """`B x 1 x T x T` bool: query t sees key s iff s <= t and both are in the same (non-padding) segment."""
    T = segment_ids_B_T.shape[1]
    causal_T_T = torch.ones((T, T), dtype=torch.bool).tril()
    same_B_T_T = segment_ids_B_T[:, :, None] == segment_ids_B_T[:, None, :]
    real_B_T = segment_ids_B_T >= 0
    mask_B_T_T = causal_T_T[None] & same_B_T_T & real_B_T[:, None, :]
    # a padding query attends to itself only (a row of all-False makes softmax NaN)
    mask_B_T_T |= torch.eye(T, dtype=torch.bool)[None] & ~real_B_T[:, :, None]
    return mask_B_T_T[:, None]


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
