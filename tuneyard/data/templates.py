"""Built-in chat templates (Jinja, rendered by ``tokenizer.apply_chat_template``) and template resolution.

A job names its template in ``DataSpec.template``:

* ``None`` (or ``"auto"``, ``"default"``, ``"tokenizer"``): the tokenizer's own chat template; a tokenizer
  without one gets ``DEFAULT_TEMPLATE`` (ChatML, which is what most open instruction-tuned models use);
* a built-in name (``BUILTIN_TEMPLATES``, case-insensitive, a few aliases such as ``qwen``);
* anything else containing Jinja syntax is the template itself.

Every built-in template is prefix-stable: rendering the first k messages (with the generation prompt
when message k+1 is the assistant's) gives a prefix of rendering them all. ``tokenize.py`` relies on
that to find the assistant tokens without ``{% generation %}`` markers. The assistant's end-of-turn
marker is part of the assistant message; whatever separates turns belongs to the next turn, so the
model is not taught to emit it. Templates without tool support raise on tool calls instead of
silently training an empty answer.
"""

from __future__ import annotations

from typing import Any

# Tool-call arguments: tokenize.py passes them as objects (the Hugging Face convention); a string is kept.
_ARGS = ("{%- if tc.arguments is string %}{{- tc.arguments }}"
         "{%- else %}{{- tc.arguments | tojson }}{%- endif %}")

CHATML = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message.role == 'system' and tools) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content }}"
    "{%- if message.tool_calls %}"
    "{%- for call in message.tool_calls %}{%- set tc = call.function if call.function is defined else call %}"
    "{%- if loop.first and not message.content %}{{- '<tool_call>\\n' }}{%- else %}{{- '\\n<tool_call>\\n' }}"
    "{%- endif %}"
    "{{- '{\"name\": \"' + tc.name + '\", \"arguments\": ' }}" + _ARGS + "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5-Instruct's published template (default system prompt, Hermes-style tool calls).
QWEN2_5 = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}{%- set tc = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tc.name }}{{- '\", \"arguments\": ' }}" + _ARGS
    + "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3 / 3.1 turns; tools are described in the system turn and calls are JSON (Llama 3.1 style),
# tool results come back in the "ipython" role.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content | trim + '\\n\\n' }}{%- endif %}"
    "{{- 'You have access to the following functions. To call a function, respond with JSON of the form "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{%- if not loop.last %}{{- '\\n\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if loop.first and message.role == 'system' and tools %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for call in message.tool_calls %}{%- set tc = call.function if call.function is defined else call %}"
    "{{- '{\"name\": \"' + tc.name + '\", \"parameters\": ' }}" + _ARGS + "{{- '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
    "{{- message.content | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral-Instruct v0.2 turns; a system message is put before the first user message (not the last one,
# as later Mistral templates do, which would rewrite earlier turns and break prefix stability).
MISTRAL = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}{{- raise_exception('the mistral template takes one system message, first') }}"
    "{%- endif %}"
    "{%- elif message.role == 'user' %}"
    "{{- '[INST] ' }}"
    "{%- if loop.index0 == 1 and messages[0].role == 'system' %}"
    "{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- message.content + ' [/INST]' }}"
    "{%- elif message.role == 'assistant' and not message.tool_calls %}"
    "{{- message.content }}{{- eos_token }}"
    "{%- else %}"
    "{{- raise_exception('the mistral template supports system, user and assistant messages only, "
    "without tool calls') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

ALPACA = (
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '\\n\\n### Instruction:\\n' + message.content }}"
    "{%- elif message.role == 'assistant' and not message.tool_calls %}"
    "{{- '\\n\\n### Response:\\n' + message.content }}{{- eos_token }}"
    "{%- elif not (message.role == 'system' and loop.first) %}"
    "{{- raise_exception('the alpaca template supports one system message, user and assistant messages "
    "only, without tool calls') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\\n\\n### Response:\\n' }}{%- endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "qwen2.5": QWEN2_5, "mistral": MISTRAL,
                     "alpaca": ALPACA}
TEMPLATE_ALIASES = {
    "chatml": "chatml", "llama3": "llama3", "llama-3": "llama3", "llama3.1": "llama3", "llama-3.1": "llama3",
    "qwen2.5": "qwen2.5", "qwen2_5": "qwen2.5", "qwen-2.5": "qwen2.5", "qwen2": "qwen2.5", "qwen": "qwen2.5",
    "mistral": "mistral", "alpaca": "alpaca",
}
# What a tokenizer without a chat template gets.
DEFAULT_TEMPLATE = "chatml"
# Names that mean "the tokenizer's own template" (ms-swift, which Simplismart follows, says "default").
OWN_TEMPLATE_NAMES = ("auto", "default", "tokenizer")


def _wants_own(template: str | None) -> bool:
    return template is None or not template.strip() or template.strip().lower() in OWN_TEMPLATE_NAMES


def builtin_template(name: str) -> str | None:
    """The Jinja source of a built-in template by name or alias, or None."""
    key = TEMPLATE_ALIASES.get(name.strip().lower())
    return BUILTIN_TEMPLATES[key] if key else None


def _is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template (its default one when it has several), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        return None


def template_problem(template: str | None) -> str | None:
    """Why ``template`` names no template (None when it does); needs no tokenizer, so a submit can check it."""
    if _wants_own(template) or builtin_template(template or "") is not None or _is_jinja(template or ""):
        return None
    names = ", ".join(BUILTIN_TEMPLATES)
    return (f"unknown chat template '{template}': give a built-in name ({names}), 'default' for the "
            "tokenizer's own, or a Jinja template")


def resolve_template(tokenizer: Any, template: str | None = None) -> str:
    """The Jinja source to render with: the tokenizer's (or the default), a built-in, or ``template``."""
    problem = template_problem(template)
    if problem is not None:
        raise ValueError(problem)
    if _wants_own(template):
        return tokenizer_template(tokenizer) or BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
    return builtin_template(template or "") or template or ""


def template_label(tokenizer: Any, template: str | None = None) -> str:
    """A short name for the template a job uses, for reports: a built-in name, "tokenizer" or "custom"."""
    if _wants_own(template):
        return "tokenizer" if tokenizer_template(tokenizer) else DEFAULT_TEMPLATE
    key = TEMPLATE_ALIASES.get((template or "").strip().lower())
    return key or "custom"
