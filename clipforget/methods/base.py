"""The method interface, the registry, and the context every method works in.

A method is a subclass of :class:`Unlearner` with

- ``name``: the registry key (``clipforget forget --method NAME``),
- ``Config``: a dataclass of its knobs (each field commented; ``__post_init__`` validates),
- ``unlearn(ctx)``: edits ``ctx.model`` — an editable copy whose image tower is private to the
  run — using the data and helpers of ``ctx`` (:class:`Context`). It may set ``ctx.alpha`` and
  ``ctx.alpha_curve`` (methods with a restore stage); otherwise α = 1.
- ``edits_text`` (default False): True for a method that edits the text tower (CLIP-LIP); only
  then does the copy own a private text tower too (most methods stay as cheap as an image-tower
  copy), and ``ctx.text_delta()`` / ``ctx.set_text`` work on it.

``Unlearner.run`` does the rest: seeding, the copy (the given model is never mutated), timing,
and the result with the weights as a delta θ_u − θ₀ with the keys of ``model.state_dict()``:
``visual.*`` for the image tower, the others for the text side (:func:`clipforget.merge.text_part`).

To add a method: write ``clipforget/methods/<your_method>.py`` with an ``Unlearner`` subclass
(``name``, ``summary``, ``Config``, ``unlearn``) decorated ``@register_method``. Nothing else: the
file is found by scanning the package (:mod:`.catalog`), so the CLI, the app and the tests list it.

A method that trains its delta declares ``learned = True``; unless it calibrates α itself
(``restores = True``, as ours does), registering it also registers ``<name>+soup``: the same
method followed by ours' restore stage (:mod:`.soup`). A Config may declare ``search_space``
(:mod:`clipforget.tuning`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.task import Task, ViewSet
from ..embed import ENCODE_BATCH, encode_texts, prompt_ensemble, to_input, tokenize
from ..eval.zeroshot import TextCache, recognised
from ..merge import VISUAL, StateDict, apply_delta, delta as state_delta
from ..models import ClipBundle
from ..train.loop import HALF_PRECISION, Callback, NonFiniteLoss, emit
from .catalog import menu_order, method_modules

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type["Unlearner"]] = {}


def register_method(cls: type["Unlearner"]) -> type["Unlearner"]:
    """Class decorator: put a method in the registry under ``cls.name``. A module of this package
    that uses it is imported by :func:`list_methods` without being listed anywhere."""
    if not getattr(cls, "name", None) or not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"{cls.__name__} needs a `name` and a dataclass `Config`")
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    if cls.learned and not cls.restores:      # its delta gets ours' restore stage as "<name>+soup"
        from .soup import soup_variant
        register_method(soup_variant(cls))
    return cls


def list_methods() -> list[str]:
    """Names of all registered methods: the single source for the CLI, the app and the tests.
    Importing the package's method modules (found by :func:`.catalog.method_modules`) registers them."""
    for module in method_modules():
        importlib.import_module(f"{__package__}.{module}")
    return sorted(_REGISTRY, key=menu_order)


def get_method(name: str) -> type["Unlearner"]:
    methods = list_methods()
    if name not in _REGISTRY:
        import difflib
        close = difflib.get_close_matches(name, methods, n=2)
        raise ValueError(f"unknown method {name!r}" + (f"; did you mean {close[0]!r}?" if close else "") +
                         f"; available: {', '.join(methods)}")
    return _REGISTRY[name]


def config_from_dict(cls, d: dict | None, base=None):
    """Build a (nested) config dataclass from a dict, rejecting unknown fields by name. Fields the
    dict leaves out keep their values in ``base`` (default: ``cls()``), so a nested override such
    as ``{"loop": {"steps": 100}}`` keeps the rest of that stage's own loop defaults."""
    d = dict(d or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        ft = fields[k].type
        sub = fields[k].default_factory if fields[k].default_factory is not dataclasses.MISSING else None
        current = getattr(base, k) if base is not None else (sub() if sub is not None else None)
        if isinstance(v, dict) and dataclasses.is_dataclass(current):
            kwargs[k] = config_from_dict(type(current), v, current)
        elif isinstance(v, list) and "tuple" in str(ft):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


@dataclass
class UnlearnResult:
    method: str
    request: dict
    delta: StateDict                      # θ_u − θ₀ (full strength), keys of model.state_dict()
    alpha: float                          # chosen unlearning strength: the model is θ₀ + α·Δ
    alpha_curve: list[dict]               # [{"alpha", <column>: acc, ...}] on the calibration set
    history: dict[str, list[dict]]        # per stage
    seconds: dict[str, float]             # per stage and "total"
    config: dict
    info: dict = field(default_factory=dict)

    def weights(self, theta0: StateDict, alpha: float | None = None) -> StateDict:
        return apply_delta(theta0, self.delta, self.alpha if alpha is None else alpha)


def editable_copy(model: nn.Module, text: bool = False, visual: bool = True) -> nn.Module:
    """A model that owns a deep copy of the towers it may edit and shares the rest with ``model``
    (frozen), so editing it never touches the original. ``visual``: the image tower; ``text``:
    the text side — every module, parameter and buffer outside ``visual`` (open_clip's
    ``transformer``/``token_embedding``/``text_projection``…, or a Hugging Face tower's ``text``),
    so any tower works through ``model.encode_text``. The copies start frozen."""
    new = copy.copy(model)
    new._modules = copy.copy(model._modules)
    new._parameters = copy.copy(model._parameters)
    new._buffers = copy.copy(model._buffers)
    owned = []
    if visual:
        new.visual = copy.deepcopy(model.visual)
        owned.append(new.visual)
    if text:
        for name, m in model._modules.items():
            if name != "visual" and m is not None:
                new._modules[name] = copy.deepcopy(m)
                owned.append(new._modules[name])
        for name, p in model._parameters.items():
            if p is not None:
                new._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in model._buffers.items():
            if b is not None:
                new._buffers[name] = b.clone()
    for m in owned:
        for p in m.parameters():
            p.requires_grad_(False)
    return new


def text_state(model: nn.Module) -> StateDict:
    """The text side of ``model.state_dict()``: every entry outside the image tower (shares storage)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(VISUAL)}


def load_text_state(model: nn.Module, state: StateDict) -> None:
    """Load text-side entries (keys of ``model.state_dict()``) into ``model``, leaving the image
    tower as it is; a key that is not a text-side weight of ``model`` is an error."""
    bad = [k for k in state if k.startswith(VISUAL)]
    result = model.load_state_dict(state, strict=False)
    if bad or result.unexpected_keys:
        raise KeyError(f"not text-side weights of this model: {(bad + list(result.unexpected_keys))[:3]}")


class Context:
    """Everything a method needs: the data, the original and the editable model, cached text
    embeddings, differentiable zero-shot logits, batches, stage timing and progress events."""

    def __init__(self, bundle: ClipBundle, task: Task, callbacks: Iterable[Callback] = (),
                 texts: TextCache | None = None, seed: int = 0, edits_text: bool = False,
                 activation_budget: int | None = None):
        self.bundle = bundle
        # bytes of autograd graph a stage may hold for one pass over a set of images (None: the
        # stage's own default); a long-lived process with a memory target (the app) passes a small one
        self.activation_budget = activation_budget
        self.task = task
        self.callbacks = list(callbacks)
        self.texts = texts or TextCache(bundle)     # the ORIGINAL text tower's class embeddings
        self.original = bundle.model
        self.edits_text = edits_text
        self.model = editable_copy(bundle.model, text=edits_text)
        self.theta0 = {k: v.detach().clone() for k, v in bundle.model.visual.state_dict().items()}
        # θ₀ of the text side (keys of model.state_dict()), only for a method that edits it
        self.text_theta0 = ({k: v.detach().clone() for k, v in text_state(bundle.model).items()}
                            if edits_text else {})
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.history: dict[str, list[dict]] = {}
        self.seconds: dict[str, float] = {}
        self.current_stage = ""
        self.alpha = 1.0
        self.alpha_curve: list[dict] = []
        self.info: dict = {}
        self.superclass_emb = self.texts.classes(task.superclasses).to(bundle.device)
        self.coarse_emb = self.superclass_emb[task.target_index]
        with torch.no_grad():
            self.logit_scale = float(bundle.model.logit_scale.exp().clamp(max=100))

    # ---- progress and timing ------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        emit(self.callbacks, stage=name, step=0, total=0, fraction=0.0, message="start")
        self.current_stage = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        log.info("stage %s: %.2fs", name, self.seconds[name])

    def log_history(self, name: str, records: list[dict]) -> None:
        self.history.setdefault(name, []).extend(records)

    # ---- data ---------------------------------------------------------------------------------
    def inputs(self, views: ViewSet, idx=None, model: nn.Module | None = None) -> torch.Tensor:
        images = views.images if idx is None else views.images[idx]
        return to_input(self.bundle, images, model or self.model)

    def sample(self, views: ViewSet, batch_size: int) -> torch.Tensor:
        """Random indices of a minibatch of ``views`` (all of them when the set is smaller)."""
        return self.sample_indices(len(views), batch_size)

    def sample_indices(self, n: int, batch_size: int) -> torch.Tensor:
        """Random indices of a minibatch out of ``n`` rows (all of them when there are fewer)."""
        if n <= batch_size:
            return torch.arange(n)
        return torch.randperm(n, generator=self.generator)[:batch_size]

    def caption_embeddings(self, views: ViewSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique caption embeddings of ``views`` (each image's own subgroup text) and the caption
        index of every image."""
        caps = [self.task.caption(it) for it in views.items]
        uniq = list(dict.fromkeys(caps))
        emb = encode_texts(self.bundle, uniq, self.original).to(self.bundle.device)
        return emb, torch.tensor([uniq.index(c) for c in caps], device=self.bundle.device)

    # ---- model outputs ------------------------------------------------------------------------
    def image_features(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        model = model or self.model
        return F.normalize(model.encode_image(x).float(), dim=-1)

    def superclass_logits(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Zero-shot logits over all superclass prompts (differentiable w.r.t. the image tower)."""
        return self.logit_scale * self.image_features(x, model) @ self.superclass_emb.t()

    @torch.no_grad()
    def accuracy(self, views: ViewSet, model: nn.Module | None = None, batch_size: int = ENCODE_BATCH) -> float:
        """Zero-shot superclass accuracy of ``views`` (eval mode, restored afterwards)."""
        model = model or self.model
        was = model.visual.training
        model.visual.eval()
        feats = torch.cat([self.image_features(self.inputs(views, slice(i, i + batch_size), model), model)
                           for i in range(0, len(views), batch_size)])
        model.visual.train(was)
        return self.superclass_accuracy(feats, self.task.superclass_labels(views))

    def superclass_accuracy(self, features: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> float:
        """Zero-shot superclass accuracy of normalised image ``features`` against ``labels``. With
        ``margin`` > 0 an image also counts as recognised while its label's logit is within
        ``margin`` of the best other logit (a stricter test of "forgotten").
        NaN/inf features raise :class:`NonFiniteLoss` naming the stage: they predict "not the target
        class", so early stopping would otherwise accept a broken model as forgotten."""
        if not bool(torch.isfinite(features).all()):
            raise NonFiniteLoss(f"stage {self.current_stage!r}: the model's image features became NaN/inf; "
                                "lower the learning rate of that stage or its number of steps")
        logits = self.logit_scale * features.to(self.superclass_emb.device) @ self.superclass_emb.t()
        return float(recognised(logits, labels, margin).float().mean())

    @property
    def chance(self) -> float:
        return 1.0 / len(self.task.superclasses)

    def text_features(self, names: list[str], model: nn.Module | None = None) -> torch.Tensor:
        """Class embeddings of ``names`` (normalised mean over each class's prompts, as
        :class:`TextCache` computes them) from ``model``'s text tower, differentiable w.r.t. it."""
        from ..data.prompts import class_prompts
        model = model or self.model
        prompts = class_prompts(names)
        tokens = tokenize(self.bundle, [p for ps in prompts for p in ps], model)
        return prompt_ensemble(F.normalize(model.encode_text(tokens).float(), dim=-1), prompts)

    def current_delta(self) -> StateDict:
        """θ_u − θ₀ of the image tower (keys of ``model.visual.state_dict()``)."""
        return state_delta(self.theta0, self.model.visual.state_dict())

    def text_delta(self) -> StateDict:
        """θ_u − θ₀ of the text side (keys of ``model.state_dict()``); {} unless the method edits it."""
        return state_delta(self.text_theta0, text_state(self.model)) if self.edits_text else {}

    def delta(self) -> StateDict:
        """The whole edit θ_u − θ₀ with the keys of ``model.state_dict()`` (what the result holds)."""
        return {**{f"{VISUAL}{k}": v for k, v in self.current_delta().items()}, **self.text_delta()}

    def set_visual(self, state: StateDict) -> None:
        self.model.visual.load_state_dict(state)

    def text_weights(self) -> StateDict:
        """The editable copy's text-side weights (keys of ``model.state_dict()``; shares storage)."""
        return text_state(self.model)

    def set_text(self, state: StateDict) -> None:
        """Load text-side weights (keys of ``model.state_dict()``) into the editable copy."""
        if not self.edits_text:
            raise RuntimeError("this context's text tower is the original's, shared; a method that edits "
                               "it sets `edits_text = True`")
        load_text_state(self.model, state)


class Unlearner:
    """Base class of every method (see the module docstring for what a method overrides)."""
    name: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    summary: ClassVar[str] = ""          # one line for `clipforget list-methods`
    edits_text: ClassVar[bool] = False   # True: the editable copy owns a private text tower too
    learned: ClassVar[bool] = False      # trains its delta (θ_u − θ₀): gets a "+soup" variant
    restores: ClassVar[bool] = False     # calibrates α itself (a restore stage): no "+soup" variant

    def __init__(self, config=None):
        if isinstance(config, dict):
            config = config_from_dict(self.Config, config)
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name}: config must be a {self.Config.__name__}, got {type(self.config).__name__}")

    def unlearn(self, ctx: Context) -> None:
        raise NotImplementedError

    def run(self, bundle: ClipBundle, task: Task, callbacks: Iterable[Callback] = (),
            texts: TextCache | None = None, activation_budget: int | None = None) -> UnlearnResult:
        if self.learned and bundle.precision == "fp16":
            raise ValueError(f"{self.name}: {HALF_PRECISION}")
        seed = getattr(self.config, "seed", 0)
        torch.manual_seed(seed)
        ctx = Context(bundle, task, callbacks, texts, seed, edits_text=self.edits_text,
                      activation_budget=activation_budget)
        t0 = time.perf_counter()
        self.unlearn(ctx)
        d = ctx.delta()
        bad = [k for k, v in d.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:   # never hand NaN/inf weights to evaluation or saving
            raise NonFiniteLoss(f"method {self.name!r} produced NaN/inf weights ({len(bad)} tensors, e.g. "
                                f"{bad[0]}); lower its learning rate or step sizes")
        ctx.seconds["total"] = time.perf_counter() - t0
        return UnlearnResult(self.name, task.request.to_dict(), d, ctx.alpha, ctx.alpha_curve, ctx.history,
                             ctx.seconds, dataclasses.asdict(self.config), ctx.info)
