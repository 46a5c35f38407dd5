"""The paper's figures for eval.py --figures: Figure 3, GradCAM of the last block's [CLS] attention, and Figure 4,
masked image modeling triplets (original / masked / recovered). PIL only."""
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import clip_model
import data
import must
from runtime import fail


def to_pil(image):
    """CLIP-normalized (3,H,W) -> RGB PIL image."""
    mean = torch.tensor(clip_model.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(clip_model.CLIP_STD).view(3, 1, 1)
    x = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _jet(x):
    """Values in [0,1] (H,W) -> jet colors (H,W,3) uint8."""
    rgb = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def heat_overlay(image, cam, alpha=0.5):
    """PIL image + (g,g) map in [0,1] -> the map upsampled bilinearly, in jet colors, blended over the image."""
    W, H = image.size
    up = F.interpolate(cam[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    return Image.blend(image, Image.fromarray(_jet(up.clamp(0, 1).numpy())), alpha)


def attention_cam(model, images, columns=None):
    """GradCAM on the last block's self-attention (paper Figure 3): gradient of the top-class logit w.r.t. the
    attention probabilities A (B,H,L,L), cam = mean over heads of relu(∂y/∂A ⊙ A), [CLS] row over the patches.

    clip_model's Attention runs SDPA, which hides A, so the last block is recomputed here from its weights.
    Returns (cam (B, g, g) min-max scaled to [0,1], predicted labels (B,), logits (B, K)).
    """
    visual = model.visual
    blocks = visual.transformer.resblocks
    with torch.no_grad():  # nothing upstream of A needs a gradient
        x = visual.tokens(images)  # (B, 1+N, C)
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        q, k, v = last.attn.qkv(last.ln_1(x))  # (B, H, L, C/H) each
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, L, L)
    attn.requires_grad_(True)
    with torch.enable_grad():
        B, L, C = x.shape
        out = (attn @ v).transpose(1, 2).reshape(B, L, C)
        z = x + last.attn.out_proj(out)
        z = z + last.mlp(last.ln_2(z))
        logits = model.classify(visual.ln_post(z[:, 0]) @ visual.proj)
        if columns is not None:
            logits = logits[:, columns.to(logits.device)]
        pred = logits.argmax(dim=1)
        # images are independent, so the gradient of the summed top logits is each image's own gradient
        (grad,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), attn)
    cam = (grad * attn).clamp(min=0).mean(dim=1)[:, 0, 1:].detach()  # (B, N): [CLS] row, patches only
    g = visual.grid_size
    cam = cam.view(B, g, g)
    lo, hi = cam.flatten(1).min(1).values.view(B, 1, 1), cam.flatten(1).max(1).values.view(B, 1, 1)
    return (cam - lo) / (hi - lo).clamp_min(1e-12), pred, logits.detach()


@torch.no_grad()
def mim_triplets(model, images, masks):
    """Figure 4: (original, masked, recovered) CLIP-normalized images; recovered = visible pixels + the decoder's
    prediction on the masked patches (what L_mim trains, eq. 4). masks (B, N) bool, True = masked."""
    _, _, recon = model.visual.forward_must(images, masks)
    m = must.pixel_mask(masks, model.visual.patch_size).to(images.dtype)  # (B,1,H,W)
    gray = torch.zeros_like(images)  # normalized 0 = CLIP's mean color
    return images, images * (1 - m) + gray * m, images * (1 - m) + recon.float() * m


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def compose_grid(rows, header, cell):
    """rows: [[(PIL image, caption), ...], ...] -> one PNG-ready image; column titles on top, captions under."""
    font, pad, text_h = _font(), 4, 16
    n_cols = len(header)
    width = n_cols * (cell + pad) + pad
    height = text_h + len(rows) * (cell + text_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(header):
        draw.text((pad + j * (cell + pad), 2), title, fill="black", font=font)
    for i, row in enumerate(rows):
        y = text_h + i * (cell + text_h + pad)
        for j, (img, caption) in enumerate(row):
            x = pad + j * (cell + pad)
            canvas.paste(img.resize((cell, cell), Image.NEAREST if img.width < cell else Image.BICUBIC), (x, y))
            if caption:
                draw.text((x, y + cell + 1), caption[:cell // 6], fill="black", font=font)
    return canvas


def write_figures(out_prefix, eval_set, models, columns, num_images, mask_setup, seed, device):
    """PNG files: <prefix>-attention.png (image | each model's GradCAM, captioned with its prediction) and, for a
    MUST checkpoint, <prefix>-reconstruction.png (original | masked | recovered of the student). -> paths."""
    ds = eval_set.dataset
    picks = np.unique(np.linspace(0, len(ds) - 1, min(num_images, len(ds))).round().astype(int))
    images = torch.stack([ds[int(i)][0] for i in picks]).to(device)
    labels = [ds[int(i)][1] for i in picks]
    names = ds.classnames
    cell = max(images.shape[-1], 128)
    paths = []
    cams = {}
    for name, m in models.items():
        cams[name] = attention_cam(m, images, columns.get(name))
    rows = []
    for b in range(len(picks)):
        original = to_pil(images[b])
        truth = names[labels[b]] if labels[b] >= 0 else ""
        rows.append([(original, truth)] + [(heat_overlay(original, cams[n][0][b].cpu()), names[int(cams[n][1][b])])
                                           for n in models])
    path = f"{out_prefix}-attention.png"
    compose_grid(rows, ["image (label)"] + [f"{n} GradCAM" for n in models], cell).save(path)
    paths.append(path)
    if "student" in models and mask_setup is not None:
        mask_unit, mask_ratio = mask_setup
        student = models["student"]
        generator = data.MaskGenerator(student.visual.input_resolution, mask_unit, student.visual.patch_size,
                                       mask_ratio)
        torch.manual_seed(seed)
        masks = torch.stack([generator() for _ in picks]).to(device)
        triplets = mim_triplets(student, images, masks)
        rows = [[(to_pil(t[b]), "") for t in triplets] for b in range(len(picks))]
        path = f"{out_prefix}-reconstruction.png"
        compose_grid(rows, ["original", f"masked ({mask_ratio:.0%})", "recovered"], cell).save(path)
        paths.append(path)
    return paths


def make_figures(args, run, sets, models, columns, visual, prefix, device):
    """Figures on the first set that the most models score; masks as the checkpoint was trained (Table 10)."""
    first = max(range(len(sets)), key=lambda i: (sum((i, n) in columns for n in models), -i))
    fig_models = {n: m for n, m in models.items() if (first, n) in columns}
    mask_setup = None
    if "student" in fig_models:
        mask_unit, mask_ratio = run.get("mask_unit"), run.get("mask_ratio")
        if mask_unit is None or mask_ratio is None:  # a checkpoint without its config: the run's Table 10 row
            hp = data.hparams(run.get("data") or "imagenet", run.get("model"), visual.patch_size,
                              visual.input_resolution)
            mask_unit, mask_ratio = hp["mask_unit"], hp["mask_ratio"]
        mask_setup = (mask_unit, mask_ratio)
    if len(sets) > 1:
        prefix += "-" + re.sub(r"[^0-9A-Za-z.-]+", "_", sets[first].name)
    try:
        return write_figures(prefix, sets[first], fig_models, {n: columns[(first, n)] for n in fig_models},
                             args.figures, mask_setup, args.seed, device)
    except ValueError as e:  # e.g. a mask unit that does not tile the model's input
        fail(f"figures: {e}")
