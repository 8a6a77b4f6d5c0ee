"""Helpers shared by the prepare tests: tiny tokenizers with chat templates, built in milliseconds.

(No tests here; the file name keeps it within the prepare tests' files.)
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A template with a system role; special tokens around each turn, BOS first.
TEMPLATE_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# No system role (raises on one), plain-text role markers: the prompt/response boundary is ordinary text.
TEMPLATE_NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]:{% endif %}"
)
# The generation prompt "A" is the first letter of the rendered assistant turn "A<content>": a BPE merge crosses it.
TEMPLATE_MERGE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q {{ m['content'] }}\n{% else %}A{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A{% endif %}"
)

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Answer the question. Answer yes or no. Answer: yes. Answers are short.",
    "Rewrite the sentence in the past tense. The cat sat on the mat.",
    "List three fruits: apple, banana, cherry. Numbered lists and bullets.",
    "Compute 12 plus 7. The result is 19. system user assistant",
    "Please provide the input. Summarise the text in one line.",
] * 20


def make_tokenizer(template: str = TEMPLATE_SYSTEM, vocab_size: int = 400):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on a tiny corpus, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = template
    return fast


def save_tokenizer(folder: Path, template: str = TEMPLATE_SYSTEM) -> Path:
    tok = make_tokenizer(template)
    tok.save_pretrained(folder)
    return folder
