"""Named presets: the preset's fields first, the user's --split / --config / --set over them."""
import pytest

from clipforget.cli import _config, _split, build_parser
from clipforget.presets import PRESETS, deep_update, get_preset, preset_config, preset_split


def test_user_fields_win_over_the_preset_field_by_field():
    config = preset_config("quick", "ours", {"remind": {"loop": {"lr": 1e-4}}})
    split = preset_split("quick", {"test_views": 3})
    quick = get_preset("quick")
    assert config["remind"]["loop"] == {"steps": 10, "lr": 1e-4}          # the preset's steps, the user's lr
    assert config["remind"]["align"] == quick.config["ours"]["remind"]["align"]
    assert split == {**quick.split, "test_views": 3}
    assert quick.config["ours"]["remind"]["loop"] == {"steps": 10}         # the preset itself is unchanged
    assert preset_config("quick", "ga", {"loop": {"steps": 3}}) == {"loop": {"steps": 3}}   # no ga part: its own
    assert preset_split("quick", {}) == quick.split
    assert (preset_config(None, "ours", {"a": 1}), preset_split(None, {"b": 2})) == ({"a": 1}, {"b": 2})
    with pytest.raises(ValueError, match="unknown preset 'fast'; known: quick"):
        get_preset("fast")
    assert deep_update({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


def test_every_preset_builds_valid_configs_from_the_command_line():
    for name in PRESETS:
        args = build_parser().parse_args(["forget", "--superclass", "dog", "--subgroup", "poodle", "--out", "x",
                                          "--preset", name, "--set", "forget.top_k_layers=2",
                                          "--split", '{"test_images": 2}'])
        config, split = _config("ours", args), _split(args.split, args.preset)
        assert config.forget.top_k_layers == 2 and split.test_images == 2
        if name == "quick":
            assert (config.remind.loop.steps, config.stand_ins.images, split.test_views, split.max_other_images) == \
                (10, 8, 1, 48)
            assert config.remind.loop.lr == 5e-4            # what the preset leaves alone keeps its default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["forget", "--superclass", "dog", "--out", "x", "--preset", "nope"])
