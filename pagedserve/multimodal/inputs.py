"""What a prompt's images become before the engine sees them, and where images come from."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pagedserve.errors import ParamError

# A fetched or decoded image larger than this is refused (a 4K RGB PNG is ~25 MB raw, far less encoded).
MAX_IMAGE_BYTES = 32 << 20
FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ImageFeature:
    """One image of a prompt: the run of placeholder tokens it fills and its pixels."""

    offset: int  # the first placeholder's position in the prompt
    length: int  # the image's span of placeholder tokens (the vision encoder's rows, unless embed_rows)
    # As the model's image processor made them, float32: [3, H, W] (LLaVA), its tiles
    # [n, 3, H, W] (LLaVA-NeXT), or the image's flattened patches [t * h * w, C * patch volume]
    # (Qwen2-VL) with their grid.
    pixel_values: torch.Tensor
    hash: str  # of the pixels: the key of the prefix cache and of the runner's encoder cache
    grid_thw: Optional[tuple[int, int, int]] = None  # (time, height, width) in patches (Qwen2-VL)
    # Positions within the span that take the encoder's rows, in order; None: all of them. (Mistral
    # 3 puts an [IMG_BREAK] token after each row of patches: plain tokens inside the span.)
    embed_rows: Optional[tuple[int, ...]] = None
    # The image's own (height, width) before resizing (LLaVA-NeXT: its tiles' padding is cut by it).
    image_size: Optional[tuple[int, int]] = None
    # Embeddings given by the caller (engine/prompt_embeds.py): pixel_values are the rows
    # themselves [length, hidden], taken as they are, with no encoder.
    precomputed: bool = False

    @property
    def num_embeds(self) -> int:
        """The encoder's output rows for this image."""
        return self.length if self.embed_rows is None else len(self.embed_rows)

    @staticmethod
    def pixel_hash(pixels: torch.Tensor, grid_thw: Optional[tuple[int, ...]] = None) -> str:
        t = pixels.detach().to("cpu", torch.float32).contiguous()
        h = hashlib.sha256(str((tuple(t.shape), grid_thw)).encode())
        h.update(t.numpy().tobytes())
        return h.hexdigest()


def load_image(source: Any, field: str = "image") -> Any:
    """A PIL image from a PIL image, raw bytes, a `data:image/...;base64,` URL or an http(s)
    URL (fetched with a timeout and a size limit); anything else is a ParamError."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, str):
        if source.startswith("data:"):
            head, _, payload = source.partition(",")
            if not head.endswith(";base64") or not payload:
                raise ParamError(field, "an image data URL must be 'data:image/<type>;base64,<data>'.")
            try:
                source = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ParamError(field, "the image data URL is not valid base64.") from None
        elif source.startswith(("http://", "https://")):
            source = _fetch(source, field)
        else:
            raise ParamError(field, "an image URL must be a data: URL or an http(s) URL "
                             f"(got {source[:40]!r}).")
    if isinstance(source, (bytes, bytearray)):
        if len(source) > MAX_IMAGE_BYTES:
            raise ParamError(field, f"the image is larger than {MAX_IMAGE_BYTES >> 20} MB.")
        try:
            img = Image.open(io.BytesIO(source))
            img.load()
        except Exception as e:  # PIL raises several types for undecodable data
            raise ParamError(field, f"could not decode the image: {e}") from None
        return img
    raise ParamError(field, f"an image must be a PIL image, bytes or a URL, got {type(source).__name__}.")


def _fetch(url: str, field: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as r:
            data = r.read(MAX_IMAGE_BYTES + 1)
    except Exception as e:  # URLError, HTTPError, timeouts, bad hosts
        raise ParamError(field, f"could not fetch the image at {url[:200]!r}: {e}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ParamError(field, f"the image at {url[:200]!r} is larger than {MAX_IMAGE_BYTES >> 20} MB.")
    return data
