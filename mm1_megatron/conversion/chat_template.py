"""The run's chat template (``data.conversations.chat_template``) in the exported tokenizer.

``tokenizer.apply_chat_template(messages)`` in plain ``transformers`` then gives exactly
the ids of training's ``tokenize_conversation`` (``data/shards/conversations.py``)::

    <bos> <user> <image> how many shapes ? <end_turn> <assistant> ... <end_turn> <eos>

- each turn is its role marker, its text and the end-of-turn marker; the text is cut at
  its ``<image>`` markers and every piece is stripped of surrounding whitespace, as
  training tokenizes each piece on its own;
- ``content`` may be a string or a list of parts (``{"type": "text", "text": ...}`` /
  ``{"type": "image"}``), joined by newlines, an image part standing for ``<image>``;
- the conversation ends with eos, or, with ``add_generation_prompt=True``, with the
  assistant marker instead, for ``generate()`` to answer (the model closes its answer
  with the end-of-turn marker, so the exported generation config stops there too).

The template writes no whitespace between markers and text, and every marker, bos, eos
and ``<image>`` is an added special token of the exported tokenizer (at the id training
used): the text between them is then tokenized piece by piece, as training does.
"""

from __future__ import annotations

import re
from typing import Dict

from mm1_megatron.config.schema import ChatTemplateConfig
from mm1_megatron.conversion.errors import ConversionError
from mm1_megatron.data.shards.conversations import (
    CHAT_TEMPLATE_VERSION,
    IMAGE_MARKER,
    ROLES,
    template_token,
)

_TEMPLATE = r"""{%- set markers = MARKERS -%}
{{- BOS -}}
{%- for message in messages -%}
    {%- if message['role'] not in markers -%}
        {{- raise_exception('unknown role ' ~ message['role'] ~ ': VERSION has roles ROLES') -}}
    {%- endif -%}
    {%- if message['content'] is string -%}
        {%- set text = message['content'] -%}
    {%- else -%}
        {%- set joined = namespace(text='') -%}
        {%- for part in message['content'] -%}
            {%- if not loop.first -%}{%- set joined.text = joined.text ~ '\n' -%}{%- endif -%}
            {%- if part['type'] == 'text' -%}
                {%- set joined.text = joined.text ~ part['text'] -%}
            {%- elif part['type'] == 'image' -%}
                {%- set joined.text = joined.text ~ IMAGE -%}
            {%- else -%}
                {{- raise_exception('content parts must be text or image, not ' ~ part['type']) -}}
            {%- endif -%}
        {%- endfor -%}
        {%- set text = joined.text -%}
    {%- endif -%}
    {{- markers[message['role']] -}}
    {%- for piece in text.split(IMAGE) -%}
        {%- if not loop.first -%}{{- IMAGE -}}{%- endif -%}
        {{- piece | trim -}}
    {%- endfor -%}
    {{- END_TURN -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- ASSISTANT -}}{%- else -%}{{- EOS -}}{%- endif -%}
"""


def _literal(text: str, field: str) -> str:
    if not text or re.search(r"['\\{}%#\s]", text):
        raise ConversionError(
            f"{field}={text!r} cannot go into the exported Jinja chat template (quotes, "
            "backslashes, braces, % or # and whitespace are not allowed); choose a marker "
            "without them"
        )
    return f"'{text}'"


def chat_template_jinja(template: ChatTemplateConfig, *, bos: str, eos: str) -> str:
    """The Jinja ``chat_template`` of ``template`` (version ``mm1-chat-1``)."""
    if template.version != CHAT_TEMPLATE_VERSION:
        raise ConversionError(
            f"data.conversations.chat_template.version={template.version!r}: this exporter "
            f"writes {CHAT_TEMPLATE_VERSION!r} templates only"
        )
    field = "data.conversations.chat_template"
    markers = ", ".join(
        f"'{role}': {_literal(getattr(template, role), f'{field}.{role}')}" for role in ROLES
    )
    values = {
        "MARKERS": "{" + markers + "}",
        "BOS": _literal(bos, "the bos token"),
        "EOS": _literal(eos, "the eos token"),
        "IMAGE": _literal(IMAGE_MARKER, "the image marker"),
        "END_TURN": _literal(template.end_of_turn, f"{field}.end_of_turn"),
        "ASSISTANT": _literal(template.assistant, f"{field}.assistant"),
        "VERSION": CHAT_TEMPLATE_VERSION,
        "ROLES": ", ".join(ROLES),
    }
    return re.sub("|".join(values), lambda match: values[match.group(0)], _TEMPLATE)


def marker_ids(template: ChatTemplateConfig, tokenizer) -> Dict[str, int]:
    """Each marker's id in training's tokenizer (``template_token``), plus ``<image>``."""
    markers = {role: getattr(template, role) for role in ROLES}
    markers["end_of_turn"] = template.end_of_turn
    try:
        ids = {marker: template_token(tokenizer, marker) for marker in markers.values()}
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    ids[IMAGE_MARKER] = tokenizer.image_token_id
    return ids


def add_chat_template(hf, template: ChatTemplateConfig, tokenizer) -> None:
    """Make the markers, bos, eos and ``<image>`` added special tokens of ``hf`` (the
    exported ``transformers`` tokenizer) at training's ids, and set its chat template."""
    expected = marker_ids(template, tokenizer)
    expected[hf.convert_ids_to_tokens(tokenizer.bos_token_id)] = tokenizer.bos_token_id
    expected[hf.convert_ids_to_tokens(tokenizer.eos_token_id)] = tokenizer.eos_token_id
    add_special_tokens(hf, expected)
    hf.chat_template = chat_template_jinja(
        template,
        bos=hf.convert_ids_to_tokens(tokenizer.bos_token_id),
        eos=hf.convert_ids_to_tokens(tokenizer.eos_token_id),
    )


def add_special_tokens(hf, expected: Dict[str, int]) -> None:
    """Make each token of ``expected`` an added special token of ``hf`` (so text around it
    never merges with it) and check it keeps training's id."""
    from transformers import AddedToken

    hf.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in expected],
        special_tokens=True,
    )
    for token, token_id in expected.items():
        if hf.convert_tokens_to_ids(token) != token_id:
            raise ConversionError(
                f"special token {token!r} has id {hf.convert_tokens_to_ids(token)} in "
                f"the exported tokenizer but {token_id} in training"
            )
