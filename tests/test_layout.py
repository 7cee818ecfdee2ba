"""The code's shape that the README promises a newcomer: every module listed in its layout map,
none of them a wall of code (issue: one big tidy-up)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_APP_LINES = 250


def modules() -> list[Path]:
    return sorted(p for p in (ROOT / "clipforget").rglob("*.py") if p.name != "__init__.py")


def test_no_module_over_the_limit():
    too_long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not too_long, f"split these modules (over {MAX_MODULE_LINES} lines): {too_long}"
    n = len((ROOT / "app.py").read_text().splitlines())
    assert n <= MAX_APP_LINES, f"app.py has {n} lines; widgets and wiring live in clipforget/app/page/"


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
    missing = [str(p.relative_to(ROOT)) for p in modules() if not re.search(rf"\b{re.escape(p.stem)}\b", layout)]
    assert not missing, f"README's layout section does not mention: {missing}"
