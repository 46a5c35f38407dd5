"""MUST: Masked Unsupervised Self-Training (Li, Savarese, Hoi; ICLR 2023) -- the method.

The model (paper §3, Fig. 1-2): CLIP's image tower, patched with a [MSK] token, a patch LayerNorm
and a linear pixel decoder (clip_model.VisionTransformer, its MUST section), plus a linear
classifier whose weights start as CLIP's zero-shot text embeddings and are trained with the tower.

One function per equation of the paper, then the optimizer step that uses them all:
    eq. 1  ema_momentum / ema_update   EMA teacher  Δ ← µΔ + (1 − µ)θ
    eq. 2  pseudo_labels / loss_cls    self-training on confident hard pseudo-labels
    eq. 3  loss_reg (+ mean_probs, FairnessMean, fairness_weights)   fairness regularization
    eq. 4  loss_mim                    masked image modeling, L1 on masked pixels
    eq. 5  loss_align                  global-local (CLS-MSK) feature alignment
    eq. 6  must_loss                   L = L_cls + λ_reg L_reg + L_mim + λ_align L_align
           must_step                   one optimizer step on a global batch, eq. 1-6 in order
A trained model leaves as a standalone classifier file: save_classifier, load_classifier.
"""
import contextlib
import copy
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from util import clip_load
import clip_model
from util.runtime import all_reduce, is_distributed, save_atomic


# ----------------------------------------------------------------------------------------------
# model

class MUSTOutput(NamedTuple):
    """What the student computes on a batch of B images. Without a mask only the logits; with one,
    the inputs of eq. 4 and 5 too."""
    logits: torch.Tensor  # (B, K) classifier logits
    v_cls: Optional[torch.Tensor] = None  # (B, D) [CLS] embedding, L2-normalized
    v_patch: Optional[torch.Tensor] = None  # (B, N, D) patch embeddings, L2-normalized
    recon: Optional[torch.Tensor] = None  # (B, 3, H, W) the decoder's pixels


class MUSTModel(nn.Module):
    """CLIP image tower + linear classifier initialized from the zero-shot head (paper Fig. 1).

    logits = s · normalize(v_cls) @ W, with W (embed_dim, K) = the zero-shot head at init and s the
    CLIP checkpoint's own logit scale exp(logit_scale) (exactly 100 for OpenAI's CLIPs, which the
    release hard-codes). Stored as self.classifier = nn.Linear(embed_dim, K, bias=False)
    (weight = W.T) and the buffer self.logit_scale (the multiplier s itself, not its log).
    must_heads=False leaves the tower without [MSK], patch LayerNorm and decoder: a classifier
    only (load_classifier).
    """

    def __init__(self, visual, head, logit_scale, freeze_classifier=False, must_heads=True):
        super().__init__()
        if must_heads and not visual.has_must_heads:
            visual.add_must_heads()
        self.visual = visual
        embed_dim, num_classes = head.shape
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(head.t())
        # The §4.4 warm-up: a frozen classifier anchors the image embeddings to CLIP's text ones.
        self.classifier.weight.requires_grad_(not freeze_classifier)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @classmethod
    def from_clip(cls, clip, head, freeze_classifier=False):
        """A CLIP's image tower with `head` (embed_dim, K) as its classifier, at the CLIP's own
        logit scale: CLIP zero-shot as a MUSTModel, where MUST starts."""
        return cls(clip.visual, head, clip.logit_scale.exp().item(), freeze_classifier)

    @property
    def num_classes(self):
        return self.classifier.out_features

    def classify(self, v):
        """v: (B, D) image embedding -> logits (B, K) = s · normalize(v) · W, in fp32 whatever the
        autocast: at s = 100 a bf16 cosine's error of 0.004 is 0.4 in a logit, enough to flip
        pseudo-labels across τ."""
        with torch.autocast(v.device.type, enabled=False):
            weight = self.classifier.weight.float()
            return self.logit_scale * F.linear(F.normalize(v.float(), dim=-1), weight)

    def forward(self, images, mask=None):
        """images (B,3,H,W); mask (B, N) bool, True = masked patch, or None -> MUSTOutput.

        The masked pass goes through forward() too, so that DistributedDataParallel sees it (DDP
        only synchronizes the gradients of calls to forward)."""
        if mask is None:
            return MUSTOutput(self.classify(self.visual(images)))
        v_cls, v_patch, recon = self.visual.forward_must(images, mask)
        return MUSTOutput(self.classify(v_cls), v_cls, v_patch, recon)


def load_checkpoint(ckpt, which="student"):
    """The student or the EMA teacher ("teacher") of a train.py checkpoint, read with
    runtime.read_checkpoint -> MUSTModel on CPU in eval mode. Needs no CLIP weights on disk: the
    tower is rebuilt from the checkpoint's own tensor shapes, with the activation and head count of
    the CLIP it started from (QuickGELU and 64-wide heads in checkpoints older than that record:
    the only ones there were)."""
    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', not {which!r}")
    return _from_state(ckpt[which], ckpt.get("clip", {}))


def _from_state(state, spec):
    """A MUSTModel's state dict -> the MUSTModel on CPU in eval mode, loaded strictly; with the
    MUST heads if the state holds them (a checkpoint's), without if not (a classifier file's).
    spec: the CLIP's spec as a dict (QuickGELU and 64-wide heads where it says none)."""
    tower = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    visual = clip_model.build_visual(tower, spec.get("activation", "quick_gelu"),
                                     spec.get("vision_heads"))
    model = MUSTModel(visual, state["classifier.weight"].t(), state["logit_scale"].item(),
                      must_heads="visual.mask_token" in state)
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# the standalone classifier (eval.py --export)

# What MUST adds to CLIP's tower to train it (VisionTransformer.add_must_heads): classifying
# needs none of it.
_TRAINING_HEADS = ("visual.mask_token", "visual.ln_patch.", "visual.decoder.")


def save_classifier(model, classnames, spec, path):
    """Write a MUSTModel as a classifier file: the tower's and the classifier's tensors (the logit
    scale among them), the class names and the clip_load.ClipSpec that prepares its images. No
    optimizer, no teacher, no MUST heads. load_classifier reads it."""
    state = {k: v.cpu() for k, v in model.state_dict().items()
             if not k.startswith(_TRAINING_HEADS)}
    save_atomic({"model": state, "classnames": list(classnames), "clip": spec._asdict()}, path)


def load_classifier(path):
    """A classifier file that eval.py --export wrote -> (MUSTModel on CPU in eval mode, the
    transform that prepares a PIL image for it, the class names). It is read with
    torch.load(weights_only=True), so nothing in the file runs:

        model, preprocess, classnames = must.load_classifier("classifier.pt")
        probs = model(preprocess(image).unsqueeze(0)).logits.softmax(-1)
    """
    file = torch.load(path, map_location="cpu", weights_only=True)
    spec = clip_load.ClipSpec(**file["clip"])
    model = _from_state(file["model"], file["clip"])
    return model, clip_load.image_transform(model.visual.input_resolution, spec), file["classnames"]


# ----------------------------------------------------------------------------------------------
# eq. 1: EMA teacher

def make_teacher(student):
    """Δ initialized as θ (§3.1); the teacher never receives gradients and always runs in eval
    mode."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


def ema_momentum(step, mu0, mu_n, mu_max=0.9998):
    """µ at optimizer step `step` (0 = first update): a linear ramp from µ0 to 0.9998 over µn
    iterations (§3.4)."""
    if mu_n <= 0:
        return mu_max
    return mu0 + (mu_max - mu0) * min(step / mu_n, 1.0)


@torch.no_grad()
def ema_update(teacher, student, mu):
    """eq. 1: Δ ← µΔ + (1 − µ)θ for every parameter and floating buffer (integer buffers are
    copied).

    Written as Δ ← Δ + (1 − µ)(θ − Δ) (lerp, the same quantity), so that a parameter the student
    never changes (a frozen classifier, unused MIM heads) stays bit-identical in the teacher instead
    of drifting by rounding.
    """
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    if t_state.keys() != s_state.keys():
        raise ValueError("teacher and student have different parameters")
    floats = [name for name, t in t_state.items() if t.is_floating_point()]
    # One multi-tensor kernel for all of them, not one launch per tensor.
    torch._foreach_lerp_([t_state[n] for n in floats], [s_state[n].detach() for n in floats],
                         1.0 - mu)
    for name, t in t_state.items():
        if not t.is_floating_point():
            t.copy_(s_state[name])


# ----------------------------------------------------------------------------------------------
# eq. 2: self-training
#
# Every loss below is written as a PART's share of the loss of the whole global batch (all
# micro-batches of all processes): the shares add up to the release's global-batch loss, so their
# gradients, summed over micro-batches and averaged by DDP (times the world size), are exactly the
# gradient of one process holding the whole batch.

@torch.no_grad()
def pseudo_labels(teacher_logits, conf_threshold):
    """eq. 2's targets: q = softmax of the EMA teacher's logits on the weak view (fp32, whatever the
    autocast), q̂ = argmax q, confident where max q > τ.
    -> (labels (B,) long, confident (B,) bool)"""
    max_prob, labels = teacher_logits.float().softmax(dim=-1).max(dim=-1)
    return labels, max_prob > conf_threshold


def loss_cls(student_logits, labels, confident, num_confident):
    """eq. 2: cross-entropy H(q̂_b, p_b), p_b the student's softmax on the strong view, summed over
    this part's confident samples and divided by num_confident, the number of confident samples in
    the whole global batch.

    Summed over the parts this is the mean over confident samples, as the release computes it (the
    paper's equation writes 1/B; the two differ by the share of confident samples). A batch with no
    confident sample gives exactly 0 (the release produces NaN there).
    """
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")  # (B,)
    confident_ce = torch.where(confident, ce, torch.zeros_like(ce))
    return confident_ce.sum() / torch.as_tensor(num_confident).clamp_min(1)


# ----------------------------------------------------------------------------------------------
# eq. 3: fairness regularization

def mean_probs(logits):
    """p̄ of a batch: the mean of the softmax in fp32. (B, K) -> (K,)"""
    return logits.float().softmax(dim=-1).mean(dim=0)


def loss_reg(mean_probs):
    """eq. 3: L_reg = −(1/K) Σ_k log p̄_k, minimal (log K) when the average prediction p̄ (K,) is
    uniform."""
    return -mean_probs.log().mean()


class FairnessMean:
    """The p̄ fed to eq. 3: the global-batch mean p̄_batch, or a running mean
    p̄ ← ½(p̄_prev.detach() + p̄_batch), with the loss divided by ½ so that the gradient reaching
    the current batch keeps the batch-mean scale.

    §3.1 takes the running mean when K > B; the code follows the release's rule, K ≥ 512, which
    differs: ImageNet (K = 1000 < B = 1024) gets the running mean, while SUN397, Food101, UCF101
    and Caltech101 at a batch of 64 (K > B) get the batch mean. At the first step of every epoch
    (reset=True) the release sets p̄ = p̄_batch, with its full gradient, and still divides by ½.
    The state is saved in checkpoints (state_dict / load_state_dict).
    """

    def __init__(self, num_classes):
        self.running = num_classes >= 512
        self.prev = None  # (K,) the detached running mean

    def __call__(self, batch_mean, reset=False):
        """p̄_batch (K,) -> (p̄ for eq. 3, multiplier of L_reg)."""
        if not self.running:
            return batch_mean, 1.0
        if reset or self.prev is None:
            mean = batch_mean
        else:
            mean = 0.5 * (self.prev.to(batch_mean.device) + batch_mean)
        self.prev = mean.detach()
        return mean, 1.0 / 0.5

    def state_dict(self):
        return {"running": self.running, "prev": None if self.prev is None else self.prev.cpu()}

    def load_state_dict(self, state):
        self.running = state["running"]
        self.prev = state["prev"]


def fairness_weights(batch_mean, fairness, reset=False):
    """L_reg (eq. 3, through `fairness`) at the global batch's p̄_batch (K,), and
    w = ∂L_reg/∂p̄_batch. -> (w (K,), L_reg value)

    p̄_batch = (1/B) Σ_b p_b over the global batch, so a part's share (1/B) Σ_{b in part} w·p_b has
    exactly that part's gradient of L_reg: the regularizer of the global batch needs no gradient
    across processes or micro-batches, only p̄_batch. Advances the running mean once.
    """
    p = batch_mean.detach().float().requires_grad_()
    with torch.enable_grad():
        mean, scale = fairness(p, reset)
        value = scale * loss_reg(mean)
        (w,) = torch.autograd.grad(value, p)
    return w, value.detach()


def global_mean_probs(logits_of_parts, global_batch):
    """p̄_batch (K,) of the global batch, from the logits of this process's parts: each part adds
    its images' probabilities, and the sums are added over processes."""
    probs = sum(len(logits) * mean_probs(logits) for logits in logits_of_parts)
    return all_reduce(probs, probs.device) / global_batch


# ----------------------------------------------------------------------------------------------
# eq. 4: masked image modeling

def pixel_mask(mask, patch_size, grid_hw=None):
    """Patch mask (B, N) bool -> pixel mask (B, 1, H, W) float, each patch upsampled to
    patch_size²."""
    B, N = mask.shape
    gh, gw = grid_hw if grid_hw is not None else (int(round(N ** 0.5)),) * 2
    m = mask.reshape(B, 1, gh, gw).float()
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def loss_mim(recon, target, mask, patch_size):
    """eq. 4: L1 between the decoder's output and the strong view's CLIP-normalized pixels, on
    masked pixels only, averaged over masked pixels and the 3 channels. recon, target (B,3,H,W);
    mask (B,N) bool. 0 if nothing is masked."""
    H, W = target.shape[-2:]
    m = pixel_mask(mask, patch_size, (H // patch_size, W // patch_size))  # (B,1,H,W)
    l1 = (recon.float() - target.float()).abs()  # (B,3,H,W)
    return (l1 * m).sum() / (m.sum() * target.shape[1]).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# eq. 5: global-local feature alignment

def loss_align(v_cls, v_patch, mask, k=None):
    """eq. 5: L_align = 1/(BM) Σ_b Σ_m ||v_b^c − v_b^m||²₂ between the normalized [CLS] embedding
    v_cls (B,D) and each normalized masked-patch ([MSK]) embedding v_patch (B,N,D); mask (B,N) bool.

    k: align only with the k masked tokens nearest to [CLS] in each image (Table 6 uses k = 10);
    None = all. Averaged over the aligned tokens; 0 if nothing is masked. Both sides receive
    gradients (as in the release).
    """
    dist2 = (v_cls.float().unsqueeze(1) - v_patch.float()).pow(2).sum(dim=-1)  # (B, N)
    if k is None:
        m = mask.float()
        return (dist2 * m).sum() / m.sum().clamp_min(1.0)
    k = min(k, dist2.shape[1])
    far = dist2.masked_fill(~mask, float("inf"))
    nearest, idx = far.topk(k, dim=1, largest=False)  # (B, k)
    valid = mask.gather(1, idx)  # False where an image has fewer than k masked tokens
    return torch.where(valid, nearest, torch.zeros_like(nearest)).sum() / valid.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------
# eq. 6: total loss

@dataclass(frozen=True)
class Hparams:
    """The settings one optimizer step reads (Table 10 and the ablation switches)."""
    conf_threshold: float  # τ (eq. 2)
    lambda_reg: float  # λ_reg (eq. 6)
    lambda_align: float  # λ_align (eq. 6)
    align_k: Optional[int]  # align [CLS] with its k nearest [MSK] only (Table 6); None = all
    patch_size: int  # px; the masks' and the decoder's unit (eq. 4)
    global_batch: int  # B: the images of one optimizer step over all processes
    use_reg: bool = True  # the terms of eq. 6; the ablations switch them off (Tables 5, 7)
    use_mim: bool = True
    use_align: bool = True
    amp_dtype: Optional[torch.dtype] = None  # the autocast dtype; None = fp32


def must_loss(out, images_strong, mask, labels, confident, num_confident, reg_weights, hp):
    """eq. 6: this part's share of L = L_cls + λ_reg L_reg + L_mim + λ_align L_align over a global
    batch of hp.global_batch images (see the note above eq. 2: shares add up to the global-batch
    loss).

    out: the student's MUSTOutput on this part (masked when use_mim or use_align); images_strong
    (b,3,H,W) CLIP-normalized; mask (b,N) bool; labels, confident (b,) from pseudo_labels;
    num_confident: confident samples in the global batch; reg_weights: w of fairness_weights, None
    = no L_reg. L_mim and L_align are means over equally many masked pixels / tokens per image, so
    a part's share is its mean times b / global_batch. hp.use_mim / hp.use_align switch terms off
    for the ablations (Tables 5, 7).
    -> (loss share, {"loss_cls", "loss_mim", "loss_align"}: the detached shares of the terms used)
    """
    part = images_strong.shape[0] / hp.global_batch
    terms = {"loss_cls": loss_cls(out.logits, labels, confident, num_confident)}
    loss = terms["loss_cls"]
    if reg_weights is not None:  # its value is fairness_weights' L_reg; this carries its gradient
        loss = loss + hp.lambda_reg * part * (reg_weights * mean_probs(out.logits)).sum()
    if hp.use_mim:
        terms["loss_mim"] = part * loss_mim(out.recon, images_strong, mask, hp.patch_size)
        loss = loss + terms["loss_mim"]
    if hp.use_align:
        terms["loss_align"] = part * loss_align(out.v_cls, out.v_patch, mask, hp.align_k)
        loss = loss + hp.lambda_align * terms["loss_align"]
    return loss, {name: value.detach() for name, value in terms.items()}


# ----------------------------------------------------------------------------------------------
# one optimizer step

def part_counts(loss, labels, confident, target):
    """One micro-batch's numbers for the log: its confident, all, labeled and correctly
    pseudo-labeled images (target >= 0 is a known label, only logged) and whether its loss is
    non-finite. Counted without boolean indexing and made on the device (torch.full; torch.tensor
    would copy from the host and wait), so that nothing waits for the device."""
    labeled = confident & (target >= 0)
    images = torch.full((), len(target), device=target.device)
    return {"confident": confident.sum(), "images": images, "labeled": labeled.sum(),
            "correct": (labeled & (labels == target)).sum(),
            "nonfinite": ~torch.isfinite(loss.detach())}


def must_step(student, teacher, model, optimizer, scaler, fairness, micro_batches, hp, ema_mu,
              new_epoch):
    """One MUST optimizer step on a global batch of hp.global_batch images, of which this process
    holds `micro_batches` on its device: [((weak, strong, mask), target)]. At every split it is the
    one-process step on the whole batch. model: DistributedDataParallel(student) with several
    processes, else the student. new_epoch restarts the running p̄. Nothing here waits for the
    device. -> {name: 0-dim float64}: this process's loss-term shares and part_counts.
    """
    device = next(student.parameters()).device
    world = torch.distributed.get_world_size() if is_distributed() else 1
    masked = hp.use_mim or hp.use_align
    autocast = torch.autocast(device.type, dtype=hp.amp_dtype, enabled=hp.amp_dtype is not None)
    batches = [[*views, target] for views, target in micro_batches]  # [weak, strong, mask, target]

    # 1. The teacher labels every micro-batch first, from the weak view without a mask (eq. 2): the
    #    confident samples of the whole global batch are counted before any backward pass.
    with torch.no_grad(), autocast:
        targets = [pseudo_labels(teacher(weak).logits, hp.conf_threshold)
                   for weak, *_ in batches]
    num_confident = all_reduce(sum(confident.sum() for _, confident in targets), device)

    # 2. p̄ of the global batch (eq. 3). With accumulation, a no-grad pass of the student gives
    #    every micro-batch's probabilities first; with one micro-batch, its forward below does.
    reg_weights = reg_value = None
    if hp.use_reg and len(batches) > 1:
        with torch.no_grad(), autocast:
            logits = [student(strong, mask if masked else None).logits
                      for _, strong, mask, _ in batches]
        reg_weights, reg_value = fairness_weights(global_mean_probs(logits, hp.global_batch),
                                                  fairness, new_epoch)

    # 3. Each micro-batch back-propagates its share of eq. 6. DDP averages the gradients over the
    #    processes, so each share is scaled by their number: the shares add up to the gradient of
    #    the whole batch. Gradients are synchronized once, with the last micro-batch.
    stats = {}
    for i, ((_, strong, mask, target), (labels, confident)) in enumerate(zip(batches, targets)):
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last or world == 1 else model.no_sync():
            with autocast:
                out = model(strong, mask if masked else None)
            if hp.use_reg and reg_weights is None:  # one micro-batch: p̄ from this very forward
                p_bar = global_mean_probs([out.logits.detach()], hp.global_batch)
                reg_weights, reg_value = fairness_weights(p_bar, fairness, new_epoch)
            loss, terms = must_loss(out, strong, mask, labels, confident, num_confident,
                                    reg_weights, hp)
            scaler.scale(loss * world).backward()
        for name, value in {**terms, **part_counts(loss, labels, confident, target)}.items():
            stats[name] = stats.get(name, 0) + value.float().double()
    if hp.use_reg:  # the same global value on every process: the sum over them gives it back
        stats = {"loss_cls": stats.pop("loss_cls"), "loss_reg": (reg_value / world).double(),
                 **stats}

    # 4. The optimizer steps on the summed gradient.
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    # 5. The EMA teacher follows the student (eq. 1).
    ema_update(teacher, student, ema_mu)
    return stats
