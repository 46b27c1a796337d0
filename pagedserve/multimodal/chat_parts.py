"""OpenAI-style message content with images -> what a chat template renders, and the images.

A message's content may be a list of parts: {"type": "text", "text": ...},
{"type": "image_url", "image_url": {"url": ...}} (OpenAI's), or vLLM's offline
{"type": "image_pil", "image_pil": PIL image}. Image parts become {"type": "image"}, which
LLaVA-style templates render as the model's placeholder where the part stands; text parts stay
as they are. Messages without images keep their text as one string (the templates of text
models want strings)."""

from __future__ import annotations

from typing import Any

from pagedserve.errors import ParamError

_IMAGE_TYPES = ("image_url", "image_pil", "image")


def split_images(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """(messages for the template, image sources in order of appearance)."""
    out: list[dict] = []
    images: list[Any] = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        if not any(isinstance(p, dict) and p.get("type") in _IMAGE_TYPES for p in content):
            out.append({**msg, "content": "".join(_text_of(p) for p in content)})
            continue
        parts = []
        for p in content:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "image_url":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ParamError("messages", "an image_url part needs {'image_url': {'url': ...}}.")
                images.append(url)
                parts.append({"type": "image"})
            elif kind in ("image_pil", "image"):
                if p.get(kind) is None:
                    raise ParamError("messages", f"an {kind} part needs the image under {kind!r}.")
                images.append(p[kind])
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": _text_of(p)})
        out.append({**msg, "content": parts})
    return out, images


def _text_of(part: Any) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise ParamError("messages", f"unsupported message content part {kind!r} (text and image_url are accepted).")
