"""What the student and the teacher see (paper §3): the teacher's weak view of an image, the
student's strong view and its patch mask, and the datasets they are drawn from (build_dataset, the
entry point; folders.py reads the files).

Label order is always the order of prompts.DATASETS[...]["classes"] (the authors' prepared copies,
i.e. sorted folder names). Training labels are only read to log the pseudo-labels' accuracy; the
method itself never sees them.

Layouts accepted by build_dataset (root = --data-root):
    imagenet        root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG
    any named set   root/train/<class>/..., root/test/<class>/... (or val/); <class> is a prompt
                    class name in any spelling (case, '_', spaces, punctuation, CamelCase), a
                    wnid, or for gtsrb / imagenet-v2 the class index
    food101, dtd, gtsrb, pets, caltech101, sun397
                    torchvision's on-disk layout under root (download=True fetches it)
    ucf101          root/train/<ActionName>/**/*.jpg (video frames), root/test/...
    imagenet-r/-a/-sketch  root/<wnid>/* ; imagenet-v2  root/<0..999>/*   (transductive, §4.8:
                    the "train" split is the same unlabeled test images)
    folder          root/**/* unlabeled images + a class-names file; split "test" reads
                    eval_root/<class>/*
"""
import functools
import math

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

import prompts
from toy import world as toy
from util import clip_load, folders
from util.clip_load import CLIP_MEAN, OPENAI_SPEC
from util.randaugment import RandAugment, fill_color


# ----------------------------------------------------------------------------------------------
# The views and the mask (§3: the teacher sees the weak view, the student the strong view with
# masked patches)

# CLIP's evaluation preprocessing as its spec says: resize, center crop, normalize.
test_transform = clip_load.image_transform


class MaskGenerator:
    """SimMIM patch-aligned random masking (paper §3.2).

    The image is cut into (input_size / mask_unit)² mask units of mask_unit px, exactly
    ceil(mask_ratio × units) of them are masked, and each masked unit covers a full
    (mask_unit / patch_size)² block of ViT patches. __call__ -> BoolTensor (grid²,), True = masked.
    """

    def __init__(self, input_size, mask_unit, patch_size, mask_ratio):
        if mask_unit % patch_size:
            suggested = max(patch_size, round(mask_unit / patch_size) * patch_size)
            raise ValueError(f"mask_unit {mask_unit} must be a multiple of the patch size "
                             f"{patch_size} (e.g. --mask-unit {suggested})")
        if input_size % mask_unit:
            raise ValueError(f"input size {input_size} must be a multiple of mask_unit {mask_unit}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        self.units_per_side = input_size // mask_unit
        self.patches_per_unit = mask_unit // patch_size
        # Rounded up, as the release's generator does: np.ceil of the same float product, so a
        # product a rounding error above an integer, e.g. 100 units x 0.55, is rounded up too.
        # UCF101 ViT-L/14 thus masks 7 of 64 units.
        self.num_masked = math.ceil(self.units_per_side ** 2 * mask_ratio)

    def __call__(self):
        g, s = self.units_per_side, self.patches_per_unit
        units = torch.zeros(g * g, dtype=torch.bool)
        units[torch.randperm(g * g)[:self.num_masked]] = True
        unit_grid = units.view(g, g)
        patches = unit_grid.repeat_interleave(s, dim=0).repeat_interleave(s, dim=1)  # (g*s, g*s)
        return patches.flatten()  # (grid*grid,), row-major like the ViT's patch tokens


STRONG_VIEWS = ("paper", "light")


def strong_view(input_size, kind="paper", mean=CLIP_MEAN):
    """The student's strong augmentation (PIL image -> PIL image), before ToTensor and
    normalization.

    paper: RandomResizedCrop 0.3-1 + flip + RandAugment (timm's rand-m9-mstd0.5-inc1), the
    release's view for 224 px photos of a web-trained CLIP. light: translation by up to 10% of the
    side (edge padding) + flip + brightness/contrast jitter 0.3. At 32 px the paper's ops (crops of
    a third of the image, posterize, equalize, 9/30 translations) destroy the object, and a CLIP
    pretrained on a small world was never taught to read them. light is the toy world's view, and
    the toy CLIP is pretrained with it (toy.PRETRAIN). mean: the CLIP's normalization mean, whose
    colour RandAugment gives the pixels its geometric ops uncover.
    """
    if kind == "paper":
        return T.Compose([
            T.RandomResizedCrop(input_size, scale=(0.3, 1.0),
                                interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            RandAugment(num_ops=2, magnitude=9.0, magnitude_std=0.5, fill=fill_color(mean))])
    if kind == "light":
        return T.Compose([
            T.Resize(input_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(input_size),
            T.RandomCrop(input_size, padding=max(1, input_size // 10), padding_mode="edge"),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.3, contrast=0.3)])
    raise ValueError(f"unknown strong view {kind!r}; expected one of {', '.join(STRONG_VIEWS)}")


class TrainTransform:
    """One decoded PIL image -> (weak, strong, mask).

    weak is the teacher's view (resize + random crop), strong the student's view
    (strong_view(input_size, strong): 'paper' or 'light'), and mask the strong view's patch mask.
    The views are uint8 (3, H, W), a quarter of float32's bytes to pass from a loader worker and
    to copy to the GPU; normalize() makes them the CLIP's input where they are used. spec
    (clip_load.ClipSpec) gives the resize's interpolation and RandAugment's fill colour.
    """

    def __init__(self, input_size, mask_generator, strong="paper", spec=OPENAI_SPEC):
        resize = clip_load.INTERPOLATIONS[spec.interpolation]
        self.weak = T.Compose([
            T.Resize(input_size, interpolation=resize), T.RandomCrop(input_size),
            T.PILToTensor()])
        self.strong = T.Compose([strong_view(input_size, strong, spec.mean), T.PILToTensor()])
        self.mask_generator = mask_generator

    def __call__(self, img):
        return self.weak(img), self.strong(img), self.mask_generator()


def normalize(images, spec):
    """uint8 views (..., 3, H, W), on any device -> float32, normalized as the CLIP's spec says.

    The arithmetic is T.ToTensor's and T.Normalize's, in their order: on the CPU the result is
    bit for bit theirs, and on a GPU it runs after the copy, off the loader workers' cores.
    """
    mean, std = (_channels(values, images.device) for values in (spec.mean, spec.std))
    return images.float().div(255).sub(mean).div(std)


@functools.cache
def _channels(values, device):
    """Per-channel values as a (3, 1, 1) float32 tensor on the device, made once: a tensor made
    from a list on a GPU is a copy that waits for the GPU, at every step."""
    return torch.tensor(values, device=device).view(-1, 1, 1)


# ----------------------------------------------------------------------------------------------
# The datasets

# Paper §4.1: these report mean per-class accuracy, the others top-1.
MEAN_PER_CLASS = ("pets", "caltech101")
_SHIFTED_IMAGENETS = ("imagenet-r", "imagenet-a", "imagenet-v2", "imagenet-sketch")
DATASET_NAMES = ["imagenet", "sun397", "food101", "gtsrb", "dtd", "ucf101", "pets", "caltech101",
                 *_SHIFTED_IMAGENETS, "folder", "toy"]


def default_model(name):
    """The CLIP a dataset runs with when --model is not given: the toy world's own, else
    ViT-B/16."""
    return toy.WEIGHTS if name == "toy" else "ViT-B/16"


# The 'a photo of a {}.' family, for --data folder without a templates file.
DEFAULT_TEMPLATES = ["a photo of a {}.", "a photo of the {}.",
                     "a bad photo of a {}.", "a good photo of a {}.",
                     "a photo of the small {}.", "a photo of the large {}.",
                     "a cropped photo of a {}.", "a close-up photo of a {}."]


def dataset_prompts(dataset):
    """(classnames, templates) of a named dataset, in label order."""
    entry = prompts.DATASETS["imagenet" if dataset in _SHIFTED_IMAGENETS else dataset]
    classes = list(entry["classes"])
    # imagenet-r and imagenet-a are 200-class subsets of ImageNet, in their own label order.
    if dataset in ("imagenet-r", "imagenet-a"):
        classes = [classes[prompts.IMAGENET_WNIDS.index(w)] for w in prompts.WNIDS[dataset]]
    return classes, list(entry["templates"])


def build_dataset(name, root, split, transform, classes_file=None, templates_file=None,
                  eval_root=None, download=False):
    """Dataset of (transform(img), label) with .classnames (in prompt order) and .templates.

    split: 'train' (the unlabeled adaptation images) or 'test'. templates_file replaces the
    published templates; classes_file and eval_root are for name='folder'; download lets
    torchvision fetch its datasets. Training substitutes unreadable images, evaluation skips them
    (folders.ImageList).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "toy":  # rendered in memory: no root, files or class names to read
        return toy.build_dataset(root, split, transform)
    classnames, templates = class_prompts(name, classes_file, templates_file)
    if name == "folder" and split == "test":
        if eval_root is None:
            raise ValueError("split 'test' of dataset 'folder' needs --eval-root DIR: labeled "
                             "images in DIR/<class name>/..., one folder per name in the classes "
                             "file")
        folders.require_dir(eval_root, "eval root")
    elif not (download and name in folders.TORCHVISION_LAYOUTS):
        folders.require_dir(root, "dataset root")
    ignored = []  # (path, reason) of what the listing leaves out
    samples = list_samples(name, root, split, classnames, eval_root, download, ignored)
    if not samples:
        raise FileNotFoundError(f"no {split} images of {name} found under {root!r}")
    on_error = "substitute" if split == "train" else "skip"
    return folders.ImageList(samples, classnames, templates, transform, on_error, ignored)


def class_prompts(name, classes_file, templates_file):
    """(class names, templates) of a dataset: the published ones, or the --classes file's names
    (for --data folder, with the 'a photo of a {}.' family), the --templates file's templates."""
    if name == "folder":
        if classes_file is None:
            raise ValueError("dataset 'folder' needs a class names file (--classes FILE, one class "
                             "name per line)")
        classnames, templates = folders.read_classnames(classes_file), list(DEFAULT_TEMPLATES)
    elif classes_file is not None:
        raise ValueError(f"--classes is only for dataset 'folder'; {name!r} uses the published "
                         "class names")
    else:
        classnames, templates = dataset_prompts(name)
    if templates_file:
        templates = folders.read_templates(templates_file)
    return classnames, templates


def list_samples(name, root, split, classnames, eval_root, download, ignored):
    """[(path, label)] of a split, found by the dataset's layout (the module docstring)."""
    if name == "folder" and split == "test":
        return folders.scan_class_folders(eval_root, "folder", classnames, ignored)
    if name == "folder":
        samples = [(p, -1) for p in folders.list_images(root, ignored=ignored)]  # unlabeled
        if not samples:
            raise FileNotFoundError(f"no images ({'/'.join(folders.IMG_EXTENSIONS)}) found under "
                                    f"{root!r}{folders.left_out(ignored)}")
        return samples
    if name in _SHIFTED_IMAGENETS:  # transductive: both splits are the unlabeled test images
        images = folders.split_dir(root, split) or folders.split_dir(root, "test") or root
        return folders.scan_class_folders(images, name, classnames, ignored,
                                          prompts.WNIDS.get(name, ()))
    if any(folders.split_dir(root, s) for s in ("train", "test")):
        split_dir = folders.split_dir(root, split)
        if split_dir is None:
            want = "train" if split == "train" else "test (or val)"
            raise FileNotFoundError(f"{root!r} has no {want} folder of class folders for split "
                                    f"{split!r}")
        return folders.scan_class_folders(split_dir, name, classnames, ignored,
                                          prompts.WNIDS.get(name, ()))
    if name in folders.TORCHVISION_LAYOUTS:
        return folders.torchvision_samples(name, root, split, download, classnames)
    what = ("<wnid>/*.JPEG and val/<wnid>" if name == "imagenet"
            else "<ActionName>/**/*.jpg and test/<ActionName>")
    raise FileNotFoundError(f"no {name} under {root!r}: expected {root}/train/{what}/...")
