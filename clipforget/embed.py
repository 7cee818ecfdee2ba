"""Images | texts -> L2-normalised embeddings, batched, on the bundle's device and precision."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import ClipBundle

# Images (or prompts) per no-grad forward pass. Small on purpose: on the CPU, a batch whose
# activations stay at a few MiB reuses memory malloc already holds, while bigger ones get fresh
# pages from the kernel at every layer (page faults cost more than the larger matrix products save),
# and they raise the process's peak. bench/bench_app.py measures the app's job time and memory.
ENCODE_BATCH = 64


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.visual.parameters()).dtype


def to_input(bundle: ClipBundle, images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """uint8 or [0, 1] float images (N,3,H,W) -> normalised model input on the bundle's device."""
    model = model or bundle.model
    x = images.to(bundle.device)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return bundle.normalize(x).to(_dtype(model))


@torch.no_grad()
def encode_images(bundle: ClipBundle, images: torch.Tensor, model: nn.Module | None = None,
                  batch_size: int = ENCODE_BATCH) -> torch.Tensor:
    """Normalised image embeddings (N, D) in float32 on the CPU. ``model`` defaults to the
    bundle's; pass an edited copy to encode with it."""
    if len(images) == 0:
        raise ValueError("no images to encode")
    model = model or bundle.model
    was_training = model.training
    model.eval()
    out = [F.normalize(model.encode_image(to_input(bundle, images[i:i + batch_size], model)).float(), dim=-1).cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def tokenize(bundle: ClipBundle, texts: list[str], model: nn.Module | None = None) -> torch.Tensor:
    """Token ids of ``texts`` on the bundle's device. A Hugging Face text tower (the embedded
    model's MiniLM) masks its padding, so the columns that are padding in every row change no
    embedding and are cut: short prompts padded to the context length cost a third of the work.
    Other towers (open_clip's own transformer adds positional embeddings of the full context
    length) get the tokens as the tokenizer makes them."""
    from open_clip.hf_model import HFTextEncoder
    tokens = bundle.tokenizer(texts)
    text = getattr(model or bundle.model, "text", None)
    if isinstance(text, HFTextEncoder) and tokens.ndim == 2 and len(tokens):
        used = (tokens != text.config.pad_token_id).any(0).nonzero()
        if len(used):
            tokens = tokens[:, :int(used.max()) + 1]
    return tokens.to(bundle.device)


@torch.no_grad()
def encode_texts(bundle: ClipBundle, texts: list[str], model: nn.Module | None = None,
                 batch_size: int = ENCODE_BATCH) -> torch.Tensor:
    """Normalised text embeddings (N, D), float32 on the CPU, in the order of ``texts``. The texts
    are batched by length (see :func:`tokenize`: a batch of short prompts is cut short)."""
    model = model or bundle.model
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(bundle, [texts[j] for j in order[i:i + batch_size]], model)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(chunks)[torch.argsort(torch.tensor(order))]      # back in the order of ``texts``


def prompt_ensemble(emb: torch.Tensor, prompt_lists: list[list[str]]) -> torch.Tensor:
    """One embedding per class from the embeddings of its prompts (rows of ``emb`` in the order of
    ``prompt_lists`` flattened): their normalised mean."""
    out, i = [], 0
    for ps in prompt_lists:
        out.append(F.normalize(emb[i:i + len(ps)].mean(0), dim=-1))
        i += len(ps)
    return torch.stack(out)


@torch.no_grad()
def class_embeddings(bundle: ClipBundle, prompt_lists: list[list[str]], model: nn.Module | None = None) -> torch.Tensor:
    """One embedding per class: the normalised mean of its prompts' embeddings (prompt ensemble)."""
    return prompt_ensemble(encode_texts(bundle, [p for ps in prompt_lists for p in ps], model), prompt_lists)
