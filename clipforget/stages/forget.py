"""Stage 1 — forget: LoRA on the layers ranked by relative Fisher; push D_f away from t_c.

Loss [paper Eq. 3]: L_f = mean_i s(x_i, t_c) over the forget images, t_c the coarse label
("a dog") — ``loss="similarity"``. [recon] ``loss="probability"`` minimises instead the zero-shot
probability of t_c among all superclass prompts: it pushes only until another class wins, which
is what the stopping rule measures, and does not keep pushing images that are already forgotten.
Stops as soon as the zero-shot forget accuracy is at or below the target (default: 0) or after the
step budget; the LoRA weights are then merged (``merge_and_unload``).

The layers before the first candidate / chosen layer are frozen, so their output is computed once
per image (:class:`clipforget.trunk.TrunkEncoder`) — exact, and several times faster.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..towers import adapter_for
from ..train.loop import LoopConfig, optimize
from ..trunk import TrunkEncoder
from .fisher import layer_fisher, prunable_layers, rank_layers, relative_fisher

log = logging.getLogger(__name__)

LAYER_SELECTIONS = ("relative", "plain", "all")
FORGET_LOSSES = ("similarity", "probability")


def forget_objective(ctx, features: torch.Tensor, kind: str) -> torch.Tensor:
    """What the forget stage minimises over forget-image ``features`` (normalised): the mean
    similarity to the coarse label [paper Eq. 3], or the mean zero-shot probability of the coarse
    label among all superclass prompts [recon]."""
    if kind == "similarity":
        return (features @ ctx.coarse_emb).mean()
    logits = ctx.logit_scale * features @ ctx.superclass_emb.t()
    return logits.softmax(-1)[:, ctx.task.target_index].mean()


@dataclass
class ForgetConfig:
    layer_selection: str = "relative"   # relative Fisher (ours) | plain Fisher on D_f | all layers
    top_k_layers: int = 3               # layers kept by the ranking (ignored for "all")
    layers: tuple[str, ...] | None = None  # explicit layer names (relative to the image tower); skips the ranking
    candidate_fraction: float = 0.35    # rank only the last fraction of layers in forward order [recon]; 1: all
    fisher_samples: int = 32            # images per set for the Fisher estimate
    fisher_retain_text: str = "coarse"  # text paired with retain images in F(D_r): coarse label | own [recon]
    use_lora: bool = True               # LoRA on the chosen layers; False: update them fully
    lora_rank: int = 8
    lora_alpha: float = 16.0
    loss: str = "probability"           # similarity: s(x, t_c) [paper Eq. 3] | probability: p(t_c | x) [recon]
    batch_size: int = 64
    target_accuracy: float | None = 0.0   # stop when forget accuracy (train views) <= this; None: chance
    margin: float = 2.0                 # ... counting a view as recognised while the coarse logit is within this
                                        # of the best other one: forgotten with a margin, so unseen views follow [recon]
    bn_mode: str = "eval"               # BatchNorm during the stage: eval (frozen stats) | train
    check_calibration: bool = False     # stop only once D_m's held-out forget images are forgotten too (with the
                                        # margin): the stage never trains on them, they only say when to stop [recon]
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=60, lr=1e-3, grad_clip=None, check_every=1))

    def __post_init__(self):
        if self.layer_selection not in LAYER_SELECTIONS:
            raise ValueError(f"layer_selection must be one of {LAYER_SELECTIONS}, got {self.layer_selection!r}")
        if self.top_k_layers < 1:
            raise ValueError(f"top_k_layers must be >= 1, got {self.top_k_layers}")
        if not 0 < self.candidate_fraction <= 1:
            raise ValueError(f"candidate_fraction must be in (0, 1], got {self.candidate_fraction}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.fisher_retain_text not in ("coarse", "own"):
            raise ValueError(f"fisher_retain_text must be 'coarse' or 'own', got {self.fisher_retain_text!r}")
        if self.bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', got {self.bn_mode!r}")
        if self.loss not in FORGET_LOSSES:
            raise ValueError(f"loss must be one of {FORGET_LOSSES}, got {self.loss!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.target_accuracy is not None and not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in [0, 1], got {self.target_accuracy}")


@dataclass
class ForgetResult:
    """What the forget stage did: the stages after it read it (remind's scope and margin), and the
    run records it (``to_dict``, in ``run.json``'s info)."""
    layers: list[str]                   # the layers edited (ranked, or given by ``ForgetConfig.layers``)
    lora_layers: list[str]              # those edited through a low-rank update (peft or a parametrization)
    full_layers: list[str]              # those updated fully
    steps: int                          # optimisation steps taken
    forget_train_accuracy: float        # forget accuracy on its train views at the end (with the margin)
    target_accuracy: float              # the accuracy the stage stops at
    margin: float                       # a view counts as recognised while its coarse logit is within this
    candidates: list[str]               # the layers the ranking chose from
    fisher: dict = field(default_factory=dict)  # per-layer fisher_forget (and fisher_retain, relative_fisher)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("layers", "lora_layers", "full_layers", "steps", "forget_train_accuracy",
                                           "target_accuracy", "margin", "candidates")}
        return {**d, **self.fisher}


class LowRankDelta(nn.Module):
    """A LoRA update as a weight parametrization: W → W + (α/r)·B·A (B starts at 0, so training
    starts from W). For weights that a tower uses functionally (its adapter's
    ``functional_layers``), where peft's wrapper, which replaces the module's ``forward``, would
    never run (open_clip's attention pool passes its q/k/v/c projection weights to
    ``F.multi_head_attention_forward``)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out_features, in_features = weight.shape[0], weight[0].numel()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)      # peft's initialisation
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).view_as(weight)


def add_low_rank(modules: dict[str, nn.Module], rank: int, alpha: float) -> list[nn.Parameter]:
    """Parametrize each module's weight with a :class:`LowRankDelta`; returns the new parameters."""
    from torch.nn.utils import parametrize
    params = []
    for m in modules.values():
        delta = LowRankDelta(m.weight, rank, alpha)
        parametrize.register_parametrization(m, "weight", delta)
        params += [delta.lora_A, delta.lora_B]
    return params


def merge_low_rank(modules: dict[str, nn.Module]) -> None:
    """Fold the low-rank updates into plain weights (like peft's ``merge_and_unload``)."""
    from torch.nn.utils import parametrize
    for m in modules.values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        m.weight.requires_grad_(False)


def candidate_layers(visual: nn.Module, fraction: float = ForgetConfig.candidate_fraction) -> dict[str, nn.Module]:
    """The layers the ranking chooses from: the last ``fraction`` of the tower's prunable layers in
    forward order (what the forget stage, and so the remind stage, can edit)."""
    layers = prunable_layers(visual)
    names = list(layers)
    return {n: layers[n] for n in names[int(len(names) * (1 - fraction)):]}


def select_layers(ctx, cfg: ForgetConfig) -> tuple[list[str], dict]:
    visual = ctx.model.visual
    layers = prunable_layers(visual)
    if cfg.layers:
        unknown = [n for n in cfg.layers if n not in layers]
        if unknown:
            raise ValueError(f"forget.layers: {unknown} are not Conv2d/Linear layers of the image tower; "
                             f"choose from {list(layers)}")
        return list(cfg.layers), {"candidates": list(cfg.layers)}
    if cfg.layer_selection == "all":
        return list(layers), {"candidates": list(layers)}
    # Subgroups differ in late, specific features; early layers serve every class. Unrestricted, the
    # ranking on the embedded model picks the first convolution, whose edit hurts every class.
    layers = candidate_layers(visual, cfg.candidate_fraction)
    visual.eval()
    task = ctx.task
    enc = TrunkEncoder(visual, layers)      # the layers before every candidate are not ranked
    gen = torch.Generator().manual_seed(ctx.seed)
    fi = torch.randperm(len(task.forget), generator=gen)[:cfg.fisher_samples]
    f_forget = layer_fisher(ctx.model, enc.prepare(ctx.inputs(task.forget, fi)), ctx.coarse_emb, layers,
                            encode=enc)
    info = {"candidates": list(layers), "fisher_forget": f_forget}
    if cfg.layer_selection == "relative" and len(task.retain):
        ri = torch.randperm(len(task.retain), generator=gen)[:cfg.fisher_samples]
        sub = task.retain.subset(ri.tolist())
        if cfg.fisher_retain_text == "own":
            cap_emb, cap_ids = ctx.caption_embeddings(sub)
            text = cap_emb[cap_ids]
        else:   # the same coarse label as D_f: which layers carry "dog" for poodles but not other dogs
            text = ctx.coarse_emb
        f_retain = layer_fisher(ctx.model, enc.prepare(ctx.inputs(sub)), text, layers, encode=enc)
        importance = relative_fisher(f_forget, f_retain)
        info.update(fisher_retain=f_retain, relative_fisher=importance)
    else:
        importance = f_forget
    return rank_layers(importance, cfg.top_k_layers), info


def forget_stage(ctx, cfg: ForgetConfig, extra: torch.Tensor | None = None) -> ForgetResult:
    """Edit ``ctx.model.visual`` in place; return what was chosen (layers, Fisher values).
    ``extra``: model inputs of more forget images (stand-ins, :mod:`.synthesize`), trained on
    and checked like D_f."""
    chosen, info = select_layers(ctx, cfg)
    visual = ctx.model.visual
    task = ctx.task
    target = ctx.chance if cfg.target_accuracy is None else cfg.target_accuracy
    mods = dict(visual.named_modules())
    # weights the tower uses functionally get the same low-rank update as a parametrization
    used_functionally = adapter_for(visual).functional_layers(visual, chosen, ctx.inputs(task.forget, slice(0, 1))) \
        if cfg.use_lora else set()
    lora_layers = sorted(n for n in chosen if n not in used_functionally) if cfg.use_lora else []
    functional = {n: mods[n] for n in chosen if n in used_functionally}
    full_layers = [n for n in chosen if n not in lora_layers and n not in functional]
    low_rank = add_low_rank(functional, cfg.lora_rank, cfg.lora_alpha)
    peft_model = None
    if lora_layers:
        from peft import LoraConfig, get_peft_model
        peft_model = get_peft_model(visual, LoraConfig(target_modules=lora_layers, r=cfg.lora_rank,
                                                       lora_alpha=cfg.lora_alpha, lora_dropout=0.0))
        ctx.model.visual = peft_model
        # get_peft_model freezes every parameter but its own adapters', the parametrizations' factors
        # too: without this, functionally used layers chosen beside peft's never trained
        for p in low_rank:
            p.requires_grad_(True)
    params = [p for n, m in mods.items() if n in full_layers for p in m.parameters(recurse=False)]
    for p in params:
        p.requires_grad_(True)
    params += low_rank
    if peft_model is not None:
        params += [p for p in peft_model.parameters() if p.requires_grad]
    params = list({id(p): p for p in params}.values())   # a fully updated layer is also seen via peft
    ctx.model.visual.train(cfg.bn_mode == "train")
    enc = TrunkEncoder(ctx.model.visual, chosen, enabled=cfg.bn_mode == "eval")
    forget_in = ctx.inputs(task.forget)
    labels = task.superclass_labels(task.forget)
    if extra is not None:
        forget_in = torch.cat([forget_in, extra.to(forget_in)])
        labels = torch.cat([labels, torch.full((len(extra),), task.target_index, dtype=labels.dtype)])
    forget_x = enc.prepare(forget_in)
    calib = task.calib.get("target") if cfg.check_calibration else None
    calib_x = enc.prepare(ctx.inputs(calib.views)) if calib is not None else None
    records, calib_records = {}, {}

    def loss_fn(step):
        return forget_objective(ctx, enc(forget_x[ctx.sample_indices(len(forget_x), cfg.batch_size)]), cfg.loss)

    def accuracy() -> float:
        return ctx.superclass_accuracy(enc.encode(forget_x), labels, cfg.margin)

    def should_stop(step):
        acc = accuracy()
        records[step] = acc
        if calib_x is not None and acc <= target:
            calib_records[step] = ctx.superclass_accuracy(enc.encode(calib_x), calib.labels, cfg.margin)
            return calib_records[step] <= target
        return acc <= target

    history = optimize(params, loss_fn, cfg.loop, "forget", ctx.callbacks, should_stop=should_stop)
    for rec in history:
        if rec["step"] - 1 in records:
            rec["forget_acc_before_step"] = records[rec["step"] - 1]
        if rec["step"] - 1 in calib_records:
            rec["calib_forget_acc_before_step"] = calib_records[rec["step"] - 1]
    final_acc = accuracy()
    if peft_model is not None:
        ctx.model.visual = peft_model.merge_and_unload()
    merge_low_rank(functional)
    for p in ctx.model.visual.parameters():
        p.requires_grad_(False)
    ctx.log_history("forget", history)
    candidates = info.pop("candidates")
    return ForgetResult(chosen, lora_layers + sorted(functional), full_layers, len(history), final_acc, target,
                        cfg.margin, candidates, info)
