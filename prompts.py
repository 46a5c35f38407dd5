"""The paper's class names and prompt templates (prompts.json: CLIP's published ones),
and the zero-shot head: CLIP's text embeddings of the prompts as the weight of a linear
classifier (Figure 1).
"""

import json
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from util import runtime
from util.tokenizer import tokenize

_PROMPTS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.json")
with open(_PROMPTS_JSON, encoding="utf-8") as _f:
    _DATA = json.load(_f)

# name -> {"classes": [...] in label order, "templates": ["a photo of a {}.", ...]}
DATASETS = {("ucf101" if name == "ucf101_frames" else name): d
            for name, d in _DATA["datasets"].items()}
IMAGENET_WNIDS = _DATA["imagenet_wnids"]  # ImageNet-1k label order
IMAGENET_R_WNIDS = _DATA["imagenet_r_wnids"]  # the 200-class subsets, in label order
IMAGENET_A_WNIDS = _DATA["imagenet_a_wnids"]
# The ImageNets' wnids in label order: the classes' identities, because names repeat
# there (two 'missile's).
WNIDS = {"imagenet": IMAGENET_WNIDS, "imagenet-sketch": IMAGENET_WNIDS,
         "imagenet-v2": IMAGENET_WNIDS, "imagenet-c": IMAGENET_WNIDS,
         "imagenet-r": IMAGENET_R_WNIDS, "imagenet-a": IMAGENET_A_WNIDS}


def _cache_key(model, classnames, templates):
    """A cached head's key: a fingerprint of the text weights and the prompts."""
    text_tower = {k: v for k, v in model.state_dict().items()
                  if not k.startswith("visual.")}
    key = runtime.fingerprint(
        [runtime.fingerprint(text_tower), list(classnames), list(templates)])
    return key[:32]


def _read_cached_head(path, shape, device):
    """The head cached at path if it is a float32 tensor of `shape`, else None."""
    try:
        head = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = runtime.load_error_detail(e, path)
    else:
        is_tensor = torch.is_tensor(head)
        if is_tensor and head.dtype == torch.float32 and tuple(head.shape) == shape:
            return head
        what = (f"a {head.dtype} tensor of shape {tuple(head.shape)}" if is_tensor
                else f"a {type(head).__name__}")
        why = f"it holds {what}, not a float32 tensor of shape {shape}"
    print(f"warning: the cached zero-shot head {path} is unreadable ({why}); "
          "computing it again")
    return None


@torch.inference_mode()
def zero_shot_head(model, classnames, templates, device="cpu", batch_size=1000,
                   cache_dir=None):
    """The zero-shot classifier weight (embed_dim, K): per class, the mean of its
    prompts' L2-normalized text embeddings, renormalized (CLIP's prompt ensemble).

    With cache_dir, the head is kept there under a key of the text weights and prompts;
    a cached head that cannot be read is computed again.
    """
    if cache_dir is not None:
        cache_dir = os.path.expanduser(cache_dir)
        key = _cache_key(model, classnames, templates)
        path = os.path.join(cache_dir, f"head-{key}.pt")
        if os.path.isfile(path):
            shape = (model.text_projection.shape[1], len(classnames))
            head = _read_cached_head(path, shape, device)
            if head is not None:
                return head
    texts = [t.format(c) for c in classnames for t in templates]  # class-major: (K*T,)
    features = []
    batch_starts = range(0, len(texts), batch_size)
    quiet = len(texts) <= batch_size
    for i in tqdm(batch_starts, desc="zero-shot head", disable=quiet):
        try:
            tokens = tokenize(texts[i:i + batch_size],
                              context_length=model.context_length)
        except ValueError as e:  # a prompt over the context: say what to change
            raise ValueError(f"{e}: shorten the class name or the template") from None
        # Drop the all-padding tail: (B, L<=77).
        longest = int((tokens > 0).sum(1).max())
        tokens = tokens[:, :longest].to(device)
        # fp32, because the head decides labels.
        features.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    # shape = (K, T, D)
    features = torch.cat(features).view(len(classnames), len(templates), -1)
    head = F.normalize(features.mean(dim=1), dim=-1).t().contiguous()  # (D, K)
    if cache_dir is not None:  # a kill or a full disk leaves no partial file
        runtime.save_atomic(head.cpu(), path)
    return head
