"""MUST: Masked Unsupervised Self-Training (Li, Savarese, Hoi; ICLR 2023) -- the method.

The model (paper §3, Fig. 1-2): CLIP's image tower, patched with a [MSK] token, a patch LayerNorm and a
linear pixel decoder (clip_model.VisionTransformer.add_must_heads), plus a linear classifier whose
weights start as CLIP's zero-shot text embeddings and are trained with the tower.

One function per equation of the paper:
    eq. 1  ema_momentum / ema_update   EMA teacher  Δ ← µΔ + (1 − µ)θ
    eq. 2  pseudo_labels / loss_cls    self-training on confident hard pseudo-labels
    eq. 3  loss_reg (+ mean_probs, FairnessMean, fairness_weights)   fairness regularization
    eq. 4  loss_mim                    masked image modeling, L1 on masked pixels
    eq. 5  loss_align                  global-local (CLS-MSK) feature alignment
    eq. 6  must_loss                   L = L_cls + λ_reg L_reg + L_mim + λ_align L_align
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_model


# ----------------------------------------------------------------------------------------------------------
# model

class MUSTModel(nn.Module):
    """CLIP image tower + linear classifier initialized from the zero-shot head (paper Fig. 1).

    logits = s · normalize(v_cls) @ W, with W (embed_dim, K) = the zero-shot head at init and s the CLIP
    checkpoint's own logit scale exp(logit_scale) (exactly 100 for OpenAI's CLIPs, which the release hard-codes).
    Stored as self.classifier = nn.Linear(embed_dim, K, bias=False) (weight = W.T) and the buffer
    self.logit_scale (the multiplier s itself, not its log).
    """

    def __init__(self, visual, head, logit_scale, freeze_classifier=False):
        super().__init__()
        if not visual.has_must_heads:
            visual.add_must_heads()
        self.visual = visual
        embed_dim, num_classes = head.shape
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(head.t())
        # §4.4 warm-up: a frozen classifier anchors the image embeddings to CLIP's text embeddings
        self.classifier.weight.requires_grad_(not freeze_classifier)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @property
    def num_classes(self):
        return self.classifier.out_features

    def classify(self, v):
        """v: (B, D) image embedding -> logits (B, K) = s · normalize(v) · W, in fp32 whatever the autocast: at
        s = 100 a bf16 cosine's error of 0.004 is 0.4 in a logit, enough to flip pseudo-labels across τ."""
        with torch.autocast(v.device.type, enabled=False):
            return self.logit_scale * F.linear(F.normalize(v.float(), dim=-1), self.classifier.weight.float())

    def forward(self, images, mask=None):
        """images (B,3,H,W) -> logits (B, K).

        With a mask, the same as forward_masked: routing the masked pass through forward() lets
        DistributedDataParallel see it (DDP only synchronizes gradients of calls to forward).
        """
        if mask is not None:
            return self.forward_masked(images, mask)
        return self.classify(self.visual(images))

    def forward_masked(self, images, mask):
        """images (B,3,H,W), mask (B, N) bool, True = masked patch
        -> (logits (B,K), v_cls (B,D), v_patch (B,N,D), recon (B,3,H,W)); v_cls and v_patch L2-normalized."""
        v_cls, v_patch, recon = self.visual.forward_must(images, mask)
        return self.classify(v_cls), v_cls, v_patch, recon


def load_checkpoint(path, which="student"):
    """A train.py checkpoint -> (MUSTModel on CPU in eval mode, args dict of the run incl. "classnames").

    which: "student" or "teacher" (the EMA weights). Needs no CLIP weights on disk: the tower is rebuilt
    from the checkpoint's own tensor shapes.
    """
    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', not {which!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # reads only what is used
    state = ckpt[which]
    visual = clip_model.build_visual({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    model = MUSTModel(visual, state["classifier.weight"].t(), state["logit_scale"].item())
    model.load_state_dict(state)
    args = dict(ckpt.get("args", {}))
    args["classnames"] = list(ckpt.get("classnames", []))
    return model.eval(), args


# ----------------------------------------------------------------------------------------------------------
# eq. 1: EMA teacher

def make_teacher(student):
    """Δ initialized as θ (§3.1); the teacher never receives gradients and always runs in eval mode."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


def ema_momentum(step, mu0, mu_n, mu_max=0.9998):
    """µ at optimizer step `step` (0 = first update): linear ramp from µ0 to 0.9998 over µn iterations (§3.4)."""
    if mu_n <= 0:
        return mu_max
    return mu0 + (mu_max - mu0) * min(step / mu_n, 1.0)


@torch.no_grad()
def ema_update(teacher, student, mu):
    """eq. 1: Δ ← µΔ + (1 − µ)θ for every parameter and floating buffer (integer buffers are copied).

    Written as Δ ← Δ + (1 − µ)(θ − Δ) (lerp, the same quantity), so that a parameter the student never changes
    (a frozen classifier, unused MIM heads) stays bit-identical in the teacher instead of drifting by rounding.
    """
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    if t_state.keys() != s_state.keys():
        raise ValueError("teacher and student have different parameters")
    floats = [name for name, t in t_state.items() if t.is_floating_point()]
    # one multi-tensor kernel for all of them, not one launch per tensor
    torch._foreach_lerp_([t_state[n] for n in floats], [s_state[n].detach() for n in floats], 1.0 - mu)
    for name, t in t_state.items():
        if not t.is_floating_point():
            t.copy_(s_state[name])


# ----------------------------------------------------------------------------------------------------------
# eq. 2: self-training
#
# Every loss below is written as a PART's share of the loss of the whole global batch (all micro-batches of all
# processes): the shares add up to the release's global-batch loss, so their gradients, summed over micro-batches
# and averaged by DDP (times the world size), are exactly the gradient of one process holding the whole batch.

@torch.no_grad()
def pseudo_labels(teacher_logits, conf_threshold):
    """eq. 2's targets: q = softmax of the EMA teacher's logits on the weak view (fp32, whatever the autocast),
    q̂ = argmax q, confident where max q > τ. -> (labels (B,) long, confident (B,) bool)."""
    max_prob, labels = teacher_logits.float().softmax(dim=-1).max(dim=-1)
    return labels, max_prob > conf_threshold


def loss_cls(student_logits, labels, confident, num_confident):
    """eq. 2: cross-entropy H(q̂_b, p_b) with p_b the student softmax on the strong view, summed over this part's
    confident samples and divided by num_confident, the count of confident samples in the whole global batch.

    Summed over the parts this is the mean over confident samples, as the release does (the paper's equation
    writes 1/B; the two differ by the share of confident samples). A batch with no confident sample gives exactly
    0 (the release produces NaN there).
    """
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")  # (B,)
    return torch.where(confident, ce, torch.zeros_like(ce)).sum() / torch.as_tensor(num_confident).clamp_min(1)


# ----------------------------------------------------------------------------------------------------------
# eq. 3: fairness regularization

def mean_probs(logits):
    """p̄ of a batch: the mean of the softmax in fp32. (B, K) -> (K,)"""
    return logits.float().softmax(dim=-1).mean(dim=0)


def loss_reg(mean_probs):
    """eq. 3: L_reg = −(1/K) Σ_k log p̄_k, minimal (log K) when the average prediction p̄ (K,) is uniform."""
    return -mean_probs.log().mean()


class FairnessMean:
    """The p̄ fed to eq. 3: the global-batch mean p̄_batch, or, with many classes (K ≥ 512, "K > B" in §3.1), a
    running mean as in the release: p̄ ← ½(p̄_prev.detach() + p̄_batch), with the loss divided by ½ so that the
    gradient reaching the current batch keeps the batch-mean scale. At the first step of every epoch (reset=True)
    the release sets p̄ = p̄_batch, with its full gradient, and still divides by ½. The state is saved in
    checkpoints (state_dict / load_state_dict).
    """

    def __init__(self, num_classes, running=None):
        self.running = num_classes >= 512 if running is None else running
        self.prev = None  # (K,) detached running mean

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
    """L_reg (eq. 3, through `fairness`) at the global batch's p̄_batch (K,), and w = ∂L_reg/∂p̄_batch.

    p̄_batch = (1/B) Σ_b p_b over the global batch, so a part's share (1/B) Σ_{b in part} w·p_b has exactly that
    part's gradient of L_reg: the regularizer of the global batch needs no gradient across processes or
    micro-batches, only p̄_batch. Advances the running mean once. -> (w (K,), L_reg value)."""
    p = batch_mean.detach().float().requires_grad_()
    with torch.enable_grad():
        mean, scale = fairness(p, reset)
        value = scale * loss_reg(mean)
        (w,) = torch.autograd.grad(value, p)
    return w, value.detach()


# ----------------------------------------------------------------------------------------------------------
# eq. 4: masked image modeling

def pixel_mask(mask, patch_size, grid_hw=None):
    """Patch mask (B, N) bool -> pixel mask (B, 1, H, W) float, each patch upsampled to patch_size²."""
    B, N = mask.shape
    gh, gw = grid_hw if grid_hw is not None else (int(round(N ** 0.5)),) * 2
    m = mask.reshape(B, 1, gh, gw).float()
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def loss_mim(recon, target, mask, patch_size):
    """eq. 4: L1 between the decoder output and the strong view's CLIP-normalized pixels, on masked pixels only,
    averaged over masked pixels and the 3 channels. recon, target (B,3,H,W); mask (B,N) bool. 0 if nothing masked."""
    H, W = target.shape[-2:]
    m = pixel_mask(mask, patch_size, (H // patch_size, W // patch_size))  # (B,1,H,W)
    l1 = (recon.float() - target.float()).abs()  # (B,3,H,W)
    return (l1 * m).sum() / (m.sum() * target.shape[1]).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# eq. 5: global-local feature alignment

def loss_align(v_cls, v_patch, mask, k=None):
    """eq. 5: L_align = 1/(BM) Σ_b Σ_m ||v_b^c − v_b^m||²₂ between the normalized [CLS] embedding v_cls (B,D) and
    each normalized masked-patch ([MSK]) embedding v_patch (B,N,D); mask (B,N) bool.

    k: align only with the k masked tokens nearest to [CLS] in each image (Table 6 uses k = 10); None = all.
    Averaged over the aligned tokens; 0 if nothing is masked. Both sides receive gradients (as in the release).
    """
    dist2 = (v_cls.float().unsqueeze(1) - v_patch.float()).pow(2).sum(dim=-1)  # (B, N)
    if k is None:
        m = mask.float()
        return (dist2 * m).sum() / m.sum().clamp_min(1.0)
    k = min(k, dist2.shape[1])
    nearest, idx = dist2.masked_fill(~mask, float("inf")).topk(k, dim=1, largest=False)  # (B, k)
    valid = mask.gather(1, idx)  # False where an image has fewer than k masked tokens
    return torch.where(valid, nearest, torch.zeros_like(nearest)).sum() / valid.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------
# eq. 6: total loss

def must_loss(outputs, images_strong, mask, labels, confident, num_confident, global_batch, reg_weights=None, *,
              lambda_reg=1.0, lambda_align=0.2, patch_size=None, use_mim=True, use_align=True, align_k=None):
    """eq. 6: this part's share of L = L_cls + λ_reg L_reg + L_mim + λ_align L_align over a global batch of
    `global_batch` images (see the note above eq. 2: shares add up to the global-batch loss).

    outputs: the student's output on this part, (logits,) unmasked or (logits, v_cls, v_patch, recon) masked;
    images_strong (b,3,H,W) CLIP-normalized; mask (b,N) bool; labels, confident (b,) from pseudo_labels;
    num_confident: confident samples in the global batch; reg_weights: w of fairness_weights, None = no L_reg.
    L_mim and L_align are means over equally many masked pixels / tokens per image, so a part's share is its mean
    times b / global_batch. use_mim / use_align switch terms off for the ablations (Tables 5, 7).
    Returns (loss share, dict of the detached shares of L_cls, L_mim, L_align).
    """
    logits, part = outputs[0], images_strong.shape[0] / global_batch
    terms = {"loss_cls": loss_cls(logits, labels, confident, num_confident)}
    loss = terms["loss_cls"]
    if reg_weights is not None:  # its value is fairness_weights' L_reg; this carries its gradient
        loss = loss + lambda_reg * part * (reg_weights * mean_probs(logits)).sum()
    if use_mim:
        terms["loss_mim"] = part * loss_mim(outputs[3], images_strong, mask, patch_size)
        loss = loss + terms["loss_mim"]
    if use_align:
        terms["loss_align"] = part * loss_align(outputs[1], outputs[2], mask, align_k)
        loss = loss + lambda_align * terms["loss_align"]
    return loss, {name: value.detach() for name, value in terms.items()}
