"""The CUDA paths, run only where a GPU is (gpu.sh runs them first): a bf16 step, an fp16 step with
its GradScaler, DDP over a 1-process NCCL group, train.py's loader into pinned memory and the
views' normalization on the GPU, flash attention at ViT-B/16's shapes. Skipped on CPU machines;
gpu.sh runs the multi-process paths under torchrun."""
import argparse

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from tools import bench
from util import clip_load
import clip_model
import data
import must
from util import runtime
import train
from conftest import tiny_clip
from test_train import argv, ckpt, records, world  # noqa: F401 -- the tiny world fixture
from util import folders

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_step_on_gpu(world, tmp_path, amp):  # noqa: F811
    out = tmp_path / amp
    train.main(argv(world, out, "--device", "cuda", "--amp", amp, "--max-steps", "2"))
    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["loss"]) for r in steps)
    c = ckpt(out)
    assert c["args"]["amp"] == amp and all(
        torch.isfinite(v).all() for v in c["student"].values())
    if amp == "fp16":  # the GradScaler ran and its scale was saved
        assert c["scaler"]["scale"] > 0


@pytest.mark.parametrize("accum", [1, 2])
def test_the_step_never_waits_for_the_gpu(accum):
    """must.must_step and the trainer's copy and normalization of its batches (train.next_parts)
    queue their work without a host sync: CUDA's sync debug mode raises at any wait. The first
    step, which makes cuBLAS's handles and the optimizer's state, is run before it is on."""
    torch.manual_seed(0)
    student = must.MUSTModel(tiny_clip().visual, torch.randn(32, 3), 100.0).cuda()
    teacher = must.make_teacher(student)
    optimizer = train.make_optimizer(student, 0.05, 0.65, 1e-4, torch.device("cuda"))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    fairness = must.FairnessMean(3)
    run = argparse.Namespace(accum=accum, device=torch.device("cuda"),
                             clip_spec=clip_load.OPENAI_SPEC)
    masks = data.MaskGenerator(32, 16, 8, 0.5)

    def pinned_parts():  # as the loader's pinning thread hands them over
        parts = []
        for _ in range(accum):
            views = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8).pin_memory()
            mask = torch.stack([masks() for _ in range(4)]).pin_memory()
            parts.append(((views[0], views[1], mask), torch.full((4,), -1).pin_memory()))
        return iter(parts)

    def step(parts):
        method = must.Hparams(0.0, 1.0, 0.1, None, 8, 4 * accum, amp_dtype=torch.bfloat16)
        return must.must_step(student, teacher, student, optimizer, scaler, fairness,
                              train.next_parts(run, parts), method, 0.99, new_epoch=False)

    step(pinned_parts())
    parts = pinned_parts()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = step(parts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(stats["loss_cls"]) and stats["images"] == 4 * accum


def test_ddp_over_a_one_process_nccl_group(tmp_path):
    init_method = f"file://{tmp_path / 'rendezvous'}"
    dist.init_process_group("nccl", init_method=init_method, rank=0, world_size=1)
    try:
        clip = tiny_clip().cuda()
        student = must.MUSTModel(clip.visual, torch.randn(32, 3), 100.0).cuda()
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[0])
        x = torch.randn(4, 3, 32, 32, device="cuda")
        mask = torch.zeros(4, 16, dtype=torch.bool, device="cuda")
        mask[:, :4] = True
        logits, v_cls, v_patch, recon = model(x, mask)
        (logits.sum() + recon.mean()).backward()
        assert all(torch.isfinite(p.grad).all()
                   for p in student.parameters() if p.grad is not None)
        t = torch.ones(3, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_loader_pins_uint8_views_and_the_gpu_normalizes_them(tmp_path):
    """train.py's loader hands over uint8 views in pinned memory; normalized on the GPU they are
    the CPU's normalization to float32 rounding."""
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(tmp_path / f"{i}.png")
    items = [(str(tmp_path / f"{i}.png"), i % 2) for i in range(4)]
    views = data.TrainTransform(32, data.MaskGenerator(32, 16, 8, 0.5))
    ds = folders.ImageList(items, ["a", "b"], ["{}"], views)
    sampler = runtime.ResumableSampler(ds, num_replicas=1, rank=0, drop_last=True)
    settings = argparse.Namespace(num_workers=2, seed=0)
    loader = train.train_loader(ds, sampler, 2, settings, torch.device("cuda"))
    (weak, strong, mask), _ = next(iter(loader))
    assert weak.is_pinned() and weak.dtype == torch.uint8 and weak.shape == (2, 3, 32, 32)
    on_gpu = data.normalize(weak.to("cuda", non_blocking=True), clip_load.OPENAI_SPEC)
    on_cpu = data.normalize(weak, clip_load.OPENAI_SPEC)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-6)
    train.end_workers(loader)


@pytest.mark.parametrize("model", ["ViT-B/16", "ViT-L/14"])
def test_fused_attention_runs_at_the_paper_shapes(model):
    """In bf16 the image tower's attention (F.scaled_dot_product_attention: 197 or 257 tokens,
    head dim 64) dispatches to a fused kernel, flash attention (or cuDNN's, which torch may prefer
    on Hopper), forward and backward: not the math fallback that materializes every score."""
    torch.manual_seed(0)
    visual = clip_model.VisionTransformer(*bench.SHAPES[model]).cuda()
    visual.transformer.init_weights()
    images = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.profiler.profile() as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = visual(images)
        out.float().sum().backward()
        torch.cuda.synchronize()
    ops = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    fused = [kind for kind in ("flash", "cudnn")
             if {f"aten::_scaled_dot_product_{kind}_attention",
                 f"aten::_scaled_dot_product_{kind}_attention_backward"} <= ops]
    assert fused, ops
    print(f"{model}: {fused[0]} attention")
