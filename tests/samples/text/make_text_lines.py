#!/usr/bin/env python3
"""Renders the text-line samples for models/ppocr-textline-orientation: one printed line of
English text, black on white, 384x96 (the classifier's 4:1 aspect, so the worker's stretch
resize to 192x48 keeps the glyphs' shape), upright and turned by 180 degrees. Our own work, CC0.

Uses only Pillow and the font built into it (ImageFont.load_default, Pillow >= 10.1 with
FreeType), so no system font is involved:

    python3 tests/samples/text/make_text_lines.py [--out DIR]     # default: tests/samples/text/

Made with Pillow 13.0.0; other versions may rasterise a pixel differently (harmless: the known
answers in tests/known_answers.json hold with a wide margin).
"""

import argparse
import os

from PIL import Image, ImageDraw, ImageFont

TEXT = "Hello, world"
SIZE = (384, 96)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    img = Image.new("RGB", SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    # The largest size whose line fits in the width less a 16-pixel margin each side.
    size = 60
    while True:
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = draw.textbbox((0, 0), TEXT, font=font)
        if right - left <= SIZE[0] - 32 and bottom - top <= SIZE[1] - 16:
            break
        size -= 1
    x = (SIZE[0] - (right - left)) // 2 - left
    y = (SIZE[1] - (bottom - top)) // 2 - top
    draw.text((x, y), TEXT, fill=(0, 0, 0), font=font)
    img.save(os.path.join(args.out, "text_upright.png"), optimize=True)
    img.transpose(Image.Transpose.ROTATE_180).save(
        os.path.join(args.out, "text_rotated180.png"), optimize=True)


if __name__ == "__main__":
    main()
