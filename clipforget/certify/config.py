"""The certificate's knobs: one dataclass per check and the verdict's thresholds."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RelearnConfig:
    steps: int = 20                 # fine-tuning steps of the attack
    eval_every: int = 5             # target accuracy is measured every this many steps (and at 0)
    lr: float = 1e-4                # Adam on the whole image tower (BatchNorm statistics frozen)
    batch_size: int = 16
    train_views: int = 8            # augmented views per relearning image
    eval_views: int = 4             # augmented views per evaluation image
    sample_fraction: float = 0.4    # share of the subgroup's groups (styles / images) used to relearn
    anchor_images: int = 64         # images of other superclasses mixed into every batch with their own
                                    # labels, so fine-tuning cannot just predict one class for everything
    control: str | None = None      # control subgroup ("superclass/subgroup"); None: picked by seed

    def __post_init__(self):
        for name in ("steps", "eval_every", "batch_size", "train_views", "eval_views", "anchor_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"relearn.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"relearn.batch_size must be >= 2 (half sample, half anchors), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"relearn.lr must be > 0, got {self.lr}")
        if not 0 < self.sample_fraction < 1:
            raise ValueError(f"relearn.sample_fraction must be in (0, 1), got {self.sample_fraction}")
        if self.control is not None and self.control.count("/") != 1:
            raise ValueError(f"relearn.control must be 'superclass/subgroup', got {self.control!r}")


@dataclass
class ProbeConfig:
    train_views: int = 4            # augmented views per image to fit a probe
    eval_views: int = 4             # augmented views per held-out image
    steps: int = 150                # full-batch Adam steps of the logistic regression
    lr: float = 0.05
    weight_decay: float = 1e-4
    max_negatives: int = 400        # other-superclass images for the coarse probe (sampled by seed)

    def __post_init__(self):
        for name in ("train_views", "eval_views", "steps", "max_negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"probe.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"probe.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class RetrievalConfig:
    k: int = 20                     # recall@k
    pool: int | None = None         # at most this many gallery images besides the target superclass
                                    # (None: the whole gallery); a smaller pool is a quicker check
    paraphrases: tuple[str, ...] = ("a picture of a {}", "a drawing of a {}", "an image showing a {}")

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"retrieval.k must be >= 1, got {self.k}")
        if self.pool is not None and self.pool < 1:
            raise ValueError(f"retrieval.pool must be >= 1 or None, got {self.pool}")
        self.paraphrases = tuple(self.paraphrases)
        for p in self.paraphrases:
            if p.count("{}") != 1:
                raise ValueError(f"retrieval.paraphrases: each template needs exactly one '{{}}', got {p!r}")


@dataclass
class Thresholds:
    """What the verdict asks of the unlearned model; each is compared with a measured number."""
    max_target_accuracy: float = 0.1    # zero-shot target accuracy on held-out images, before relearning
    max_relearn_recovery: float = 0.5   # best target accuracy during the relearning attack / the original's
    max_coarse_recall_ratio: float = 0.25  # recall@k for the coarse label: after / before
    max_coarse_probe_ratio: float = 0.5    # forgotten images a coarse-class probe still recognises:
                                           # after / before
    min_kept_ratio: float = 0.9         # zero-shot accuracy on other superclasses' images: after / before
                                        # (at least; a model that forgot everything is not certified)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not 0 <= v <= 1:
                raise ValueError(f"thresholds.{f.name} must be in [0, 1], got {v}")


@dataclass
class CertifyConfig:
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    thresholds: Thresholds = field(default_factory=Thresholds)
    kept_images: int = 256          # other superclasses' images for the "rest kept" check (sampled by seed)
    seed: int = 0

    def __post_init__(self):
        if self.kept_images < 1:
            raise ValueError(f"kept_images must be >= 1, got {self.kept_images}")
        for name, cls in (("relearn", RelearnConfig), ("probe", ProbeConfig), ("retrieval", RetrievalConfig),
                          ("thresholds", Thresholds)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "CertifyConfig":
        from ..methods.base import config_from_dict
        return config_from_dict(cls, d)
