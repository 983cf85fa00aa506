"""What an edited model derives from: its base model's Hub id, a display name, the license.

The Hub links a derived model to its base through the card's ``base_model`` (a Hub id), and
llama.cpp lists a GGUF by ``general.name``; both are filled from here, so the card, the GGUF
keys and the manifest say the same. The Hub id is taken, in this order, from the user's
``base_model`` option, a Hub source, a GGUF source's own keys (``general.source.repo_url``: what
it was converted from; else its one ``general.base_model.0.repo_url``) and the direction's or
config's model id when it is a Hub id. Nothing is guessed: with none of these the card has no
``base_model`` (pass ``--base-model``).

``base_model_relation`` (the Hub's values are ``adapter``, ``merge``, ``quantized`` and
``finetune``) is ``finetune`` for a baked folder and for a baked GGUF: the weights differ from
the base's, which is what the Hub's ``finetune`` stands for (the closest of its four; not a merge
of several models, and not ``quantized``, which the Hub infers for a repository of GGUF files and
would list the edit among the base's plain quantizations, as if it behaved the same). A LoRA
folder is ``adapter``: it holds only the update and loads on top of the base.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.sharing import looks_like_hub_id, portable_name

HUB_URL = "https://huggingface.co/"
RELATIONS = {"hf": "finetune", "gguf": "finetune", "lora": "adapter"}
_HUB_REPO_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+?)/?$")


@dataclass(frozen=True)
class Lineage:
    """The source as a derived model's card and metadata name it (all portable)."""

    label: str  # the source's portable name: Hub id, builtin:NAME or file name
    display: str  # a human name: the GGUF's general.name, else the Hub repo's or file's name
    base_model: str | None  # a Hub id, or None when none is known
    base_model_from: str  # where base_model came from (for the manifest), "" when None
    license: str | None
    organization: str | None = None

    def record(self) -> dict:
        """What the manifest keeps (``push`` builds a GGUF's card from it)."""
        return {
            "label": self.label,
            "display": self.display,
            "base_model": self.base_model,
            "base_model_from": self.base_model_from,
            "license": self.license,
        }


def check_base_model(value: str | None) -> str | None:
    """The ``base_model`` option: a Hub id (``owner/name``), or one clear line."""
    if value is None:
        return None
    text = str(value).strip()
    if not looks_like_hub_id(text) or "@" in text:
        raise CosmicBakeError(
            f"--base-model '{value}' is not a Hub model id",
            "pass owner/name, e.g. --base-model Qwen/Qwen2.5-0.5B-Instruct",
        )
    return text


def hub_id_from_url(url: object) -> str | None:
    """``owner/name`` from a ``https://huggingface.co/owner/name`` URL (None for anything else)."""
    match = _HUB_REPO_URL.match(str(url or "").strip())
    return match.group(1) if match else None


def gguf_keys(path: Path) -> dict:
    """The ``general.*`` keys of a GGUF file (strings and numbers as Python values), from its header."""
    from cosmic_bake.export.gguf_io import read_metadata

    return read_metadata(path, "general.")


def _gguf_hub_id(keys: dict) -> tuple[str | None, str]:
    for key in ("general.source.repo_url", "general.source.huggingface.repository"):
        hub = hub_id_from_url(keys.get(key)) or (
            str(keys[key]) if key.endswith("repository") and looks_like_hub_id(str(keys.get(key) or "")) else None
        )
        if hub:
            return hub, f"GGUF {key}"
    if int(keys.get("general.base_model.count") or 0) == 1:
        hub = hub_id_from_url(keys.get("general.base_model.0.repo_url"))
        if hub:
            return hub, "GGUF general.base_model.0.repo_url"
    return None, ""


def _gguf_display(keys: dict) -> str | None:
    if keys.get("general.name"):
        return str(keys["general.name"])
    parts = [keys.get(k) for k in ("general.basename", "general.size_label", "general.finetune")]
    return " ".join(str(p) for p in parts if p) or None


def _card_license(folder: Path | None) -> str | None:
    """``license:`` from the front matter of a model folder's README.md (a Hub snapshot or clone)."""
    card = folder / "README.md" if folder is not None else None
    if card is None or not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---\n"):
        return None
    front = text[4:].split("\n---", 1)[0]
    match = re.search(r"^license:\s*['\"]?([\w.+-]+)['\"]?\s*$", front, re.MULTILINE)
    return match.group(1) if match else None


def _config_name(folder: Path | None) -> str | None:
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return str(value) if value and looks_like_hub_id(str(value)) else None


def lineage(source, *, base_model: str | None = None, folder: Path | None = None, model_id: str = "") -> Lineage:
    """The :class:`Lineage` of ``source`` (a :class:`~cosmic_bake.model.loading.ModelSource`).

    ``folder`` is the transformers folder baked for it (the source itself, a Hub snapshot or a
    GGUF's dequantized copy), read for a README license and a Hub ``_name_or_path``;
    ``model_id`` is the direction's (a Hub id when selection ran on a Hub model).
    """
    label = portable_name(source.spec)
    keys = gguf_keys(source.path) if source.kind == "gguf" and source.path is not None else {}
    chosen, origin = check_base_model(base_model), "base_model option"
    if chosen is None and source.hub_id:
        chosen, origin = source.hub_id, "Hub source"
    if chosen is None and keys:
        chosen, origin = _gguf_hub_id(keys)
    if chosen is None:
        for candidate, where in ((model_id, "direction model id"), (_config_name(folder), "config _name_or_path")):
            if candidate and looks_like_hub_id(candidate):
                chosen, origin = candidate.partition("@")[0], where
                break
    display = _gguf_display(keys) or (source.hub_id or "").rsplit("/", 1)[-1] or None
    if display is None:
        display = Path(label).stem if source.kind == "gguf" else Path(label).name
    lic = keys.get("general.license") or _card_license(folder if source.kind != "gguf" else None)
    org = chosen.split("/", 1)[0] if chosen else keys.get("general.organization")
    return Lineage(label, display, chosen, origin if chosen else "", str(lic) if lic else None, org)


def edit_phrase(mode: str, alpha: float) -> str:
    """What the edit did, in a few words (the card's title and the GGUF's ``general.name``)."""
    if mode == "add":
        return f"steered along its refusal direction, alpha {alpha:g}"
    if mode == "scale":
        return f"refusal component scaled, beta {alpha:g}"
    if mode == "affine":
        return f"refusal component pinned, alpha {alpha:g}"
    return "refusal direction removed"


def edited_name(lin: Lineage, mode: str, alpha: float) -> str:
    """``general.name`` of the edited GGUF: the source's name and what was done to it."""
    return f"{lin.display} ({edit_phrase(mode, alpha)})"


def gguf_identity(lin: Lineage, mode: str, alpha: float) -> dict:
    """``general.name`` and the base-model keys (gguf-py ``Keys.General``) of an edited GGUF.

    The base is the source itself: its name, and its Hub repository when known. The source's own
    ``general.base_model.*`` keys (its base, one step further back) are replaced, not kept.
    """
    import numpy as np
    from gguf import Keys

    out: dict = {Keys.General.NAME: edited_name(lin, mode, alpha)}
    out[Keys.General.BASE_MODEL_COUNT] = np.uint32(1)
    out[Keys.General.BASE_MODEL_NAME.format(id=0)] = lin.display
    if lin.organization:
        out[Keys.General.BASE_MODEL_ORGANIZATION.format(id=0)] = str(lin.organization)
    if lin.base_model:
        out[Keys.General.BASE_MODEL_REPO_URL.format(id=0)] = HUB_URL + lin.base_model
    return out
