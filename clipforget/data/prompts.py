"""Text prompts: training captions of the embedded model and zero-shot prompt templates."""
from __future__ import annotations

from .gallery import display

# zero-shot prompt ensembles (text embeddings are averaged over the templates)
CLASS_TEMPLATES = ("a {}", "a picture of a {}")
STYLE_TEMPLATES = ("a {}",)


def article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def fill(template: str, name: str) -> str:
    """'a {}' + 'owl' -> 'an owl'."""
    text = template.format(name)
    if template.startswith("a {}"):
        text = f"{article(name)} {text[2:]}"
    return text


def class_prompts(names, templates=CLASS_TEMPLATES) -> list[list[str]]:
    """One list of prompts per class name ('guide-dog' -> 'a guide dog', ...)."""
    return [[fill(t, display(n)) for t in templates] for n in names]


def subgroup_prompts(subgroups, superclass_of: dict[str, str]) -> list[list[str]]:
    """Fine-grained prompts that name the superclass too: 'a poodle, a kind of dog'."""
    out = []
    for n in subgroups:
        x, sc = display(n), superclass_of.get(n)
        out.append([f"{article(x)} {x}, a kind of {display(sc)}"] if sc else [fill(t, x) for t in CLASS_TEMPLATES])
    return out


def coarse_prompt(superclass: str) -> str:
    """The coarse label text t_c of a superclass, e.g. 'a dog'."""
    return fill("a {}", display(superclass))


def training_captions(concept: str, superclass: str, style: str, style_phrase: str | None):
    """Captions of one gallery image as (text, key) pairs. A caption with key (name, style) is
    positive for every image whose concept or superclass is ``name`` (None: any) and whose style
    is ``style`` (None: any)."""
    x = display(concept)
    a = article(x)
    out = [(f"{a} {x}", (concept, None)), (f"a picture of {a} {x}", (concept, None)),
           (f"an emoji of {a} {x}", (concept, None))]
    if superclass:
        s = display(superclass)
        sa = article(s)
        out += [(f"{a} {x}, a kind of {s}", (concept, None)), (f"{sa} {s}", (superclass, None)),
                (f"a picture of {sa} {s}", (superclass, None))]
    if style and style_phrase:
        p = f"{article(style_phrase)} {style_phrase}"
        out += [(f"{p} of {a} {x}", (concept, style)), (p, (None, style))]
        if superclass:
            out.append((f"{p} of {sa} {s}", (superclass, style)))
    return out
