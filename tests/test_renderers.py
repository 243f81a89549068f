"""Renderers: parity with apply_chat_template, per-token weights, validation, datum shift, formatting.

References are independent of the renderer's char-offset logic: token parity is checked against
`tokenizer.apply_chat_template(tokenize=True)`, and expected weights are built from the token lengths of
`apply_chat_template(messages[:i], add_generation_prompt=True)` plus `encode(content) + [end-of-turn id]`.
"""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from training_core.presets import resolve_model_path
from training_core.renderers import (
    Renderer,
    TemplateNotPrefixStableError,
    TrainOnWhat,
    datum_from_tokens_weights,
    format_weighted_example,
    get_renderer,
    validate_supervised_batch,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5-style ChatML: injects a default system prompt when the conversation has none.
CHATML_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Meta-Llama-3-Instruct's template (BOS inside the template, content trimmed, <|eot_id|> ends a turn).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
    " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip

SYS = {"role": "system", "content": "You are terse. Answer with one sentence."}
CONVS: dict[str, list[dict[str, str]]] = {
    "single": [
        SYS,
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "It is 42."},
    ],
    "multi_sys": [
        SYS,
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sea."},
        {"role": "user", "content": "And a fruit?\nJust one."},
        {"role": "assistant", "content": "An apple — café naïve 日本."},
    ],
    "multi_nosys": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."},
    ],
    "ends_with_user": [
        SYS,
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Again?"},
    ],
}


def _ids(out: object) -> list[int]:
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)  # type: ignore[index]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    corpus = [
        "The quick brown fox jumps over the lazy dog. What is 12 + 30? It is 42. Name a colour and a fruit.",
        "User: hi\n\nAssistant: Hello there! One, two, three. You are welcome. Thanks. Say yes. Again?",
        "An apple, café naïve 日本. Blue, like the sea. You are terse. Answer with one sentence.",
    ] * 30
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _hf(bpe: Tokenizer, template: str | None, **kw: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), **kw)
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def toks(bpe: Tokenizer) -> dict[str, PreTrainedTokenizerFast]:
    chatml = _hf(bpe, CHATML, eos_token="<|im_end|>", pad_token="<|pad|>")
    qwen = _hf(bpe, CHATML_DEFAULT_SYSTEM, eos_token="<|im_end|>", pad_token="<|pad|>")
    # Llama-3: eos is <|end_of_text|>, so the renderer must find <|eot_id|> from the template itself; the
    # post-processor adds BOS like the real tokenizer does (the double-BOS trap).
    llama = _hf(bpe, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|pad|>")
    bos = llama.convert_tokens_to_ids("<|begin_of_text|>")
    llama.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    preset = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    return {"chatml": chatml, "qwen": qwen, "llama3": llama, "preset_tiny": preset}


END_TOKEN = {
    "chatml": "<|im_end|>",
    "qwen": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "preset_tiny": "<|im_end|>",
}
TEMPLATES = list(END_TOKEN)


def _expected_weights(
    tok: PreTrainedTokenizerFast, msgs: list[dict[str, str]], which: TrainOnWhat, end: str
) -> list[float]:
    full = _ids(tok.apply_chat_template(msgs, tokenize=True))
    w = [0.0] * len(full)
    asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    chosen = asst[-1:] if which == TrainOnWhat.LAST_ASSISTANT_MESSAGE else asst
    for i in chosen:
        start = len(_ids(tok.apply_chat_template(msgs[:i], tokenize=True, add_generation_prompt=True)))
        span = tok.encode(msgs[i]["content"].strip(), add_special_tokens=False) + [
            tok.convert_tokens_to_ids(end)
        ]
        assert full[start : start + len(span)] == span  # the reference itself is consistent
        w[start : start + len(span)] = [1.0] * len(span)
    return w


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("conv", list(CONVS))
def test_chat_template_parity_and_weights(toks: dict, template: str, conv: str) -> None:
    tok, msgs = toks[template], CONVS[conv]
    r = get_renderer("chat_template", tok)
    full_ids = _ids(tok.apply_chat_template(msgs, tokenize=True))
    for which in (TrainOnWhat.LAST_ASSISTANT_MESSAGE, TrainOnWhat.ALL_ASSISTANT_MESSAGES):
        tokens, weights = r.build_supervised_example(msgs, which)
        assert tokens == full_ids
        assert weights == _expected_weights(tok, msgs, which, END_TOKEN[template])
    tokens, weights = r.build_supervised_example(msgs, TrainOnWhat.ALL_MESSAGES)
    assert tokens == full_ids
    last_end = max(j for j, t in enumerate(tokens) if t == tok.convert_tokens_to_ids(END_TOKEN[template]))
    assert weights == [1.0] * (last_end + 1) + [0.0] * (len(tokens) - last_end - 1)
    # Generation prompt parity; its tokens are a prefix of the training tokens when the last turn is the user's.
    gen = r.build_generation_prompt(msgs).to_ints()
    assert gen == _ids(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
    prompt = r.build_generation_prompt(msgs[:-1]).to_ints()
    if msgs[-1]["role"] == "assistant":
        assert tokens[: len(prompt)] == prompt
        # The weighted completion parses back to the assistant message with a clean stop.
        _, last_w = r.build_supervised_example(msgs, TrainOnWhat.LAST_ASSISTANT_MESSAGE)
        completion = [t for t, w in zip(tokens, last_w, strict=True) if w]
        assert last_w.index(1.0) == len(prompt)
        msg, ok = r.parse_response(completion)
        assert ok and msg == {"role": "assistant", "content": msgs[-1]["content"].strip()}
    validate_supervised_batch(
        [r.build_supervised_example(msgs, w) for w in TrainOnWhat], r.get_stop_sequences()
    )


def test_weighted_span_is_content_plus_eot_not_header(toks: dict) -> None:
    msgs = CONVS["single"]
    for template, expected in [
        ("chatml", "It is 42.<|im_end|>"),
        ("llama3", "It is 42.<|eot_id|>"),
    ]:
        tok = toks[template]
        tokens, weights = get_renderer("chat_template", tok).build_supervised_example(msgs)
        weighted = [t for t, w in zip(tokens, weights, strict=True) if w]
        assert tok.decode(weighted) == expected
    # Llama-3: exactly one BOS although the tokenizer's post-processor would add a second one.
    llama = toks["llama3"]
    bos = llama.convert_tokens_to_ids("<|begin_of_text|>")
    tokens, _ = get_renderer("chat_template", llama).build_supervised_example(msgs)
    assert tokens[0] == bos and tokens.count(bos) == 1
    assert llama(llama.apply_chat_template(msgs, tokenize=False))["input_ids"].count(bos) == 2


def test_stop_tokens_discovered_from_template(toks: dict) -> None:
    llama, chatml = toks["llama3"], toks["chatml"]
    eot, eotext = llama.convert_tokens_to_ids("<|eot_id|>"), llama.convert_tokens_to_ids("<|end_of_text|>")
    assert isinstance(get_renderer("chat_template", llama), Renderer)
    assert isinstance(get_renderer("role_colon", llama), Renderer)
    assert get_renderer("chat_template", llama).get_stop_sequences() == [eot, eotext]
    assert get_renderer("chat_template", chatml).get_stop_sequences() == [
        chatml.convert_tokens_to_ids("<|im_end|>")
    ]


def test_parse_response_chat_template(toks: dict) -> None:
    tok = toks["chatml"]
    r = get_renderer("chat_template", tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    body = tok.encode("Blue, like the sea.", add_special_tokens=False)
    assert r.parse_response(body + [im_end]) == (
        {"role": "assistant", "content": "Blue, like the sea."},
        True,
    )
    assert r.parse_response(body) == ({"role": "assistant", "content": "Blue, like the sea."}, False)
    assert r.parse_response(body + [im_end] + body)[0]["content"] == "Blue, like the sea."


def test_not_prefix_stable_template_is_rejected(bpe: Tokenizer) -> None:
    # Rewrites non-final assistant turns (as reasoning templates that drop past thinking do).
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
        "[old]{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = _hf(bpe, template, eos_token="<|im_end|>")
    msgs = CONVS["multi_sys"][:3] + [{"role": "user", "content": "more"}]
    with pytest.raises(TemplateNotPrefixStableError, match="prefix-stable"):
        get_renderer("chat_template", tok).build_supervised_example(msgs, TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    with pytest.raises(ValueError, match="no chat_template"):
        get_renderer("chat_template", _hf(bpe, None, eos_token="<|im_end|>"))
    with pytest.raises(ValueError, match=r"messages\[1\] has no 'content'"):
        get_renderer("chat_template", _hf(bpe, CHATML, eos_token="<|im_end|>")).build_supervised_example(
            [SYS, {"role": "user"}]
        )
    with pytest.raises(ValueError, match="unknown renderer"):
        get_renderer("nope", tok)


def test_role_colon_round_trip(bpe: Tokenizer) -> None:
    tok = _hf(bpe, None, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    r = get_renderer("role_colon", tok)
    msgs = CONVS["multi_sys"]
    tokens, weights = r.build_supervised_example(msgs, TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tokens[0] == bos and weights[0] == 0.0
    assert tok.decode(tokens[1:]) == (
        "System: You are terse. Answer with one sentence.\n\nUser: Name a colour.\n\nAssistant: Blue, like the sea."
        "\n\nUser: And a fruit?\nJust one.\n\nAssistant: An apple — café naïve 日本.\n\nUser:"
    )
    assert format_weighted_example(tokens, weights, tok, color=False).count("[[") == 2
    runs = re.findall(r"\[\[(.*?)\]\]", format_weighted_example(tokens, weights, tok, color=False), re.S)
    assert runs == [" Blue, like the sea.\n\nUser:", " An apple — café naïve 日本.\n\nUser:"]
    # The generation prompt is the exact token prefix of the final turn; the completion parses back.
    prompt = r.build_generation_prompt(msgs[:-1]).to_ints()
    assert tokens[: len(prompt)] == prompt and tok.decode(prompt).endswith("\n\nAssistant:")
    completion = tokens[len(prompt) :]
    assert r.parse_response(completion) == ({"role": "assistant", "content": msgs[-1]["content"]}, True)
    body = tok.encode(" An apple", add_special_tokens=False)
    assert r.parse_response(body) == ({"role": "assistant", "content": "An apple"}, False)
    assert r.parse_response(body + [bos]) == ({"role": "assistant", "content": "An apple"}, True)
    assert r.get_stop_strings() == ["\n\nUser:"] and r.get_stop_sequences() == [bos]
    # LAST_ASSISTANT: only the final turn plus its "User:" tail; all variants pass validation.
    tokens, weights = r.build_supervised_example(msgs)
    assert re.findall(r"\[\[(.*?)\]\]", format_weighted_example(tokens, weights, tok, color=False), re.S) == [
        " An apple — café naïve 日本.\n\nUser:"
    ]
    examples = [r.build_supervised_example(msgs, w) for w in TrainOnWhat]
    validate_supervised_batch(examples, r.get_end_of_turn_sequences())


def test_validation_names_bad_examples(toks: dict) -> None:
    tok = toks["chatml"]
    r = get_renderer("chat_template", tok)
    eos = r.get_stop_sequences()
    good = r.build_supervised_example(CONVS["multi_sys"], TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    no_asst = r.build_supervised_example([SYS, {"role": "user", "content": "hi"}])
    assert not any(no_asst[1])
    with pytest.raises(ValueError, match=r"example 1 \('row-17'\): all \d+ weights are zero"):
        validate_supervised_batch([good, no_asst], eos, names=["row-3", "row-17"])
    with pytest.raises(ValueError, match="example 1: all"):
        validate_supervised_batch([good, no_asst], eos)
    # The classic pad == eos bug: a collator masks every token equal to pad, which is also the EOS.
    tokens, weights = good
    masked = [0.0 if t == tok.eos_token_id else w for t, w in zip(tokens, weights, strict=True)]
    first_eos_weighted = next(
        j for j, (t, w) in enumerate(zip(tokens, weights, strict=True)) if w and t in eos
    )
    with pytest.raises(
        ValueError, match=rf"example 0 \('chat-a'\).*position {first_eos_weighted}.*masked out"
    ):
        validate_supervised_batch([(tokens, masked)], eos, names=["chat-a"])
    # Only the second turn's EOS masked: still caught.
    second = max(j for j, t in enumerate(tokens) if t in eos and weights[j])
    one_masked = list(weights)
    one_masked[second] = 0.0
    with pytest.raises(ValueError, match=f"position {second}"):
        validate_supervised_batch([good, (tokens, one_masked)], eos)
    # Truncated before the EOS: the weighted turn never ends.
    with pytest.raises(ValueError, match="never followed"):
        validate_supervised_batch([(tokens[:second], weights[:second])], eos)
    with pytest.raises(ValueError, match="pad_token_id"):
        validate_supervised_batch([good], eos, pad_token_id=tok.eos_token_id)
    validate_supervised_batch([good], eos, pad_token_id=tok.pad_token_id)


def test_datum_shift_and_truncation(toks: dict) -> None:
    tok = toks["chatml"]
    tokens, weights = get_renderer("chat_template", tok).build_supervised_example(CONVS["single"])
    d = datum_from_tokens_weights(tokens, weights)
    inp = d.model_input.to_ints()
    tgt = d.loss_fn_inputs["target_tokens"].to_torch()
    w = d.loss_fn_inputs["weights"].to_torch()
    assert inp == tokens[:-1] and tgt.tolist() == tokens[1:] and w.tolist() == weights[1:]
    assert tgt.dtype == torch.int64 and w.dtype == torch.float32 and list(w.shape) == [len(tokens) - 1]
    # Input position i predicts target i == tokens[i + 1]: the weighted targets are exactly content + EOS.
    assert (
        tok.decode([t for t, x in zip(tgt.tolist(), w.tolist(), strict=True) if x]) == "It is 42.<|im_end|>"
    )
    d10 = datum_from_tokens_weights(tokens, weights, max_length=10)
    assert d10.model_input.to_ints() == tokens[:9]
    assert d10.loss_fn_inputs["target_tokens"].tolist() == tokens[1:10]
    assert d10.loss_fn_inputs["weights"].tolist() == weights[1:10]
    with pytest.raises(ValueError, match="differ in length"):
        datum_from_tokens_weights(tokens, weights[:-1])


def test_format_weighted_example(toks: dict) -> None:
    tok = toks["chatml"]
    msgs = CONVS["single"]
    tokens, weights = get_renderer("chat_template", tok).build_supervised_example(msgs)
    prompt_text = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    plain = format_weighted_example(tokens, weights, tok, color=False)
    assert plain == prompt_text + "[[It is 42.<|im_end|>]]\n"
    colored = format_weighted_example(tokens, weights, tok)
    assert colored.count("\x1b[1;32m") == 1
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == tok.apply_chat_template(msgs, tokenize=False)


def test_header_content_straddle_warns(bpe: Tokenizer) -> None:
    # The generation prompt ends in a space that BPE merges into the content's first token when training.
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = _hf(bpe, template, eos_token="<|im_end|>")
    msgs = CONVS["single"]
    prompt = _ids(tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True))
    full = _ids(tok.apply_chat_template(msgs, tokenize=True))
    assert full[: len(prompt)] != prompt  # the mismatch is real for this template
    with pytest.warns(UserWarning, match="spans the end of the assistant header"):
        tokens, weights = get_renderer("chat_template", tok).build_supervised_example(msgs)
    assert tokens == full
    assert tok.decode([t for t, w in zip(tokens, weights, strict=True) if w]) == " It is 42.<|im_end|>"
