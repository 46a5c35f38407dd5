"""Regenerate tests/data/release_*.pt by running the authors' release of MUST (salesforce/MUST) on
the toy CLIP.

Dev-only: the tests never import this file, the release or timm; they only read what it writes. The
release is imported from a folder given on the command line (or in MUST_RELEASE), never copied into
the project. Fixtures were made from release commit 1e0f84eb77ed0a3e57f3c14e67e987bccf5212c7. To
remake them:

    python -m venv --system-site-packages /tmp/venv-ref
    /tmp/venv-ref/bin/pip install --no-deps timm==0.4.12
    mkdir -p /tmp/must-release            # MUST.git: a clone of github.com/salesforce/MUST
    git -C MUST.git archive 1e0f84eb77ed0a3e57f3c14e67e987bccf5212c7 | tar -x -C /tmp/must-release
    MUST_RELEASE=/tmp/must-release /tmp/venv-ref/bin/python tests/make_release_fixtures.py

Runs on CPU in seconds. On current torch the release needs import shims, installed by
import_release() and nothing else: clip/model.py imports the removed private
torch.nn.functional._scaled_dot_product_attention (for a function the model never calls), utils.py
imports torch._six.inf and tensorboardX / sklearn (for logging and per-class accuracy, not used
here), and train_one_epoch calls torch.cuda.synchronize() (a no-op here) and, at its end, averages
its logged meters over processes on 'cuda' (skipped: one process). Its all_gather_with_grad asks
torch.distributed for the world size, so a one-process gloo group is started. The release tokenizes
its zero-shot prompts to 77 tokens; the toy CLIP has 20 positions, so its tokenize is called with
the model's own context length.

Writes (float tensors fp32 unless said; images are rounded to fp16 before the release sees them, so
the fp16 copies stored are exact):
  release_forward.pt  (a) the masked image tower: images, masks, the release's extra weights in
                      project names, logits / v_cls / v_patch / recon / per-token alignment;
                      (b) every parameter's layer id, lr scale and weight decay under the release's
                      create_optimizer; (c) cosine_scheduler values and the EMA decay ramp as
                      train_one_epoch sets it; (d) MaskGenerator's masked-unit counts.
  release_steps.pt    (e) 3 optimizer steps of the release's own train_one_epoch in both fairness
                      modes.
The exact layout of each is in its "about" entry and in the functions below that build it.
"""
import contextlib
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import types
from argparse import Namespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "data")
sys.path.insert(0, ROOT)
import data  # noqa: E402  (the project: toy images and views only)
from toy import world as toy  # noqa: E402

RELEASE_COMMIT = "1e0f84eb77ed0a3e57f3c14e67e987bccf5212c7"
SEED = 0
LOGIT_SCALE = 100.0  # hard-coded in the release's VisionTransformer_MIM.forward


# --------------------------------------------------------------------------------------------------
# importing the release

def import_release(path):
    """Put the release first on sys.path behind the shims described in the module docstring;
    -> its modules."""

    def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0):
        attn = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = attn.softmax(dim=-1)
        return attn @ v, attn

    if not hasattr(F, "_scaled_dot_product_attention"):
        F._scaled_dot_product_attention = _sdpa
    for name, attrs in (("torch._six", {"inf": math.inf}),
                        ("tensorboardX", {"SummaryWriter": object}),
                        ("sklearn", {"metrics": None})):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.SimpleNamespace(**attrs)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                             world_size=1)
    sys.path.insert(0, os.path.abspath(path))
    with contextlib.redirect_stdout(io.StringIO()):
        import build_dataset
        import ema
        import engine_self_training
        import model as release_model
        import optim_factory
        import utils
    # with one process there is nothing to gather; the release's version moves its meters to 'cuda'
    utils.MetricLogger.synchronize_between_processes = lambda self: None
    for m in (build_dataset, ema, engine_self_training, release_model, optim_factory, utils):
        if not os.path.abspath(m.__file__).startswith(os.path.abspath(path)):
            raise RuntimeError(f"{m.__name__} was imported from {m.__file__}, "
                               f"not from the release at {path}")
    return types.SimpleNamespace(build_dataset=build_dataset, ema=ema, engine=engine_self_training,
                                 model=release_model, optim=optim_factory, utils=utils,
                                 path=os.path.abspath(path))


def quiet(fn, *args, **kwargs):
    """The release prints its parameter groups, missing keys and progress; keep the fixture run
    readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# models: the release's clip_classifier built by its own code, and the name map to the project

def toy_state_dict():
    """toy_clip.pt as a plain state dict: it stores the token embedding by its used rows (the others
    are zero)."""
    sd = torch.load(toy.WEIGHTS, map_location="cpu", weights_only=True)
    ids, rows = sd.pop("token_embedding.ids"), sd.pop("token_embedding.rows")
    weight = rows.new_zeros(sd.pop("token_embedding.vocab_size"), rows.shape[1])
    weight[ids] = rows
    sd.pop("recipe")
    return {**sd, "token_embedding.weight": weight}


def build_release_classifier(R, state_dict, classnames, templates, seed=SEED):
    """The release's clip_classifier (its load() -> build_model(mask=True) -> zero-shot head) for a
    state dict.

    The [MSK] token, patch LayerNorm and decoder are the release's own random init under
    torch.manual_seed(seed).
    """
    context_length = state_dict["positional_embedding"].shape[0]
    tokenize = R.model.tokenize
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state_dict, os.path.join(tmp, "clip.pt"))
        for name, value in (("templates.json", {"toy": templates}),
                            ("classes.json", {"toy": classnames})):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(value, f)
        args = Namespace(template=os.path.join(tmp, "templates.json"),
                         classname=os.path.join(tmp, "classes.json"),
                         dataset="toy", clip_model=os.path.join(tmp, "clip.pt"), mask=True,
                         device="cpu")
        R.model.tokenize = lambda texts: tokenize(texts, context_length=context_length)
        try:
            torch.manual_seed(seed)
            model = quiet(R.model.clip_classifier, args)
        finally:
            R.model.tokenize = tokenize
    return model


def project_name(release_name):
    """Release parameter name (clip_classifier) -> the project's MUSTModel name."""
    name = release_name.removeprefix("model.")
    if name == "visual.mask_token_embedding":
        return "visual.mask_token"
    if name == "visual.classifier":
        return "classifier.weight"
    return name


def to_project(release_name, tensor):
    """A release tensor in the project's layout: [MSK] (1, 1, width) -> (width,), classifier (D, K)
    -> (K, D)."""
    name = project_name(release_name)
    t = tensor.detach().clone()
    if name == "visual.mask_token":
        t = t.reshape(-1)
    elif name == "classifier.weight":
        t = t.t().contiguous()
    return name, t


def project_state(model):
    return dict(to_project(k, v) for k, v in model.state_dict().items())


EXTRA = ("visual.mask_token", "visual.ln_patch.weight", "visual.ln_patch.bias",
         "visual.decoder.0.weight", "visual.decoder.0.bias", "classifier.weight")


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def toy_images(split, start, n):
    images, labels = toy.render_split(split, n=n, start=start)
    return images, torch.from_numpy(labels).long()


def exact_fp16(x):
    """Round to fp16 so that the fixture can store the exact input in half the bytes."""
    return x.half().float()


# --------------------------------------------------------------------------------------------------
# (a) masked forward

def forward_fixture(R):
    model = build_release_classifier(R, toy_state_dict(), toy.SHAPES, toy.TEMPLATES).eval()
    visual = model.model.visual
    images, _ = toy_images("test", 0, 4)
    images = exact_fp16(toy.to_tensor(images))
    np.random.seed(SEED)
    generator = R.build_dataset.MaskGenerator(input_size=32, mask_patch_size=8, model_patch_size=8,
                                              mask_ratio=0.3)
    # (B, 4, 4) int, 5 of 16 ones
    masks = torch.from_numpy(np.stack([generator() for _ in range(len(images))]))

    captured = {}
    hooks = [visual.ln_post.register_forward_hook(
                 lambda m, i, o: captured.__setitem__("cls", o)),
             visual.ln_patch.register_forward_hook(
                 lambda m, i, o: captured.__setitem__("patch", o))]
    with torch.no_grad():
        logits, recon, align, pixel_mask = model(images, mask=masks)
        # the two lines of VisionTransformer_MIM.forward that make the features its losses use
        v_cls = F.normalize(captured["cls"] @ visual.proj, dim=-1)
        v_patch = F.normalize(captured["patch"] @ visual.proj, dim=-1)
        logits_unmasked = model(images)
    for h in hooks:
        h.remove()
    state = project_state(model)
    return {
        "images": images.half(),  # (4, 3, 32, 32) exact
        # (4, 16) project layout; the release's (4, 4) grid flattened row-major
        "mask": masks.flatten(1).bool(),
        # release init of the MUST heads + its zero-shot head, project names
        "extra": {k: state[k] for k in EXTRA},
        "logits": logits, "logits_unmasked": logits_unmasked,  # (4, 10), scale 100
        "v_cls": v_cls, "v_patch": v_patch,  # (4, 64), (4, 16, 64) L2-normalized
        "recon": recon,  # (4, 3, 32, 32)
        "align": align,  # (4, 5): ||v_cls - v_patch||² of each masked token, in patch order
        "pixel_mask": pixel_mask.bool(),  # (4, 1, 32, 32)
    }


# --------------------------------------------------------------------------------------------------
# (b) parameter groups

def tiny_state_dict(vision_layers, seed=SEED):
    """A random OpenAI-format CLIP state dict: 12 blocks give two-digit block numbers in the
    names."""
    from conftest import tiny_clip
    torch.manual_seed(seed)
    return tiny_clip(vision_layers=vision_layers).state_dict()


def groups_fixture(R, model, weight_decay, layer_decay):
    """Every trainable parameter's group under the release's create_optimizer as its train.py calls
    it."""
    num_layers = model.model.visual.transformer.layers
    assigner = R.optim.LayerDecayValueAssigner(
        list(layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)))
    args = Namespace(opt="adamw", weight_decay=weight_decay, lr=1e-3, opt_eps=1e-8, opt_betas=None,
                     momentum=0.9)
    optimizer = quiet(R.optim.create_optimizer, args, model, get_num_layer=assigner.get_layer_id,
                      get_layer_scale=assigner.get_scale)
    names = {id(p): n for n, p in model.named_parameters()}
    rows = []
    for group in optimizer.param_groups:
        layer = int(group["name"].split("_")[1])  # "layer_%d_decay" / "layer_%d_no_decay"
        for p in group["params"]:
            rows.append({"release_name": names[id(p)], "name": project_name(names[id(p)]),
                         "layer_id": layer, "lr_scale": group["lr_scale"],
                         "weight_decay": group["weight_decay"]})
    assert len(rows) == sum(1 for p in model.parameters() if p.requires_grad)
    return {"num_layers": num_layers, "weight_decay": weight_decay, "layer_decay": layer_decay,
            "betas": list(optimizer.defaults["betas"]), "eps": optimizer.defaults["eps"],
            "params": sorted(rows, key=lambda r: r["name"])}


# --------------------------------------------------------------------------------------------------
# (c) lr schedule and EMA decay ramp

def schedule_fixture(R):
    # (base lr, final lr, epochs, iterations per epoch), lr and min_lr already × batch / 256
    settings = [
        (1e-3, 1e-4, 2, 2),  # release_steps.pt's schedule
        (2e-4 * 128 / 256, 1e-6 * 128 / 256, 5, 234),  # toy defaults
        (2e-5 * 1024 / 256, 1e-6 * 1024 / 256, 30, 1251),  # ImageNet ViT-B/16, batch 1024
        (4e-5 * 512 / 256, 1e-6 * 512 / 256, 20, 2502),  # ImageNet ViT-L/14, batch 512
    ]
    cosine = []
    for base, final, epochs, niter in settings:
        values = quiet(R.utils.cosine_scheduler, base, final, epochs, niter)
        total = epochs * niter
        steps = np.arange(total) if total <= 2000 else np.unique(
            np.r_[0:5, total - 5:total, np.linspace(0, total - 1, 60).round()])
        steps = steps.astype(np.int64)
        cosine.append({"lr": base, "min_lr": final, "epochs": epochs, "steps_per_epoch": niter,
                       "step": torch.from_numpy(steps),
                       "value": torch.from_numpy(values[steps].astype(np.float64))})

    ema = []
    for mu0, warm in ((0.999, 2000), (0.99, 500), (0.99, 2000), (0.9, 4)):
        its = sorted({0, 1, 2, 3, 4, 5, 10, warm // 2, warm - 1, warm, warm + 1, 2 * warm,
                      10 * warm})
        ema.append({"mu0": mu0, "mu_n": warm, "mu_max": 0.9998, "step": its,
                    "value": [release_ema_decay(R, it, mu0, warm, 0.9998) for it in its]})
    return {"cosine": cosine, "ema": ema}


class _Stop(Exception):
    pass


def release_ema_decay(R, it, mu0, warm_it, mu_max):
    """The EMA decay train_one_epoch sets for global iteration `it`, read where it is used (the
    teacher's forward on the weak view); that step is then abandoned."""

    class Teacher:
        def ema(self, images):
            seen.append(self.decay)
            raise _Stop

    seen = []
    batch = [((torch.zeros(1), torch.zeros(1), torch.zeros(1)), torch.zeros(1))]
    try:
        quiet(R.engine.train_one_epoch, nn.Identity(), Namespace(model_ema_decay=mu_max),
              {"model_ema_decay_init": mu0, "warm_it": warm_it}, batch, None, None, "cpu", 0, None,
              start_steps=it, lr_schedule_values=None, model_ema=Teacher())
    except _Stop:
        pass
    return seen[0]


# --------------------------------------------------------------------------------------------------
# (d) masked-unit count

def mask_count_fixture(R):
    """MaskGenerator.mask_count for every train_configs.json row (224 px) and a few others."""
    with open(os.path.join(R.path, "train_configs.json")) as f:
        configs = json.load(f)
    settings = {(224, c["mask_patch_size"], c["model_patch_size"], c["mask_ratio"])
                for c in configs.values()}
    settings |= {(32, 8, 8, 0.0625), (32, 8, 8, 0.1), (32, 16, 8, 0.3), (32, 16, 8, 0.5),
                 (336, 56, 14, 0.3),
                 (224, 16, 16, 0.0), (224, 32, 16, 1.0),
                 # 100 × 0.55 = 55.00000000000001 in floating point: the release masks 56
                 (280, 28, 14, 0.55)}
    rows = []
    for input_size, unit, patch, ratio in sorted(settings):
        gen = R.build_dataset.MaskGenerator(input_size=input_size, mask_patch_size=unit,
                                            model_patch_size=patch, mask_ratio=ratio)
        rows.append({"input_size": input_size, "mask_unit": unit, "patch_size": patch,
                     "mask_ratio": ratio,
                     "units": gen.token_count, "masked_units": gen.mask_count,
                     "masked_patches": int(gen().sum())})
    return rows


# --------------------------------------------------------------------------------------------------
# (e) optimizer steps of the release's train_one_epoch

STEPS = dict(
    # epoch 0: steps 0-1, epoch 1: 2
    batch_size=8, steps=3, steps_per_epoch=2, epochs=2, total_steps=4,
    # what the release's train.py would get from base lr × batch / 256
    lr=1e-3, min_lr=1e-4,
    # large enough that decay (also of [MSK]) shows above float noise
    weight_decay=0.5, layer_decay=0.8,
    mu0=0.9, mu_n=4, mu_max=0.9998, conf_threshold=0.9, lambda_reg=1.0, lambda_align=0.2,
    # 2 of 4 units, 8 of 16 patches
    logit_scale=LOGIT_SCALE, patch_size=8, mask_unit=16, mask_ratio=0.3,
    betas=(0.9, 0.999), eps=1e-8)
# the release's fairness term switches to its running mean at nb_classes >= 512
RUNNING_CLASSES = 512
SAMPLED = 256  # stored entries of each large final tensor
FULL_MAX = 4096  # tensors up to this size are stored whole


def step_batches():
    """3 batches of 8 target-domain toy images: weak view = the image, strong view =
    data.strong_view('light')."""
    from PIL import Image
    n = STEPS["batch_size"] * STEPS["steps"]
    images, labels = toy_images("train", 0, n)
    strong_view = data.strong_view(32, "light")
    torch.manual_seed(SEED)
    strong = np.stack([np.asarray(strong_view(Image.fromarray(im))) for im in images])
    weak, strong = exact_fp16(toy.to_tensor(images)), exact_fp16(toy.to_tensor(strong))
    return weak, strong, labels


def step_masks(R, n):
    np.random.seed(SEED + 1)
    gen = R.build_dataset.MaskGenerator(input_size=32, mask_patch_size=STEPS["mask_unit"],
                                        model_patch_size=8, mask_ratio=STEPS["mask_ratio"])
    # (n, 4, 4) int64, the release's layout
    return torch.from_numpy(np.stack([gen() for _ in range(n)]))


class StepLog:
    """A log_writer for train_one_epoch: it calls update(..., head=...) with each step's numbers,
    then set_step()."""

    def __init__(self):
        self.rows = [{}]

    def update(self, head="scalar", step=None, **values):
        self.rows[-1].update({k: float(v) for k, v in values.items()})

    def set_step(self, step=None):
        self.rows.append({})


def run_release_steps(R, model, weak, strong, masks, labels):
    """train.py's setup (EMA made before the optimizer, create_optimizer with layer decay,
    cosine_scheduler) and its epoch loop, on fixed batches; returns the per-step records and the
    final student and teacher."""
    c, K = STEPS, model.model.visual.classifier.shape[1]
    args = Namespace(mask=True, nb_classes=K, model_ema_decay=c["mu_max"], lr=c["lr"],
                     min_lr=c["min_lr"], weight_decay=c["weight_decay"],
                     layer_decay=c["layer_decay"], opt="adamw", opt_eps=c["eps"],
                     opt_betas=None, momentum=0.9, epochs=c["epochs"], warmup_epochs=0,
                     warmup_steps=-1)
    train_config = {"model_ema_decay_init": c["mu0"], "warm_it": c["mu_n"],
                    "conf_threshold": c["conf_threshold"],
                    "w_fair": c["lambda_reg"], "w_align": c["lambda_align"]}
    model_ema = R.ema.ModelEma(model, decay=args.model_ema_decay, resume="")
    num_layers = model.model.visual.transformer.layers
    assigner = R.optim.LayerDecayValueAssigner(
        list(args.layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)))
    optimizer = quiet(R.optim.create_optimizer, args, model, get_num_layer=assigner.get_layer_id,
                      get_layer_scale=assigner.get_scale)
    assert (tuple(optimizer.defaults["betas"]) == c["betas"]
            and optimizer.defaults["eps"] == c["eps"])
    lr_schedule_values = quiet(R.utils.cosine_scheduler, args.lr, args.min_lr, args.epochs,
                               c["steps_per_epoch"], warmup_epochs=args.warmup_epochs,
                               warmup_steps=args.warmup_steps)
    assert len(lr_schedule_values) == c["total_steps"]

    log, decays, lrs = StepLog(), [], []
    update = model_ema.update
    model_ema.update = lambda m: (decays.append(model_ema.decay), update(m))
    optimizer.register_step_pre_hook(
        lambda opt, a, k: lrs.append({g["name"]: float(g["lr"]) for g in opt.param_groups}))

    B = c["batch_size"]
    batches = [((weak[i:i + B], strong[i:i + B], masks[i:i + B]), labels[i:i + B])
               for i in range(0, len(weak), B)]
    for epoch in range(c["epochs"]):
        loader = batches[epoch * c["steps_per_epoch"]:(epoch + 1) * c["steps_per_epoch"]]
        if loader:
            quiet(R.engine.train_one_epoch, model, args, train_config, loader, optimizer,
                  contextlib.nullcontext, torch.device("cpu"), epoch, None, log_writer=log,
                  start_steps=epoch * c["steps_per_epoch"],
                  lr_schedule_values=lr_schedule_values, model_ema=model_ema)
    rows = log.rows[:-1]
    assert len(rows) == len(decays) == len(lrs) == c["steps"]
    # the release's loss is NaN without a confident sample; all confident would hide the mask
    for row in rows:
        assert 0 < row["conf_ratio"] < 1, row
    steps = {k: torch.tensor([row[k] for row in rows], dtype=torch.float64)
             for k in ("loss_st", "loss_fair", "loss_mim", "loss_align", "conf_ratio",
                       "pseudo_label_acc")}
    steps["loss"] = (steps["loss_st"] + c["lambda_reg"] * steps["loss_fair"] + steps["loss_mim"]
                     + c["lambda_align"] * steps["loss_align"])
    steps["ema_mu"] = torch.tensor(decays, dtype=torch.float64)
    steps["lr"] = torch.tensor([max(s.values()) for s in lrs], dtype=torch.float64)  # top layer
    steps["lr_by_group"] = lrs
    return steps, project_state(model), project_state(model_ema.ema)


def sampled_indices(state):
    g = torch.Generator().manual_seed(SEED)
    return {name: torch.randperm(t.numel(), generator=g)[:SAMPLED].sort().values.int()
            for name, t in sorted(state.items()) if t.numel() > FULL_MAX}


def compact(final, initial, index):
    """Tensors up to FULL_MAX entries whole; larger ones as SAMPLED entries + float64 sums of
    (final - initial)."""
    out = {"full": {}, "sampled": {}}
    for name, t in final.items():
        if name not in index:
            out["full"][name] = t
            continue
        d = (t.double() - initial[name].double()).flatten()
        out["sampled"][name] = {"value": t.flatten()[index[name].long()],
                                "delta_sum": d.sum().item(),
                                "delta_abs_sum": d.abs().sum().item(),
                                "delta_sq_sum": d.pow(2).sum().item()}
    return out


def steps_fixture(R):
    sd = toy_state_dict()
    weak, strong, labels = step_batches()
    masks = step_masks(R, len(weak))
    runs, init_extra = {}, None
    for mode in ("batch", "running"):
        model = build_release_classifier(R, sd, toy.SHAPES, toy.TEMPLATES)
        if mode == "running":
            g = torch.Generator().manual_seed(SEED + 2)
            head = F.normalize(torch.randn(model.model.visual.classifier.shape[0], RUNNING_CLASSES,
                                           generator=g), dim=0)
            model.model.visual.classifier = nn.Parameter(head)
        initial = project_state(model)
        extra = {k: initial[k] for k in EXTRA if k != "classifier.weight"}
        if init_extra is None:
            init_extra = extra
        assert all(torch.equal(init_extra[k], extra[k]) for k in extra)
        # the rest of the initial student is the toy CLIP's image tower
        for name, t in initial.items():
            assert name in EXTRA or torch.equal(t, sd[name]), name
        steps, student, teacher = run_release_steps(R, model, weak, strong, masks, labels)
        index = sampled_indices(student)
        runs[mode] = {"num_classes": model.model.visual.classifier.shape[1],
                      "running_mean": mode == "running",
                      "init_classifier": initial["classifier.weight"], "steps": steps,
                      "index": index,
                      "student": compact(student, initial, index),
                      "teacher": compact(teacher, initial, index)}
    return {"about": STEPS_ABOUT, "release_commit": RELEASE_COMMIT,
            "toy_clip_sha256": sha256_file(toy.WEIGHTS),
            "hparams": dict(STEPS, betas=list(STEPS["betas"])), "weak": weak.half(),
            "strong": strong.half(),
            "mask": masks.flatten(1).bool(), "target": labels, "init_extra": init_extra,
            "runs": runs}


STEPS_ABOUT = (
    "3 AdamW steps of the release's engine_self_training.train_one_epoch on the toy CLIP "
    "(project names).\n"
    "Initial student = the image tower of toy_clip.pt (toy_state_dict, keys 'visual.*'; sha256 "
    "in toy_clip_sha256) +\n"
    "init_extra ([MSK] (width,), ln_patch, decoder: the release's init) + "
    "runs[mode]['init_classifier'] (K, D), logit\n"
    "scale 100; initial teacher = initial student. Step i (i = 0, 1, 2) uses rows 8i..8i+7 of "
    "weak / strong (fp16,\n"
    "exact) / mask ((24, 16) bool, True = masked patch) / target (labels, only logged). hparams: "
    "lr and min_lr are the\n"
    "schedule's ends (already x batch / 256), cosine over total_steps = epochs x steps_per_epoch "
    "= 4; steps 0-1 are\n"
    "epoch 0 and step 2 is epoch 1 (the release resets its running fairness mean at an epoch's "
    "first step).\n"
    "runs['batch']: 10 classes (the release's batch-mean fairness); runs['running']: 512 classes "
    "(its running mean).\n"
    "steps: per-step float64 (3,) loss_st, loss_fair (as the release logs it, /0.5 included), "
    "loss_mim, loss_align,\n"
    "conf_ratio, pseudo_label_acc as logged; loss = loss_st + lambda_reg loss_fair + loss_mim + "
    "lambda_align loss_align\n"
    "summed here from the logged terms; ema_mu = decay of that step's EMA update; lr = top "
    "layer's lr of that step;\n"
    "lr_by_group = {release group name 'layer_<i>_<decay|no_decay>': lr}.\n"
    "student / teacher after 3 steps: 'full' {name: tensor} for tensors up to 4096 entries; "
    "'sampled' {name: {'value'\n"
    "at flat positions runs[mode]['index'][name], 'delta_sum', 'delta_abs_sum', 'delta_sq_sum' "
    "of final - initial in\n"
    "float64}} for the larger ones. The attention key biases (in_proj_bias[width:2 width]) have "
    "a zero gradient in\n"
    "exact arithmetic; Adam turns their rounding noise into lr-sized steps, so their values are "
    "not comparable.")

FORWARD_ABOUT = (
    "Release outputs on the toy CLIP with its own [MSK] / ln_patch / decoder init and zero-shot "
    "head\n"
    "('extra', project names and layout), logit scale 100. forward: images (4,3,32,32) fp16 "
    "exact, mask (4,16) bool,\n"
    "logits / logits_unmasked (4,10), v_cls (4,64), v_patch (4,16,64), recon (4,3,32,32), align "
    "(4,5) per masked token,\n"
    "pixel_mask (4,1,32,32). groups: create_optimizer's groups per parameter for the toy model "
    "and a random 12-block\n"
    "tiny CLIP. schedule: cosine_scheduler values at 'step' and the EMA decay train_one_epoch "
    "sets at global iteration\n"
    "'step'. mask_count: MaskGenerator counts.")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MUST_RELEASE")
    if not path:
        raise SystemExit("usage: MUST_RELEASE=/path/to/release "
                         "python tests/make_release_fixtures.py")
    torch.set_num_threads(1)
    R = import_release(path)
    os.makedirs(OUT, exist_ok=True)
    toy_model = build_release_classifier(R, toy_state_dict(), toy.SHAPES, toy.TEMPLATES)
    deep = build_release_classifier(R, tiny_state_dict(12), ["cat", "dog", "bird"],
                                    ["a photo of a {}."])
    forward = {"about": FORWARD_ABOUT, "release_commit": RELEASE_COMMIT,
               "toy_clip_sha256": sha256_file(toy.WEIGHTS),
               "logit_scale": LOGIT_SCALE, "forward": forward_fixture(R),
               "groups": {"toy": groups_fixture(R, toy_model, 0.05, 0.65),
                          "deep": groups_fixture(R, deep, 0.05, 0.65)},
               "schedule": schedule_fixture(R), "mask_count": mask_count_fixture(R)}
    torch.save(forward, os.path.join(OUT, "release_forward.pt"))
    torch.save(steps_fixture(R), os.path.join(OUT, "release_steps.pt"))
    for name in ("release_forward.pt", "release_steps.pt"):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name)) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
