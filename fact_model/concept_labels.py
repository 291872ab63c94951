"""Named concepts: a persistent, versioned store of human labels for a model's concepts.

A user names a concept ("layer3 concept 131 = 'striped texture'") and may add a note. The
labels live in one JSON file next to the model, by default ``<artifact>/concept_labels.json``
(:func:`default_labels_path`)::

    {
      "format": "fact-concept-labels",
      "format_version": 1,
      "model_sha256": "<the sha256 of the weights the labels describe (manifest weights.sha256)>",
      "updated_at": "2025-01-31T12:00:00.000+00:00",
      "layers": {
        "layer3": {
          "131": {
            "label": "striped texture",
            "note": "fires on zebra and tiger fur",
            "updated_at": "2025-01-31T12:00:00.000+00:00",
            "version": 2,
            "author": "ana",
            "history": [
              {"version": 1, "label": "stripes", "note": "", "updated_at": "…", "author": null}
            ]
          }
        }
      }
    }

Concept ids are JSON object keys, so they are decimal strings. ``version`` counts the edits of
a concept (1 for the first); ``history`` holds its previous versions, oldest first, at most
:data:`HISTORY_LIMIT` (older ones are dropped). A label is at most :data:`MAX_LABEL_CHARS`
characters, a note at most :data:`MAX_NOTE_CHARS`, an author at most :data:`MAX_AUTHOR_CHARS`;
all are plain text with surrounding whitespace stripped; a label holds no control characters,
a note none but newline and tab.

**Deletion keeps the history.** :meth:`LabelStore.delete` is an edit to an empty label: the
entry stays in the file as a *tombstone* (``"label": ""``, version incremented, the deleted
label in its history), :meth:`LabelStore.get` returns None for it and :meth:`LabelStore.all`
omits it. A later :meth:`~LabelStore.put` continues its version count, so optimistic
concurrency (``expected_version``) keeps working across a delete; ``expected_version=0``
means "only if the concept has no label yet".

**Safety.** Every write is a read-modify-write under an in-process lock and an exclusive
``fcntl.flock`` on the sidecar ``<path>.lock``; the new document goes to a temporary file in
the same folder, is flushed and fsync'ed, then ``os.replace``'d over the old one, so readers
(other threads, workers, replicas sharing the folder) never see half a file and a crash
leaves the previous file intact. Reads re-parse the file only when its (mtime_ns, size,
inode) changed. A write always re-reads the file under the lock, so no write is ever lost; a
reader in *another* process could serve a file one write behind only if two writes landed
within one file-system timestamp tick with the same size and a recycled inode.

**A file this store will not use** — one for another model (``model_sha256`` differs), or one
that is not a valid label document — is never overwritten: :meth:`~LabelStore.get` and
:meth:`~LabelStore.all` return no labels and log a warning once per state of the file
(serving goes on without labels; :meth:`~LabelStore.problem` says why), while
:meth:`~LabelStore.export` and every write raise :class:`StaleLabels` / :class:`CorruptLabels`.
An operator moves the file aside (or imports it elsewhere) to resolve it.

Every error is a :class:`LabelError` (a ``ValueError``) whose message says what to do.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fact_model._files import fsync_dir

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HISTORY_LIMIT",
    "LABELS_FILE",
    "MAX_AUTHOR_CHARS",
    "MAX_LABEL_CHARS",
    "MAX_NOTE_CHARS",
    "ConceptLabel",
    "CorruptLabels",
    "InvalidLabel",
    "LabelConflict",
    "LabelEdit",
    "LabelError",
    "LabelNotFound",
    "LabelStore",
    "LabelStoreBusy",
    "LabelStoreUnwritable",
    "StaleLabels",
    "UnknownConcept",
    "UnknownLayer",
    "default_labels_path",
]

log = logging.getLogger(__name__)

FORMAT = "fact-concept-labels"
FORMAT_VERSION = 1
LABELS_FILE = "concept_labels.json"
MAX_LABEL_CHARS = 200
MAX_NOTE_CHARS = 2000
MAX_AUTHOR_CHARS = 100
HISTORY_LIMIT = 50
"""Previous versions kept per concept; older edits are dropped (the version number still counts them)."""

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONCEPT_KEY = re.compile(r"0|[1-9][0-9]{0,8}")
_LABEL_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NOTE_BAD = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_DOC_KEYS = frozenset({"format", "format_version", "model_sha256", "updated_at", "layers"})
_ENTRY_KEYS = frozenset({"label", "note", "updated_at", "version", "author", "history"})
_EDIT_KEYS = frozenset({"version", "label", "note", "updated_at", "author"})


# ---------------------------------------------------------------------------- errors
class LabelError(ValueError):
    """Base of every label-store error (the message says what to do)."""


class InvalidLabel(LabelError):
    """A label, note, author or imported document is malformed or too long."""


class UnknownConcept(LabelError):
    """The concept id is out of range for its layer (or, as :class:`UnknownLayer`, the layer is unknown)."""


class UnknownLayer(UnknownConcept):
    """The layer is not one of the model's concept layers."""


class LabelNotFound(LabelError):
    """The concept has no label (never labelled, or deleted)."""


class LabelConflict(LabelError):
    """``expected_version`` differs from the stored version (someone else edited the concept)."""

    def __init__(self, message: str, expected: int, actual: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class StaleLabels(LabelError):
    """The labels (a file or an imported document) belong to another model's weights."""

    def __init__(self, message: str, found_sha256: str, model_sha256: str) -> None:
        super().__init__(message)
        self.found_sha256 = found_sha256
        self.model_sha256 = model_sha256


class CorruptLabels(LabelError):
    """The label file exists but is not a valid label document; it is left untouched."""


class LabelStoreUnwritable(LabelError):
    """The label file or its folder cannot be written (read-only, missing, no space)."""


class LabelStoreBusy(LabelError):
    """Another writer held the lock for longer than the store's ``lock_timeout_s``."""


# ---------------------------------------------------------------------------- values
@dataclass(frozen=True)
class LabelEdit:
    """One previous version of a concept's label."""

    version: int
    label: str
    note: str
    updated_at: str
    author: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "label": self.label,
            "note": self.note,
            "updated_at": self.updated_at,
            "author": self.author,
        }


@dataclass(frozen=True)
class ConceptLabel:
    """The current label of one concept, its edit count and its previous versions (oldest first).

    An empty ``label`` marks a deleted concept (a tombstone, see the module docstring).
    """

    layer: str
    concept: int
    label: str
    note: str
    updated_at: str
    version: int
    author: str | None = None
    history: tuple[LabelEdit, ...] = ()

    @property
    def deleted(self) -> bool:
        return self.label == ""

    def to_dict(self, history: bool = True) -> dict[str, Any]:
        """As JSON: layer, concept, label, note, updated_at, version, author (and history, oldest first)."""
        out: dict[str, Any] = {
            "layer": self.layer,
            "concept": self.concept,
            "label": self.label,
            "note": self.note,
            "updated_at": self.updated_at,
            "version": self.version,
            "author": self.author,
        }
        if history:
            out["history"] = [h.to_dict() for h in self.history]
        return out

    def _entry(self) -> dict[str, Any]:
        """The file's form (no layer/concept: they are the keys)."""
        return {
            "label": self.label,
            "note": self.note,
            "updated_at": self.updated_at,
            "version": self.version,
            "author": self.author,
            "history": [h.to_dict() for h in self.history],
        }

    def _as_edit(self) -> LabelEdit:
        return LabelEdit(self.version, self.label, self.note, self.updated_at, self.author)


def default_labels_path(artifact_dir: str | Path) -> Path:
    """Where an artifact's labels live by default: ``<artifact_dir>/concept_labels.json``."""
    return Path(artifact_dir) / LABELS_FILE


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------- text checks
def _clean_label(value: object, what: str = "label") -> str:
    if not isinstance(value, str):
        raise InvalidLabel(f"{what} must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InvalidLabel(f"{what} is empty: give a short name for the concept (to remove a label, delete it)")
    if len(text) > MAX_LABEL_CHARS:
        raise InvalidLabel(f"{what} has {len(text)} characters; at most {MAX_LABEL_CHARS} are allowed")
    if bad := _LABEL_BAD.search(text):
        raise InvalidLabel(f"{what} contains the control character {bad.group()!r}: a label is one line of plain text")
    return text


def _clean_note(value: object, what: str = "note") -> str:
    if not isinstance(value, str):
        raise InvalidLabel(f"{what} must be a string, got {type(value).__name__}")
    text = value.strip()
    if len(text) > MAX_NOTE_CHARS:
        raise InvalidLabel(f"{what} has {len(text)} characters; at most {MAX_NOTE_CHARS} are allowed")
    if bad := _NOTE_BAD.search(text):
        raise InvalidLabel(
            f"{what} contains the control character {bad.group()!r}: a note is plain text (newlines and tabs allowed)"
        )
    return text


def _clean_author(value: object, what: str = "author") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidLabel(f"{what} must be a string or null, got {type(value).__name__}")
    text = value.strip()
    if len(text) > MAX_AUTHOR_CHARS:
        raise InvalidLabel(f"{what} has {len(text)} characters; at most {MAX_AUTHOR_CHARS} are allowed")
    if bad := _LABEL_BAD.search(text):
        raise InvalidLabel(f"{what} contains the control character {bad.group()!r}")
    return text or None


def _check_timestamp(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidLabel(f"{what} must be an ISO-8601 string, got {type(value).__name__}")
    try:
        parsed = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidLabel(f"{what} {value[:40]!r} is not an ISO-8601 timestamp") from None
    if parsed.tzinfo is None:
        raise InvalidLabel(f"{what} {value[:40]!r} has no time zone: write it in UTC, e.g. 2025-01-31T12:00:00+00:00")
    return value


def _check_version(value: object, what: str) -> int:
    if type(value) is not int or value < 1:
        raise InvalidLabel(f"{what} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------- document parsing
@dataclass(frozen=True)
class _Document:
    """A parsed label file: the model it is for and its entries (tombstones included)."""

    model_sha256: str
    entries: dict[str, dict[int, ConceptLabel]]


def _parse_entry(layer: str, concept: int, raw: object, where: str) -> ConceptLabel:
    if not isinstance(raw, dict):
        raise InvalidLabel(f"{where} must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise InvalidLabel(f"{where} has unknown field(s) {unknown} (the fields are: {', '.join(sorted(_ENTRY_KEYS))})")
    missing = [k for k in ("label", "updated_at", "version") if k not in raw]
    if missing:
        raise InvalidLabel(f"{where} lacks required field(s) {missing}")
    label = raw["label"]
    # An empty label is a tombstone (a deleted concept whose history is kept).
    label = "" if isinstance(label, str) and not label.strip() else _clean_label(label, f"{where}.label")
    note = _clean_note(raw.get("note", ""), f"{where}.note")
    version = _check_version(raw["version"], f"{where}.version")
    history_raw = raw.get("history", [])
    if not isinstance(history_raw, list):
        raise InvalidLabel(f"{where}.history must be a list, got {type(history_raw).__name__}")
    history = []
    for i, item in enumerate(history_raw):
        at = f"{where}.history[{i}]"
        if not isinstance(item, dict):
            raise InvalidLabel(f"{at} must be an object, got {type(item).__name__}")
        unknown = sorted(set(item) - _EDIT_KEYS)
        if unknown:
            raise InvalidLabel(f"{at} has unknown field(s) {unknown} (the fields are: {', '.join(sorted(_EDIT_KEYS))})")
        if "label" not in item or "updated_at" not in item or "version" not in item:
            raise InvalidLabel(f"{at} needs 'version', 'label' and 'updated_at'")
        old = item["label"]
        old = "" if isinstance(old, str) and not old.strip() else _clean_label(old, f"{at}.label")
        history.append(
            LabelEdit(
                _check_version(item["version"], f"{at}.version"),
                old,
                _clean_note(item.get("note", ""), f"{at}.note"),
                _check_timestamp(item["updated_at"], f"{at}.updated_at"),
                _clean_author(item.get("author"), f"{at}.author"),
            )
        )
    return ConceptLabel(
        layer=layer,
        concept=concept,
        label=label,
        note=note,
        updated_at=_check_timestamp(raw["updated_at"], f"{where}.updated_at"),
        version=version,
        author=_clean_author(raw.get("author"), f"{where}.author"),
        history=tuple(history[-HISTORY_LIMIT:]),
    )


def _parse_document(doc: object, layers: Mapping[str, int], source: str) -> _Document:
    """Check a whole label document against the model's layers (raises :class:`InvalidLabel`)."""
    if not isinstance(doc, dict):
        raise InvalidLabel(f"{source} must be a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - _DOC_KEYS)
    if unknown:
        raise InvalidLabel(f"{source} has unknown field(s) {unknown} (the fields are: {', '.join(sorted(_DOC_KEYS))})")
    if doc.get("format") != FORMAT:
        raise InvalidLabel(f"{source} has format {doc.get('format')!r}, expected {FORMAT!r}")
    if type(doc.get("format_version")) is not int or doc["format_version"] != FORMAT_VERSION:
        raise InvalidLabel(
            f"{source} has format_version {doc.get('format_version')!r}; this fact_model reads {FORMAT_VERSION}"
        )
    sha = doc.get("model_sha256")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise InvalidLabel(f"{source}: model_sha256 {sha!r} is not a lowercase hex sha256")
    raw_layers = doc.get("layers", {})
    if not isinstance(raw_layers, dict):
        raise InvalidLabel(f"{source}: 'layers' must be an object, got {type(raw_layers).__name__}")
    entries: dict[str, dict[int, ConceptLabel]] = {}
    for layer, concepts in raw_layers.items():
        if layer not in layers:
            raise InvalidLabel(
                f"{source}: unknown layer {layer!r}; this model's concept layers are {', '.join(layers)}"
            )
        if not isinstance(concepts, dict):
            raise InvalidLabel(f"{source}: layers.{layer} must be an object, got {type(concepts).__name__}")
        parsed: dict[int, ConceptLabel] = {}
        for key, raw in concepts.items():
            where = f"{source}: layers.{layer}.{key}"
            if not _CONCEPT_KEY.fullmatch(key):
                raise InvalidLabel(
                    f"{where}: {key[:40]!r} is not a concept id: write the id in decimal, without sign or leading zeros"
                )
            if int(key) >= layers[layer]:
                raise InvalidLabel(
                    f"{where}: concept id {key!r} is out of range: layer {layer!r} has concepts 0..{layers[layer] - 1}"
                )
            parsed[int(key)] = _parse_entry(layer, int(key), raw, where)
        entries[layer] = parsed
    return _Document(sha, entries)


# ---------------------------------------------------------------------------- store
_StatKey = tuple[int, int, int]


class LabelStore:
    """The labels of one model's concepts, persisted in a JSON file (see the module docstring).

    Safe to share between threads, worker processes and replicas using the same folder.

    Args:
        path: the label file (:func:`default_labels_path` of the artifact, usually); its folder
            must exist to write.
        model_sha256: the sha256 of the model's weights (manifest ``weights.sha256``); labels
            recorded for other weights are refused.
        layers: concept layer name → number of concepts K (ids ``0..K-1``).
        lock_timeout_s: longest wait for another writer's lock before :class:`LabelStoreBusy`.
    """

    def __init__(
        self, path: str | Path, model_sha256: str, layers: Mapping[str, int], lock_timeout_s: float = 10.0
    ) -> None:
        if not isinstance(model_sha256, str) or not _SHA256_RE.fullmatch(model_sha256):
            raise ValueError(f"model_sha256 must be a lowercase hex sha256, got {model_sha256!r}")
        if not layers:
            raise ValueError("layers is empty: a label store needs the model's concept layers")
        for name, k in layers.items():
            if not isinstance(name, str) or not name or type(k) is not int or k < 1:
                raise ValueError(f"layers must map names to positive concept counts, got {name!r}: {k!r}")
        if not lock_timeout_s > 0:
            raise ValueError(f"lock_timeout_s must be > 0, got {lock_timeout_s!r}")
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.model_sha256 = model_sha256
        self.layers: dict[str, int] = dict(layers)
        self.lock_timeout_s = float(lock_timeout_s)
        self._write_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache_key: _StatKey | None = None
        self._cache: _Document | LabelError = self._empty()
        self._warned: set[tuple[_StatKey, str]] = set()

    @classmethod
    def for_artifact(cls, artifact_dir: str | Path, path: str | Path | None = None, **kwargs: Any) -> LabelStore:
        """The store of the artifact at ``artifact_dir`` (its manifest gives the sha256 and layers).

        ``path`` defaults to :func:`default_labels_path` of the artifact.
        """
        from fact_model.artifacts import read_manifest, resolve_artifact_path

        directory = resolve_artifact_path(artifact_dir)
        manifest = read_manifest(directory)
        layers = {i["name"]: i["num_concepts"] for i in manifest.get("concept_layers", [])}
        if not layers:
            from fact_model.config import FaCTConfig

            layers = {s.name: s.num_concepts for s in FaCTConfig.from_dict(manifest["model"]).concept_layers}
        return cls(path or default_labels_path(directory), manifest["weights"]["sha256"], layers, **kwargs)

    def __repr__(self) -> str:
        return f"LabelStore({str(self.path)!r}, model_sha256={self.model_sha256[:12]}…, layers={self.layers})"

    # ------------------------------------------------------------------ reads
    def check_concept(self, layer: str, concept: int) -> None:
        """Raise :class:`UnknownLayer` / :class:`UnknownConcept` (naming the valid ones) unless the concept exists."""
        if layer not in self.layers:
            raise UnknownLayer(f"unknown layer {layer!r}: this model's concept layers are {', '.join(self.layers)}")
        k = self.layers[layer]
        if type(concept) is not int or not 0 <= concept < k:
            raise UnknownConcept(f"concept {concept!r} is out of range: layer {layer!r} has concepts 0..{k - 1}")

    def get(self, layer: str, concept: int) -> ConceptLabel | None:
        """The label of ``layer``'s concept ``concept``, or None (none, deleted, or the file is unusable).

        Raises:
            UnknownConcept: ``layer`` is not a concept layer or ``concept`` is out of range.
        """
        self.check_concept(layer, concept)
        entry = self._usable().entries.get(layer, {}).get(concept)
        return None if entry is None or entry.deleted else entry

    def all(self) -> dict[str, dict[int, ConceptLabel]]:
        """Every current label: layer → concept id → label (every layer present; deleted ones omitted).

        An unusable file (another model's, or corrupt) gives no labels and a logged warning.
        """
        entries = self._usable().entries
        return {
            layer: {c: e for c, e in sorted(entries.get(layer, {}).items()) if not e.deleted} for layer in self.layers
        }

    def export(self) -> dict[str, Any]:
        """The whole document (tombstones and histories included), ready for :func:`json.dumps`.

        Raises:
            StaleLabels: the file belongs to another model.
            CorruptLabels: the file is not a valid label document.
        """
        doc = self._read()
        if isinstance(doc, LabelError):
            raise doc
        return self._serialise(doc)

    def problem(self) -> str | None:
        """Why the file's labels are not served (another model's, corrupt, unreadable), or None."""
        doc = self._read()
        return str(doc) if isinstance(doc, LabelError) else None

    # ------------------------------------------------------------------ writes
    def put(
        self,
        layer: str,
        concept: int,
        label: str,
        note: str = "",
        author: str | None = None,
        expected_version: int | None = None,
    ) -> ConceptLabel:
        """Set the label (and note) of a concept; the previous version goes to its history.

        Args:
            expected_version: when given, write only if the concept's stored version is this
                one (0: only if it has never been labelled) — optimistic concurrency.

        Raises:
            UnknownConcept, InvalidLabel, LabelConflict, StaleLabels, CorruptLabels,
            LabelStoreUnwritable, LabelStoreBusy.
        """
        self.check_concept(layer, concept)
        label = _clean_label(label)
        note = _clean_note(note)
        author = _clean_author(author)
        self._check_expected(expected_version)

        def edit(doc: _Document) -> ConceptLabel:
            return self._edit(doc, layer, concept, label, note, author, expected_version)

        result = self._transaction(edit)
        log.info("label %s/%d v%d set%s", layer, concept, result.version, f" by {author}" if author else "")
        return result

    def delete(
        self, layer: str, concept: int, author: str | None = None, expected_version: int | None = None
    ) -> ConceptLabel:
        """Delete a concept's label; the entry stays as a tombstone with its history (module docstring).

        Returns:
            The tombstone (``label == ""``, version incremented).

        Raises:
            LabelNotFound: the concept has no label.
            UnknownConcept, LabelConflict, StaleLabels, CorruptLabels, LabelStoreUnwritable, LabelStoreBusy.
        """
        self.check_concept(layer, concept)
        author = _clean_author(author)
        self._check_expected(expected_version)

        def edit(doc: _Document) -> ConceptLabel:
            current = doc.entries.get(layer, {}).get(concept)
            if current is None or current.deleted:
                raise LabelNotFound(f"{layer} concept {concept} has no label to delete")
            return self._edit(doc, layer, concept, "", "", author, expected_version)

        result = self._transaction(edit)
        log.info("label %s/%d deleted (v%d)%s", layer, concept, result.version, f" by {author}" if author else "")
        return result

    def import_document(self, doc: Mapping[str, Any], *, mode: Literal["merge", "replace"] = "merge") -> dict[str, int]:
        """Import an exported document (:meth:`export`'s form) for this model.

        ``merge``: each imported concept becomes the newest version of the stored one, its own
        history appended after the stored history (renumbered to continue the stored version
        count); a concept whose stored label, note, version and time equal the imported ones is
        left as it is (re-importing an export changes nothing); concepts absent from the
        document are kept. ``replace``: the document becomes the store's content verbatim
        (versions and histories as imported; a restore from backup); stored concepts it lacks
        are dropped.

        Returns:
            Counts: ``added``, ``updated``, ``unchanged``, ``removed``.

        Raises:
            StaleLabels: the document (or the stored file) is for another model's weights.
            InvalidLabel: malformed document (unknown layer, id out of range, bad entry…; named).
            CorruptLabels, LabelStoreUnwritable, LabelStoreBusy.
        """
        if mode not in ("merge", "replace"):
            raise InvalidLabel(f"import mode must be 'merge' or 'replace', got {mode!r}")
        if isinstance(doc, Mapping) and "model_sha256" in doc:
            found = doc["model_sha256"]
            if isinstance(found, str) and _SHA256_RE.fullmatch(found) and found != self.model_sha256:
                raise self._stale(found, "the imported document")
        incoming = _parse_document(dict(doc) if isinstance(doc, Mapping) else doc, self.layers, "the imported document")
        counts = {"added": 0, "updated": 0, "unchanged": 0, "removed": 0}

        def apply(stored: _Document) -> None:
            if mode == "replace":
                for layer in self.layers:
                    old, new = stored.entries.get(layer, {}), incoming.entries.get(layer, {})
                    counts["removed"] += sum(1 for c, e in old.items() if c not in new and not e.deleted)
                    for c, entry in new.items():
                        if c not in old:
                            counts["added"] += 1
                        elif old[c] == entry:
                            counts["unchanged"] += 1
                        else:
                            counts["updated"] += 1
                    stored.entries[layer] = dict(new)
                return
            for layer, concepts in incoming.entries.items():
                target = stored.entries.setdefault(layer, {})
                for c, entry in concepts.items():
                    old = target.get(c)
                    if old is None:
                        counts["added"] += 1
                        target[c] = entry
                    elif (old.label, old.note, old.version, old.updated_at) == (
                        entry.label,
                        entry.note,
                        entry.version,
                        entry.updated_at,
                    ):
                        counts["unchanged"] += 1
                    else:
                        counts["updated"] += 1
                        target[c] = _merged(old, entry)

        self._transaction(apply)
        log.info("labels imported (%s): %s", mode, counts)
        return counts

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_expected(expected_version: int | None) -> None:
        if expected_version is not None and (type(expected_version) is not int or expected_version < 0):
            raise InvalidLabel(f"expected_version must be a non-negative integer, got {expected_version!r}")

    def _edit(
        self,
        doc: _Document,
        layer: str,
        concept: int,
        label: str,
        note: str,
        author: str | None,
        expected_version: int | None,
    ) -> ConceptLabel:
        current = doc.entries.get(layer, {}).get(concept)
        stored_version = 0 if current is None else current.version
        if expected_version is not None and expected_version != stored_version:
            raise LabelConflict(
                f"{layer} concept {concept} is at version {stored_version}, not the expected version "
                f"{expected_version}: someone else edited it; read it again and retry with expected_version="
                f"{stored_version}",
                expected_version,
                stored_version,
            )
        history = () if current is None else (*current.history, current._as_edit())[-HISTORY_LIMIT:]
        new = ConceptLabel(layer, concept, label, note, _now(), stored_version + 1, author, history)
        doc.entries.setdefault(layer, {})[concept] = new
        return new

    def _empty(self) -> _Document:
        return _Document(self.model_sha256, {})

    def _stale(self, found: str, what: str) -> StaleLabels:
        remedy = "" if what == "the imported document" else f" (move {what} aside to start afresh)"
        return StaleLabels(
            f"{what} holds labels for the model with weights sha256 {found}, but this model's weights have "
            f"sha256 {self.model_sha256}: labels never move between models{remedy}",
            found,
            self.model_sha256,
        )

    def _parse_bytes(self, data: bytes) -> _Document | LabelError:
        source = str(self.path)
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            return CorruptLabels(
                f"{source} is not valid JSON ({err}); it is left untouched: repair it or move it aside"
            )
        if isinstance(raw, dict):
            found = raw.get("model_sha256")
            if isinstance(found, str) and _SHA256_RE.fullmatch(found) and found != self.model_sha256:
                return self._stale(found, source)
        try:
            return _parse_document(raw, self.layers, source)
        except InvalidLabel as err:
            return CorruptLabels(f"{err}; the file is left untouched: repair it or move it aside")

    def _read(self) -> _Document | LabelError:
        """The file's document (cached by stat key), or the error that makes it unusable."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._empty()
        except OSError as err:
            return CorruptLabels(f"cannot read {self.path}: {err.strerror}")
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._cache_lock:
            if key == self._cache_key:
                return self._cache
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())  # the stat of the bytes actually read (the file may have been replaced)
                data = f.read()
        except FileNotFoundError:
            return self._empty()
        except OSError as err:
            return CorruptLabels(f"cannot read {self.path}: {err.strerror}")
        parsed = self._parse_bytes(data)
        with self._cache_lock:
            self._cache_key, self._cache = (st.st_mtime_ns, st.st_size, st.st_ino), parsed
        return parsed

    def _usable(self) -> _Document:
        """The file's document for serving: an unusable file reads as empty, with one warning per state."""
        doc = self._read()
        if not isinstance(doc, LabelError):
            return doc
        with self._cache_lock:
            mark = (self._cache_key or (0, 0, 0), type(doc).__name__)
            first = mark not in self._warned
            self._warned.add(mark)
        if first:
            log.warning("serving no concept labels: %s", doc)
        return self._empty()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The in-process lock, then the exclusive flock on ``<path>.lock`` (polled up to ``lock_timeout_s``)."""
        if not self._write_lock.acquire(timeout=self.lock_timeout_s):
            raise LabelStoreBusy(f"another write to {self.path} is taking too long; retry shortly")
        try:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:
                # A lock file another user created: flock works on a read-only descriptor too.
                try:
                    fd = os.open(self.lock_path, os.O_RDONLY)
                except OSError as err:
                    raise self._unwritable(self.lock_path, err) from None
            except OSError as err:
                raise self._unwritable(self.lock_path, err) from None
            try:
                deadline = time.monotonic() + self.lock_timeout_s
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise LabelStoreBusy(
                                f"another process has held {self.lock_path} for over {self.lock_timeout_s:g} s; "
                                "retry shortly"
                            ) from None
                        time.sleep(0.005)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            self._write_lock.release()

    def _unwritable(self, path: Path, err: OSError) -> LabelStoreUnwritable:
        hint = {
            errno.EACCES: "the folder or file is not writable by this process",
            errno.EPERM: "the folder or file is not writable by this process",
            errno.EROFS: "the file system is read-only",
            errno.ENOENT: "the folder does not exist",
            errno.ENOSPC: "the disk is full",
        }.get(err.errno or 0, err.strerror or str(err))
        return LabelStoreUnwritable(
            f"cannot write concept labels to {path}: {hint}; point the label file at a writable folder"
        )

    def _transaction(self, change: Callable[[_Document], Any]) -> Any:
        """Read the file afresh under the locks, apply ``change`` to it, write it atomically."""
        with self._locked():
            try:
                with open(self.path, "rb") as f:
                    parsed = self._parse_bytes(f.read())
            except FileNotFoundError:
                parsed = self._empty()
            except OSError as err:
                raise CorruptLabels(f"cannot read {self.path}: {err.strerror}; nothing was written") from None
            if isinstance(parsed, LabelError):
                raise parsed
            doc = _Document(parsed.model_sha256, {layer: dict(m) for layer, m in parsed.entries.items()})
            result = change(doc)
            self._write(doc)
            return result

    def _serialise(self, doc: _Document) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_sha256": self.model_sha256,
            "updated_at": max(
                (e.updated_at for m in doc.entries.values() for e in m.values()),
                default=None,
                key=lambda t: _dt.datetime.fromisoformat(t),
            ),
            "layers": {
                layer: {str(c): e._entry() for c, e in sorted(doc.entries[layer].items())}
                for layer in self.layers
                if doc.entries.get(layer)
            },
        }

    def _write(self, doc: _Document) -> None:
        """Write ``doc`` to a fsync'ed temporary sibling and ``os.replace`` it over the file."""
        text = json.dumps(self._serialise(doc), indent=1, ensure_ascii=False) + "\n"
        directory = self.path.parent
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as err:
            raise self._unwritable(self.path, err) from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), 0o644)  # mkstemp makes it private; workers may run as other users
                st = os.fstat(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise self._unwritable(self.path, err) from None
            raise
        fsync_dir(directory)
        with self._cache_lock:  # this process's own write is visible at once, whatever the timestamp resolution
            self._cache_key, self._cache = (st.st_mtime_ns, st.st_size, st.st_ino), doc


def _merged(old: ConceptLabel, new: ConceptLabel) -> ConceptLabel:
    """``new`` (imported) as the latest edit of ``old``: old history, old current, new history, new current."""
    version = old.version
    chain = [*old.history, old._as_edit()]
    for edit in new.history:
        version += 1
        chain.append(LabelEdit(version, edit.label, edit.note, edit.updated_at, edit.author))
    return ConceptLabel(
        old.layer,
        old.concept,
        new.label,
        new.note,
        new.updated_at,
        version + 1,
        new.author,
        tuple(chain[-HISTORY_LIMIT:]),
    )
