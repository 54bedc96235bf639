"""Deterministic result images: real PNGs drawn with Pillow from prompt, seed and index.

Emulators call `render_png` off their event loop (`asyncio.to_thread`): a render takes tens of
milliseconds, and requests held up meanwhile would be counted together against the rate limit,
as a burst the client never sent."""

from __future__ import annotations

import hashlib
import io
import random

from PIL import Image, ImageDraw


def render_png(prompt: str, seed: int, width: int, height: int, index: int = 0,
               init_image: bytes | None = None) -> bytes:
    """A `width` x `height` PNG that depends only on the arguments. A prompt containing
    ``[[blank]]`` gives a uniform grey image, as a failed generation sometimes does."""
    if "[[blank]]" in prompt:
        out = io.BytesIO()
        Image.new("RGB", (width, height), (128, 128, 128)).save(out, format="PNG")
        return out.getvalue()
    rng = random.Random(hashlib.sha256(f"{prompt}|{seed}|{index}".encode()).digest())
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    mask = Image.linear_gradient("L").resize((width, height))
    image = Image.composite(Image.new("RGB", (width, height), colour()),
                            Image.new("RGB", (width, height), colour()), mask)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(width // 8, width // 2), y0 + rng.randrange(height // 8, height // 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour(), outline=colour(), width=max(1, width // 256))
    if init_image is not None:
        with Image.open(io.BytesIO(init_image)) as init:
            image = Image.blend(image, init.convert("RGB").resize((width, height)), 0.5)
        draw = ImageDraw.Draw(image)
    draw.text((8, 8), f"{prompt[:60]} #{seed}/{index}", fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
