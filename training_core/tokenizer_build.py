"""Deterministic corpus + byte-level BPE tokenizer for the random-init presets.

The corpus is generated from a seeded RNG (no downloads): English-ish sentences, pseudo-words, numbers,
arithmetic and ChatML-formatted turns, so the learned merges cover what the demo tasks look like.
Digits are always split one per token (as Llama 3 / Qwen do) so arithmetic is not hidden inside
arbitrary multi-digit merges.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]  # ids 0..3, in this order

# ChatML, as Qwen2/SmolLM2 use it; `add_generation_prompt` opens an assistant turn.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the a an of to and in is it you that he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal house point "
    "page letter mother answer found study still learn should world high every near add food between own "
    "below country plant last school father keep tree never start city earth eye light thought head under "
    "story saw left few while along might close something seem next hard open example begin life always "
    "those both paper together got group often run important until children side feet car mile night walk "
    "white sea began grow took river four carry state once book hear stop without second later miss idea "
    "enough eat face watch far really almost let above girl sometimes mountain cut young talk soon list "
    "song being leave family sum total plus minus times digits reverse sort copy letters question result"
).split()
_ONSETS = "b c d f g h j k l m n p r s t v w z br ch cl cr dr fl fr gr pl pr sh sl st str th tr wh".split()
_VOWELS = "a e i o u ai ea ee oo ou ie".split()
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "nt"]
_PROMPTS = [
    "What is {a}{op}{b}?",
    "Compute {a} {op} {b}.",
    "Reverse the digits {d}.",
    "Sort these letters: {l}",
    "Copy this: {w}",
    "How many {w} are there?",
]


def _pseudo_word(rng: random.Random) -> str:
    n_syll = rng.choice([1, 1, 2, 2, 2, 3])
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syll))


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS) if rng.random() < 0.7 else _pseudo_word(rng)


def _sentence(rng: random.Random) -> str:
    words = [_word(rng) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 10 ** rng.randint(1, 4))))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!", ","])


def random_prose(rng: random.Random) -> str:
    """One to three sentences of the corpus' prose (the replay data of models built on this corpus)."""
    return " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))


def _user_prompt(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return rng.choice(_PROMPTS).format(
        a=a,
        b=b,
        op=rng.choice(["+", "-", "*"]),
        d=" ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))),
        l=" ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6))),
        w=_word(rng),
    )


def generate_corpus(seed: int, n_lines: int) -> list[str]:
    """Seeded lines of text: prose, arithmetic and ChatML turns (deterministic for a given seed)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.55:
            lines.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 3))))
        elif r < 0.75:
            a, b = rng.randint(0, 9999), rng.randint(0, 9999)
            lines.append(f"{a} + {b} = {a + b}. {a}-{b}={a - b}. Answer: {a + b}")
        else:
            user, reply = _user_prompt(rng), _sentence(rng)
            if rng.random() < 0.5:
                reply = f"Answer: {rng.randint(0, 2000)}"
            lines.append(f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{reply}{IM_END}\n{ENDOFTEXT}")
    return lines


def train_bpe(corpus: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with digits split one per token and the four special tokens at ids 0..3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tokenizer(
    vocab_size: int, corpus_seed: int, n_lines: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Train the BPE and wrap it as a HF fast tokenizer with the ChatML template."""
    tok = train_bpe(generate_corpus(corpus_seed, n_lines), vocab_size)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=[ENDOFTEXT, IM_START],
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    return hf_tok
