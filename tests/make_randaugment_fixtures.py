"""Regenerate tests/data/randaugment_timm.npz: timm 0.4.12's own RandAugment ops, as the MUST
release builds them.

Dev-only: the tests never import this file or timm; they only read what it writes. It needs timm
0.4.12 in an environment OUTSIDE the project (timm is not a project dependency), on top of the
system torch/Pillow:

    python -m venv --system-site-packages /tmp/venv-ref
    /tmp/venv-ref/bin/pip install --no-deps timm==0.4.12
    /tmp/venv-ref/bin/python tests/make_randaugment_fixtures.py

The transform is the one the release's build_dataset.py gets from timm.data.create_transform
(is_training, auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', CLIP's mean/std), so the
hparams (fill color, resampling filter, translate percentage) are timm's own. Each of its 15 ops is
run through timm's AugmentOp with prob 1 and no magnitude noise, at fixed magnitudes, with timm's
sign draw (random.random() > 0.5 negates) forced to each outcome. The fixture holds the input
images, every output, and the metadata the test checks the project's constants against.

timm's PosterizeIncreasing asks for ImageOps.posterize(img, 0) at magnitude 10. Pillow of the
release's time (9.x; 9.5 checked) returns a black image there; recent Pillow (13 checked) raises
ValueError. On such a Pillow the script runs that case with posterize replaced by the 9.x table
(keep the top `bits` bits, none for 0) and records that it did. Run under Pillow 9.5 without the
stand-in, the script writes the same outputs as under Pillow 13.
"""
import copy
import json
import os
import unittest.mock

import numpy as np
import PIL
from PIL import Image, ImageOps

import timm
import timm.data.auto_augment as aa
from timm.data import create_transform

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "randaugment_timm.npz")

CONFIG = "rand-m9-mstd0.5-inc1"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the release's --image_mean / --image_std defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# 7.5: PosterizeIncreasing's step from 2 kept bits to 1;
# 3.7: int() truncation in the solarize levels
MAGNITUDES = (0.0, 3.7, 7.5, 9.0, 10.0)


def make_images():
    """Small deterministic RGB images (w x h): gradients plus hashed noise, one odd-sized and one
    low-contrast (so autocontrast and equalize stretch it). The fixture stores them as
    input_<k>."""
    images = []
    for k, (w, h, lo, hi) in enumerate([(24, 20, 0, 255), (13, 17, 0, 255), (16, 22, 70, 150)]):
        y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
        ramp = (x * (c + 1) * 97 // max(w - 1, 1) + y * (3 - c) * 61 // max(h - 1, 1)) % 256
        noise = (x * 7919 + y * 104729 + c * 15485863 + k * 3571) * 2654435761 % 4294967296 >> 24
        pix = (ramp * 3 + noise) // 4
        images.append((lo + pix * (hi - lo) // 255).astype(np.uint8))
    return images


def release_randaugment():
    tf = create_transform(input_size=224, scale=(0.3, 1.0), is_training=True, color_jitter=0.0,
                          auto_augment=CONFIG, interpolation="bicubic", mean=CLIP_MEAN,
                          std=CLIP_STD)
    (ra,) = [t for t in tf.transforms if isinstance(t, aa.RandAugment)]
    return ra


def _posterize_pillow9(img, bits):
    keep = 0xFF & ~(2 ** (8 - bits) - 1)
    return img.point([i & keep for i in range(256)] * len(img.getbands()))


def run_op(op, img, magnitude, negate):
    """timm's AugmentOp at a fixed magnitude, always applied, its sign draw forced. Returns (output,
    sign draws, whether Pillow-9 posterize stood in)."""
    op = copy.copy(op)
    op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0
    draws = []

    def forced_random():
        draws.append(1)
        return 1.0 if negate else 0.0

    with unittest.mock.patch.object(aa.random, "random", forced_random):
        try:
            return op(img), len(draws), False
        except ValueError:
            if op.aug_fn is not aa.posterize:
                raise
            draws.clear()
            with unittest.mock.patch.object(ImageOps, "posterize", _posterize_pillow9):
                return op(img), len(draws), True


def main():
    ra = release_randaugment()
    names = [aa._RAND_INCREASING_TRANSFORMS[i] for i in range(len(ra.ops))]
    assert [(op.aug_fn, op.level_fn) for op in ra.ops] == [
        (aa.NAME_TO_OP[n], aa.LEVEL_TO_ARG[n]) for n in names]
    images = make_images()
    signed, patched, arrays = set(), False, {}
    cases, outputs = [], [[] for _ in images]
    for op_index, (name, op) in enumerate(zip(names, ra.ops)):
        for magnitude in MAGNITUDES:
            for negate in (False, True):
                results = [run_op(op, Image.fromarray(a, "RGB"), magnitude, negate) for a in images]
                if results[0][1] == 0 and negate:
                    continue  # the op draws no sign: one case per magnitude
                signed |= {name} if results[0][1] else set()
                patched |= any(r[2] for r in results)
                cases.append((op_index, magnitude, float(negate)))
                for k, (out, _, _) in enumerate(results):
                    outputs[k].append(np.asarray(out, dtype=np.uint8))
    op0 = ra.ops[0]
    meta = dict(timm_version=timm.__version__, pillow_version=PIL.__version__, config=CONFIG,
                ops=names, signed_ops=sorted(signed), num_layers=ra.num_layers,
                choice_weights=ra.choice_weights,
                prob=op0.prob, magnitude=op0.magnitude, magnitude_std=op0.magnitude_std,
                fillcolor=list(op0.kwargs["fillcolor"]), resample=int(op0.kwargs["resample"]),
                translate_pct=op0.hparams.get("translate_pct", 0.45), magnitudes=list(MAGNITUDES),
                posterize_pillow9_substituted=patched)
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["cases"] = np.array(cases, dtype=np.float64)  # (op index, magnitude, negate)
    for k, (a, outs) in enumerate(zip(images, outputs)):
        arrays[f"input_{k}"] = a
        arrays[f"output_{k}"] = np.stack(outs)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes, {len(cases)} cases x {len(images)} images)")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
