"""The shipped embedded model meets its floors on held-out augmented views, and loads fast."""
import pytest

from clipforget.eval.embedded import evaluate_model, format_table
from clipforget.models import EMBEDDED_WEIGHTS


def test_weights_small_and_loaded(bundle):
    assert EMBEDDED_WEIGHTS.stat().st_size < 15 * 2**20
    assert bundle.image_size == 64
    assert any(m.__class__.__name__ == "BatchNorm2d" for m in bundle.model.visual.modules())


@pytest.mark.slow
def test_floors_on_held_out_views(bundle, gallery, view_cache):
    rows = {r["task"]: r for r in evaluate_model(bundle, gallery, views=1, cache=view_cache,
                                                 distributions=("held-out views",))}   # the floors' figures
    assert "training-distribution views" not in rows["superclass"]
    print(format_table(list(rows.values())))
    held = "held-out views"
    assert rows["superclass"][held] >= 0.95
    assert rows["subgroup"][held] >= 0.80
    assert rows["other concepts"][held] >= 0.65
    assert rows["style"][held] >= 0.80
    assert rows["text->image hit@5"]["clean images"] >= 0.95
    # clean images of the trained styles, and of the two styles the model never trained on
    clean = "clean images"
    assert rows["superclass, clean"][clean] >= 0.97
    assert rows["subgroup, clean"][clean] >= 0.80
    assert rows["superclass, unseen styles"][clean] >= 0.80
    assert rows["superclass, unseen styles"]["images"] < rows["superclass"]["images"]
    # unseen concepts are never trained on: above chance, far below seen ones
    assert rows["unseen concepts"]["chance"] < rows["unseen concepts"][held] < rows["other concepts"][held]
