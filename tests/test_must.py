"""must.py: each equation against an independent hand computation (plain Python loops / math), the
EMA teacher, the classifier model and its checkpoint loader. CPU, tiny CLIP, a few seconds."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from util import clip_load
import clip_model
import must
from util import runtime
from conftest import tiny_clip


def tiny_must(num_classes=5, seed=0, **kw):
    torch.manual_seed(seed)
    clip = tiny_clip()
    head = F.normalize(torch.randn(clip.visual.output_dim, num_classes), dim=0)
    return must.MUSTModel(clip.visual, head, clip.logit_scale.exp().item(), **kw), head, clip


def softmax_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


# -------------------------------------------------------------------------------------------- eq. 2

def cls_loss(teacher, student, tau):
    """eq. 2 over one whole batch: the count of confident samples is this batch's."""
    labels, confident = must.pseudo_labels(teacher, tau)
    return must.loss_cls(student, labels, confident, confident.sum()), confident, labels


def test_loss_cls_matches_hand_computation():
    torch.manual_seed(0)
    teacher = torch.randn(6, 4) * 3
    student = torch.randn(6, 4, requires_grad=True)
    tau = 0.6
    loss, confident, pseudo = cls_loss(teacher, student, tau)
    total, expect_conf = 0.0, []
    for b in range(6):
        q = softmax_row(teacher[b].tolist())
        label = max(range(4), key=lambda k: q[k])
        expect_conf.append(max(q) > tau)
        assert pseudo[b].item() == label
        if max(q) > tau:
            p = softmax_row(student[b].tolist())
            total += -math.log(p[label])
    assert confident.tolist() == expect_conf
    assert 0 < sum(expect_conf) < 6  # the example mixes confident and unconfident samples
    # mean over confident samples
    assert loss.item() == pytest.approx(total / sum(expect_conf), rel=1e-5)
    loss.backward()
    assert torch.all(student.grad[~confident] == 0)
    # a part of a larger batch divides by the global count: the parts' shares add up to the whole
    first, second = (
        must.loss_cls(student[i:i + 3], pseudo[i:i + 3], confident[i:i + 3], confident.sum())
        for i in (0, 3))
    assert (first + second).item() == pytest.approx(loss.item(), rel=1e-6)


def test_loss_cls_no_confident_sample_is_zero_with_finite_grads():
    teacher = torch.zeros(4, 10)  # uniform: max prob 0.1
    student = torch.randn(4, 10, requires_grad=True)
    loss, confident, _ = cls_loss(teacher, student, 0.5)
    assert not confident.any()
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(student.grad).all() and torch.all(student.grad == 0)


def test_loss_cls_threshold_is_strict_and_teacher_gets_no_grad():
    # max q = 0.75
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]], requires_grad=True)
    student = torch.zeros(2, 2, requires_grad=True)
    loss, confident, _ = cls_loss(teacher, student, 0.7499)
    assert confident.all()
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert not must.pseudo_labels(teacher, 0.76)[1].any()
    loss.backward()
    assert teacher.grad is None


def test_pseudo_labels_are_fp32_decisions_under_bf16_autocast():
    """The classifier, softmax, confidence test and pseudo-labels run in fp32 whatever the autocast:
    under CPU bf16 autocast they equal those of the fp32 classifier on the same features."""
    model, _, _ = tiny_must(num_classes=50)
    torch.manual_seed(3)
    features = torch.randn(256, 32)
    with torch.no_grad():
        expect = model.logit_scale * F.normalize(features, dim=-1) @ model.classifier.weight.t()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.classify(features)
            bf16 = model.logit_scale * F.linear(F.normalize(features, dim=-1),
                                                model.classifier.weight)
    assert logits.dtype == torch.float32 and bf16.dtype == torch.bfloat16  # autocast was really on
    assert torch.allclose(logits, expect, atol=1e-4)
    # half the samples sit on each side of τ
    tau = float(expect.softmax(-1).max(-1).values.median())
    labels, confident = must.pseudo_labels(logits, tau)
    ref_labels, ref_confident = must.pseudo_labels(expect, tau)
    assert torch.equal(labels, ref_labels) and torch.equal(confident, ref_confident)
    # what a bf16 classifier would have been off by
    assert (bf16.float() - expect).abs().max() > 1e-2


# -------------------------------------------------------------------------------------------- eq. 3

def test_loss_reg_matches_hand_computation_and_is_minimal_at_uniform():
    torch.manual_seed(1)
    logits = torch.randn(8, 5)
    mean_probs = must.mean_probs(logits)
    rows = [softmax_row(r) for r in logits.tolist()]
    pbar = [sum(r[k] for r in rows) / 8 for k in range(5)]
    assert mean_probs.tolist() == pytest.approx(pbar, rel=1e-5)
    expect = -sum(math.log(v) for v in pbar) / 5
    assert must.loss_reg(mean_probs).item() == pytest.approx(expect, rel=1e-5)
    assert must.loss_reg(torch.full((5,), 0.2)).item() == pytest.approx(math.log(5), rel=1e-6)
    assert must.loss_reg(mean_probs).item() > math.log(5)


def test_fairness_batch_mean_below_512_classes():
    fair = must.FairnessMean(10)
    assert not fair.running
    p = torch.softmax(torch.randn(10), 0)
    mean, scale = fair(p)
    assert mean is p and scale == 1.0


def test_fairness_running_mean_from_512_classes():
    """As the release: p̄ ← ½(p̄_prev.detach() + p̄_batch), loss divided by ½; at an epoch's first
    step p̄ = p̄_batch with its full gradient, still divided by ½ (that step's gradient is
    doubled)."""
    K = 512
    fair = must.FairnessMean(K)
    assert fair.running
    b1 = torch.softmax(torch.randn(K), 0).requires_grad_()
    mean1, scale = fair(b1)
    assert scale == 2.0 and mean1 is b1  # first step: the batch's own mean, not detached
    (scale * must.loss_reg(mean1)).backward()
    # twice the plain batch-mean gradient
    assert torch.allclose(b1.grad, -2.0 / (K * b1.detach()), rtol=1e-5)
    b2 = torch.softmax(torch.randn(K), 0).requires_grad_()
    mean2, _ = fair(b2)
    assert torch.allclose(mean2, 0.5 * (mean1.detach() + b2.detach()))
    (2.0 * must.loss_reg(mean2)).backward()
    # previous mean carries no gradient
    assert torch.allclose(b2.grad, -1.0 / (K * mean2.detach()), rtol=1e-5)
    state = fair.state_dict()
    other = must.FairnessMean(K)
    other.load_state_dict(state)
    b3 = torch.softmax(torch.randn(K), 0)
    assert torch.equal(fair(b3)[0], other(b3)[0])
    # an epoch's first step starts over
    assert torch.equal(fair(b2.detach(), reset=True)[0], b2.detach())


@pytest.mark.parametrize("K", [5, 512])
def test_fairness_weights_give_the_global_batch_gradient(K):
    """w = ∂L_reg/∂p̄_batch at the global batch's mean: the parts' shares (1/B) Σ w·p_b carry exactly
    the gradient of L_reg(p̄ of the whole batch), in both fairness modes and with a running mean from
    an earlier step."""
    torch.manual_seed(4)
    logits = torch.randn(8, K, requires_grad=True)
    prev = torch.softmax(torch.randn(K), 0)
    reference = must.FairnessMean(K)
    reference.prev = prev
    mean, scale = reference(must.mean_probs(logits))
    (expect,) = torch.autograd.grad(scale * must.loss_reg(mean), logits)
    fair = must.FairnessMean(K)
    fair.prev = prev
    w, value = must.fairness_weights(must.mean_probs(logits), fair)
    assert value.item() == pytest.approx((scale * must.loss_reg(mean)).item(), rel=1e-6)
    shares = sum(len(part) / 8 * (w * must.mean_probs(part)).sum()
                 for part in (logits[:3], logits[3:]))
    (grad,) = torch.autograd.grad(shares, logits)
    assert torch.allclose(grad, expect, atol=1e-7, rtol=1e-5)
    assert expect.abs().max() > 1e-4
    if fair.running:
        # the running mean advanced once, as the reference's
        assert torch.equal(fair.prev, reference.prev)


# -------------------------------------------------------------------------------------------- eq. 4

def test_loss_mim_matches_hand_computation():
    torch.manual_seed(2)
    B, p, g = 2, 4, 3  # 12x12 images, 3x3 patches of 4 px
    recon, target = torch.randn(B, 3, g * p, g * p), torch.randn(B, 3, g * p, g * p)
    mask = torch.rand(B, g * g) < 0.4
    mask[0, 0], mask[1, 8] = True, True
    total, count = 0.0, 0
    for b in range(B):
        for n in range(g * g):
            if not mask[b, n]:
                continue
            row, col = divmod(n, g)  # row-major patch order
            for c in range(3):
                for y in range(row * p, row * p + p):
                    for x in range(col * p, col * p + p):
                        total += abs(recon[b, c, y, x].item() - target[b, c, y, x].item())
                        count += 1
    assert must.loss_mim(recon, target, mask, p).item() == pytest.approx(total / count, rel=1e-5)
    assert must.loss_mim(recon, target, torch.zeros_like(mask), p).item() == 0.0


# -------------------------------------------------------------------------------------------- eq. 5

def test_loss_align_matches_hand_computation_and_nearest_k():
    torch.manual_seed(3)
    B, N, D = 3, 6, 4
    v_cls = F.normalize(torch.randn(B, D), dim=-1)
    v_patch = F.normalize(torch.randn(B, N, D), dim=-1)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 1], [1, 1, 1, 1, 0, 1]],
                        dtype=torch.bool)
    d = [[sum((v_cls[b, i].item() - v_patch[b, n, i].item()) ** 2 for i in range(D))
          for n in range(N)]
         for b in range(B)]
    all_masked = [d[b][n] for b in range(B) for n in range(N) if mask[b, n]]
    assert must.loss_align(v_cls, v_patch, mask).item() == pytest.approx(
        sum(all_masked) / len(all_masked), rel=1e-5)
    k = 2
    nearest = [v for b in range(B) for v in sorted(d[b][n] for n in range(N) if mask[b, n])[:k]]
    assert must.loss_align(v_cls, v_patch, mask, k=k).item() == pytest.approx(
        sum(nearest) / len(nearest), rel=1e-5)
    # k above the number of masked tokens = all of them
    assert must.loss_align(v_cls, v_patch, mask, k=N).item() == pytest.approx(
        sum(all_masked) / len(all_masked), rel=1e-5)
    assert must.loss_align(v_cls, v_patch, torch.zeros_like(mask)).item() == 0.0


# -------------------------------------------------------------------------------------------- eq. 1

def test_ema_momentum_linear_ramp():
    assert must.ema_momentum(0, 0.99, 100) == pytest.approx(0.99)
    assert must.ema_momentum(50, 0.99, 100) == pytest.approx(0.99 + 0.5 * (0.9998 - 0.99))
    assert must.ema_momentum(100, 0.99, 100) == pytest.approx(0.9998)
    assert must.ema_momentum(10 ** 6, 0.99, 100) == pytest.approx(0.9998)
    assert must.ema_momentum(5, 0.99, 0) == 0.9998


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_update_math_params_and_buffers():
    torch.manual_seed(4)
    student = _Net()
    teacher = must.make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student.running.fill_(2.0)
        student.count.fill_(7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    mu = 0.9
    must.ema_update(teacher, student, mu)
    for name, value in teacher.state_dict().items():
        if value.is_floating_point():
            expect = mu * before[name] + (1 - mu) * student.state_dict()[name]
            assert torch.allclose(value, expect, atol=1e-7), name
    assert teacher.count.item() == 7  # integer buffers are copied
    assert teacher.lin.weight.grad is None


# -------------------------------------------------------------------------------------------- model

def test_must_model_is_the_zero_shot_classifier_at_init():
    model, head, clip = tiny_must()
    assert model.visual.has_must_heads
    # not hard-coded 100
    assert model.logit_scale.item() == pytest.approx(clip.logit_scale.exp().item())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expect = model.logit_scale * F.normalize(clip.encode_image(x), dim=-1) @ head
        out = model(x)
        masked_logits, v_cls, v_patch, recon = model(x, torch.zeros(3, 16, dtype=torch.bool))
    logits = out.logits
    assert out.v_cls is None and out.v_patch is None and out.recon is None  # no mask: logits only
    assert torch.allclose(logits, expect, atol=1e-5)
    assert torch.allclose(masked_logits, logits, atol=1e-5)  # an empty mask changes nothing
    assert v_cls.shape == (3, 32) and v_patch.shape == (3, 16, 32) and recon.shape == x.shape
    assert model.classifier.weight.requires_grad
    frozen, _, _ = tiny_must(freeze_classifier=True)
    assert not frozen.classifier.weight.requires_grad


def release_loss(model, teacher_logits, x, mask, tau, lam_reg, lam_align):
    """eq. 6 on one whole batch, written plainly: mean CE over confident samples
    + λ L_reg(batch mean) + L_mim + λ L_align."""
    logits, v_cls, v_patch, recon = model(x, mask)
    labels, confident = must.pseudo_labels(teacher_logits, tau)
    ce = F.cross_entropy(logits[confident], labels[confident])
    return (ce + lam_reg * must.loss_reg(logits.softmax(-1).mean(0))
            + must.loss_mim(recon, x, mask, 8)
            + lam_align * must.loss_align(v_cls, v_patch, mask))


def test_must_loss_shares_add_up_to_the_global_batch_loss_and_gradient():
    """Exact accumulation at the level of eq. 6: two parts' shares give the whole batch's loss and
    gradient."""
    model, _, _ = tiny_must()
    torch.manual_seed(5)
    x, mask = torch.randn(6, 3, 32, 32), torch.zeros(6, 16, dtype=torch.bool)
    # the same number of masked patches in every image, as MaskGenerator draws
    mask[:, [0, 5, 10]] = True
    teacher_logits = torch.randn(6, 5) * 2
    hp = must.Hparams(0.75, 0.3, 0.7, None, 8, 6)
    expect = release_loss(model, teacher_logits, x, mask, 0.75, 0.3, 0.7)
    params = [p for p in model.parameters()]
    expect_grads = torch.autograd.grad(expect, params, allow_unused=True)
    labels, confident = must.pseudo_labels(teacher_logits, 0.75)
    assert 0 < confident.sum() < 6
    with torch.no_grad():
        w, l_reg = must.fairness_weights(must.mean_probs(model(x, mask).logits),
                                         must.FairnessMean(5))
    total, terms_sum = 0.0, {}
    for part in (slice(0, 2), slice(2, 6)):
        loss, terms = must.must_loss(model(x[part], mask[part]), x[part], mask[part], labels[part],
                                     confident[part], confident.sum(), w, hp)
        loss.backward()
        total += loss.item()
        terms_sum = {k: terms_sum.get(k, 0.0) + v.item() for k, v in terms.items()}
    whole = (terms_sum["loss_cls"] + 0.3 * l_reg.item() + terms_sum["loss_mim"]
             + 0.7 * terms_sum["loss_align"])
    assert whole == pytest.approx(expect.item(), rel=1e-5)
    for p, g in zip(params, expect_grads):
        if g is not None:
            assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)
    assert (model.visual.mask_token.grad.abs().max() > 0
            and model.visual.decoder[0].weight.grad.abs().max() > 0)


def test_must_loss_switches():
    model, _, _ = tiny_must()
    torch.manual_seed(5)
    x, mask = torch.randn(4, 3, 32, 32), torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :3] = True
    labels, confident = must.pseudo_labels(torch.randn(4, 5) * 5, 0.5)
    hp = must.Hparams(0.5, 0.3, 0.7, None, 8, 4)
    _, terms = must.must_loss(model(x, mask), x, mask, labels, confident, confident.sum(), None,
                              hp)
    assert set(terms) == {"loss_cls", "loss_mim", "loss_align"}
    out = model(x)
    logits = out.logits
    hp = must.Hparams(0.5, 0.3, 0.7, None, 8, 4, use_mim=False, use_align=False)
    loss, terms = must.must_loss(out, x, mask, labels, confident, confident.sum(), None, hp)
    assert set(terms) == {"loss_cls"}
    expect = must.loss_cls(logits, labels, confident, confident.sum()).item()
    assert loss.item() == pytest.approx(expect, rel=1e-6)


def test_load_checkpoint_roundtrip(tmp_path):
    model, _, _ = tiny_must(num_classes=4)
    teacher = must.make_teacher(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    path = str(tmp_path / "ckpt.pt")
    torch.save({"student": model.state_dict(), "teacher": teacher.state_dict(),
                "args": {"data": "x", "model": "m"}, "classnames": ["a", "b", "c", "d"]}, path)
    ckpt = runtime.read_checkpoint(path)
    assert ckpt["args"]["data"] == "x" and ckpt["classnames"] == ["a", "b", "c", "d"]
    loaded = must.load_checkpoint(ckpt, "student")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)
        t_loaded = must.load_checkpoint(ckpt, "teacher")
        assert torch.allclose(t_loaded(x).logits, teacher(x).logits, atol=1e-6)
    with pytest.raises(ValueError):
        must.load_checkpoint(ckpt, "ema")


def test_load_checkpoint_rebuilds_the_activation_the_run_started_from(tmp_path):
    """A run from a GELU CLIP records its spec; the tower comes back with GELU. Checkpoints older
    than that record were all QuickGELU's."""
    model, _, _ = tiny_must(num_classes=4)
    state = model.state_dict()
    gelu = clip_load.OPENAI_SPEC._replace(activation="gelu")
    for record, expected in (({"clip": gelu._asdict()}, nn.GELU), ({}, clip_model.QuickGELU)):
        rebuilt = must.load_checkpoint({"student": state, "teacher": state, **record})
        block = rebuilt.visual.transformer.resblocks[0]
        assert type(block.mlp.gelu) is expected
