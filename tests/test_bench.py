"""bench.py's mechanics on CPU with the tiny model: every printed field present and sane in step
mode (accumulation 1 and 2) and pipeline mode, and the analytic FLOP count against torch's flop
counter on a real must.must_step. Nothing here asserts a speed: the numbers only have to exist, be
finite and positive, and agree with each other."""
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tools import bench
from toy import world as toy
from util import folders

# tiny models: one thread is several times faster than two on a shared 2-core machine
torch.set_num_threads(1)
TINY = (32, 8, 64, 2, 32, 10)  # bench.SHAPES["tiny"] with 10 classes
STEP = ["--model", "tiny", "--classes", "10", "--device", "cpu", "--amp", "fp32", "--batch", "8",
        "--steps", "2", "--warmup", "1"]


def positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("accum", [1, 2])
def test_step_mode_reports_sane_numbers(accum, capsys):
    res = bench.main(STEP + ["--accum", str(accum)])
    out = capsys.readouterr().out
    for label in ("model", "GFLOP/image", "warm-up", "images/s", "ms/step", "CPU s/step", "TFLOP/s",
                  "utilization", "peak memory"):
        assert f"\n{label} " in "\n" + out, label
    assert f"batch 8 = {accum} x {8 // accum}" in out
    for key in ("images_per_s", "ms_per_step", "cpu_s_per_step", "tflops", "peak_memory_gib",
                "gflop_per_image"):
        assert positive(res[key]), (key, res[key])
    assert res["utilization"] is None and "n/a" in out  # no known peak for a CPU
    assert res["images_per_s"] == pytest.approx(8 / (res["ms_per_step"] / 1e3))
    assert res["tflops"] == pytest.approx(res["gflop_per_image"] * res["images_per_s"] / 1e3)
    assert res["gflop_per_image"] * 1e9 == bench.train_flops_per_image(*TINY, accum)[0]


def test_step_mode_loads_a_checkpoint(capsys):
    """--model PATH: the tower of a CLIP checkpoint
    (the committed toy CLIP: width 128, 4 blocks, embed 64)."""
    res = bench.main(["--model", toy.WEIGHTS, *STEP[2:], "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "32 px, patch 8, width 128, 4 layers, 2 heads, embed 64, 10 classes" in out
    expected_flops = bench.train_flops_per_image(32, 8, 128, 4, 64, 10, 1)[0]
    assert res["gflop_per_image"] * 1e9 == expected_flops
    assert positive(res["images_per_s"])


def test_utilization_against_a_given_peak():
    res = bench.main(STEP + ["--peak-tflops", "0.5", "--steps", "1", "--warmup", "0"])
    assert res["utilization"] == pytest.approx(res["tflops"] / 0.5)


def test_flop_formulas_worked_example_and_accumulation_cost():
    """docs/usage.md's ViT-B/16 numbers, and exact accumulation's one extra student forward:
    ≈ +25%."""
    b16 = (*bench.SHAPES["ViT-B/16"], 1000)
    assert round(bench.vit_forward_flops(*b16) / 1e9, 1) == 35.1
    assert round(bench.vit_forward_flops(*b16, must_heads=True) / 1e9, 1) == 35.5
    one, two = bench.train_flops_per_image(*b16, 1), bench.train_flops_per_image(*b16, 2)
    assert (round(one[0] / 1e9, 1), round(two[0] / 1e9, 1)) == (141.4, 176.9)
    assert two[0] == one[0] + bench.vit_forward_flops(*b16, must_heads=True)
    assert bench.train_flops_per_image(*b16, 4) == two  # one extra pass however many micro-batches
    assert 1.24 < two[0] / one[0] < 1.26


def counted(fn):
    """FLOPs that torch's flop counter sees in fn(); attention through the math kernel, whose
    matmuls it counts (it has no formula for the fused CPU attention kernel)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("accum", [1, 2])
def test_flop_formulas_match_the_flop_counter(accum):
    args = bench.parse_args(STEP + ["--accum", str(accum)])
    step, student, teacher, parts, _, _ = bench.make_step(args, torch.device("cpu"))
    (weak, strong, mask), _ = parts[0]
    micro = 8 // accum
    with torch.no_grad():
        assert counted(lambda: teacher(weak)) == micro * bench.vit_forward_flops(*TINY)
        masked = micro * bench.vit_forward_flops(*TINY, must_heads=True)
        assert counted(lambda: student(strong, mask)) == masked
    total, teacher, student, extra = bench.train_flops_per_image(*TINY, accum)
    assert total == teacher + student + extra and (extra > 0) == (accum > 1)
    # A whole optimizer step: teacher, (no-grad student,) student forward and backward, AdamW, EMA.
    assert counted(step) == 8 * total


def test_make_jpegs_writes_photo_sized_jpegs(tmp_path):
    paths = bench.make_jpegs(str(tmp_path), 2, 50, 30)
    for path in paths:
        with Image.open(path) as img:
            assert (img.format, img.size) == ("JPEG", (50, 30))
        pixels = torch.from_numpy(np.asarray(folders.read_image(path), dtype=np.float32))
        assert pixels.std() > 10  # not a flat image


def test_pipeline_mode_reports_sane_numbers(capsys):
    res = bench.main(["--pipeline", "--model", "tiny", "--jpeg-count", "3", "--jpeg-size", "64x48",
                      "--images", "4", "--workers", "0", "--step-images-per-s", "100"])
    out = capsys.readouterr().out
    assert "one core" in out and "cores/GPU" in out and "mask unit 8" in out
    for key in ("one_core_images_per_s", "jpeg_kib"):
        assert positive(res[key]), (key, res[key])
    assert res["loader"] is None  # --workers 0: no loader measured
    assert res["cores_per_gpu"] == pytest.approx(100 / res["one_core_images_per_s"])


def test_pipeline_mode_measures_the_step_and_train_pys_loader(capsys):
    res = bench.main(["--pipeline", "--model", "tiny", "--jpeg-count", "2", "--jpeg-size", "64x48",
                      "--images", "6", "--workers", "1", "--loader-batch", "2", "--seconds", "1",
                      *STEP[2:]])
    out = capsys.readouterr().out
    assert "1 workers" in out and "measuring the step" in out and "per CPU second" in out
    loader = res["loader"]
    assert loader["warmup"] == 2 and loader["seconds"] >= 1 and loader["images"] % 2 == 0
    for value in (loader["per_s"], loader["per_cpu_s"], res["step_images_per_s"],
                  res["cores_per_gpu"]):
        assert positive(value), value
    # The figure is the loader's: the whole cost of an image, the workers' CPU time counted.
    assert res["images_per_core_s"] == loader["per_cpu_s"]
    assert res["cores_per_gpu"] == pytest.approx(res["step_images_per_s"] / loader["per_cpu_s"])


def test_cpu_seconds_counts_a_busy_child():
    """The workers' CPU time comes from /proc: a child that spins for 0.5 s of CPU shows it."""
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass\ninput()"],
                             stdin=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while bench.cpu_seconds([child.pid]) < 0.5 and time.time() < deadline:
            time.sleep(0.05)
        assert 0.5 <= bench.cpu_seconds([child.pid]) < 5
    finally:
        child.kill()
        child.wait()
