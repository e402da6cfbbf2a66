"""Chat templates of model families, for tokenizers that ship none (Gemma 3's GGUF carries no template).

The instruct task uses the tokenizer's own template when it has one, else the template of its model family
when the family is known, else its documented default. A family is recognised by its turn markers: every
marker must be a single token of the tokenizer's vocabulary (a tokenizer that has them was trained with
them, and a template whose markers are not tokens would only teach the model to spell them). Each template
is written here from the family's published turn format; system messages are folded into the first user
turn where the family has no system role (Gemma).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyTemplate:
    name: str
    markers: tuple[str, ...]  # tokens the template needs, all in the vocabulary
    end_of_turn: str  # where a generated answer ends
    template: str  # Jinja, as transformers' apply_chat_template takes it


GEMMA = FamilyTemplate(
    "gemma", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>",
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}<start_of_turn>user\n{{ ns.system }}{{ m['content'] }}<end_of_turn>\n"
    "{% set ns.system = '' %}"
    "{% else %}<start_of_turn>model\n{{ m['content'] }}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
)

LLAMA3 = FamilyTemplate(
    "llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>",
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
)

CHATML = FamilyTemplate(  # Qwen2/Qwen3, SmolLM2 and others trained on ChatML
    "chatml", ("<|im_start|>", "<|im_end|>"), "<|im_end|>",
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
)

FAMILY_TEMPLATES = (GEMMA, LLAMA3, CHATML)


def _single_token(tokenizer, text: str) -> bool:
    vocab = tokenizer.get_vocab()
    return text in vocab or text in getattr(tokenizer, "all_special_tokens", ())


def family_template(tokenizer) -> FamilyTemplate | None:
    """The family template whose turn markers are all tokens of ``tokenizer``, else None."""
    for fam in FAMILY_TEMPLATES:
        if all(_single_token(tokenizer, m) for m in fam.markers):
            return fam
    return None
