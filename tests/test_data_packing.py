"""Packing: packed rows give the same per-token logprobs as one example per row (no cross-contamination)."""

from __future__ import annotations

import pytest
import torch

from tasks.packing import (
    block_causal_mask,
    pack_examples,
    pack_indices,
    packed_target_logprobs,
    packing_efficiency,
)


@pytest.fixture(scope="module")
def model_and_examples():
    from transformers import AutoModelForCausalLM

    from flows.preflight import load_tokenizer
    from training_core.model_loading import resolve
    from training_core.renderers import TrainOnWhat, get_renderer

    tok = load_tokenizer("tiny")
    model = AutoModelForCausalLM.from_pretrained(resolve("tiny")).eval()
    r = get_renderer("chat_template", tok)
    convs = [[{"role": "user", "content": "x " * (1 + 3 * i)}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(7)]
    return model, [r.build_supervised_example(c, TrainOnWhat.LAST_ASSISTANT_MESSAGE) for c in convs]


def test_pack_indices_fills_rows_without_exceeding_max_length() -> None:
    lengths = [9, 3, 5, 2, 7, 4]  # input lengths are length - 1: 8, 2, 4, 1, 6, 3
    bins = pack_indices(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] - 1 for i in b) <= 10 for b in bins)
    assert bins == [[0, 1], [2, 4], [3, 5]]  # first-fit decreasing (8+2, 6+4, 3+1), deterministic
    with pytest.raises(ValueError, match="example 0: 11 input tokens exceed max_length=10"):
        pack_indices([12], 10)
    eff = packing_efficiency(lengths, 10)
    assert (eff["rows_unpacked"], eff["rows_packed"]) == (6, 3) and eff["pad_share_packed"] < eff["pad_share_unpacked"]


def test_block_mask_never_crosses_sequences() -> None:
    seg_B_T = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(seg_B_T)[0, 0]
    assert m[3].tolist() == [False, False, True, True, False, False]  # token 3 sees 2..3 of its own sequence
    assert m[1].tolist() == [True, True, False, False, False, False]
    assert m[5].tolist() == [False] * 5 + [True]  # padding sees itself only (no NaN row)


def test_packed_and_unpacked_logprobs_are_equal(model_and_examples) -> None:
    model, examples = model_and_examples
    max_len = max(len(t) for t, _ in examples) + 12
    packed = pack_examples(examples, max_len)
    assert packed.tokens_B_T.shape[0] < len(examples)  # something actually shares a row
    with torch.no_grad():
        lp_packed = packed_target_logprobs(model, packed)
        for i, (toks, w) in enumerate(examples):
            logits_T_V = model(input_ids=torch.tensor([toks[:-1]])).logits[0]
            lp_ref_T = torch.log_softmax(logits_T_V.float(), -1).gather(1, torch.tensor(toks[1:])[:, None])[:, 0]
            assert lp_packed[i].shape == lp_ref_T.shape
            torch.testing.assert_close(lp_packed[i], lp_ref_T, atol=2e-5, rtol=1e-5)
            row, s, n = packed.spans[i]
            assert packed.weights_B_T[row, s:s + n].tolist() == w[1:]  # loss weights travel with their tokens
    # the same batch with a plain causal mask (what packing without boundaries would do) differs
    with torch.no_grad():
        leak = model(input_ids=packed.tokens_B_T, position_ids=packed.position_ids_B_T).logits
    second = next(i for i, (row, s, _) in enumerate(packed.spans) if s > 0)
    row, s, n = packed.spans[second]
    lp_leak = torch.log_softmax(leak[row, s:s + n].float(), -1).gather(
        1, packed.targets_B_T[row, s:s + n, None])[:, 0]
    assert (lp_leak - lp_packed[second]).abs().max() > 1e-3
