"""training_core.sampler: logprob contract, Tinker stop semantics, seeds, HF parity, peft, prompt logprobs.

References are independent of the sampler: a plain full-sequence ``model(...)`` forward for logprobs, HF
``generate`` for greedy tokens, prefix decoding with the tokenizer for stop strings, and scipy's chi-square
test for the sampling distribution.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from training_core import sampler as sampler_mod
from training_core import sampling_decoders
from training_core.sampler import SampledSequenceWithSamplingLogprobs, prompt_logprobs, sample_batch
from training_core.sampling_decoders import FusedDecoder, HFDecoder, make_decoder
from training_core.sampling_ops import TokenSelector, UniformStreams, filter_top_k_, filter_top_p_
from training_core.types import SamplingParams

CORPUS = [
    "the cat sat on the mat. the dog ate the bone.",
    "User: what is two plus two?\n\nAssistant: four.\n\n",
    "tokens, logprobs and stop strings; seeds make samples repeatable!",
] * 20
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 3], [60, 61, 62, 63]]  # different lengths: left padding


def _tiny(
    config_cls: type = LlamaConfig, vocab: int = 300, max_pos: int = 128, **kw: object
) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        initializer_range=0.2,
        **kw,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF initialises norm weights to 1; make them matter (the sampler folds them)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning threads make
    # every op slower; restore the setting for the other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    return _tiny(vocab=len(tokenizer))


def _forward_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Reference: log_softmax of one unpadded full-sequence forward, gathered at the sampled tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    lp = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def _greedy(model: torch.nn.Module, prompts: list[list[int]], n: int) -> list[list[int]]:
    out = sample_batch(
        model, prompts, SamplingParams(max_tokens=n, temperature=0.0, stop=[]), eos_token_ids=[]
    )
    return [g[0].tokens for g in out]


# -- the logprob contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=12, seed=3, stop=[]),
        SamplingParams(max_tokens=12, seed=3, stop=[], temperature=0.7, top_k=20, top_p=0.9),
        SamplingParams(max_tokens=12, stop=[], temperature=0.0),
    ],
    ids=["t1", "t0.7-topk-topp", "greedy"],
)
def test_logprobs_equal_forward_logprobs(model: torch.nn.Module, params: SamplingParams) -> None:
    out = sample_batch(model, PROMPTS, params, num_samples=2, eos_token_ids=[])
    assert [len(g) for g in out] == [2, 2, 2]
    for prompt, group in zip(PROMPTS, out, strict=True):
        for seq in group:
            assert len(seq.tokens) == len(seq.logprobs) == 12 and seq.stop_reason == "length"
            ref = _forward_logprobs(model, prompt, seq.tokens)
            torch.testing.assert_close(torch.tensor(seq.logprobs), ref, atol=1e-4, rtol=0)


def _reference_sampling_logprobs(
    logits_TV: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """Independent numpy version of temperature -> top-k -> top-p, returned as log-probabilities."""
    out = []
    for row in logits_TV.double().numpy() / temperature:
        keep = row >= np.sort(row)[-top_k]
        p = np.exp(row - row.max()) * keep
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep2 = np.zeros_like(keep)
        keep2[order[(before < top_p) & (p[order] > 0)]] = True
        q = p * keep2
        with np.errstate(divide="ignore"):
            out.append(np.log(q / q.sum()))
    return np.stack(out)


def test_sampling_logprobs_differ_from_logprobs_under_temperature(model: torch.nn.Module) -> None:
    params = SamplingParams(max_tokens=10, seed=7, stop=[], temperature=0.7, top_k=20, top_p=0.9)
    out = sample_batch(model, PROMPTS[:2], params, eos_token_ids=[], sampling_logprobs=True)
    for prompt, (seq,) in zip(PROMPTS[:2], out, strict=True):
        assert isinstance(seq, SampledSequenceWithSamplingLogprobs)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + seq.tokens])).logits[0, len(prompt) - 1 : -1]
        ref = _reference_sampling_logprobs(logits, 0.7, 20, 0.9)[np.arange(len(seq.tokens)), seq.tokens]
        assert np.isfinite(ref).all()  # every sampled token lies inside the top-k / nucleus support
        np.testing.assert_allclose(seq.sampling_logprobs, ref, atol=1e-4)
        # the reported logprobs are the untempered ones, which differ under temperature 0.7
        assert np.abs(np.array(seq.logprobs) - ref).max() > 1e-2
    plain = sample_batch(
        model,
        PROMPTS[:1],
        SamplingParams(max_tokens=5, seed=1, stop=[]),
        eos_token_ids=[],
        sampling_logprobs=True,
    )[0][0]
    assert plain.sampling_logprobs == plain.logprobs  # temperature 1, no truncation: the same distribution
    greedy = sample_batch(
        model,
        PROMPTS[:1],
        SamplingParams(max_tokens=4, temperature=0.0),
        eos_token_ids=[],
        sampling_logprobs=True,
    )[0][0]
    assert greedy.sampling_logprobs == [0.0] * 4


# -- decoders: fused path equals the HF forward on each supported family, fallback equals fused --------------
@pytest.mark.parametrize("config_cls", [LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config])
def test_fused_decoder_logits_equal_hf_forward(config_cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampling_decoders, "_FIRST_ALLOC_NEW_TOKENS", 1)  # force the cache to grow mid-decode
    m = _tiny(config_cls)
    ids = torch.zeros(2, 5, dtype=torch.long)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    ids[0], valid[0] = torch.tensor([4, 8, 15, 16, 23]), True
    ids[1, 3:], valid[1, 3:] = torch.tensor([42, 7]), True
    new = [[9, 10, 11], [12, 13, 14]]
    with torch.inference_mode():
        dec = make_decoder(m, max_positions=16, capacity=8)
        assert isinstance(dec, FusedDecoder)
        got = [dec.prefill(ids, valid)]
        assert dec.k_cache[0].shape[2] == 6
        pos = valid.sum(1)
        for t in range(3):
            got.append(dec.step(torch.tensor([new[0][t], new[1][t]]), pos + t))
        assert dec.k_cache[0].shape[2] == 8
        for r, prompt in enumerate([[4, 8, 15, 16, 23], [42, 7]]):
            ref = m(torch.tensor([prompt + new[r]])).logits[0, len(prompt) - 1 :]
            torch.testing.assert_close(torch.stack([g[r] for g in got]), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config, Qwen3Config])
def test_fused_decoder_bf16_as_close_to_fp32_as_hf_bf16(config_cls: type) -> None:
    """bf16 weights: prepacked bf16 projections, fp32 attention; as accurate as HF's own bf16 forward."""
    m32 = _tiny(config_cls)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    prompts, new = [[4, 8, 15, 16, 23], [42, 7]], [[9, 10, 11], [12, 13, 14]]
    ids = torch.zeros(2, 5, dtype=torch.long)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    ids[0], valid[0] = torch.tensor(prompts[0]), True
    ids[1, 3:], valid[1, 3:] = torch.tensor(prompts[1]), True
    with torch.inference_mode():
        dec = make_decoder(m16, max_positions=16, capacity=8)
        assert isinstance(dec, FusedDecoder) and dec.dtype == torch.bfloat16
        assert dec.k_cache == [] and dec.attn_dtype == torch.float32
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            assert dec.layers[0].qkv.packed is not None
        got = [dec.prefill(ids, valid)]
        pos = valid.sum(1)
        for t in range(3):
            got.append(dec.step(torch.tensor([new[0][t], new[1][t]]), pos + t))
        assert got[-1].dtype == torch.bfloat16
        for r, prompt in enumerate(prompts):
            seq = torch.tensor([prompt + new[r]])
            ref32 = m32(seq).logits[0, len(prompt) - 1 :].log_softmax(-1)
            hf16 = m16(seq).logits[0, len(prompt) - 1 :].float().log_softmax(-1)
            ours = torch.stack([g[r] for g in got]).float().log_softmax(-1)
            err_ours, err_hf = (ours - ref32).abs().mean(), (hf16 - ref32).abs().mean()
            assert err_ours < 0.05 and err_ours <= 1.5 * err_hf + 1e-3, (float(err_ours), float(err_hf))


def test_hf_fallback_gives_the_same_samples(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(max_tokens=10, seed=11, stop=[], temperature=0.9, top_p=0.95)
    fused = sample_batch(model, PROMPTS, params, num_samples=2, eos_token_ids=[])
    monkeypatch.setattr(sampling_decoders, "FusedDecoder", _raise_unsupported)
    assert isinstance(sampling_decoders.make_decoder(model, 16, 16), HFDecoder)
    hf = sample_batch(model, PROMPTS, params, num_samples=2, eos_token_ids=[])
    for gf, gh in zip(fused, hf, strict=True):
        for sf, sh in zip(gf, gh, strict=True):
            assert sf.tokens == sh.tokens
            np.testing.assert_allclose(sf.logprobs, sh.logprobs, atol=1e-4)


def test_unsupported_architecture_uses_hf_fallback() -> None:
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(
            vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    ).eval()
    assert isinstance(make_decoder(gpt2, 16, 16), HFDecoder)
    out = sample_batch(gpt2, PROMPTS, SamplingParams(max_tokens=6, seed=1, stop=[]), eos_token_ids=[])
    for prompt, (seq,) in zip(PROMPTS, out, strict=True):
        ref = _forward_logprobs(gpt2, prompt, seq.tokens)
        torch.testing.assert_close(torch.tensor(seq.logprobs), ref, atol=1e-4, rtol=0)


def _raise_unsupported(*args: object, **kwargs: object) -> None:
    raise sampling_decoders.Unsupported("forced fallback in test")


def test_greedy_matches_hf_generate_and_top_k_1(model: torch.nn.Module) -> None:
    ours = _greedy(model, PROMPTS, 15)
    for prompt, toks in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=15,
                min_new_tokens=15,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :]
        assert toks == ref.tolist()
    top1 = sample_batch(
        model, PROMPTS, SamplingParams(max_tokens=15, seed=5, top_k=1, stop=[]), eos_token_ids=[]
    )
    assert [g[0].tokens for g in top1] == ours


# -- stops, lengths, validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("force_fallback", [False, True], ids=["fused", "hf-fallback"])
def test_stop_token_ids_and_eos(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, force_fallback: bool
) -> None:
    if force_fallback:
        monkeypatch.setattr(sampling_decoders, "FusedDecoder", _raise_unsupported)
    free = _greedy(model, PROMPTS, 20)
    stop_id = free[0][2]  # stops prompt 0 at its 3rd token; other rows run on (batch compaction)

    def expected(seq: list[int], ids: set[int]) -> tuple[list[int], str]:
        for i, t in enumerate(seq):
            if t in ids:
                return seq[: i + 1], "stop"
        return seq, "length"

    greedy = {"max_tokens": 20, "temperature": 0.0}
    by_eos = sample_batch(model, PROMPTS, SamplingParams(**greedy), eos_token_ids=[stop_id])
    by_ids = sample_batch(model, PROMPTS, SamplingParams(**greedy, stop=[stop_id]), eos_token_ids=[999])
    for prompt, seq, ge, gi in zip(PROMPTS, free, by_eos, by_ids, strict=True):
        toks, reason = expected(seq, {stop_id})
        for g in (ge, gi):
            assert (g[0].tokens, g[0].stop_reason) == (toks, reason)
            ref = _forward_logprobs(model, prompt, g[0].tokens)
            torch.testing.assert_close(torch.tensor(g[0].logprobs), ref, atol=1e-4, rtol=0)
    assert by_eos[0][0].tokens[-1] == stop_id  # the stop token is included
    # stop=[] disables EOS too; a list of ints replaces EOS rather than adding to it
    none = sample_batch(model, PROMPTS[:1], SamplingParams(**greedy, stop=[]), eos_token_ids=[stop_id])[0][0]
    other = sample_batch(model, PROMPTS[:1], SamplingParams(**greedy, stop=[998]), eos_token_ids=[stop_id])[
        0
    ][0]
    assert none.tokens == other.tokens == free[0] and none.stop_reason == other.stop_reason == "length"


def test_stop_strings(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    free = _greedy(model, PROMPTS[:1], 30)[0]
    target = tokenizer.decode(free[4:7])
    assert target

    def first_completion(stop: str) -> int:
        return next(i for i in range(len(free)) if stop in tokenizer.decode(free[: i + 1]))

    for stop in (target, [target[-3:] or target, "never-generated-\u00e9"]):
        params = SamplingParams(max_tokens=30, temperature=0.0, stop=stop)
        seq = sample_batch(model, PROMPTS[:1], params, eos_token_ids=[], tokenizer=tokenizer)[0][0]
        s = stop if isinstance(stop, str) else stop[0]
        k = first_completion(s)
        assert seq.tokens == free[: k + 1] and seq.stop_reason == "stop"
        assert s in tokenizer.decode(seq.tokens) and s not in tokenizer.decode(seq.tokens[:-1])
    miss = SamplingParams(max_tokens=30, temperature=0.0, stop="never-generated-\u00e9")
    seq = sample_batch(model, PROMPTS[:1], miss, eos_token_ids=[], tokenizer=tokenizer)[0][0]
    assert seq.tokens == free and seq.stop_reason == "length"
    with pytest.raises(ValueError, match="tokenizer"):
        sample_batch(model, PROMPTS[:1], SamplingParams(max_tokens=3, stop="x"), eos_token_ids=[])


def test_max_tokens_and_validation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    assert sample_batch(model, PROMPTS, SamplingParams(max_tokens=0), eos_token_ids=[]) == [
        [sampler_mod.SampledSequence("length", [], [])] for _ in PROMPTS
    ]
    small = _tiny(vocab=len(tokenizer), max_pos=24)
    long_prompt = list(range(1, 21))
    seq = sample_batch(small, [long_prompt, [1, 2]], SamplingParams(seed=0, stop=[]), eos_token_ids=[])
    assert [len(g[0].tokens) for g in seq] == [4, 4]  # max_tokens None: up to the context (24 - 20)
    with pytest.raises(ValueError, match=r"prompts\[1\].*exceeds the model context"):
        sample_batch(small, [[1], long_prompt], SamplingParams(max_tokens=5), eos_token_ids=[])
    vocab = len(tokenizer)
    with pytest.raises(ValueError, match=rf"prompts\[1\]\[2\] = {vocab} is not a token id"):
        sample_batch(model, [[1, 2], [3, 4, vocab]], SamplingParams(max_tokens=2), eos_token_ids=[])
    with pytest.raises(ValueError, match=r"prompts\[0\]\[1\] = -1"):
        sample_batch(model, [[1, -1]], SamplingParams(max_tokens=2), eos_token_ids=[])
    with pytest.raises(ValueError, match="empty"):
        sample_batch(model, [[]], SamplingParams(max_tokens=2), eos_token_ids=[])
    for bad in (
        SamplingParams(max_tokens=2, top_p=0.0),
        SamplingParams(max_tokens=2, temperature=-1.0),
        SamplingParams(max_tokens=2, top_k=-2),
        SamplingParams(max_tokens=2, stop=[1, "a"]),
    ):
        with pytest.raises(ValueError):
            sample_batch(model, [[1]], bad, eos_token_ids=[], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="num_samples"):
        sample_batch(model, [[1]], SamplingParams(max_tokens=2), 0, eos_token_ids=[])


# -- seeds ---------------------------------------------------------------------------------------------------
def test_seed_reproducibility_and_batch_independence(model: torch.nn.Module) -> None:
    params = SamplingParams(max_tokens=16, seed=1234, stop=[])
    a = sample_batch(model, PROMPTS, params, num_samples=3, eos_token_ids=[])
    b = sample_batch(model, PROMPTS, params, num_samples=3, eos_token_ids=[])
    assert [[s.tokens for s in g] for g in a] == [[s.tokens for s in g] for g in b]
    assert len({tuple(s.tokens) for s in a[0]}) == 3  # the samples of one prompt differ
    # the same prompt + seed alone, or batched with other prompts in another order, gives the same tokens
    alone = sample_batch(model, [PROMPTS[1]], params, num_samples=3, eos_token_ids=[])
    swapped = sample_batch(model, [PROMPTS[2], PROMPTS[1]], params, num_samples=3, eos_token_ids=[])
    assert [s.tokens for s in alone[0]] == [s.tokens for s in a[1]] == [s.tokens for s in swapped[1]]
    other = sample_batch(model, PROMPTS, SamplingParams(max_tokens=16, seed=4321, stop=[]), eos_token_ids=[])
    assert other[0][0].tokens != a[0][0].tokens
    r1, r2 = (
        sample_batch(model, PROMPTS[:1], SamplingParams(max_tokens=16, stop=[]), eos_token_ids=[])
        for _ in range(2)
    )
    assert r1[0][0].tokens != r2[0][0].tokens  # seed None: nondeterministic
    state = torch.get_rng_state()
    sample_batch(model, PROMPTS[:1], params, eos_token_ids=[])
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


# -- the sampling distribution -------------------------------------------------------------------------------
def test_token_distribution_matches_softmax_with_top_k_top_p() -> None:
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 40_000
    uniforms = UniformStreams(list(range(n)), 1)  # one stream per row, as in sample_batch
    for temperature, top_k, top_p in [(1.0, -1, 1.0), (0.5, 5, 1.0), (1.3, -1, 0.8)]:
        sel = TokenSelector(temperature, top_k, top_p, uniforms, want_sampling_logprob=False)
        toks, _, _ = sel(logits.expand(n, -1), 0)
        counts = np.bincount(toks.numpy(), minlength=8)
        p = np.exp(
            _reference_sampling_logprobs(logits[None], temperature, top_k if top_k > 0 else 8, top_p)[0]
        )
        assert counts[p == 0].sum() == 0  # nothing outside the top-k / nucleus support
        support = p > 0
        _, pval = stats.chisquare(counts[support], n * p[support])
        assert pval > 1e-3, (temperature, top_k, top_p, counts, p)


def test_filters_keep_the_right_sets() -> None:
    s = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(filter_top_k_(s.clone(), 2)).tolist() == [[False, True, False, True]]
    probs = s.softmax(-1)[0]  # 0.644, 0.087, 0.237, 0.032
    assert probs[0] < 0.7 < probs[0] + probs[2] < 0.95
    assert torch.isinf(filter_top_p_(s.clone(), 0.7)).tolist() == [[False, True, False, True]]
    assert torch.isinf(filter_top_p_(s.clone(), 0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_top_p_(s.clone(), 1.0)).any()


# -- peft and prompt logprobs --------------------------------------------------------------------------------
def test_peft_wrapped_model(tokenizer: PreTrainedTokenizerFast) -> None:
    from peft import LoraConfig, get_peft_model

    base = _tiny(vocab=len(tokenizer))
    base_out = sample_batch(
        base, PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, stop=[]), eos_token_ids=[]
    )
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.5,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base, cfg)
    peft_model.train()  # the sampler must switch dropout off and restore the mode
    params = SamplingParams(max_tokens=8, seed=2, stop=[], temperature=0.8)
    out = sample_batch(peft_model, PROMPTS, params, num_samples=2, eos_token_ids=[])
    assert peft_model.training
    peft_model.eval()
    for prompt, group in zip(PROMPTS, out, strict=True):
        for seq in group:
            ref = _forward_logprobs(peft_model, prompt, seq.tokens)
            torch.testing.assert_close(torch.tensor(seq.logprobs), ref, atol=1e-4, rtol=0)
    lora_greedy = sample_batch(
        peft_model, PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, stop=[]), eos_token_ids=[]
    )
    assert [g[0].tokens for g in lora_greedy] != [g[0].tokens for g in base_out]  # the adapter is applied


def test_prompt_logprobs(model: torch.nn.Module) -> None:
    tokens = [5, 17, 33, 2, 90, 41, 7]
    lps, top = prompt_logprobs(model, tokens, topk=3)
    assert lps[0] is None and len(lps) == len(tokens)
    ref = _forward_logprobs(model, tokens[:1], tokens[1:])
    torch.testing.assert_close(torch.tensor(lps[1:]), ref, atol=1e-5, rtol=0)
    assert top is not None and top[0] is None and len(top) == len(tokens)
    with torch.no_grad():
        full = model(torch.tensor([tokens])).logits[0].log_softmax(-1)
    for i in range(1, len(tokens)):
        vals, ids = full[i - 1].topk(3)
        assert [t for t, _ in top[i]] == ids.tolist()
        np.testing.assert_allclose([v for _, v in top[i]], vals.numpy(), atol=1e-5)
    assert prompt_logprobs(model, tokens)[1] is None
    with pytest.raises(ValueError, match=r"tokens\[0\]\[1\]"):
        prompt_logprobs(model, [1, 10**6])


# -- bench helper --------------------------------------------------------------------------------------------
def test_merge_results_read_modify_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import common
    from bench.common import merge_results, print_table

    path = tmp_path / "results.json"
    monkeypatch.setattr(common, "DEFAULT_RESULTS", str(path))
    merge_results({"a": 1.5}, path)
    merge_results({"b": 2, "a": 2.5}, path)
    assert merge_results("eval", {"speedup": 3.0}) == path  # (section, figures) form, as bench_eval calls it
    data = json.loads(path.read_text())
    assert data["a"] == 2.5 and data["b"] == 2 and data["eval"] == {"speedup": 3.0}
    assert set(data["_meta"]["measured_at"]) == {"a", "b", "eval"} and "cpu_count" in data["_meta"]["machine"]
    assert "impl" in print_table([{"impl": "x", "tok/s": 1.0}])
