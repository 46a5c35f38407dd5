"""The CUDA paths, run only where a GPU is (gpu.sh runs them with bench.py on a lent GPU machine):
a bf16 step, an fp16 step with its GradScaler, DDP over a 1-process NCCL group, pinned-memory
loading. Skipped on CPU machines."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import data
import must
import train
from conftest import tiny_clip
from test_train import argv, ckpt, records, world  # noqa: F401 -- the tiny world fixture
import folders

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


def test_pinned_memory_loading(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((40, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    items = [(str(tmp_path / f"{i}.png"), i % 2) for i in range(4)]
    ds = folders.ImageList(items, ["a", "b"], ["{}"], data.test_transform(32))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, pin_memory=True)
    images, labels = next(iter(loader))
    assert images.is_pinned() and images.shape == (2, 3, 32, 32)
    assert images.to("cuda", non_blocking=True).device.type == "cuda"
