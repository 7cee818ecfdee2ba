"""Named run presets: SplitConfig fields and method config that bound what a run costs.

    clipforget forget --model RN50 --pretrained rn50.safetensors --superclass dog --subgroup poodle --preset quick

``quick`` lets a real tower at 224 px (RN50, RN101, ViT-B-32) finish a whole run on a CPU in
minutes (``bench/bench_towers.py``, docs/results/towers.md): one view per test image, a sample of
each other column, short stages. It checks that a model and gallery work end to end and what each
stage costs; its Score is not the method's — the defaults are what the sweep and the bench measure.
A preset is applied first: ``--split``, ``--config`` and ``--set`` change it field by field.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    split: dict = field(default_factory=dict)        # SplitConfig fields
    config: dict = field(default_factory=dict)       # method name -> its config fields (nested)
    suggest: bool = True                             # the CLI's over-forgetting check (encodes the whole gallery)


PRESETS = {p.name: p for p in [
    Preset("quick", "bounded steps and a gallery sample: a real tower at 224 px finishes on a CPU in minutes",
           split={"train_views": 2, "forget_views": 4, "calib_views": 1, "calib_target_views": 2, "test_views": 1,
                  "calib_other_images": 24, "calib_concept_images": 24, "max_other_images": 48,
                  "replay_images": 16},
           config={"ours": {"stand_ins": {"images": 8, "steps": 5},
                            "forget": {"fisher_samples": 8, "batch_size": 16, "loop": {"steps": 10}},
                            "remind": {"batch_size": 16, "loop": {"steps": 10},
                                       "align": {"steps": 3, "max_images": 16, "micro_batch": 8}},
                            "restore": {"grid_points": 5}}},
           suggest=False),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def deep_update(base: dict, over: dict) -> dict:
    """A copy of ``base`` with ``over`` applied, nested dicts merged key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_config(name: str | None, method: str, config: dict) -> dict:
    """``method``'s config fields: the preset's (none when it has none for that method), ``config`` over them."""
    return deep_update(get_preset(name).config.get(method, {}), config) if name else config


def preset_split(name: str | None, split: dict) -> dict:
    """SplitConfig fields: the preset's, ``split`` over them."""
    return deep_update(get_preset(name).split, split) if name else split
