"""Multi-turn conversations: LLaVA-style records, the chat template, assistant-only targets.

A conversation is a list of turns (``system``, ``user``, ``assistant``) whose text may
hold ``<image>`` markers anywhere, one per image of the sample, in order. LLaVA's JSON
(``{"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}``)
reads as one; ``image`` may be one file name or a list, or absent for text-only turns.

**Chat template** (``ChatTemplate``, versioned, saved with the run's config): each turn is
its role marker, its text, then the end-of-turn marker; the conversation starts with bos
and ends with eos::

    <bos> <user> <image> what is in the picture ? <end_turn>
          <assistant> there are two shapes ... . <end_turn> ... <eos>

**Targets:** only the tokens of assistant turns after their role marker, *and* the
end-of-turn marker that closes them, are trained on (``targets`` is True there), so the
model learns to answer and to stop. Role markers, user and system text, images and the
final eos are context only.

Bad records raise ``BadSample("bad_record", ...)`` with the reason: a conversation with no
assistant turn, an unknown role, a marker count that differs from the image count, or
a turn that is not text; text the tokenizer cannot encode raises ``bad_text``. Records
come from the dataset: whatever they hold, nothing but ``BadSample`` leaves these
functions (a marker that is not one token is a configuration error: ``ValueError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from mm1_megatron.data.shards.records import encode_text
from mm1_megatron.data.shards.skips import BadSample
from mm1_megatron.data.tokenizers.base import Tokenizer

CHAT_TEMPLATE_VERSION = "mm1-chat-1"
ROLES = ("system", "user", "assistant")
IMAGE_MARKER = "<image>"
# LLaVA's "from" values (and the role names themselves) -> our roles.
LLAVA_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class ChatTemplate:
    """Role and end-of-turn markers; each must be one token of the run's tokenizer."""

    version: str = CHAT_TEMPLATE_VERSION
    system: str = "<system>"
    user: str = "<user>"
    assistant: str = "<assistant>"
    end_of_turn: str = "<end_turn>"

    def marker(self, role: str) -> str:
        return getattr(self, role)


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@dataclass(frozen=True)
class Conversation:
    turns: Tuple[Turn, ...]
    images: Tuple[str, ...]  # image names, in the order of the markers

    @property
    def num_image_markers(self) -> int:
        return sum(turn.text.count(IMAGE_MARKER) for turn in self.turns)


def parse_llava_record(record: Mapping[str, Any]) -> Conversation:
    """A LLaVA-style JSON object as a ``Conversation`` (``BadSample`` when malformed)."""
    turns_in = record.get("conversations")
    if not isinstance(turns_in, list) or not turns_in:
        raise BadSample("bad_record", "no 'conversations' list")
    images = record.get("image", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(name, str) for name in images):
        raise BadSample("bad_record", f"'image' must be a file name or a list of them: {images!r}")
    turns = []
    for index, turn in enumerate(turns_in):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise BadSample("bad_record", f"turn {index} has no text 'value'")
        speaker = turn.get("from")
        role = LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise BadSample(
                "bad_record",
                f"turn {index} has unknown role {turn.get('from')!r}; expected one of "
                f"{sorted(LLAVA_ROLES)}",
            )
        turns.append(Turn(role, turn["value"]))
    conversation = Conversation(tuple(turns), tuple(images))
    check_conversation(conversation)
    return conversation


def check_conversation(conversation: Conversation) -> None:
    if not any(turn.role == "assistant" for turn in conversation.turns):
        raise BadSample("bad_record", "the conversation has no assistant turn")
    markers = conversation.num_image_markers
    if markers != len(conversation.images):
        raise BadSample(
            "bad_record",
            f"{markers} {IMAGE_MARKER} markers for {len(conversation.images)} images",
        )


def template_token(tokenizer: Tokenizer, text: str) -> int:
    """The single token of a chat marker: a vocabulary entry of its own (subword
    tokenizers with ``piece_id``), else what ``encode`` makes of it."""
    piece_id = getattr(tokenizer, "piece_id", None)
    single = piece_id(text) if piece_id is not None else None
    if single is not None:
        return single
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(
            f"chat template marker {text!r} is {len(ids)} tokens for this tokenizer; each "
            "marker must be a single token (add it as a special token, or change "
            "data.chat_template)"
        )
    return ids[0]


def tokenize_conversation(
    conversation: Conversation, template: ChatTemplate, tokenizer: Tokenizer
) -> Tuple[List[int], List[bool]]:
    """Token ids (one ``image_token_id`` per image) and, per token, whether it is a target."""
    check_conversation(conversation)
    end_of_turn = template_token(tokenizer, template.end_of_turn)
    ids, targets = [tokenizer.bos_token_id], [False]
    for turn in conversation.turns:
        trained = turn.role == "assistant"
        text_ids = _text_ids(turn.text, tokenizer)
        ids += [template_token(tokenizer, template.marker(turn.role)), *text_ids, end_of_turn]
        targets += [False] + [trained and t != tokenizer.image_token_id for t in text_ids]
        targets.append(trained)
    ids.append(tokenizer.eos_token_id)
    targets.append(False)
    return ids, targets


def _text_ids(text: str, tokenizer: Tokenizer) -> List[int]:
    """Ids of ``text`` with each ``<image>`` marker as one ``image_token_id``."""
    ids: List[int] = []
    for index, piece in enumerate(text.split(IMAGE_MARKER)):
        if index > 0:
            ids.append(tokenizer.image_token_id)
        if piece.strip():
            ids += encode_text(tokenizer, piece.strip())
    return ids


def target_tokens(ids: Sequence[int], targets: Sequence[bool]) -> List[int]:
    """The trained tokens in order (for tests and logging)."""
    return [token for token, trained in zip(ids, targets) if trained]


def truncate_conversation(
    tokens: Sequence[int],
    trainable: Sequence[bool],
    *,
    max_length: int,
    max_images: int,
    image_token_id: int,
    num_image_tokens: int,
    end_of_turn_id: int,
    eos_id: int,
) -> Optional[Tuple[List[int], List[bool]]]:
    """The longest prefix of an (image-expanded) conversation that ends with a whole
    assistant turn, fits ``max_length`` tokens with an eos after it, and holds at most
    ``max_images`` images; ``None`` when not even the first answer fits. A cut falls only
    right after an assistant's end-of-turn token, so never inside an image."""
    best, image_tokens = None, 0
    for index, (token, flag) in enumerate(zip(tokens, trainable)):
        if token == image_token_id:
            image_tokens += 1
            if image_tokens > max_images * num_image_tokens:
                break
        if index + 2 > max_length:  # the prefix up to here, then eos
            break
        if token == end_of_turn_id and flag:
            best = index + 1
    if best is None:
        return None
    return [*tokens[:best], eos_id], [*trainable[:best], False]
