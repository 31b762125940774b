"""The model families, their tokenizer and architectures (importable without the trainer).

``create_model(arch, tokenizer, family=...)`` builds a model from an architecture JSON file
chosen by name (``vlp_core/models/architectures/<name>.json``) or by path, as open_clip does,
with the class of its family (:mod:`vlp_core.models.families`: blip, xvlm, vilbert);
``load_model(dir)`` loads a saved one by the family its ``config.json`` names.
"""
from __future__ import annotations

import importlib
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp_core.errors import ModelError
from vlp_core.models import families  # the registry (stdlib only; a family's class loads on first use)

if TYPE_CHECKING:  # torch and transformers load on first use, not when `vlp --help` imports this package
    from vlp_core.models.families import load_model
    from vlp_core.models.med import BlipMED, MedConfig
    from vlp_core.models.tokenizer import load_tokenizer, train_tokenizer

_LAZY = {"BlipMED": "med", "MedConfig": "med", "load_tokenizer": "tokenizer",
         "train_tokenizer": "tokenizer", "load_model": "families"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"vlp_core.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'vlp_core.models' has no attribute {name!r}")


def list_architectures() -> list[str]:
    folder = resources.files("vlp_core.models") / "architectures"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_architecture(arch: str | Path) -> dict[str, Any]:
    path = Path(arch)
    if not path.suffix == ".json":
        path = Path(str(resources.files("vlp_core.models") / "architectures" / f"{arch}.json"))
    if not path.is_file():
        raise ModelError(f"unknown architecture {arch!r} (known: {', '.join(list_architectures())}, or a .json path)")
    d = json.loads(path.read_text())
    d.pop("_comment", None)
    d["arch"] = str(arch)
    return d


def fresh_family(arch: str | Path, family: str = families.DEFAULT_FAMILY) -> str:
    """The family a fresh model of ``model.arch`` / ``model.family`` is, without building it:
    ``model.family`` at its default (blip) lets an architecture that names its family (vilbert-tiny)
    build it.  The one rule: the training loop builds this family, the round composer asks it
    whether the model will caption.  (An explicit family that the architecture contradicts is
    :func:`create_model`'s one-line error.)"""
    if family != families.DEFAULT_FAMILY:
        return family
    return load_architecture(arch).get("family") or families.DEFAULT_FAMILY


def create_model(arch: str | Path = "tiny", tokenizer=None, family: str | None = None, **overrides: Any) -> "BlipMED":
    """A freshly initialised model of architecture ``arch`` and family ``family`` (``model.family``:
    blip, xvlm, vilbert; None = the architecture's ``family`` key, else blip); token ids and vocab
    size come from ``tokenizer``; ``overrides`` replace architecture fields.  An architecture JSON
    that names a ``family`` is for that family only; one that names none (tiny, tiny-vit,
    blip-base: sizes) serves every family, whose own fields (e.g. X-VLM's region-loss weights)
    then take their defaults."""
    d = {**load_architecture(arch), **overrides}
    arch_family = d.pop("family", None)
    if family is not None and arch_family is not None and family != arch_family:
        raise ModelError(f"architecture {arch!r} is for model family {arch_family!r}, not {family!r} "
                         f"(set model.family={arch_family}, or pick an architecture without a family key)")
    name = family or arch_family or families.DEFAULT_FAMILY
    cls = families.model_class(name)
    create = getattr(cls, "create", None)
    if create is not None:  # a family that builds itself from the architecture dict (ViLBERT)
        return create(d, tokenizer)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise ModelError(f"model family {name!r}: {cls.__name__} has no config_class (see vlp_core.models.families)")
    if tokenizer is not None:
        d.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                 sep_token_id=tokenizer.sep_token_id, enc_token_id=tokenizer.convert_tokens_to_ids("[ENC]"),
                 dec_token_id=tokenizer.convert_tokens_to_ids("[DEC]"))
    model = cls(config_class.from_dict(d), tokenizer=tokenizer)
    if hasattr(model, "copy_params"):
        model.copy_params()
    return model


__all__ = ["BlipMED", "MedConfig", "ModelError", "create_model", "fresh_family", "list_architectures", "load_architecture",
           "load_model", "load_tokenizer", "train_tokenizer"]
