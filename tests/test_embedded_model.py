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


def test_hit_chance_is_what_a_random_ranking_scores():
    """Brute force over every 5 of 8 images: the share of them that holds one of a query's images."""
    from itertools import combinations

    from clipforget.eval.embedded import hit_chance
    labels = ["a", "a", "b", "b", "b", "c", "d", "d"]
    subsets = list(combinations(range(len(labels)), 5))
    brute = {q: sum(any(labels[i] == q for i in s) for s in subsets) / len(subsets) for q in "abcd"}
    sizes = [labels.count(q) for q in "abcd"]
    assert hit_chance(sizes, len(labels)) == pytest.approx(sum(brute.values()) / 4)
    assert hit_chance([1], 3) == 1.0 and hit_chance([0, 2], 10) == pytest.approx((1 - 56 / 252) / 2)


def test_the_t2i_row_reports_the_chance_of_its_own_gallery(bundle, gallery):
    """The chance of text->image hit@5 is the gallery's (it once assumed 5 images per subgroup: 25 / N)."""
    from collections import Counter
    from math import comb

    from clipforget.data.gallery import Gallery
    items = [it for it in gallery.select(kind="hierarchy", unseen_style=False) if it.superclass in ("dog", "cat")
             and (it.style == "noto" or (it.superclass == "dog" and it.style in ("twemoji", "openmoji")))]
    small = Gallery(gallery.root, items, "small")
    row = next(r for r in evaluate_model(bundle, small, views=1, distributions=("held-out views",))
               if r["task"] == "text->image hit@5")
    n, sizes = len(items), Counter(it.subgroup for it in items)
    expected = sum(1 - comb(n - m, 5) / comb(n, 5) for m in sizes.values()) / len(sizes)
    assert row["images"] == n and row["chance"] == pytest.approx(expected)
    assert row["chance"] != pytest.approx(min(1.0, 25 / n))
