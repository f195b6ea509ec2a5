"""The `deepseek` chat template (reference §5) as a list of segments, before any tokenizer or pixel is involved.

What the official processor tokenises (format_messages_v2), message by message:
  * bos, once, at the very start;
  * a `system` message (allowed only first): its stripped content, raw, with no role tag;
  * a user turn: "<|User|>: " + content.strip() + "\\n\\n<|Assistant|>:", split at every "<image>"; each text piece
    is encoded on its own (add_special_tokens=False) and each "<image>" becomes that image's run of image slots;
  * an assistant turn: its stripped content + eos (no role prefix: the previous user turn ended with it).
The official inference mode then drops the final eos, so a conversation ending with a user turn (or with an empty
assistant turn) ends right after "<|Assistant|>:", and a final non-empty assistant turn is a prefix of the answer
(no eos). Both endings are accepted here and give exactly the official ids.

Images are attached in one of two ways (not both in one call):
  * flat: `images=[...]` for the whole conversation, consumed in the order of the "<image>" tags (the official
    convention);
  * per message: a user message's own "images": [...] list, one per tag in that message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

USER_TAG = "<|User|>"
ASSISTANT_TAG = "<|Assistant|>"
IMAGE_TAG = "<image>"
USER_PREFIX = USER_TAG + ": "
USER_SUFFIX = "\n\n" + ASSISTANT_TAG + ":"

Role = Literal["system", "user", "assistant"]
_ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant",
                 USER_TAG: "user", ASSISTANT_TAG: "assistant"}  # the official examples use the tag strings


class TemplateError(ValueError):
    """A conversation the template cannot express (bad roles, tag/image count mismatch, ...)."""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    images: tuple[Any, ...] | None = None  # per-message images (user turns only); None = not given


@dataclass(frozen=True)
class Segment:
    """One piece of the prompt: text to encode, a special token, or the slots of one image."""

    kind: Literal["text", "bos", "eos", "image"]
    text: str = ""
    image_index: int = -1  # position in the conversation's image list (kind == "image")


@dataclass(frozen=True)
class Conversation:
    segments: tuple[Segment, ...]
    images: tuple[Any, ...] = field(default=())  # the image inputs, in tag order


def user_turn_text(content: str) -> str:
    """The text of one user turn as the model was trained on it."""
    return USER_PREFIX + content.strip() + USER_SUFFIX


def normalize_messages(messages: str | Iterable[Mapping[str, Any] | Message]) -> list[Message]:
    """Accept a plain prompt string (one user turn) or a list of {"role", "content", ["images"]} dicts."""
    if isinstance(messages, str):
        return [Message("user", messages)]
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TemplateError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        role = _ROLE_ALIASES.get(m["role"])
        if role is None:
            raise TemplateError(f"message {i}: unknown role {m['role']!r} (use 'system', 'user' or 'assistant')")
        if not isinstance(m["content"], str):
            raise TemplateError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
        images = m.get("images")
        out.append(Message(role, m["content"], None if images is None else as_image_list(images)))
    return out


def as_image_list(images: Any) -> tuple[Any, ...]:
    """A list of images; a single image (a path string, bytes, a PIL image, ...) given without a list is one."""
    if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Sequence):
        return (images,)
    return tuple(images)


def build_conversation(messages: str | Iterable[Mapping[str, Any] | Message], images: Any = None,
                       image_tag: str = IMAGE_TAG) -> Conversation:
    """Lay out the template's segments and match every image tag with its image (see module docstring)."""
    msgs = normalize_messages(messages)
    if not msgs:
        raise TemplateError("the conversation has no messages")
    if not any(m.role == "user" for m in msgs):
        raise TemplateError("the conversation has no user message")
    per_message = any(m.images is not None for m in msgs)
    if per_message and images is not None:
        raise TemplateError("images given both per message and as a flat list; use one or the other")

    segments: list[Segment] = [Segment("bos")]
    ordered: list[Any] = []
    n_tags_total = 0
    for i, m in enumerate(msgs):
        last = i == len(msgs) - 1
        if m.role == "system":
            if i != 0:
                raise TemplateError(f"message {i}: a system message is only allowed first")
            _no_images(m, i, image_tag)
            segments.append(Segment("text", m.content.strip()))
        elif m.role == "assistant":
            _no_images(m, i, image_tag)
            segments.append(Segment("text", m.content.strip()))
            if not last:  # the final assistant turn is the answer's prefix: inference mode drops its eos
                segments.append(Segment("eos"))
        else:
            text = user_turn_text(m.content)
            pieces = text.split(image_tag)
            n_tags = len(pieces) - 1
            if per_message:
                given = m.images or ()
                if len(given) != n_tags:
                    raise TemplateError(f"message {i}: {n_tags} {image_tag} tag(s) but {len(given)} image(s) "
                                        f"in its 'images'")
                ordered.extend(given)
            for k, piece in enumerate(pieces):
                segments.append(Segment("text", piece))
                if k < n_tags:
                    segments.append(Segment("image", image_index=n_tags_total))
                    n_tags_total += 1
    if not per_message:
        ordered = [] if images is None else list(as_image_list(images))
        if len(ordered) != n_tags_total:
            raise TemplateError(f"the conversation has {n_tags_total} {image_tag} tag(s) but {len(ordered)} "
                                f"image(s) were given")
    return Conversation(tuple(segments), tuple(ordered))


def _no_images(m: Message, i: int, image_tag: str) -> None:
    if image_tag in m.content:
        raise TemplateError(f"message {i}: {image_tag} is only allowed in user messages, not in {m.role!r} ones")
    if m.images:
        raise TemplateError(f"message {i}: a {m.role!r} message cannot carry images")


def render(conversation: Conversation, bos: str, eos: str, image_tag: str = IMAGE_TAG) -> str:
    """The prompt as text (for display and logs): special tokens spelled out, one image tag per image."""
    spelled = {"bos": bos, "eos": eos, "image": image_tag}
    return "".join(spelled.get(s.kind, s.text) for s in conversation.segments)
