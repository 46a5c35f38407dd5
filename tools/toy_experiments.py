"""The toy world's tools (toy/world.py): its tiny CLIP's pretraining, probes of what a
CLIP or a MUST checkpoint knows, the paper's ablation through train.py, its test images
as files, and a picture. What they measured is in docs/toy.md.

    python -m tools.toy_experiments pretrain --out toy/toy_clip.pt  # remake the CLIP
    python -m tools.toy_experiments show --out toy_world.png  # source and target images
    python -m tools.toy_experiments probe [CHECKPOINT] [--which student]  # kNN, ...
    python -m tools.toy_experiments ablation --seeds 0 1 2  # Tables 5, 7: 12 runs
    python -m tools.toy_experiments images  # the test images, for eval.py --classify
"""
import argparse
import hashlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import clip_model
import config
import data
import must
import prompts
from toy import world as toy
import train
from util import clip_load
from util.runtime import fail, read_checkpoint, save_atomic
from util.tokenizer import tokenize

# ----------------------------------------------------------------------------
# Measurements: why adaptation helps (or not)

def load(path, which="teacher"):
    """-> (MUSTModel in eval mode, whether `path` is a train.py checkpoint): its `which`
    weights, or a CLIP with the toy world's zero-shot head, as train.py starts."""
    try:
        return must.load_checkpoint(read_checkpoint(path), which), True
    except ValueError:  # a CLIP, or clip_load says what it is
        clip, _ = clip_model.load(path)
    head = prompts.zero_shot_head(clip, toy.SHAPES, toy.TEMPLATES)
    return must.MUSTModel.from_clip(clip, head).eval(), False


@torch.no_grad()
def embed(model, images, masks=None, batch_size=500):
    """-> (L2-normalized embeddings (n, D), logits (n, K)) of a MUSTModel on uint8
    images, masked (with its [MSK]) where masks (n, N) is True."""
    v = []
    for i in range(0, len(images), batch_size):
        x = toy.to_tensor(images[i:i + batch_size])
        mask = None if masks is None else masks[i:i + batch_size]
        v.append(model.visual.forward_must(x, mask)[0])
    v = torch.cat(v)
    return v, model.classify(v)


def accuracy(model, images, labels):
    """Top-1 (%) of a MUSTModel on labeled uint8 images."""
    return _acc(embed(model, images)[1].argmax(1), labels)


def probe(path, which="teacher", mask_ratio=None, n_train=5000, taus=(0.5, 0.7, 0.9)):
    """The classifier's accuracy on source and target, and what target features know.

    kNN (k=10, cosine) and a linear probe, fit on labeled target-train features, bound
    what adapting the classifier alone could reach; pass_τ says how many pseudo-labels a
    threshold τ passes, and how accurate they are. A train.py checkpoint is also scored
    on masked test views (one fixed draw, mask_ratio or toy.HPARAMS').
    """
    model, trained = load(path, which)
    r = {"head_source": accuracy(model, *toy.render_split("source", 2000))}
    xtr, ytr = toy.render_split("train", min(n_train, toy.SPLIT_SIZES["train"]))
    xte, yte = toy.render_split("test")
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    (ftr, _), (fte, logits) = embed(model, xtr), embed(model, xte)
    conf, pred = logits.softmax(1).max(1)
    r["head_target"] = _acc(pred, yte)
    r["predicted_class_share"] = _shares(pred)
    for tau in taus:
        m = conf > tau
        r[f"pass_{tau}"] = m.float().mean().item() * 100
        r[f"acc_pass_{tau}"] = _acc(pred[m], yte[m]) if m.any() else float("nan")
    nn_idx = (fte @ ftr.T).topk(10, dim=1).indices
    r["knn10_target"] = _acc(torch.mode(ytr[nn_idx], dim=1).values, yte)
    torch.manual_seed(0)
    linear = torch.nn.Linear(ftr.shape[1], model.num_classes)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(linear(ftr * model.logit_scale), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    r["linear_probe_target"] = _acc(linear(fte * model.logit_scale).argmax(1), yte)
    if trained:
        ratio = toy.HPARAMS["mask_ratio"] if mask_ratio is None else mask_ratio
        gen = config.mask_generator(model.visual, toy.HPARAMS["mask_unit"], ratio)
        torch.manual_seed(0)
        masks = torch.stack([gen() for _ in range(len(xte))])
        pred = embed(model, xte, masks)[1].argmax(1)
        r["head_target_masked"] = _acc(pred, yte)
        r["masked_class_share"] = _shares(pred)
    return r


def _acc(pred, labels):
    right = torch.as_tensor(pred) == torch.as_tensor(labels)
    return right.float().mean().item() * 100


def _shares(pred):
    """Share of predictions per class (a list summing to 1)."""
    counts = torch.bincount(pred, minlength=len(toy.SHAPES)).float()
    return (counts / len(pred)).tolist()


# ----------------------------------------------------------------------------
# Ablation (paper Tables 5 and 7) through train.py's main

ABLATION = [  # (row, run directory, train.py flags)
    ("self-training only", "st", ["--no-reg", "--no-mim", "--no-align"]),
    ("+ fairness (L_reg)", "st_reg", ["--no-mim", "--no-align"]),
    ("+ MIM (L_mim)", "st_reg_mim", ["--no-align"]),
    ("+ alignment = MUST", "must", []),
]


def ablation(seeds, out_dir, extra=()):
    """Each ablation row for each seed through train.py: zero-shot, student and teacher,
    mean ± spread, on the target test split (reported) and val split (for choices)."""
    val_images, val_labels = toy.render_split("val")
    test, val = {}, {}
    for name, short, flags in ABLATION:
        for seed in seeds:
            # A finished run is resumed, not redone.
            run_dir = os.path.join(out_dir, f"{short}_seed{seed}")
            print(f"\n=== {name}, seed {seed} -> {run_dir}")
            train_args = ["--data", "toy", "--out-dir", run_dir, "--seed", str(seed),
                          *flags, *extra]
            evals = train.main(train_args)
            last = evals[-1]
            test.setdefault(name, []).append((last["student_acc"], last["teacher_acc"]))
            checkpoint = os.path.join(run_dir, train.CHECKPOINT)
            val_accs = [accuracy(load(checkpoint, which)[0], val_images, val_labels)
                        for which in ("student", "teacher")]
            val.setdefault(name, []).append(val_accs)
    zero_shot = {"test": evals[0]["student_acc"],
                 "val": accuracy(load(toy.WEIGHTS)[0], val_images, val_labels)}
    lines = []
    for split, rows in (("test", test), ("val", val)):
        z = zero_shot[split]
        lines += [f"toy world, target {split} top-1 (%), final epoch, mean ± std over "
                  f"seeds {list(seeds)}",
                  f"{'':24s} {'student':>15s} {'teacher':>15s}",
                  f"{'zero-shot':24s} {z:>15.1f} {z:>15.1f}"]
        for name, vals in rows.items():
            v = np.array(vals)
            lines.append(f"{name:24s} {_ms(v[:, 0]):>15s} {_ms(v[:, 1]):>15s}")
        lines.append("")
    table = "\n".join(lines).rstrip()
    print("\n" + table)
    with open(os.path.join(out_dir, "ablation.txt"), "w") as f:
        f.write(table + "\n")
    return table


def _ms(v):
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


# ----------------------------------------------------------------------------
# A picture of the world

def world_grid(per_class=2, seed=123, scale=3):
    """`per_class` source rows above the same scenes as target rows, a class a column,
    enlarged `scale` times."""
    n = len(toy.SHAPES)
    rows = []
    for domain in ("source", "target"):
        a = toy.sample_attributes(n * per_class, seed)
        a["label"] = np.repeat(np.arange(n), per_class)
        size = toy.IMAGE_SIZE
        img = toy.render(a, domain).reshape(n, per_class, size, size, 3)
        by_row = img.transpose(1, 2, 0, 3, 4)  # (per_class, H, n, W, 3)
        rows.append(by_row.reshape(per_class * toy.IMAGE_SIZE, n * toy.IMAGE_SIZE, 3))
    grid = Image.fromarray(np.concatenate(rows))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


# ----------------------------------------------------------------------------
# The tiny CLIP: pretraining on source image-caption pairs

def pretrain(out_path):
    """Contrastive pretraining (symmetric InfoNCE, learnable temperature) of the tiny
    CLIP on rendered source image-caption batches (toy.PRETRAIN), written to out_path
    with its config note. Deterministic: batch s is drawn from seed [1000 + seed, s],
    which no split uses; AdamW, linear warmup, cosine decay, CLIP's clamp of the
    temperature at 100.
    """
    cfg = toy.PRETRAIN
    steps, batch_size, seed = cfg["steps"], cfg["batch_size"], cfg["seed"]
    torch.manual_seed(seed)
    model = clip_model.CLIP(**cfg["model"])
    decay = [p for n, p in model.named_parameters()
             if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters()
                if not (p.ndim >= 2 and "embedding" not in n)]
    param_groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
                    {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(param_groups, lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-6)
    view = data.strong_view(toy.IMAGE_SIZE, cfg["augment"])  # draws from torch's RNG
    bar = tqdm(range(steps), desc="pretrain tiny CLIP", mininterval=2)
    for step in bar:
        warmup_scale = min(1.0, (step + 1) / cfg["warmup"])
        one_plus_cos = 1 + math.cos(math.pi * step / steps)
        lr = cfg["lr"] * warmup_scale * 0.5 * one_plus_cos
        for g in opt.param_groups:
            g["lr"] = lr
        a = toy.sample_attributes(batch_size, [1000 + seed, step])
        source_images = toy.render(a, "source")
        views = [np.asarray(view(Image.fromarray(x))) for x in source_images]
        images = toy.to_tensor(np.stack(views))
        captions = [toy.caption(a, i) for i in range(batch_size)]
        tokens = tokenize(captions, context_length=model.context_length)
        logits_per_image, logits_per_text = model(images, tokens)
        target = torch.arange(len(images))
        image_loss = F.cross_entropy(logits_per_image, target)
        text_loss = F.cross_entropy(logits_per_text, target)
        loss = (image_loss + text_loss) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp
        scale = model.logit_scale.exp().item()
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale:.1f}", refresh=False)
    note = clip_load.config_note(clip_load.OPENAI_SPEC)
    save_atomic({**stored_state(model), "open_clip_config": note}, out_path)


def toy_token_ids(context_length):
    """Every token id a toy caption or prompt holds (a few dozen of CLIP's 49,408)."""
    sizes, colors = ([""] + [w + " " for w in ws] for ws in (toy.SIZES, toy.COLORS))
    backgrounds = [""] + [f" on a {b} background" for b in toy.BACKGROUNDS]
    texts = [t.format(f"{s}{c}{k}{b}")
             for t in toy.CAPTION_TEMPLATES for s in sizes for c in colors
             for k in toy.SHAPES for b in backgrounds]
    texts += [t.format(k) for t in toy.TEMPLATES for k in toy.SHAPES]
    return torch.unique(tokenize(texts, context_length=context_length, truncate=True))


def stored_state(model):
    """The tiny CLIP's state dict as toy_clip.pt stores it: the token embedding by
    the rows toy texts use (the others, most of the parameters, get no gradient),
    toy.RECIPE as a note."""
    out = dict(model.state_dict())  # a plain dict, as the committed file
    weight = out.pop("token_embedding.weight")
    ids = toy_token_ids(model.context_length)
    out.update({"token_embedding.ids": ids, "token_embedding.rows": weight[ids],
                "token_embedding.vocab_size": weight.shape[0], "recipe": toy.RECIPE})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="The toy world's tools: its tiny CLIP's pretraining, probes, the "
                    "ablation, its test images as files, a picture.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("probe", help="zero-shot, kNN and linear-probe accuracy of a "
                                     "CLIP or MUST checkpoint")
    c.add_argument("path", nargs="?", default=toy.WEIGHTS,
                   help="a CLIP or a train.py checkpoint [the committed tiny CLIP]")
    c.add_argument("--which", choices=["student", "teacher"], default="teacher",
                   help="which weights of a MUST checkpoint to probe [teacher]")
    c.add_argument("--mask-ratio", type=float,
                   help="mask ratio of the masked-view accuracy [toy.HPARAMS]")
    c = sub.add_parser("ablation", help="Tables 5 and 7: each loss added in turn, for "
                                        "several seeds")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds, one run per row and seed [0 1 2]")
    c.add_argument("--out-dir", default=os.path.join("out", "toy_ablation"),
                   help="where each run and ablation.txt go [out/toy_ablation]")
    c.add_argument("--num-workers", default="2",
                   help="data loader processes per run [2]")
    c = sub.add_parser("pretrain", help="pretrain the tiny CLIP (~7 min on 2 cores)")
    c.add_argument("--out", default=os.path.join("out", "toy_clip.pt"),
                   help="weights file [out/toy_clip.pt]")
    c = sub.add_parser("images", help="write the test images as <class>/<index>.png")
    c.add_argument("--out", default=os.path.join("out", "toy", "test-images"),
                   help="folder [out/toy/test-images]")
    c = sub.add_parser("show", help="save a grid of source and target images")
    c.add_argument("--out", default="toy_world.png", help="PNG path [toy_world.png]")
    args = parser.parse_args(argv)
    if args.command == "probe":
        if not os.path.isfile(args.path):
            fail(f"no file {args.path}")
        for k, v in probe(args.path, args.which, args.mask_ratio).items():
            value_text = (" ".join(f"{x:.2f}" for x in v) if isinstance(v, list)
                          else f"{v:.1f}")
            print(f"{k:24s} {value_text}")
    elif args.command == "ablation":
        ablation(args.seeds, args.out_dir, extra=["--num-workers", args.num_workers])
    elif args.command == "pretrain":
        pretrain(args.out)
        with open(args.out, "rb") as f:
            print(f"wrote {args.out}, sha256 {hashlib.sha256(f.read()).hexdigest()}")
    elif args.command == "images":
        toy.write_images("test", args.out)
        print(f"wrote the test images to {args.out}/<class>/<index>.png")
    elif args.command == "show":
        world_grid().save(args.out, optimize=True)
        print(f"wrote {args.out}: top 2 rows source, bottom 2 rows the same scenes in "
              f"the target style; columns: {', '.join(toy.SHAPES)}")


if __name__ == "__main__":
    main()
