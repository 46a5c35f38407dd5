"""RandAugment as the authors' release runs it, the heart of the student's strong view (paper §3):
timm 0.4.12's rand_augment_transform('rand-m9-mstd0.5-inc1'), written anew, with all randomness
drawn from torch's global RNG, so that a loader that seeds torch per sample reproduces it.
tests/test_randaugment.py checks every op against fixtures that timm itself wrote.
"""
import functools

import torch
from PIL import Image, ImageEnhance, ImageOps

from util.clip_load import CLIP_MEAN

# RandAugment as the release runs it: timm 0.4.12's
# rand_augment_transform('rand-m9-mstd0.5-inc1', hparams) with the hparams timm's create_transform
# builds from the release's arguments. Those are fill color img_mean = CLIP's mean in 0-255
# (rounded), interpolation bicubic (--train_interpolation), and translate_pct left at its 0.45
# default. Each op below takes a magnitude in [0, 10] and the sign draw, and computes its parameter
# with the same floating-point expression as timm's level function, so that given the same
# magnitude and sign its pixels are bit-equal (tests/test_randaugment.py checks this against
# fixtures written by timm itself).

_MAX_MAGNITUDE = 10.0


def fill_color(mean):
    """The colour that pixels a geometric op uncovers get: the normalization's mean in 0-255, as
    the release's img_mean."""
    return tuple(min(255, round(255 * m)) for m in mean)


_FILL = fill_color(CLIP_MEAN)
_RESAMPLE = Image.BICUBIC


def _level(magnitude, top, negate=False):
    """An op's parameter at this magnitude.

    That is magnitude / 10 of its value at magnitude 10, negated on a sign draw.
    """
    value = magnitude / _MAX_MAGNITUDE * top
    return -value if negate else value


def _lut(img, table):
    return img.point(table * len(img.getbands()))


def _unparameterized(op, img, magnitude, negate, fill=None):  # AutoContrast, Equalize, Invert
    return op(img)


def _rotate(img, magnitude, negate, fill=None):
    # about the centre, same canvas, up to ±30°
    angle = _level(magnitude, 30.0, negate)
    return img.rotate(angle, resample=_RESAMPLE, fillcolor=fill or _FILL)


def _posterize_increasing(img, magnitude, negate, fill=None):
    # Keeps 4 bits at magnitude 0 down to 0 bits (a black image) at 10. This is our own table, not
    # ImageOps.posterize, because Pillow of the release's era accepted 0 bits and current Pillow
    # raises on it.
    bits = 4 - int(_level(magnitude, 4))
    keep = 0xFF & ~(2 ** (8 - bits) - 1)
    return _lut(img, [i & keep for i in range(256)])


def _solarize_increasing(img, magnitude, negate, fill=None):
    # inverts values >= threshold; the threshold falls from 256 (no-op) to 0 (full inversion)
    return ImageOps.solarize(img, 256 - int(_level(magnitude, 256)))


def _solarize_add(img, magnitude, negate, fill=None):
    add = int(_level(magnitude, 110))
    return _lut(img, [min(255, i + add) if i < 128 else i for i in range(256)])


def _enhance(enhancer, img, magnitude, negate, fill=None):
    # enhancer is an ImageEnhance class: Color, Contrast, Brightness or Sharpness.
    # 1 is the identity; the distortion grows with magnitude towards 0.1 or 1.9.
    return enhancer(img).enhance(1.0 + _level(magnitude, 0.9, negate))


def _affine(name, img, magnitude, negate, fill=None):
    # PIL's affine maps output pixel (x, y) to input (a·x + b·y + c, d·x + e·y + f). Shears pivot on
    # the top-left corner, not the centre, and translations (up to 45% of the side) may be
    # fractional (then bicubic-resampled).
    shear, shift = _level(magnitude, 0.3, negate), _level(magnitude, 0.45, negate)
    coeffs = {"ShearX": (1, shear, 0, 0, 1, 0), "ShearY": (1, 0, 0, shear, 1, 0),
              "TranslateXRel": (1, 0, shift * img.size[0], 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, shift * img.size[1])}[name]
    fillcolor = fill or _FILL
    return img.transform(img.size, Image.AFFINE, coeffs, resample=_RESAMPLE, fillcolor=fillcolor)


# timm's 'inc1' op list, in its order (the order matters: the op index is a random draw)
_RANDAUG_OPS = {
    "AutoContrast": functools.partial(_unparameterized, ImageOps.autocontrast),
    "Equalize": functools.partial(_unparameterized, ImageOps.equalize),
    "Invert": functools.partial(_unparameterized, ImageOps.invert),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize_increasing,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": functools.partial(_enhance, ImageEnhance.Color),
    "ContrastIncreasing": functools.partial(_enhance, ImageEnhance.Contrast),
    "BrightnessIncreasing": functools.partial(_enhance, ImageEnhance.Brightness),
    "SharpnessIncreasing": functools.partial(_enhance, ImageEnhance.Sharpness),
    "ShearX": functools.partial(_affine, "ShearX"),
    "ShearY": functools.partial(_affine, "ShearY"),
    "TranslateXRel": functools.partial(_affine, "TranslateXRel"),
    "TranslateYRel": functools.partial(_affine, "TranslateYRel"),
}
# ops whose parameter has a random sign; only these consume a sign draw (as in timm)
_SIGNED_OPS = frozenset({"Rotate",
                         "ColorIncreasing", "ContrastIncreasing",
                         "BrightnessIncreasing", "SharpnessIncreasing",
                         "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})


class RandAugment:
    """RandAugment (Cubuk et al., 2020) with magnitude noise, the paper's strong view.

    It is the release's timm 0.4.12 'rand-m9-mstd0.5-inc1' (ops in _RANDAUG_OPS), with all
    randomness drawn from torch's global RNG so that a loader that seeds torch per sample
    reproduces it.

    Draws per image, in this order:
      1. num_ops op indices, uniform over the 15 ops, with replacement:
         torch.randint(15, (num_ops,));
      2. for each drawn op in turn:
         a. if prob < 1: u = torch.rand(()); the op is skipped (no further draws) when u > prob;
         b. if magnitude_std > 0: magnitude + magnitude_std * torch.randn(()), then clipped to
            [0, 10] (drawn even for the ops that ignore the magnitude);
         c. for the ops in _SIGNED_OPS only: negate = torch.rand(()) > 0.5.
    This is timm's order (np.random.choice for 1, then random.random, random.gauss,
    random.random), so only the random source differs.
    """

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=_FILL):
        self.num_ops = num_ops
        self.fill = fill  # the uncovered pixels' colour: the CLIP's mean colour
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.prob = prob
        # Names, not functions, because the transform must pickle for spawned workers.
        self.op_names = list(_RANDAUG_OPS)

    def __call__(self, img):
        for i in torch.randint(len(self.op_names), (self.num_ops,)).tolist():
            if self.prob < 1.0 and torch.rand(()).item() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m += self.magnitude_std * torch.randn(()).item()
            name = self.op_names[i]
            negate = name in _SIGNED_OPS and torch.rand(()).item() > 0.5
            magnitude = min(max(m, 0.0), _MAX_MAGNITUDE)
            img = _RANDAUG_OPS[name](img, magnitude, negate, fill=self.fill)
        return img
