"""The synthetic world: vocabulary, scenes, rendering, captions and caption checking.

A *scene* is two objects on a noisy background, each with a colour, a shape and a size,
placed so that exactly one of four relations holds unambiguously between them:
``objects[0] <relation> objects[1]`` with relation in left/right/above/below.  A
*one-object* scene (``synthetic.objects: 1``, the demo's world, which a small model learns in
minutes) has one object at one of five positions (left, right, top, bottom, centre); its
``relation`` field holds the position.

Captions are varied English built from templates and synonyms, e.g. "a big red circle to
the left of a small blue square" or "there is a little blue box under a large red disc"; with
one object, "a big red circle on the left" or "there is a little blue box in the middle".
:func:`check_caption` parses any such text back (tolerating a "a picture of " prefix, extra
words and punctuation) and scores each stated attribute against a scene.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------- vocabulary
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 235),
    "yellow": (245, 225, 20),
    "purple": (150, 40, 190),
    "orange": (255, 140, 0),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
RELATIONS = ("left", "right", "above", "below")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
SIZE_PX = {"small": 12, "large": 20}

# Words a caption may use for each value (the first one is canonical).
SHAPE_WORDS = {"circle": ("circle", "disc", "ball"), "square": ("square", "box"),
               "triangle": ("triangle",), "cross": ("cross", "plus")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_PHRASES = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
# One-object scenes: where the object is, and the words that say it (the first is canonical).
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "to the left"),
    "right": ("on the right", "at the right", "to the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the middle", "in the centre", "in the center"),
}
POSITION_TEMPLATES = (
    "a {a} {pos}",
    "{a} {pos}",
    "there is a {a} {pos}",
    "a photo of a {a} {pos}",
    "an image with a {a} {pos}",
    "a {a} placed {pos}",
    "the {a} is {pos}",
    "a {a} sits {pos}",
)
_POS_WORD = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "middle": "centre",
             "centre": "centre", "center": "centre"}
# Templates: {a}/{b} are object phrases, {rel} a relation phrase.
TEMPLATES = (
    "a {a} {rel} a {b}",
    "{a} {rel} {b}",
    "there is a {a} {rel} a {b}",
    "a {a} is {rel} a {b}",
    "the {a} is {rel} the {b}",
    "an image with a {a} {rel} a {b}",
    "a photo of a {a} {rel} a {b}",
    "a {a} placed {rel} a {b}",
)
PARTIAL_TEMPLATES = ("a {a}", "there is a {a}", "a photo of a {a}", "{a}")
BOILERPLATE = (
    "IMG_{n:04d}.jpg", "DSC{n:05d}.JPG", "click here", "stock photo", "image", "download now",
    "photo {n}", "untitled", "no description available", "thumbnail", "see more at www.example.com",
)
HTML_JUNK = (
    "<div class=x>&nbsp;</div>", "<br/>", "<span class=\"img\"></span>&amp;", "<p>&nbsp;&nbsp;</p>",
    "<img src=\"pic.jpg\" alt=\"\">", "&lt;/div&gt;",
)

_COLOUR_WORD = {w: w for w in COLOURS}
_SHAPE_WORD = {w: s for s, ws in SHAPE_WORDS.items() for w in ws}
_SIZE_WORD = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_REL_WORD = {"left": "left", "right": "right", "above": "above", "over": "above", "top": "above",
             "below": "below", "under": "below", "beneath": "below", "underneath": "below"}


def synonym_groups() -> list[str]:
    """The world's words that mean the same, one group per string ("large big"): the lexicon a
    user would give as ``synonyms`` (a thesaurus, not the scenes' ground truth).  Single words
    only: the multi-word relation phrases ("to the left of") share their content word."""
    groups = [" ".join(ws) for table in (SHAPE_WORDS, SIZE_WORDS) for ws in table.values() if len(ws) > 1]
    for rel in RELATIONS:
        words = sorted({w for w, r in _REL_WORD.items() if r == rel})
        if len(words) > 1:
            groups.append(" ".join(words))
    return groups


def vocabulary() -> list[str]:
    """Every word a clean or noisy-but-grammatical caption can use (sorted)."""
    words: set[str] = set(COLOURS)
    for group in (SHAPE_WORDS, SIZE_WORDS, RELATION_PHRASES, POSITION_PHRASES):
        for values in group.values():
            for v in values:
                words.update(v.split())
    for t in TEMPLATES + PARTIAL_TEMPLATES + POSITION_TEMPLATES:
        words.update(w for w in t.replace("{a}", "").replace("{b}", "").replace("{rel}", "").replace("{pos}", "").split())
    words.add("an")
    return sorted(words)


# --------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)


@dataclass(frozen=True)
class Scene:
    """Two objects, ``objects[0] <relation> objects[1]`` holding unambiguously; or one object,
    with ``relation`` its position (one of :data:`POSITIONS`)."""

    objects: tuple[SceneObject, ...]
    relation: str
    background: tuple[int, int, int]

    def to_json(self) -> str:
        return json.dumps({"objects": [asdict(o) for o in self.objects], "relation": self.relation,
                           "background": list(self.background)}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Scene":
        d = json.loads(text)
        objs = tuple(SceneObject(o["colour"], o["shape"], o["size"], tuple(o["bbox"])) for o in d["objects"])
        return Scene(objs, d["relation"], tuple(d.get("background", (128, 128, 128))))  # type: ignore[arg-type]

    @property
    def single(self) -> bool:
        """One object, placed at a position."""
        return len(self.objects) == 1


def holdout_pairs(seed: int, frac: float) -> frozenset[tuple[str, str]]:
    """The (colour, shape) pairs never shown in the web and human splits."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    n = int(round(frac * len(pairs)))
    rng = np.random.default_rng([seed, 7777])
    idx = rng.permutation(len(pairs))[:n]
    return frozenset(pairs[i] for i in sorted(idx))


def sample_single(rng: np.random.Generator, image_size: int,
                  exclude: frozenset[tuple[str, str]] = frozenset()) -> Scene:
    """A one-object scene: one object, not an excluded (colour, shape) pair, at one of five
    positions (its centre a third of the way in from the named side, or the middle, with a
    small jitter)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    while True:
        c, s = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
        if (c, s) not in exclude:
            break
    size = SIZES[rng.integers(2)]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    scale = image_size / 48.0
    px = max(4, int(round(SIZE_PX[size] * scale)))
    margin = max(1, int(round(2 * scale)))
    near, mid, far = 0.22 * image_size, 0.5 * image_size, 0.78 * image_size
    cx, cy = {"left": (near, mid), "right": (far, mid), "top": (mid, near), "bottom": (mid, far),
              "centre": (mid, mid)}[position]
    jitter = int(3 * scale)
    x0 = int(round(cx - px / 2)) + int(rng.integers(-jitter, jitter + 1))
    y0 = int(round(cy - px / 2)) + int(rng.integers(-jitter, jitter + 1))
    x0 = min(max(margin, x0), image_size - margin - px)
    y0 = min(max(margin, y0), image_size - margin - px)
    background = tuple(int(v) for v in rng.integers(90, 166, size=3))
    return Scene((SceneObject(c, s, size, (x0, y0, x0 + px, y0 + px)),), position, background)  # type: ignore[arg-type]


def sample_scene(rng: np.random.Generator, image_size: int,
                 exclude: frozenset[tuple[str, str]] = frozenset(), objects: int = 2) -> Scene:
    """Draw a random scene of ``objects`` (1 or 2) objects; none uses an excluded (colour,
    shape) pair."""
    if objects == 1:
        return sample_single(rng, image_size, exclude)
    if objects != 2:
        raise ValueError(f"objects must be 1 or 2, not {objects}")
    colours, shapes = list(COLOURS), list(SHAPES)
    objs: list[tuple[str, str, str]] = []
    while len(objs) < 2:
        c, s = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
        if (c, s) in exclude:
            continue
        if objs and objs[0][0] == c and objs[0][1] == s:
            continue  # two identical-looking objects would make the caption ambiguous
        objs.append((c, s, SIZES[rng.integers(2)]))
    relation = RELATIONS[rng.integers(4)]
    scale = image_size / 48.0
    px = [max(4, int(round(SIZE_PX[o[2]] * scale))) for o in objs]
    margin = max(1, int(round(2 * scale)))
    min_gap = max(2, int(round(3 * scale)))
    # place along the relation's axis: first = the object that comes first (left or top)
    first, second = (0, 1) if relation in ("left", "above") else (1, 0)
    span = image_size - 2 * margin
    free = span - px[0] - px[1]
    gap = int(rng.integers(min_gap, max(min_gap, free) + 1))
    start = margin + int(rng.integers(0, max(0, free - gap) + 1))
    along = {first: start, second: start + px[first] + gap}
    # across the axis: a shared centre with a small jitter, so the relation stays clear
    big = max(px)
    centre = int(rng.integers(margin + big // 2, image_size - margin - big // 2 + 1))
    across = {}
    for i in (0, 1):
        jitter = int(rng.integers(-int(3 * scale), int(3 * scale) + 1))
        lo = min(max(margin, centre - px[i] // 2 + jitter), image_size - margin - px[i])
        across[i] = lo
    boxes = []
    for i in (0, 1):
        if relation in ("left", "right"):
            x0, y0 = along[i], across[i]
        else:
            x0, y0 = across[i], along[i]
        boxes.append((x0, y0, x0 + px[i], y0 + px[i]))
    background = tuple(int(v) for v in rng.integers(90, 166, size=3))
    return Scene(
        (SceneObject(*objs[0], boxes[0]), SceneObject(*objs[1], boxes[1])),  # type: ignore[arg-type]
        relation, background,  # type: ignore[arg-type]
    )


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    fill = COLOURS[obj.colour]
    w = x1 - x0
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif obj.shape == "cross":
        t = max(2, int(round(w / 3)))
        a = x0 + (w - t) // 2
        b = y0 + (w - t) // 2
        draw.rectangle((a, y0, a + t - 1, y1 - 1), fill=fill)
        draw.rectangle((x0, b, x1 - 1, b + t - 1), fill=fill)
    else:  # pragma: no cover - vocabulary is closed
        raise ValueError(obj.shape)


def render(scene: Scene, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """The scene as an ``(image_size, image_size, 3)`` uint8 array with a noisy background."""
    bg = np.asarray(scene.background, dtype=np.float32)
    noise = rng.normal(0.0, 14.0, size=(image_size, image_size, 3)).astype(np.float32)
    arr = np.clip(bg + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    return np.asarray(img)


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    size = SIZE_WORDS[obj.size][rng.integers(len(SIZE_WORDS[obj.size]))]
    shape = SHAPE_WORDS[obj.shape][rng.integers(len(SHAPE_WORDS[obj.shape]))]
    return f"{size} {obj.colour} {shape}"


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random true caption of ``scene`` (either object may come first)."""
    if scene.single:
        template = POSITION_TEMPLATES[rng.integers(len(POSITION_TEMPLATES))]
        phrases = POSITION_PHRASES[scene.relation]
        return _fix_articles(template.format(a=object_phrase(scene.objects[0], rng),
                                             pos=phrases[rng.integers(len(phrases))]))
    a, b, rel = scene.objects[0], scene.objects[1], scene.relation
    if rng.random() < 0.5:
        a, b, rel = b, a, INVERSE[rel]
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    phrases = RELATION_PHRASES[rel]
    text = template.format(a=object_phrase(a, rng), b=object_phrase(b, rng),
                           rel=phrases[rng.integers(len(phrases))])
    return _fix_articles(text)


def regions(scene: Scene, rng: np.random.Generator, image_size: int) -> list[dict]:
    """Each object's box with a phrase naming it, as COCO / Visual Genome give X-VLM: e.g.
    ``{"phrase": "a big red disc", "box": [x0, y0, x1, y1]}``, the box normalised to [0, 1] of the
    image (:data:`vlp_core.schema.REGIONS_TYPE`).  The phrase draws its words like a caption
    does (synonyms); with two objects it names exactly one of them (they never share colour and shape)."""
    return [{"phrase": _fix_articles(f"a {object_phrase(o, rng)}"),
             "box": [o.bbox[0] / image_size, o.bbox[1] / image_size, o.bbox[2] / image_size, o.bbox[3] / image_size]}
            for o in scene.objects]


def partial_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption that describes only one of the two objects (one object: not where it is)."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    template = PARTIAL_TEMPLATES[rng.integers(len(PARTIAL_TEMPLATES))]
    return _fix_articles(template.format(a=object_phrase(obj, rng)))


def corrupt_attribute(scene: Scene, rng: np.random.Generator,
                      exclude: frozenset[tuple[str, str]] = frozenset()) -> tuple[Scene, str]:
    """A copy of ``scene`` with exactly one attribute changed; returns (scene, attribute).
    A changed colour or shape never forms an excluded (held-out) (colour, shape) pair."""
    for _ in range(100):
        wrong, attr = _corrupt_once(scene, rng)
        if not any((o.colour, o.shape) in exclude for o in wrong.objects):
            return wrong, attr
    wrong_rel = ([p for p in POSITIONS if p != scene.relation][0] if scene.single else INVERSE[scene.relation])
    return Scene(scene.objects, wrong_rel, scene.background), "relation"


def _corrupt_once(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    attr = ("colour", "shape", "size", "relation")[rng.integers(4)]
    if attr == "relation":
        others = [r for r in (POSITIONS if scene.single else RELATIONS) if r != scene.relation]
        return Scene(scene.objects, others[rng.integers(len(others))], scene.background), attr
    i = int(rng.integers(len(scene.objects)))
    objs = list(scene.objects)
    o = objs[i]
    if attr == "colour":
        choices = [c for c in COLOURS if c != o.colour]
        objs[i] = SceneObject(choices[rng.integers(len(choices))], o.shape, o.size, o.bbox)
    elif attr == "shape":
        choices = [s for s in SHAPES if s != o.shape]
        objs[i] = SceneObject(o.colour, choices[rng.integers(len(choices))], o.size, o.bbox)
    else:
        objs[i] = SceneObject(o.colour, o.shape, "large" if o.size == "small" else "small", o.bbox)
    return Scene(tuple(objs), scene.relation, scene.background), attr


# --------------------------------------------------------------------------- checking
@dataclass
class _Mention:
    colour: Optional[str] = None
    shape: Optional[str] = None
    size: Optional[str] = None

    def empty(self) -> bool:
        return self.colour is None and self.shape is None and self.size is None


def _mention(words: list[str]) -> _Mention:
    m = _Mention()
    for w in words:
        if m.colour is None and w in _COLOUR_WORD:
            m.colour = _COLOUR_WORD[w]
        elif m.shape is None and w in _SHAPE_WORD:
            m.shape = _SHAPE_WORD[w]
        elif m.size is None and w in _SIZE_WORD:
            m.size = _SIZE_WORD[w]
    return m


def _words(text: str) -> list[str]:
    text = re.sub(r"<[^>]*>", " ", str(text or "").lower())
    return re.findall(r"[a-z]+", text)


def parse_caption(text: str) -> tuple[_Mention, _Mention, Optional[str]]:
    """(first mention, second mention, relation of first to second or None)."""
    return _parse_words(_words(text))


def _parse_words(words: list[str]) -> tuple[_Mention, _Mention, Optional[str]]:
    rel_at = next((i for i, w in enumerate(words) if w in _REL_WORD), None)
    if rel_at is not None:
        relation: Optional[str] = _REL_WORD[words[rel_at]]
        # the relation phrase ends at its "of" (left of / on top of) if any
        end = rel_at + 1
        if end < len(words) and words[end] == "of":
            end += 1
        return _mention(words[:rel_at]), _mention(words[end:]), relation
    # no relation: split after the first shape word (e.g. "a red circle and a blue box")
    cut = next((i + 1 for i, w in enumerate(words) if w in _SHAPE_WORD), len(words))
    return _mention(words[:cut]), _mention(words[cut:]), None


def _agree(m: _Mention, o: SceneObject) -> int:
    return sum(int(v == getattr(o, k)) for k, v in (("colour", m.colour), ("shape", m.shape), ("size", m.size))
               if v is not None)


class ParsedCaption(NamedTuple):
    """A caption read once for :func:`check_parsed` (:func:`parse_for_check`): as two mentions and
    a relation (two-object scenes) and as one mention and a position word (one-object scenes)."""

    pair: tuple[_Mention, _Mention, Optional[str]]
    single: _Mention
    position: Optional[str]


def parse_for_check(text: str) -> ParsedCaption:
    """Read ``text`` once for many :func:`check_parsed` calls (one caption against many scenes)."""
    words = _words(text)
    return ParsedCaption(_parse_words(words), _mention(words),
                         next((_POS_WORD[w] for w in words if w in _POS_WORD), None))


def check_caption(text: str, scene: Scene | str) -> dict[str, Optional[bool]]:
    """Score a caption against a scene (a :class:`Scene` or its JSON).

    Returns ``{colour, shape, size, relation, all}``: each is True/False when the caption
    states that attribute (for every mentioned object) and None when it does not.  ``all``
    is True only when both objects are named by colour and shape, the relation is stated,
    and everything stated is true.
    """
    return check_parsed(parse_for_check(text), scene)


def check_parsed(parsed: ParsedCaption, scene: Scene | str) -> dict[str, Optional[bool]]:
    """:func:`check_caption` of a caption already read by :func:`parse_for_check`."""
    if isinstance(scene, str):
        scene = Scene.from_json(scene)
    if scene.single:
        return _check_single(parsed.single, parsed.position, scene)
    first, second, relation = parsed.pair
    mentions = [m for m in (first, second) if not m.empty()]
    o0, o1 = scene.objects
    # which scene object does each mention describe?  try both ways, keep the better fit
    if len(mentions) == 2:
        same = _agree(first, o0) + _agree(second, o1) + (relation == scene.relation)
        swap = _agree(first, o1) + _agree(second, o0) + (relation == INVERSE[scene.relation])
        if swap > same:
            pairs, truth_rel = [(first, o1), (second, o0)], INVERSE[scene.relation]
        else:
            pairs, truth_rel = [(first, o0), (second, o1)], scene.relation
    elif len(mentions) == 1:
        m = mentions[0]
        pairs = [(m, o0 if _agree(m, o0) >= _agree(m, o1) else o1)]
        truth_rel = scene.relation if m is first else INVERSE[scene.relation]
    else:
        pairs, truth_rel = [], scene.relation
    result: dict[str, Optional[bool]] = {}
    for attr in ("colour", "shape", "size"):
        stated = [(getattr(m, attr), getattr(o, attr)) for m, o in pairs if getattr(m, attr) is not None]
        result[attr] = None if not stated else all(a == b for a, b in stated)
    result["relation"] = None if relation is None or len(mentions) < 2 else relation == truth_rel
    complete = (len(mentions) == 2 and all(m.colour and m.shape for m, _ in pairs) and relation is not None)
    result["all"] = bool(complete and all(v is not False for v in result.values()))
    return result


def _check_single(m: _Mention, position: Optional[str], scene: Scene) -> dict[str, Optional[bool]]:
    """:func:`check_caption` for a one-object scene: ``relation`` scores the stated position;
    ``all`` needs colour, shape and position stated and everything stated true."""
    o = scene.objects[0]
    result: dict[str, Optional[bool]] = {}
    for attr in ("colour", "shape", "size"):
        v = getattr(m, attr)
        result[attr] = None if v is None else v == getattr(o, attr)
    result["relation"] = None if position is None else position == scene.relation
    complete = bool(m.colour and m.shape and position is not None)
    result["all"] = bool(complete and all(v is not False for v in result.values()))
    return result
