"""Chat templates that `make-model` writes into tokenizer_config.json, one per model family.

Each spells the prompt format its family's chat models were trained on (as their model cards publish
it), written here as our own Jinja: DeepSeek-MoE and DeepSeek-V2 ("User: ...\\n\\nAssistant: ..."),
DeepSeek-V3 (its <｜User｜>/<｜Assistant｜> tokens), Mixtral ([INST] ... [/INST]), Phi-3.5-MoE
(<|user|> ... <|end|>) and Qwen2-MoE (ChatML). Roles are system, user and assistant; anything else is
refused by the template. Rendered by `router_service.chat_template` (and by transformers, identically).
"""

from __future__ import annotations

_ROLES_CHECK = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role ' ~ m['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}{% endfor %}"
)

# DeepSeek-MoE chat and DeepSeek-V2 chat: a system prompt, then "User: " / "Assistant: " turns, each
# assistant turn closed by eos; the generation prompt is "Assistant:".
_DEEPSEEK = _ROLES_CHECK + (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# DeepSeek-V3: the system prompt first, then turns marked by its role tokens.
_DEEPSEEK_V3 = _ROLES_CHECK + (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

# Mixtral instruct: user turns in [INST] ... [/INST], assistant turns closed by eos; it has no system
# role, so a system prompt opens the first user turn.
_MIXTRAL = _ROLES_CHECK + (
    "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join('\n\n') %}"
    "{{ bos_token }}"
    "{% set first = namespace(user=true) %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}"
    "{% set text = (system + '\n\n' + m['content']) if (first.user and system) else m['content'] %}"
    "{% set first.user = false %}"
    "{{ '[INST] ' + text + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Phi-3.5-MoE instruct: every turn is <|role|>, a newline, the text and <|end|>.
_PHIMOE = _ROLES_CHECK + (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Qwen2-MoE chat (Qwen1.5-MoE-A2.7B-Chat): ChatML, with Qwen's default system prompt when none is given.
_QWEN2_MOE = _ROLES_CHECK + (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {  # config.json model_type -> template
    "deepseek": _DEEPSEEK,
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK_V3,
    "mixtral": _MIXTRAL,
    "phimoe": _PHIMOE,
    "qwen2_moe": _QWEN2_MOE,
}
