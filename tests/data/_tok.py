"""A tiny real tokenizer for the data tests: byte-level BPE trained in memory (decoding is exact),
with BOS added to plain text by its post-processor and a Jinja chat template. No downloads."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "The answer is 4. The answer is 5. What is two plus two? Hello there, how are you?",
    "Write a short poem about the sea. The sea is blue and deep and wide.",
    "Once upon a time there was a tiny model that learned to follow instructions.",
] * 3

# Every turn ends with EOS and a newline; the generation prompt is exactly what precedes an
# assistant message, so rendering the prompt is a token prefix of rendering the conversation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Broken: the generation prompt differs from what the full rendering writes before the answer.
BROKEN_TEMPLATE = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>\n", "{% if add_generation_prompt %}<|assistant|>:")


@functools.cache
def _backend() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return tok.to_str()


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    tok.chat_template = chat_template
    return tok
