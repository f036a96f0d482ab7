"""A caller's Jinja template runs sandboxed: no reach into Python internals, a clear error instead."""

from __future__ import annotations

import pytest

from tuneyard.data.tokenize import EncodeError, encode_conversation

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('id') }}",
    "{{ messages.__class__.__base__ }}",
    "{% set x = messages.append(1) %}",
])
def test_hostile_templates_are_refused(tiny_tokenizer, payload):
    template = payload + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(EncodeError, match="chat template failed"):
        encode_conversation(tiny_tokenizer, ROW, template=template)
