"""The paper's figures for eval.py --figures, drawn with PIL: Figure 3, GradCAM of the
last block's [CLS] attention, and Figure 4, masked image modeling's original / masked /
recovered triplets.
"""
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import config
import must
from util.clip_load import OPENAI_SPEC


def to_pil(image, spec=OPENAI_SPEC):
    """A (3,H,W) image normalized as the CLIP's spec says -> RGB PIL image."""
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    x = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def heat_overlay(image, cam, alpha=0.5):
    """A (g, g) map in [0, 1], upsampled, in jet colours, blended over a PIL image."""
    W, H = image.size
    up = F.interpolate(cam[None, None].float(), size=(H, W), mode="bilinear",
                       align_corners=False)[0, 0]
    jet = np.stack([np.clip(1.5 - np.abs(4 * up.clamp(0, 1).numpy() - c), 0, 1)
                    for c in (3, 2, 1)], axis=-1)
    heat = Image.fromarray((jet * 255).round().astype(np.uint8))
    return Image.blend(image, heat, alpha)


def attention_cam(model, images, columns=None):
    """GradCAM on the last block's self-attention (paper Figure 3): with y the top-class
    logit and A the attention probabilities (B, H, L, L), cam = mean over heads of
    relu(∂y/∂A ⊙ A), [CLS] row over the patches. SDPA hides A, so the last block is
    recomputed here. -> (cam (B, g, g) scaled to [0, 1], labels (B,), logits (B, K))
    """
    visual = model.visual
    *blocks, last = visual.transformer.resblocks
    with torch.no_grad():  # nothing upstream of A needs a gradient
        x = visual.tokens(images)  # (B, 1+N, C)
        for block in blocks:
            x = block(x)
        q, k, v = last.attn.qkv(last.ln_1(x))  # (B, H, L, C/H) each
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        attn = scores.softmax(dim=-1)  # (B, H, L, L)
    attn.requires_grad_(True)
    with torch.enable_grad():
        out = (attn @ v).transpose(1, 2).flatten(2)  # (B, L, C)
        z = x + last.attn.out_proj(out)
        z = z + last.mlp(last.ln_2(z))
        logits = model.classify(visual.ln_post(z[:, 0]) @ visual.proj)
        if columns is not None:
            logits = logits[:, columns.to(logits.device)]
        pred = logits.argmax(dim=1)
        # Images are independent, so the gradient of the summed top logits is each
        # image's own.
        top_logit_sum = logits.gather(1, pred[:, None]).sum()
        (grad,) = torch.autograd.grad(top_logit_sum, attn)
    # (B, N): the [CLS] row, patches only.
    cam = (grad * attn).clamp(min=0).mean(dim=1)[:, 0, 1:].detach()
    cam = cam.view(-1, visual.grid_size, visual.grid_size)
    lo, hi = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    return (cam - lo) / (hi - lo).clamp_min(1e-12), pred, logits.detach()


@torch.no_grad()
def mim_triplets(model, images, masks):
    """Figure 4: (original, masked, recovered) CLIP-normalized images, recovered being
    the visible pixels and the decoder's prediction of the masked ones (L_mim, eq. 4).
    masks: (B, N) bool, True = masked."""
    _, _, recon = model.visual.forward_must(images, masks)
    m = must.pixel_mask(masks, model.visual.patch_size).bool()  # (B,1,H,W)
    masked = images.masked_fill(m, 0)  # normalized 0: CLIP's mean color
    recovered = torch.where(m, recon.float(), images)
    return images, masked, recovered


def compose_grid(rows, header, cell):
    """rows [[(PIL image, caption), ...], ...] as one image, titles on top."""
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pad, text_h = 4, 16
    width = len(header) * (cell + pad) + pad
    height = text_h + len(rows) * (cell + text_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(header):
        draw.text((pad + j * (cell + pad), 2), title, fill="black", font=font)
    for i, row in enumerate(rows):
        y = text_h + i * (cell + text_h + pad)
        for j, (img, caption) in enumerate(row):
            x = pad + j * (cell + pad)
            # cell >= the input size, so the resize never shrinks.
            canvas.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
            if caption:
                draw.text((x, y + cell + 1), caption[:cell // 6], fill="black",
                          font=font)
    return canvas


def evenly_spaced(indices, n):
    """Up to n evenly spaced entries of `indices`, the first and the last included."""
    at = np.linspace(0, len(indices) - 1, min(n, len(indices))).round().astype(int)
    return [indices[i] for i in np.unique(at)]


def readable_picks(ds, n, name):
    """Up to n evenly spaced readable images of ds -> (indices, items). A file found
    unreadable (ds.bad) is passed over and the picks spaced again: a figure must not
    show a skipped file's blank placeholder."""
    bad = getattr(ds, "bad", None)  # datasets without it (the toy's) never fail
    known = 0 if bad is None else int(bad.count_nonzero())
    items = {}
    while True:
        readable = (range(len(ds)) if bad is None
                    else torch.nonzero(bad == 0).flatten().tolist())
        picks = evenly_spaced(readable, n)
        for i in picks:
            if i not in items:
                items[i] = ds[i]
        if bad is None or not any(bad[i] for i in picks):
            break
    if bad is not None and int(bad.count_nonzero()) > known:  # files --limit left out
        more = int(bad.count_nonzero()) - known
        print(f"warning: figures: passed over {more} more unreadable image(s) of "
              f"{name}")
    if not picks:
        print(f"warning: no figures: none of the {len(ds)} images of {name} can be "
              "read")
    return picks, [items[i] for i in picks]


def make_figures(args, run, sets, models, columns, spec, prefix, device):
    """The figures' PNG paths, for args.figures images of the set most models score.

    <prefix>-attention.png shows each image and each model's GradCAM and prediction; for
    a MUST checkpoint, <prefix>-reconstruction.png shows the student's triplets, masked
    as the checkpoint was trained. spec: the images' normalization.
    """
    first = max(range(len(sets)),
                key=lambda i: (sum((i, n) in columns for n in models), -i))
    models = {n: m for n, m in models.items() if (first, n) in columns}
    if len(sets) > 1:
        prefix += "-" + re.sub(r"[^0-9A-Za-z.-]+", "_", sets[first].name)
    ds = sets[first].dataset
    picks, items = readable_picks(ds, args.figures, sets[first].name)
    if not picks:
        return []
    images, labels = zip(*items)
    images = torch.stack(images).to(device)
    names, cell = ds.classnames, max(images.shape[-1], 128)
    cams = {n: attention_cam(m, images, columns[(first, n)]) for n, m in models.items()}
    rows = []
    for b in range(len(picks)):
        original = to_pil(images[b], spec)
        truth = names[labels[b]] if labels[b] >= 0 else ""
        heat_cells = [(heat_overlay(original, cams[n][0][b].cpu()),
                       names[int(cams[n][1][b])]) for n in models]
        rows.append([(original, truth)] + heat_cells)
    paths = [f"{prefix}-attention.png"]
    titles = ["image (label)"] + [f"{n} GradCAM" for n in models]
    compose_grid(rows, titles, cell).save(paths[-1])
    if "student" in models:
        visual = models["student"].visual
        mask_unit, mask_ratio = run.get("mask_unit"), run.get("mask_ratio")
        # A checkpoint without its config gets the run's Table 10 row.
        if mask_unit is None or mask_ratio is None:
            hp = config.hparams(run.get("data") or "imagenet", run.get("model"),
                                visual.patch_size, visual.input_resolution)
            mask_unit, mask_ratio = hp["mask_unit"], hp["mask_ratio"]
        generator = config.mask_generator(visual, mask_unit, mask_ratio, masked=False)
        torch.manual_seed(args.seed)
        masks = torch.stack([generator() for _ in picks]).to(device)
        triplets = mim_triplets(models["student"], images, masks)
        rows = [[(to_pil(t[b], spec), "") for t in triplets] for b in range(len(picks))]
        paths.append(f"{prefix}-reconstruction.png")
        titles = ["original", f"masked ({mask_ratio:.0%})", "recovered"]
        compose_grid(rows, titles, cell).save(paths[-1])
    return paths
