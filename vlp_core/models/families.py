"""Model families: which class builds and loads each ``model.family``.

A family is a model class that the whole platform can train (:mod:`vlp_core.train.loop`),
evaluate (:mod:`vlp_core.train.evaluate`) and use in CapFilt (:mod:`vlp_core.capfilt.backend`):

========  ==================================  =========  ====================================
family    class                               generates  what it adds
========  ==================================  =========  ====================================
blip      ``vlp_core.models.med:BlipMED``     yes        BLIP's MED: ITC + ITM + LM
xvlm      ``vlp_core.models.xvlm:XVLM``       yes        the MED + X-VLM's region-text ITC/ITM
                                                         and box prediction (L1 + GIoU)
vilbert   ``vlp_core.models.vilbert:ViLBERT`` no         two streams with co-attention
========  ==================================  =========  ====================================

A family that ``generates`` can be CapFilt's captioner; every family can be its filter (its
ITM probability).  Classes are imported on first use, so the registry works (and names every
family) before a family's module exists; resolving a missing one is a one-line
:class:`~vlp_core.models.med.ModelError`.

The contract of a family class (what :func:`vlp_core.models.create_model` and
:func:`load_model` call): ``config_class.from_dict(dict)`` builds its config from an
architecture JSON (unknown keys ignored), ``cls(config, tokenizer=...)`` a fresh model,
``copy_params()`` (optional) resets momentum copies, ``save_pretrained(dir)`` writes
``config.json`` with ``"family": <name>``, and ``from_pretrained(dir)`` loads it.  A saved
``config.json`` without ``family`` (written before families existed) is ``blip``.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp_core.errors import ModelError

DEFAULT_FAMILY = "blip"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Family:
    """One registry entry: ``module:cls``, and whether the family can caption (``generates``)."""

    name: str
    module: str
    cls: str
    generates: bool

    @property
    def target(self) -> str:
        return f"{self.module}:{self.cls}"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("blip", "vlp_core.models.med", "BlipMED", generates=True),
    Family("xvlm", "vlp_core.models.xvlm", "XVLM", generates=True),
    Family("vilbert", "vlp_core.models.vilbert", "ViLBERT", generates=False),
)}


def _error(message: str) -> Exception:
    return ModelError(message)


def family(name: str) -> Family:
    """The registry entry of ``name`` (a one-line ModelError for an unknown one)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise _error(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def model_class(name: str) -> type:
    """The class of family ``name``, imported now."""
    f = family(name)
    try:
        module = importlib.import_module(f.module)
    except ModuleNotFoundError as exc:
        if exc.name != f.module:  # the module exists but something it imports does not
            raise
        raise _error(f"model family {name!r}: its module {f.module} is not installed here "
                     f"(the registry points at {f.target})") from None
    cls = getattr(module, f.cls, None)
    if cls is None:
        raise _error(f"model family {name!r}: {f.module} has no class {f.cls}")
    return cls


def generates(name: str) -> bool:
    """Whether family ``name`` can caption (be CapFilt's captioner)."""
    return family(name).generates


def saved_family(directory: str | Path) -> str:
    """The family a saved model folder names in its ``config.json`` (``blip`` when it names
    none: a folder saved before families existed)."""
    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise _error(f"{directory}: not a vlp model folder (no {CONFIG_FILE})") from None
    except ValueError as exc:
        raise _error(f"{path}: not valid JSON ({exc})") from None
    name = raw.get("family", DEFAULT_FAMILY) if isinstance(raw, dict) else DEFAULT_FAMILY
    if name not in FAMILIES:
        raise _error(f"{path}: family is {name!r} (known: {', '.join(FAMILIES)})")
    return name


def load_model(directory: str | Path, map_location: str = "cpu") -> Any:
    """The model saved in ``directory``, built by the class of the family its ``config.json``
    names."""
    return model_class(saved_family(directory)).from_pretrained(directory, map_location=map_location)


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "Family", "family", "generates", "load_model", "model_class", "saved_family"]
