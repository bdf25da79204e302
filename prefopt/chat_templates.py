"""Chat templates prefopt ships by name, for tokenizers that have none (``data.chat_template: chatml | llama3``,
``prefopt init-model --chat-template``), and the special tokens each one needs.

``chatml`` is Qwen2-Instruct's ChatML without its default system prompt: every turn is
``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the generation prompt is ``<|im_start|>assistant\\n``.
``llama3`` is Llama-3-Instruct's layout: ``{bos}`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}
<|eot_id|>`` per turn; the generation prompt is ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
"""Template text by name."""
SPECIAL_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"],
                  "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
"""The tokens each template writes that must be single (special) tokens of the tokenizer."""
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
"""The token that ends an assistant turn: generation stops there."""
