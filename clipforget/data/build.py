"""Render the embedded gallery from twelve open-licensed emoji sets.

The npm packages ``@iconify-json/<set>`` (one per style in ``hierarchy.json``) hold mostly the same
CLDR-named concepts, each in its own visual style. Each ``icons.json`` maps a name to an SVG body;
we wrap it in an ``<svg>`` element, render it with ``resvg-py`` (no system libraries) and composite
it onto white. Versions, and the names a set spells differently (``fxemoji`` writes "alarmclock",
and its "dog" is a dog's face), are pinned in ``hierarchy.json`` so a rebuild gives the same pixels.

    clipforget build-gallery --out gallery            # runs `npm pack` for the pinned versions
    clipforget build-gallery --icons DIR --out gallery  # DIR/<set>/icons.json already unpacked
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image

from ..io import write_bytes
from .gallery import Gallery, write_masks
from .hierarchy import Hierarchy, load_hierarchy

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ["path", "concept", "superclass", "subgroup", "style", "source_set", "kind", "unseen_style"]

LICENSES = {
    "twemoji": ("Twemoji", "Twitter, Inc and other contributors (jdecked/twemoji)", "CC-BY-4.0",
                "https://creativecommons.org/licenses/by/4.0/"),
    "openmoji": ("OpenMoji", "OpenMoji, HfG Schwaebisch Gmuend", "CC-BY-SA-4.0",
                 "https://creativecommons.org/licenses/by-sa/4.0/"),
    "noto": ("Noto Emoji", "Google Inc", "Apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0"),
    "fluent-emoji-flat": ("Fluent Emoji (flat)", "Microsoft Corporation", "MIT",
                          "https://github.com/microsoft/fluentui-emoji/blob/main/LICENSE"),
    "fluent-emoji-high-contrast": ("Fluent Emoji (high contrast)", "Microsoft Corporation", "MIT",
                                   "https://github.com/microsoft/fluentui-emoji/blob/main/LICENSE"),
    "fluent-emoji": ("Fluent Emoji (3D)", "Microsoft Corporation", "MIT",
                     "https://github.com/microsoft/fluentui-emoji/blob/main/LICENSE"),
    "emojione": ("Emoji One (colored)", "Emoji One (EmojiTwo/emojitwo)", "CC-BY-4.0",
                 "https://creativecommons.org/licenses/by/4.0/"),
    "emojione-monotone": ("Emoji One (monotone)", "Emoji One (EmojiTwo/emojitwo)", "CC-BY-4.0",
                          "https://creativecommons.org/licenses/by/4.0/"),
    "emojione-v1": ("Emoji One (v1)", "Emoji One (joypixels/emojione-legacy)", "CC-BY-SA-4.0",
                    "https://creativecommons.org/licenses/by-sa/4.0/"),
    "fxemoji": ("Firefox OS Emoji", "Mozilla (mozilla/fxemoji)", "Apache-2.0",
                "https://mozilla.github.io/fxemoji/LICENSE.md"),
    "noto-v1": ("Noto Emoji (v1)", "Google Inc", "Apache-2.0",
                "https://www.apache.org/licenses/LICENSE-2.0"),
    "streamline-emojis": ("Streamline Emojis", "Streamline (webalys-hq/streamline-vectors)", "CC-BY-4.0",
                          "https://creativecommons.org/licenses/by/4.0/"),
}
OPEN_LICENCES = {"CC-BY-4.0", "CC-BY-SA-4.0", "Apache-2.0", "MIT"}


def fetch_icon_sets(hierarchy: Hierarchy, dest: Path) -> Path:
    """`npm pack` the pinned iconify packages into ``dest/<set>/icons.json``."""
    dest.mkdir(parents=True, exist_ok=True)
    for style in hierarchy.styles.values():
        target = dest / style["set"]
        if (target / "icons.json").exists():
            continue
        spec = f"{style['package']}@{style['version']}"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, check=True,
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1]
            except (OSError, subprocess.CalledProcessError) as e:
                raise RuntimeError(f"could not `npm pack {spec}` ({e}); install Node.js/npm or pass "
                                   "--icons DIR with the unpacked packages") from e
            with tarfile.open(Path(tmp) / out) as tar:
                tar.extractall(tmp, filter="data")
            for name in ("info.json", "icons.json"):      # icons.json last: it marks the set complete
                write_bytes(target / name, (Path(tmp) / "package" / name).read_bytes())
    return dest


class IconSet:
    """One iconify JSON set: name -> standalone SVG string (aliases and transforms resolved)."""

    def __init__(self, path: Path):
        data = json.loads(Path(path).read_text())
        self.icons = data["icons"]
        self.aliases = data.get("aliases", {})
        self.width = data.get("width", 16)
        self.height = data.get("height", 16)
        self.left = data.get("left", 0)
        self.top = data.get("top", 0)

    def __contains__(self, name: str) -> bool:
        return name in self.icons or name in self.aliases

    def names(self) -> set[str]:
        return set(self.icons) | set(self.aliases)

    def _resolve(self, name: str) -> dict:
        props: dict = {}
        hops = 0
        while name in self.aliases:
            alias = self.aliases[name]
            for key in ("hFlip", "vFlip"):
                if key in alias:
                    props[key] = props.get(key, False) ^ bool(alias[key])
            props["rotate"] = props.get("rotate", 0) + alias.get("rotate", 0)
            for key in ("width", "height", "left", "top"):
                props.setdefault(key, alias.get(key))
            name = alias["parent"]
            hops += 1
            if hops > 10:
                raise ValueError(f"alias loop at {name!r}")
        icon = dict(self.icons[name])
        for key in ("hFlip", "vFlip"):
            icon[key] = icon.get(key, False) ^ props.get(key, False)
        icon["rotate"] = icon.get("rotate", 0) + props.get("rotate", 0)
        for key in ("width", "height", "left", "top"):
            if props.get(key) is not None:
                icon[key] = props[key]
        return icon

    def svg(self, name: str) -> str:
        icon = self._resolve(name)
        w, h = icon.get("width", self.width), icon.get("height", self.height)
        left, top = icon.get("left", self.left), icon.get("top", self.top)
        body = icon["body"]
        transforms = []
        if icon.get("hFlip"):
            transforms.append(f"translate({2 * left + w} 0) scale(-1 1)")
        if icon.get("vFlip"):
            transforms.append(f"translate(0 {2 * top + h}) scale(1 -1)")
        if icon["rotate"] % 4:
            transforms.append(f"rotate({90 * (icon['rotate'] % 4)} {left + w / 2} {top + h / 2})")
        if transforms:
            body = f'<g transform="{" ".join(transforms)}">{body}</g>'
        return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
                f'width="{w}" height="{h}" viewBox="{left} {top} {w} {h}">{body}</svg>')


def icon_name(spec: dict, concept: str) -> str | None:
    """The name a style's set gives a gallery concept: the style's ``names`` entry (None: the set
    has no icon for it), else the concept without dashes for sets that write names without them
    (``strip_dashes``), else the concept itself."""
    names = spec.get("names", {})
    if concept in names:
        return names[concept]
    return concept.replace("-", "") if spec.get("strip_dashes") else concept


def style_has(spec: dict, icon_set: IconSet, concept: str) -> bool:
    name = icon_name(spec, concept)
    return name is not None and name in icon_set


def render_svg(svg: str, size: int) -> Image.Image:
    """Render to an RGB ``size`` x ``size`` image on white."""
    import resvg_py

    png = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, skip_system_fonts=True))
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def other_pool(hierarchy: Hierarchy, sets: dict[str, IconSet]) -> list[str]:
    """Concepts outside the hierarchy, present in >= min_sets sets, minus excluded tokens. Concept
    names are those of the sets that spell names with dashes; a set with ``strip_dashes`` counts
    for a concept when it has the concept's dash-less name."""
    rules = hierarchy.other_rules
    candidates = {n for style, s in sets.items() if not hierarchy.styles[style].get("strip_dashes")
                  for n in s.names()}
    counts = Counter(n for n in candidates for style, s in sets.items()
                     if style_has(hierarchy.styles[style], s, n))
    excluded = set(rules["exclude_tokens"])
    in_hierarchy = set(hierarchy.subgroup_to_superclass)
    return sorted(n for n, k in counts.items()
                  if k >= rules["min_sets"] and n not in in_hierarchy and not set(n.split("-")) & excluded)


def trained_style_counts(hierarchy: Hierarchy, sets: dict[str, IconSet]) -> dict[str, int]:
    """subgroup -> number of styles that have it and that the embedded model trains on."""
    return {sg: sum(style_has(spec, sets[style], sg) for style, spec in hierarchy.styles.items()
                    if not spec.get("unseen"))
            for sg in hierarchy.subgroup_to_superclass}


def build_gallery(out: Path, icons_dir: Path | None = None, size: int = 96,
                  hierarchy: Hierarchy | None = None) -> dict:
    """Render every hierarchy and other-pool concept in every style that has it; write the
    manifest, the licence file and a content hash. Returns summary counts."""
    hierarchy = hierarchy or load_hierarchy()
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        icons_dir = Path(icons_dir) if icons_dir else fetch_icon_sets(hierarchy, Path(tmp))
        sets = {style: IconSet(icons_dir / spec["set"] / "icons.json")
                for style, spec in hierarchy.styles.items()}
        need = hierarchy.min_trained_styles
        missing = {sg: n for sg, n in trained_style_counts(hierarchy, sets).items() if n < need}
        if missing:
            raise ValueError(f"subgroups present in fewer than {need} trained styles: {missing}; "
                             "replace them in hierarchy.json or map their names per style")
        others = other_pool(hierarchy, sets)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        rows = []
        for concept in list(hierarchy.subgroup_to_superclass) + others:
            superclass = hierarchy.subgroup_to_superclass.get(concept, "")
            for style, icon_set in sets.items():
                spec = hierarchy.styles[style]
                if not style_has(spec, icon_set, concept):
                    continue
                rel = f"images/{style}/{concept}.png"
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                render_svg(icon_set.svg(icon_name(spec, concept)), size).save(staging / rel, optimize=True)
                rows.append({"path": rel, "concept": concept, "superclass": superclass,
                             "subgroup": concept if superclass else "", "style": style,
                             "source_set": spec["set"], "kind": "hierarchy" if superclass else "other",
                             "unseen_style": "1" if spec.get("unseen") else "0"})
        with open(staging / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        (staging / "LICENSES.md").write_text(licence_text(hierarchy))
        write_masks(staging, Gallery.from_manifest(staging / "manifest.csv").items)
        (staging / "GALLERY_HASH").write_text(hash_tree(staging) + "\n")
        # swap in atomically-ish: the old gallery stays until the new one is complete
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    n_hier = sum(r["kind"] == "hierarchy" for r in rows)
    return {"images": len(rows), "hierarchy_images": n_hier, "other_images": len(rows) - n_hier,
            "superclasses": len(hierarchy.superclasses),
            "subgroups": len(hierarchy.subgroup_to_superclass), "other_concepts": len(others),
            "styles": len(hierarchy.styles), "unseen_styles": hierarchy.unseen_styles}


def hash_tree(root: Path) -> str:
    """sha256 over the manifest and every image, in path order."""
    h = hashlib.sha256()
    root = Path(root)
    h.update((root / "manifest.csv").read_bytes())
    for p in sorted((root / "images").rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def licence_text(hierarchy: Hierarchy) -> str:
    lines = ["# Gallery licences and attribution", "",
             "Every image under `images/<style>/` is a rendering (resvg, composited onto white) of an",
             "icon from one open-licensed emoji set, distributed through the npm packages below.",
             "The renderings are adaptations of the originals and carry the original set's licence.", "",
             "| style folder | set | npm package | author | licence |", "|---|---|---|---|---|"]
    for style, spec in hierarchy.styles.items():
        title, author, spdx, url = LICENSES[spec["set"]]
        lines.append(f"| `{style}` | {title} | `{spec['package']}@{spec['version']}` | {author} | "
                     f"[{spdx}]({url}) |")
    lines += ["", "OpenMoji and Emoji One (v1) renderings are shared under the same CC BY-SA 4.0 licence "
              "(share-alike).",
              "Twemoji graphics by Twitter, Inc and other contributors, CC BY 4.0. Emoji One (colored, "
              "monotone) and Streamline Emojis graphics, CC BY 4.0, by their authors above.", ""]
    return "\n".join(lines)
