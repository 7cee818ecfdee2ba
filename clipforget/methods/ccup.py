"""CCUP: closed-form, data-free forgetting by projecting the image embeddings off the forget
directions (seed 003, "Erasing CLIP Memories") [recon for the details; the idea is the paper's].

    T_f: normalised text embeddings of the forget prompts (d × m_f), T_r: of the retained prompts
    U   = orth((I − U_r U_rᵀ) T_f)          forget directions, orthogonal to the retained span
    P_α = I − α·U Uᵀ                         α: strength of the partial projection

applied on the IMAGE side (the text side is re-normalised, which would undo it): the image
projection W (embedding = W h + b) becomes P_α W, P_α b (the tower adapter names it —
ModifiedResNet: ``attnpool.c_proj``; timm towers: ``head.proj``; ViT: ``proj`` with x @ proj, so
proj ← proj P_α). The change −α U (Uᵀ W) is rank ≤ m_f and is
stored as factors (U, R = Uᵀ W₀, α) in ``info``: W₀ = W + α U R reverts it exactly. Raw image–text
dot products with retained prompts are unchanged; with forget prompts' retained-orthogonal
directions they become 0 at α = 1. No images are used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..towers import adapter_for
from .base import Context, Unlearner, register_method
from .common import prompt_embeddings, request_prompts

log = logging.getLogger(__name__)


def orth(a: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (d × r) of the column span of ``a`` (d × m), numerically rank-revealing."""
    if a.shape[1] == 0:
        return a
    u, s, _ = torch.linalg.svd(a.double(), full_matrices=False)
    return u[:, s > tol * max(1.0, float(s[0]))].to(a.dtype)


def retained_basis(t_retain: torch.Tensor, energy: float = 1.0) -> torch.Tensor:
    """U_r: the leading left singular vectors of T_r holding ``energy`` of its squared spectrum
    (1.0: its whole span). With more retained prompts than dimensions the whole span is the whole
    space and nothing could be forgotten; a fraction keeps the principal retained directions."""
    u = orth(t_retain.double())
    if energy >= 1.0:
        return u
    s = torch.linalg.svdvals(t_retain.double())[: u.shape[1]]
    cum = (s ** 2).cumsum(0) / (s ** 2).sum()
    return u[:, : int((cum < energy).sum()) + 1]


def forget_basis(t_forget: torch.Tensor, t_retain: torch.Tensor | None, retain_energy: float = 1.0) -> torch.Tensor:
    """U = orth((I − U_r U_rᵀ) T_f); columns of ``t_*`` are text embeddings (d × m)."""
    t_forget = t_forget.double()
    if t_retain is not None and t_retain.shape[1]:
        ur = retained_basis(t_retain, retain_energy)
        t_forget = t_forget - ur @ (ur.t() @ t_forget)
    return orth(t_forget)


def projection_site(visual: nn.Module) -> tuple[str, str]:
    """(parameter name, layout) of the image projection, from the tower's adapter: "out_in" for a
    Linear's weight (W h), "in_out" for a ViT's ``proj`` (x @ proj)."""
    return adapter_for(visual).projection(visual)


def low_rank_delta(state: dict, site: tuple[str, str], u: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """Factors and the change θ_new − θ₀ of the projection for P_α = I − α U Uᵀ."""
    name, layout = site
    out = {}
    if layout == "in_out":
        w = state[name].double()                 # (width, d): proj ← proj P  =>  Δ = −α (proj U) Uᵀ
        r = w @ u                                # (width, k)
        out[name] = (-alpha * r @ u.t())
        return out
    w = state[f"{name}.weight"].double()         # (d, width): W ← P W  =>  Δ = −α U (Uᵀ W)
    out[f"{name}.weight"] = -alpha * u @ (u.t() @ w)
    if f"{name}.bias" in state:
        out[f"{name}.bias"] = -alpha * u @ (u.t() @ state[f"{name}.bias"].double())
    return out


def revert(state: dict, info: dict) -> dict:
    """θ₀ from the edited weights and the stored factors (exact up to float rounding)."""
    u, alpha = info["U"].double(), info["alpha"]
    name, layout = info["site"]
    out = dict(state)
    if layout == "in_out":
        out[name] = (state[name].double() + alpha * info["R"].double() @ u.t()).to(state[name].dtype)
        return out
    out[f"{name}.weight"] = (state[f"{name}.weight"].double() + alpha * u @ info["R"].double()).to(
        state[f"{name}.weight"].dtype)
    if "R_bias" in info:
        out[f"{name}.bias"] = (state[f"{name}.bias"].double() + alpha * u @ info["R_bias"].double()).to(
            state[f"{name}.bias"].dtype)
    return out


@dataclass
class CCUPConfig:
    strength: float = 1.0             # α of P_α = I − α U Uᵀ; 0 is the identity
    forget_prompts: tuple[str, ...] | None = None   # names to forget; None: the request's target
    retained_prompts: tuple[str, ...] | None = None  # names to keep; None: other superclasses + retain subgroups
    include_concepts: bool = False    # default retained names also list the gallery's other concepts
    retain_energy: float = 1.0        # fraction of T_r's squared spectrum spanned by U_r (1: all of it)
    orthogonalize: bool = True        # make U orthogonal to the retained span (False: U = orth(T_f))
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"retain_energy": (0.8, 0.9, 0.95, 0.99, 1.0), "include_concepts": (False, True)}

    def __post_init__(self):
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if not 0.0 < self.retain_energy <= 1.0:
            raise ValueError(f"retain_energy must be in (0, 1], got {self.retain_energy}")


@register_method
class CCUP(Unlearner):
    name, Config = "ccup", CCUPConfig
    summary = "closed form, no images: project the image embeddings off the forget prompts' text directions"

    def unlearn(self, ctx: Context) -> None:
        cfg = self.config
        with ctx.stage("project"):
            f_names, r_names = request_prompts(ctx, cfg.include_concepts)
            f_names = list(cfg.forget_prompts or f_names)
            r_names = list(cfg.retained_prompts if cfg.retained_prompts is not None else r_names)
            t_f = prompt_embeddings(ctx, f_names).t()
            t_r = prompt_embeddings(ctx, r_names).t() if r_names else None
            u = forget_basis(t_f, t_r if cfg.orthogonalize else None, cfg.retain_energy)
            if u.shape[1] == 0:
                log.warning("ccup: the forget prompts lie inside the retained span; nothing to project "
                            "(lower retain_energy or list fewer retained prompts)")
            visual = ctx.model.visual
            site = projection_site(visual)
            state = visual.state_dict()
            name, layout = site
            change = low_rank_delta(state, site, u, cfg.strength)
            with torch.no_grad():
                for k, d in change.items():
                    state[k].copy_((state[k].double() + d).to(state[k].dtype))
        theta0 = ctx.theta0
        if layout == "in_out":
            factors = {"R": (theta0[name].double() @ u).float()}
        else:
            factors = {"R": (u.t() @ theta0[f"{name}.weight"].double()).float()}
            if f"{name}.bias" in theta0:
                factors["R_bias"] = (u.t() @ theta0[f"{name}.bias"].double()).float()
        ctx.info.update(U=u.float(), alpha=cfg.strength, site=site, rank=u.shape[1],
                        forget_prompts=f_names, retained_prompts=len(r_names), **factors)
