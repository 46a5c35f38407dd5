"""Speed and memory of one MUST training step, and of the data pipeline that feeds it.

    python -m tools.bench --model ViT-B/16 --batch 128  # one GPU, bf16, eager
    python -m tools.bench --model ViT-B/16 --batch 128 --accum 2 --compile
    python -m tools.bench --model ViT-S/16 --batch 16 --device cpu --amp fp32
    python -m tools.bench --pipeline --model ViT-B/16 --step-images-per-s 2500

Step mode times must.must_step, all of an optimizer step but the loader, on random
weights and inputs. Pipeline mode times data.TrainTransform on photo-sized JPEGs, on one
core and through train.py's loader, and says how many cores per GPU a step speed needs.
How it measures, and the FLOP count behind TFLOP/s, are in docs/usage.md.
"""
import argparse
import os
import resource
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from util import clip_load
import clip_model
import config
import data
from util import folders
import must
from util import runtime
import train
from util.runtime import add_machine_flags, autocast_for, fail, pick_device

# (input px, patch, width, layers, embed_dim) of OpenAI's image towers, open_clip's
# ViT-H/14 (16 heads of 80: HEADS), a DeiT-S-like one and a tiny one for tests.
SHAPES = {"tiny": (32, 8, 64, 2, 32), "ViT-S/16": (224, 16, 384, 12, 384),
          "ViT-B/32": (224, 32, 768, 12, 512), "ViT-B/16": (224, 16, 768, 12, 512),
          "ViT-L/14": (224, 14, 1024, 24, 768),
          "ViT-L/14@336px": (336, 14, 1024, 24, 768),
          "ViT-H/14": (224, 14, 1280, 32, 1024)}
HEADS = {"ViT-H/14": 16}
# Dense bf16 / fp16 peaks in TFLOP/s by a part of the GPU's name: the SXM parts' (an
# H100 PCIe's is 756, so give --peak-tflops for it).
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def vit_forward_flops(size, patch, width, layers, embed_dim, num_classes,
                      must_heads=False):
    """FLOPs of one image's forward through the image tower and the classifier, with
    must_heads the student's (docs/usage.md derives them):
    F = 2·N·3P²·C + L·(24·T·C² + 4·T²·C) + 2·(C·D + D·K) [+ 2·N·C·(D + 3P²)]."""
    n = (size // patch) ** 2
    t = n + 1
    flops = 2 * n * 3 * patch ** 2 * width  # patch embedding
    # The matmuls and the attention of each block.
    flops += layers * (2 * 12 * t * width ** 2 + 2 * 2 * t ** 2 * width)
    flops += 2 * (width * embed_dim + embed_dim * num_classes)  # projection, classifier
    if must_heads:
        flops += 2 * n * width * (embed_dim + 3 * patch ** 2)
    return flops


def train_flops_per_image(size, patch, width, layers, embed_dim, num_classes, accum):
    """-> (total, teacher forward, student forward + backward, no-grad student forward)
    per image of a step: F + (3·F_s − 2·N·3P²·C) [+ F_s with accumulation]."""
    shape = (size, patch, width, layers, embed_dim, num_classes)
    teacher = vit_forward_flops(*shape)
    student = vit_forward_flops(*shape, must_heads=True)
    # The images need no gradient, so this part of the backward is never computed.
    images_grad = 2 * (size // patch) ** 2 * 3 * patch ** 2 * width
    extra = student if accum > 1 else 0
    student_step = 3 * student - images_grad
    return teacher + student_step + extra, teacher, student_step, extra


def build_tower(args):
    """-> (VisionTransformer, its description, its Table 10 row, its MaskGenerator),
    with ImageNet's settings (the toy world's for --model tiny)."""
    if args.model in SHAPES:
        torch.manual_seed(0)
        visual = clip_model.VisionTransformer(*SHAPES[args.model],
                                              heads=HEADS.get(args.model))
        # The constructor leaves the blocks' weights empty.
        visual.transformer.init_weights()
        what = f"{args.model} (random weights)"
    else:
        try:
            visual, what = clip_model.load(args.model)[0].visual, args.model
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            fail(str(e))
    dataset = "toy" if args.model == "tiny" else "imagenet"
    model_name = config.model_key(args.model, visual)
    hp = config.hparams(dataset, model_name, visual.patch_size, visual.input_resolution)
    gen = config.mask_generator(visual, hp["mask_unit"], hp["mask_ratio"], masked=False)
    return visual, what, hp, gen


def make_step(args, device):
    """-> (a function that runs one exact MUST step on fixed random micro-batches, the
    student, the teacher, those micro-batches, the description, the autocast dtype)."""
    visual, what, hp, gen = build_tower(args)
    torch.manual_seed(0)
    head = torch.randn(visual.output_dim, args.classes)
    head = torch.nn.functional.normalize(head, dim=0)
    # Random unit vectors have cosines of std 1/√D: at small D, s = 100 saturates the
    # softmax and eq. 3's p̄ underflows to 0 (L_reg = inf); the FLOPs do not need s.
    scale = min(100.0, 5.0 * visual.output_dim ** 0.5)
    student = must.MUSTModel(visual, head, scale).to(device).train()
    teacher = must.make_teacher(student)
    lr = hp["base_lr"] * args.batch / 256
    optimizer = train.make_optimizer(student, 0.05, 0.65, lr, device)
    amp_dtype, use_scaler = autocast_for(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    fairness = must.FairnessMean(args.classes)
    if args.compile:
        student.compile()
        teacher.compile()
    micro, size = args.batch // args.accum, visual.input_resolution

    def images():
        return torch.randn(micro, 3, size, size, device=device)
    def masks():
        return torch.stack([gen() for _ in range(micro)]).to(device)
    parts = [((images(), images(), masks()), torch.full((micro,), -1, device=device))
             for _ in range(args.accum)]

    # τ = 0 makes every sample confident, so that every term of eq. 6 is computed.
    method = must.Hparams(0.0, hp["lambda_reg"], hp["lambda_align"], None,
                          visual.patch_size, args.batch, amp_dtype=amp_dtype)

    def step():
        must.must_step(student, teacher, student, optimizer, scaler, fairness, parts,
                       method, ema_mu=0.999, new_epoch=False)
    return step, student, teacher, parts, what, amp_dtype


def peak_memory(device):
    """(the GPU's name or None, what the figure is, the peak memory in GiB)."""
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2 ** 30
        return torch.cuda.get_device_name(device), "torch.cuda.max_memory_allocated", memory
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux's unit
    return None, "process max RSS", kib / 2 ** 20


def bench_step(args):
    """Warm-up steps, then timed steps. -> dict of results (also printed)."""
    device = pick_device(args.device)
    if args.batch % args.accum:
        fail(f"--batch {args.batch} is not divisible into {args.accum} accumulation steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, student, _, _, what, amp_dtype = make_step(args, device)
    v = student.visual
    size, patch, width = v.input_resolution, v.patch_size, v.width
    layers, embed_dim = len(v.transformer.resblocks), v.output_dim
    flops = train_flops_per_image(size, patch, width, layers, embed_dim, args.classes,
                                  args.accum)
    # The first --warmup steps pay for the allocator, kernel autotuning and compilation.
    wall, cpu = [], []
    for _ in range(args.warmup + args.steps):
        tic, cpu_tic = time.perf_counter(), time.process_time()
        step()
        # The step never waits for the device; the clock does.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - cpu_tic)  # this process's, all threads
    warmup_s, times = sum(wall[:args.warmup]), wall[args.warmup:]
    seconds = sum(times) / len(times)
    gpu, memory_kind, memory = peak_memory(device)
    known = [p for key, p in PEAK_TFLOPS if gpu and key in gpu]
    peak = args.peak_tflops or (known[0] if known else None)
    tflops = flops[0] * args.batch / seconds / 1e12
    res = {"images_per_s": args.batch / seconds, "ms_per_step": 1e3 * seconds,
           "tflops": tflops, "utilization": tflops / peak if peak else None,
           "peak_memory_gib": memory, "warmup_s": warmup_s,
           "gflop_per_image": flops[0] / 1e9,
           "cpu_s_per_step": sum(cpu[args.warmup:]) / args.steps}
    where = f"{device} {gpu}" if gpu else f"{device}, {torch.get_num_threads()} threads"
    heads = v.transformer.resblocks[0].attn.heads
    print(f"model          {what}: {size} px, patch {patch}, width {width}, {layers} "
          f"layers, {heads} heads, embed {v.output_dim}, {args.classes} classes")
    precision = str(amp_dtype or "fp32").removeprefix("torch.")
    execution = "compiled" if args.compile else "eager"
    print(f"step           batch {args.batch} = {args.accum} x "
          f"{args.batch // args.accum}, amp {precision}, {execution}, {where}")
    print("GFLOP/image    {:.4g} = teacher fwd {:.4g} + student fwd+bwd {:.4g} + "
          "no-grad student fwd {:.4g}".format(*(f / 1e9 for f in flops)))
    print(f"warm-up        {args.warmup} steps in {warmup_s:.1f} s")
    print(f"images/s       {res['images_per_s']:.4g}")
    print(f"ms/step        {res['ms_per_step']:.1f}   (mean of {args.steps}; "
          f"fastest {1e3 * min(times):.1f}, slowest {1e3 * max(times):.1f})")
    # On a shared machine wall time includes other processes' turns; CPU time does not.
    if not gpu:
        print(f"CPU s/step     {res['cpu_s_per_step']:.4g}   (this process's CPU time, "
              "all threads: other processes' turns are not in it)")
    print(f"TFLOP/s        {tflops:.4g}")
    utilization = (f"{100 * res['utilization']:.1f}% of {peak:g} TFLOP/s" if peak
                   else "n/a (unknown peak: give --peak-tflops)")
    print(f"utilization    {utilization}")
    print(f"peak memory    {memory:.2f} GiB ({memory_kind})")
    return res


# ----------------------------------------------------------------------------
# the data pipeline

def make_jpegs(folder, count, width, height, seed=0):
    """The paths of `count` JPEGs of width × height px: coarse random colour fields,
    upsampled, with fine noise, so that the decoder meets a photo's smooth regions,
    edges and texture, not the incompressible noise of random pixels."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        grid = (max(1, height // 25), max(1, width // 25), 3)
        coarse = rng.integers(0, 256, grid, dtype=np.uint8)
        upsampled = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        field = np.asarray(upsampled, dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
        paths.append(os.path.join(folder, f"{i}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def bench_pipeline(args):
    """The views' cost per image: the transform alone on one core, then train.py's
    loader with --workers processes in its steady state, and the cores a step needs."""
    visual, what, hp, gen = build_tower(args)
    size = visual.input_resolution
    width, height = (int(v) for v in args.jpeg_size.lower().split("x"))
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(folder, args.jpeg_count, width, height)
        kib = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        samples = [(paths[i % len(paths)], -1) for i in range(args.images)]
        transform = data.TrainTransform(size, gen, "paper")
        dataset = folders.ImageList(samples, [], [], transform)
        one_core = time_one_core(dataset)
        loader = time_loader(args, dataset) if args.workers else None
    print(f"pipeline       {what}: {size} px views, paper strong view (RandAugment), "
          f"mask unit {hp['mask_unit']}, from {len(paths)} JPEGs of {width}x{height} "
          f"({kib:.0f} KiB on average, page-cached)")
    print(f"one core       {one_core:.1f} images per CPU second (the transform alone, "
          f"{args.images} images)")
    per_core = one_core
    if loader is not None:
        per_core = loader["per_cpu_s"]
        print(f"{args.workers} workers      {loader['per_s']:.1f} images/s, "
              f"{per_core:.1f} per CPU second of the workers and this process together "
              f"({loader['images']} images in {loader['seconds']:.1f} s after "
              f"{loader['warmup']} batches of {args.loader_batch})")
    step = args.step_images_per_s
    if step is None:
        print("measuring the step to feed (give --step-images-per-s to skip):")
        step = bench_step(args)["images_per_s"]
    cores = step / per_core
    print(f"cores/GPU      {cores:.3g} to feed {step:.4g} images/s "
          f"(at {per_core:.1f} images per CPU second)")
    return {"one_core_images_per_s": one_core, "loader": loader,
            "step_images_per_s": step, "images_per_core_s": per_core,
            "cores_per_gpu": cores, "jpeg_kib": kib}


def time_one_core(dataset):
    """Images per CPU second of the transform, on one thread as in a worker."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dataset[0]  # first call: lazy imports and allocations
    cpu = time.process_time()
    for i in range(len(dataset)):
        dataset[i]
    torch.set_num_threads(threads)
    return len(dataset) / (time.process_time() - cpu)


def time_loader(args, dataset):
    """train.py's loader over the dataset, timed for --seconds after 2 batches per
    worker (their start-up); on a GPU each batch is copied and normalized as in
    training. CPU time is the workers' and this process's.
    -> {"per_s", "per_cpu_s", "images", "seconds", "warmup"}"""
    device = pick_device(args.device)
    repeats = torch.utils.data.ConcatDataset([dataset] * 1000)
    sampler = runtime.ResumableSampler(repeats, num_replicas=1, rank=0, drop_last=True)
    settings = argparse.Namespace(num_workers=args.workers, seed=0)
    loader = train.train_loader(repeats, sampler, args.loader_batch, settings, device)
    batches = iter(loader)
    warmup = 2 * args.workers
    for _ in range(warmup):
        next(batches)
    workers = [w.pid for w in batches._workers]
    tic, cpu = time.perf_counter(), cpu_seconds(workers) + time.process_time()
    images = 0
    while time.perf_counter() - tic < args.seconds:
        (weak, strong, _), _ = next(batches)
        if device.type == "cuda":
            for views in (weak, strong):
                views = views.to(device, non_blocking=True)
                data.normalize(views, clip_load.OPENAI_SPEC)
        images += len(weak)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tic
    cpu = cpu_seconds(workers) + time.process_time() - cpu
    train.end_workers(loader)
    return {"per_s": images / seconds, "per_cpu_s": images / cpu, "images": images,
            "seconds": seconds, "warmup": warmup}


def cpu_seconds(pids):
    """The user + system CPU seconds processes have used so far (Linux's /proc)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15
    return ticks / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Speed and memory of the MUST training step (or, with --pipeline, "
                    "of its data pipeline). How it measures: docs/usage.md.")
    p.add_argument("--model", default="ViT-B/16",
                   help=f"{', '.join(SHAPES)} (random weights) or a CLIP checkpoint "
                        "path (default: %(default)s)")
    p.add_argument("--classes", type=int, default=1000,
                   help="K, the classifier's classes (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128,
                   help="images per optimizer step (default: %(default)s)")
    p.add_argument("--accum", type=int, default=1,
                   help="exact accumulation micro-batches (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile student and teacher")
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads [torch's default]")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak for the utilization line [known GPUs]")
    add_machine_flags(p, workers=False, download_root=False)
    g = p.add_argument_group("pipeline")
    g.add_argument("--pipeline", action="store_true",
                   help="time data.TrainTransform instead of the step")
    g.add_argument("--workers", type=int, default=runtime.default_workers(),
                   help="loader worker processes to time, 0 for none (default: "
                        "train.py's --num-workers, %(default)s here)")
    g.add_argument("--seconds", type=float, default=20.0,
                   help="how long the loader is timed (default: %(default)s)")
    g.add_argument("--images", type=int, default=256,
                   help="images transformed on one core (default: %(default)s)")
    g.add_argument("--jpeg-count", type=int, default=16,
                   help="distinct JPEGs generated (default: %(default)s)")
    g.add_argument("--jpeg-size", default="500x375",
                   help="their WxH, ImageNet's typical (default: %(default)s)")
    g.add_argument("--loader-batch", type=int, default=128,
                   help="the loader's batch (default: %(default)s)")
    g.add_argument("--step-images-per-s", type=float,
                   help="the step speed to feed [measured first]")
    args = p.parse_args(argv)
    counts = ("classes", "batch", "accum", "steps", "images", "jpeg_count",
              "loader_batch")
    for name in counts:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.workers < 0:
        fail("--warmup and --workers must be 0 or more")
    if args.seconds <= 0:
        fail("--seconds must be more than 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    return bench_pipeline(args) if args.pipeline else bench_step(args)


if __name__ == "__main__":
    main()
