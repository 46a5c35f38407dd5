"""Tools of the toy world (toy/world.py): its tiny CLIP's pretraining, probes of what a tiny CLIP
or a MUST checkpoint knows, the paper's ablation through train.py, its test images as files, and a
picture of the world. What they measured is in docs/toy.md.

    python -m tools.toy_experiments pretrain --out toy/toy_clip.pt  # remake the tiny CLIP
    python -m tools.toy_experiments show --out toy_world.png  # source and target examples
    python -m tools.toy_experiments probe [CHECKPOINT] [--which student]  # zero-shot, kNN, ...
    python -m tools.toy_experiments ablation --seeds 0 1 2  # Tables 5 and 7: 12 runs of ~6 min
    python -m tools.toy_experiments images  # the test images, for eval.py --classify

A driver: it imports train.py, and nothing on the training path imports it.
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

# ----------------------------------------------------------------------------------------------
# Measurements: why adaptation helps (or not)


def load(path, which="teacher"):
    """-> (MUSTModel in eval mode, whether it is a train.py checkpoint): that checkpoint's `which`
    weights, or a CLIP with the toy world's zero-shot head as its classifier, as train.py starts
    from it."""
    try:
        return must.load_checkpoint(read_checkpoint(path), which), True
    except ValueError:  # not a train.py checkpoint: a CLIP, or clip_load says what it is
        clip, _ = clip_model.load(path)
    head = prompts.zero_shot_head(clip, toy.SHAPES, toy.TEMPLATES)
    return must.MUSTModel.from_clip(clip, head).eval(), False


@torch.no_grad()
def embed(model, images, masks=None, batch_size=500):
    """-> (L2-normalized image embeddings (n, D), logits (n, K)) of a MUSTModel on uint8 images.

    Where masks (n, N) is True, the images are seen as masked views (the student's input in
    training, with its own [MSK]).
    """
    v = torch.cat([model.visual.forward_must(toy.to_tensor(images[i:i + batch_size]),
                                             None if masks is None else masks[i:i + batch_size])[0]
                   for i in range(0, len(images), batch_size)])
    return v, model.classify(v)


def accuracy(model, images, labels):
    """Top-1 (%) of a MUSTModel on labeled uint8 images."""
    return _acc(embed(model, images)[1].argmax(1), labels)


def probe(path, which="teacher", mask_ratio=None, n_train=5000, taus=(0.5, 0.7, 0.9)):
    """Accuracy of the classifier on source and target, and how much the target features know with
    labels.

    The classifier is the zero-shot head of a CLIP, or the trained W of a train.py checkpoint's
    `which` weights. kNN (k=10, cosine) and a linear probe are fit on labeled target-train features
    and scored on the target test split. They bound what adapting the classifier alone could reach.
    Confidence stats say how many pseudo-labels a threshold τ would pass, and how accurate those
    are. A train.py checkpoint is also scored on masked test views (toy.HPARAMS' mask unit,
    mask_ratio or toy.HPARAMS', one fixed draw of masks).
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
        pred = embed(model, xte, torch.stack([gen() for _ in range(len(xte))]))[1].argmax(1)
        r["head_target_masked"], r["masked_class_share"] = _acc(pred, yte), _shares(pred)
    return r


def _acc(pred, labels):
    return (torch.as_tensor(pred) == torch.as_tensor(labels)).float().mean().item() * 100


def _shares(pred):
    """Share of predictions per class (a list summing to 1)."""
    return (torch.bincount(pred, minlength=len(toy.SHAPES)).float() / len(pred)).tolist()


# ----------------------------------------------------------------------------------------------
# Ablation (paper Tables 5 and 7) through train.py's main

ABLATION = [  # (row, run directory, train.py flags)
    ("self-training only", "st", ["--no-reg", "--no-mim", "--no-align"]),
    ("+ fairness (L_reg)", "st_reg", ["--no-mim", "--no-align"]),
    ("+ MIM (L_mim)", "st_reg_mim", ["--no-align"]),
    ("+ alignment = MUST", "must", []),
]


def ablation(seeds, out_dir, extra=()):
    """Run each ablation row for each seed with train.py.

    Prints zero-shot / student / teacher, mean ± spread, on the target test split (what is
    reported) and the target val split (what choices are made on).
    """
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
            test.setdefault(name, []).append((evals[-1]["student_acc"], evals[-1]["teacher_acc"]))
            checkpoint = os.path.join(run_dir, train.CHECKPOINT)
            val_accs = [accuracy(load(checkpoint, which)[0], val_images, val_labels)
                        for which in ("student", "teacher")]
            val.setdefault(name, []).append(val_accs)
    zero_shot = {"test": evals[0]["student_acc"],
                 "val": accuracy(load(toy.WEIGHTS)[0], val_images, val_labels)}
    lines = []
    for split, rows in (("test", test), ("val", val)):
        lines += [f"toy world, target {split} top-1 (%), final epoch, mean ± std over seeds "
                  f"{list(seeds)}",
                  f"{'':24s} {'student':>15s} {'teacher':>15s}",
                  f"{'zero-shot':24s} {zero_shot[split]:>15.1f} {zero_shot[split]:>15.1f}"]
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


# ----------------------------------------------------------------------------------------------
# A picture of the world

def world_grid(per_class=2, seed=123, scale=3):
    """PIL image: `per_class` source rows above as many target rows, one class per column.

    The same scenes (attributes) are drawn in both domains, enlarged `scale` times.
    """
    n = len(toy.SHAPES)
    rows = []
    for domain in ("source", "target"):
        a = toy.sample_attributes(n * per_class, seed)
        a["label"] = np.repeat(np.arange(n), per_class)
        img = toy.render(a, domain).reshape(n, per_class, toy.IMAGE_SIZE, toy.IMAGE_SIZE, 3)
        by_row = img.transpose(1, 2, 0, 3, 4)  # (per_class, H, n, W, 3)
        rows.append(by_row.reshape(per_class * toy.IMAGE_SIZE, n * toy.IMAGE_SIZE, 3))
    grid = Image.fromarray(np.concatenate(rows))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


# ----------------------------------------------------------------------------------------------
# Command line

# ----------------------------------------------------------------------------------------------
# The tiny CLIP: pretraining on source image-caption pairs

def pretrain(out_path):
    """Contrastive pretraining (symmetric InfoNCE, learnable temperature) of a tiny CLIP.

    It trains on freshly rendered source image-caption batches with the toy.PRETRAIN recipe, and
    writes its stored_state() to out_path, with the note that says its activation and
    normalization (a QuickGELU CLIP fed OpenAI's normalization), so that clip_load reads any file
    it makes.

    It is deterministic: batch s is drawn from seed [1000 + toy.PRETRAIN['seed'], s] (no overlap
    with the splits). It uses AdamW, linear warmup, cosine decay, and CLIP's clamp of the
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
    view = data.strong_view(toy.IMAGE_SIZE, cfg["augment"])  # draws from torch's RNG: deterministic
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
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}",
                        refresh=False)
    note = clip_load.config_note(clip_load.OPENAI_SPEC)
    save_atomic({**stored_state(model), "open_clip_config": note}, out_path)


def toy_token_ids(context_length):
    """Every token id a toy caption or prompt can contain (a few dozen of CLIP's 49,408)."""
    sizes, colors = ([""] + [w + " " for w in ws] for ws in (toy.SIZES, toy.COLORS))
    backgrounds = [""] + [f" on a {b} background" for b in toy.BACKGROUNDS]
    texts = [t.format(f"{s}{c}{k}{b}")
             for t in toy.CAPTION_TEMPLATES for s in sizes for c in colors for k in toy.SHAPES
             for b in backgrounds]
    texts += [t.format(k) for t in toy.TEMPLATES for k in toy.SHAPES]
    return torch.unique(tokenize(texts, context_length=context_length, truncate=True))


def stored_state(model):
    """The tiny CLIP's state dict as toy_clip.pt stores it, which clip_model.load reads as it is.

    The token embedding is stored by the rows toy texts use (`.ids`, `.rows`, `.vocab_size`),
    because the other rows are most of the parameters and never get a gradient. toy.RECIPE is
    stored as a note.
    """
    out = dict(model.state_dict())  # a plain dict, as the committed file
    weight = out.pop("token_embedding.weight")
    ids = toy_token_ids(model.context_length)
    out.update({"token_embedding.ids": ids, "token_embedding.rows": weight[ids],
                "token_embedding.vocab_size": weight.shape[0], "recipe": toy.RECIPE})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="The toy world's tools: its tiny CLIP's pretraining, probes, the ablation, "
                    "its test images as files, a picture.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("probe", help="zero-shot, kNN and linear-probe accuracy of a tiny CLIP or "
                                     "MUST checkpoint (and a MUST checkpoint's accuracy on masked "
                                     "views)")
    c.add_argument("path", nargs="?", default=toy.WEIGHTS,
                   help="CLIP state dict or train.py checkpoint [the committed tiny CLIP]")
    c.add_argument("--which", choices=["student", "teacher"], default="teacher",
                   help="which weights of a MUST checkpoint to probe [teacher]")
    c.add_argument("--mask-ratio", type=float,
                   help="mask ratio of the masked-view accuracy [toy.HPARAMS]")
    c = sub.add_parser("ablation", help="Tables 5/7 on the toy world: each loss added in turn, "
                                        "several seeds; prints target test (reported) and val (for "
                                        "choices) tables")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds, one run per row and seed [0 1 2]")
    c.add_argument("--out-dir", default=os.path.join("out", "toy_ablation"),
                   help="one run directory per row and seed (a finished run is reused, not "
                        "redone) and ablation.txt [out/toy_ablation]")
    c.add_argument("--num-workers", default="2", help="data loader processes per run [2]")
    c = sub.add_parser("pretrain", help="pretrain the tiny CLIP from scratch (~7 min on 2 cores)")
    c.add_argument("--out", default=os.path.join("out", "toy_clip.pt"),
                   help="weights file; toy/toy_clip.pt replaces the committed one "
                        "[out/toy_clip.pt]")
    c = sub.add_parser("images", help="write the 2,000 test images as <class>/<index>.png")
    c.add_argument("--out", default=os.path.join("out", "toy", "test-images"),
                   help="folder [out/toy/test-images]")
    c = sub.add_parser("show", help="save a grid of source and target images")
    c.add_argument("--out", default="toy_world.png", help="PNG path [toy_world.png]")
    args = parser.parse_args(argv)
    if args.command == "probe":
        if not os.path.isfile(args.path):
            fail(f"no file {args.path}")
        for k, v in probe(args.path, args.which, args.mask_ratio).items():
            value_text = ' '.join(f'{x:.2f}' for x in v) if isinstance(v, list) else f'{v:.1f}'
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
        print(f"wrote {args.out}: top 2 rows source, bottom 2 rows the same scenes in the target "
              f"style; columns: {', '.join(toy.SHAPES)}")


if __name__ == "__main__":
    main()
