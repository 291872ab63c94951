"""fact_model.concept_labels.LabelStore: round trip, history, versions, refusals with their messages,
stale and corrupt files never overwritten, atomic writes, restarts, and concurrent writers
(threads and spawned processes) losing nothing."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import tempfile
import threading
from pathlib import Path

import pytest

from fact_model import concept_labels
from fact_model.concept_labels import (
    FORMAT,
    HISTORY_LIMIT,
    MAX_LABEL_CHARS,
    MAX_NOTE_CHARS,
    CorruptLabels,
    InvalidLabel,
    LabelConflict,
    LabelNotFound,
    LabelStore,
    LabelStoreUnwritable,
    StaleLabels,
    UnknownConcept,
    UnknownLayer,
    default_labels_path,
)

SHA = "a" * 64
OTHER_SHA = "b" * 64
LAYERS = {"layer2": 128, "layer3": 256}


@pytest.fixture
def path(tmp_path):
    return default_labels_path(tmp_path)


@pytest.fixture
def store(path):
    return LabelStore(path, SHA, LAYERS)


def _file(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- basics
def test_default_path_is_next_to_the_model(tmp_path):
    assert default_labels_path(tmp_path) == tmp_path / "concept_labels.json"


def test_round_trip_and_file_format(store, path):
    saved = store.put("layer3", 131, "  striped texture  ", note=" zebra fur\n\tand tigers ", author="ana")
    assert (saved.label, saved.note, saved.version, saved.author) == (
        "striped texture",
        "zebra fur\n\tand tigers",
        1,
        "ana",
    )
    assert saved.updated_at.endswith("+00:00")
    assert store.get("layer3", 131) == saved
    assert store.get("layer3", 130) is None
    assert store.all() == {"layer2": {}, "layer3": {131: saved}}

    doc = _file(path)
    assert doc["format"] == FORMAT and doc["format_version"] == 1 and doc["model_sha256"] == SHA
    entry = doc["layers"]["layer3"]["131"]
    assert entry == {
        "label": "striped texture",
        "note": "zebra fur\n\tand tigers",
        "updated_at": saved.updated_at,
        "version": 1,
        "author": "ana",
        "history": [],
    }
    assert store.export() == doc
    assert saved.to_dict()["history"] == [] and "history" not in saved.to_dict(history=False)


def test_history_and_version_increments(store):
    store.put("layer2", 5, "stripes", author="ana")
    store.put("layer2", 5, "striped texture", note="finer", author="ben")
    third = store.put("layer2", 5, "zebra stripes")
    assert third.version == 3
    assert [(h.version, h.label, h.note, h.author) for h in third.history] == [
        (1, "stripes", "", "ana"),
        (2, "striped texture", "finer", "ben"),
    ]


def test_history_keeps_the_last_edits(store):
    for i in range(HISTORY_LIMIT + 10):
        last = store.put("layer2", 0, f"label {i}")
    assert last.version == HISTORY_LIMIT + 10
    assert len(last.history) == HISTORY_LIMIT
    assert last.history[0].version == 10 and last.history[-1].version == HISTORY_LIMIT + 9


def test_expected_version_conflict_names_both_versions(store):
    store.put("layer3", 1, "first", expected_version=0)  # 0: only if never labelled
    store.put("layer3", 1, "second", expected_version=1)
    with pytest.raises(LabelConflict, match=r"at version 2, not the expected version 1") as info:
        store.put("layer3", 1, "stale edit", expected_version=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    with pytest.raises(LabelConflict, match="at version 2, not the expected version 0"):
        store.put("layer3", 1, "create", expected_version=0)
    assert store.get("layer3", 1).label == "second"
    with pytest.raises(InvalidLabel, match="expected_version must be a non-negative integer"):
        store.put("layer3", 1, "x", expected_version=-1)


def test_delete_keeps_history_and_the_version_count(store, path):
    store.put("layer3", 7, "dots", author="ana")
    tombstone = store.delete("layer3", 7, author="ben")
    assert tombstone.deleted and tombstone.version == 2 and tombstone.author == "ben"
    assert [h.label for h in tombstone.history] == ["dots"]
    assert store.get("layer3", 7) is None
    assert store.all()["layer3"] == {}
    assert _file(path)["layers"]["layer3"]["7"]["label"] == ""  # kept in the file with its history
    with pytest.raises(LabelNotFound, match="layer3 concept 7 has no label to delete"):
        store.delete("layer3", 7)
    with pytest.raises(LabelConflict):
        store.put("layer3", 7, "spots", expected_version=1)
    again = store.put("layer3", 7, "spots", expected_version=2)
    assert again.version == 3 and [h.label for h in again.history] == ["dots", ""]


def test_survives_a_restart(store, path):
    store.put("layer2", 3, "fur", note="n")
    store.delete("layer2", 3)
    store.put("layer2", 4, "grass")
    reopened = LabelStore(path, SHA, LAYERS)
    assert reopened.all() == store.all()
    assert reopened.export() == store.export()
    assert reopened.put("layer2", 3, "fur again").version == 3


def test_another_instance_sees_writes(path):
    a, b = LabelStore(path, SHA, LAYERS), LabelStore(path, SHA, LAYERS)
    assert b.get("layer2", 1) is None
    a.put("layer2", 1, "one")
    assert b.get("layer2", 1).label == "one"
    b.put("layer2", 1, "uno")
    assert a.get("layer2", 1).label == "uno" and a.get("layer2", 1).version == 2


def test_reads_are_cached_until_the_file_changes(store, monkeypatch):
    store.put("layer2", 1, "one")
    calls = []
    parse = store._parse_bytes
    monkeypatch.setattr(store, "_parse_bytes", lambda data: calls.append(1) or parse(data))
    for _ in range(5):
        store.all()
    assert calls == []  # our own write primed the cache
    LabelStore(store.path, SHA, LAYERS).put("layer2", 2, "two")  # another writer: a new inode
    assert store.get("layer2", 2).label == "two"
    store.all()
    assert len(calls) == 1


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label": ""}, "label is empty"),
        ({"label": "   "}, "label is empty"),
        (
            {"label": "x" * (MAX_LABEL_CHARS + 1)},
            f"label has {MAX_LABEL_CHARS + 1} characters; at most",
        ),
        ({"label": "two\nlines"}, r"label contains the control character '\\n'"),
        ({"label": "tab\there"}, r"label contains the control character '\\t'"),
        ({"label": "bell\x07"}, r"label contains the control character '\\x07'"),
        ({"label": 3}, "label must be a string, got int"),
        ({"label": "ok", "note": "x" * (MAX_NOTE_CHARS + 1)}, f"note has {MAX_NOTE_CHARS + 1} characters"),
        ({"label": "ok", "note": "nul\x00"}, r"note contains the control character '\\x00'"),
        ({"label": "ok", "note": None}, "note must be a string, got NoneType"),
        ({"label": "ok", "author": "a" * 101}, "author has 101 characters; at most 100"),
        ({"label": "ok", "author": "x\ny"}, "author contains the control character"),
    ],
)
def test_bad_text_is_refused_with_a_message(store, path, kwargs, message):
    with pytest.raises(InvalidLabel, match=message):
        store.put("layer2", 0, **kwargs)
    assert not path.exists()


def test_bounds_are_inclusive(store):
    saved = store.put("layer2", 0, "x" * MAX_LABEL_CHARS, note="y" * MAX_NOTE_CHARS)
    assert len(saved.label) == MAX_LABEL_CHARS and len(saved.note) == MAX_NOTE_CHARS


def test_unknown_layer_and_concept_name_the_valid_ones(store):
    with pytest.raises(UnknownLayer, match="unknown layer 'layer9': this model's concept layers are layer2, layer3"):
        store.put("layer9", 0, "x")
    with pytest.raises(UnknownConcept, match=r"concept 128 is out of range: layer 'layer2' has concepts 0..127"):
        store.get("layer2", 128)
    for bad in (-1, True, "3"):
        with pytest.raises(UnknownConcept, match="out of range"):
            store.put("layer2", bad, "x")


def test_constructor_refusals(path):
    with pytest.raises(ValueError, match="model_sha256 must be a lowercase hex sha256"):
        LabelStore(path, "ABC", LAYERS)
    with pytest.raises(ValueError, match="layers is empty"):
        LabelStore(path, SHA, {})
    with pytest.raises(ValueError, match="positive concept counts"):
        LabelStore(path, SHA, {"layer2": 0})


def test_errors_are_value_errors():
    for kind in (InvalidLabel, UnknownConcept, LabelNotFound, CorruptLabels, LabelStoreUnwritable):
        assert issubclass(kind, ValueError)


# ---------------------------------------------------------------------------- stale and corrupt files
def test_a_file_for_another_model_is_never_used_nor_overwritten(path, caplog):
    LabelStore(path, OTHER_SHA, LAYERS).put("layer2", 1, "theirs")
    before = path.read_bytes()
    store = LabelStore(path, SHA, LAYERS)
    with caplog.at_level(logging.WARNING, logger="fact_model.concept_labels"):
        assert store.get("layer2", 1) is None
        assert store.all() == {"layer2": {}, "layer3": {}}
        store.all()
    warnings = [r for r in caplog.records if "serving no concept labels" in r.getMessage()]
    assert len(warnings) == 1 and OTHER_SHA in warnings[0].getMessage()
    assert OTHER_SHA in store.problem() and SHA in store.problem()
    with pytest.raises(StaleLabels, match=f"weights sha256 {OTHER_SHA}.*have sha256 {SHA}") as info:
        store.put("layer2", 1, "ours")
    assert (info.value.found_sha256, info.value.model_sha256) == (OTHER_SHA, SHA)
    with pytest.raises(StaleLabels):
        store.delete("layer2", 1)
    with pytest.raises(StaleLabels):
        store.export()
    with pytest.raises(StaleLabels):
        store.import_document({**_empty_doc(), "layers": {}}, mode="replace")
    assert path.read_bytes() == before


def _empty_doc(sha: str = SHA) -> dict:
    return {"format": FORMAT, "format_version": 1, "model_sha256": sha, "layers": {}}


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[]", json.dumps({**_empty_doc(), "layers": {"layer9": {}}}).encode(), b""],
    ids=["invalid-json", "not-utf8", "not-an-object", "unknown-layer", "empty"],
)
def test_a_corrupt_file_reads_as_no_labels_and_is_never_overwritten(path, caplog, content):
    path.write_bytes(content)
    store = LabelStore(path, SHA, LAYERS)
    with caplog.at_level(logging.WARNING, logger="fact_model.concept_labels"):
        assert store.get("layer2", 0) is None
        assert store.all() == {"layer2": {}, "layer3": {}}
    assert any("serving no concept labels" in r.getMessage() for r in caplog.records)
    assert "left untouched" in store.problem()
    with pytest.raises(CorruptLabels, match=str(path)):
        store.export()
    with pytest.raises(CorruptLabels, match="repair it or move it aside"):
        store.put("layer2", 0, "x")
    with pytest.raises(CorruptLabels):
        store.import_document(_empty_doc(), mode="replace")
    assert path.read_bytes() == content


# ---------------------------------------------------------------------------- atomicity and folders
def test_a_failed_replace_leaves_the_old_file_intact(store, path, monkeypatch):
    store.put("layer2", 1, "kept")
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "simulated crash during replace")

    monkeypatch.setattr(concept_labels.os, "replace", broken_replace)
    with pytest.raises(LabelStoreUnwritable, match=f"cannot write concept labels to {path}"):
        store.put("layer2", 1, "lost")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["concept_labels.json", "concept_labels.json.lock"]
    assert LabelStore(path, SHA, LAYERS).get("layer2", 1).label == "kept"
    assert store.get("layer2", 1).label == "kept"  # the failed write did not reach the cache either


def test_an_interrupted_write_leaves_the_old_file_intact(store, path, monkeypatch):
    store.put("layer2", 1, "kept")
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(concept_labels.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.put("layer2", 1, "lost")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_missing_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "concept_labels.json"
    store = LabelStore(missing, SHA, LAYERS)
    assert store.all() == {"layer2": {}, "layer3": {}}
    with pytest.raises(LabelStoreUnwritable, match=f"{missing.parent}.*the folder does not exist"):
        store.put("layer2", 0, "x")


def test_a_read_only_file_system_is_named(store, path, monkeypatch):
    store.put("layer2", 0, "kept")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(concept_labels.tempfile, "mkstemp", read_only)
    with pytest.raises(
        LabelStoreUnwritable, match=f"cannot write concept labels to {path}: the file system is read-only"
    ):
        store.put("layer2", 0, "x")
    monkeypatch.undo()
    assert store.get("layer2", 0).label == "kept"


def test_a_lock_file_of_another_user_is_locked_read_only(store, path, monkeypatch):
    store.put("layer2", 0, "first")  # the lock file exists now
    real_open = os.open
    denied = []

    def open_(name, flags, *args):
        if str(name).endswith(".lock") and flags & os.O_RDWR:
            denied.append(name)
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(concept_labels.os, "open", open_)
    assert store.put("layer2", 0, "second").version == 2
    assert denied == [store.lock_path]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_folder_still_serves_reads(store, path):
    store.put("layer2", 0, "kept")
    os.chmod(path.parent, 0o555)
    try:
        assert LabelStore(path, SHA, LAYERS).get("layer2", 0).label == "kept"
        with pytest.raises(LabelStoreUnwritable, match="not writable by this process"):
            store.put("layer2", 0, "x")
    finally:
        os.chmod(path.parent, 0o755)


def test_for_artifact_reads_the_manifest(tmp_path):
    store = LabelStore.for_artifact("default", path=tmp_path / "labels.json")
    manifest = json.loads((Path(concept_labels.__file__).parent / "weights/default/manifest.json").read_text())
    assert store.model_sha256 == manifest["weights"]["sha256"]
    assert store.layers == {i["name"]: i["num_concepts"] for i in manifest["concept_layers"]}
    assert LabelStore.for_artifact("default").path.name == "concept_labels.json"


# ---------------------------------------------------------------------------- import / export
def test_import_refuses_another_models_document(store):
    with pytest.raises(StaleLabels, match=f"sha256 {OTHER_SHA}.*have sha256 {SHA}"):
        store.import_document(_empty_doc(OTHER_SHA))


def _entry(label: str, version: int = 1, history: list | None = None, **extra) -> dict:
    entry = {"label": label, "note": "", "updated_at": "2025-01-31T12:00:00+00:00", "version": version}
    return {**entry, "history": history or [], **extra}


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"layer9": {}}, "unknown layer 'layer9'; this model's concept layers are layer2, layer3"),
        ({"layer2": {"128": _entry("x")}}, r"layers.layer2.128: concept id '128' is out of range.*0..127"),
        ({"layer2": {"07": _entry("x")}}, "'07' is not a concept id: write the id in decimal"),
        ({"layer2": {"1": _entry(5)}}, "layers.layer2.1.label must be a string, got int"),
        ({"layer2": {"1": _entry("x", version=0)}}, "layers.layer2.1.version must be a positive integer"),
        ({"layer2": {"1": {**_entry("x"), "colour": 1}}}, r"layers.layer2.1 has unknown field\(s\) \['colour'\]"),
        ({"layer2": {"1": {"label": "x"}}}, r"layers.layer2.1 lacks required field\(s\) \['updated_at', 'version'\]"),
        ({"layer2": {"1": _entry("x", updated_at="yesterday")}}, "updated_at 'yesterday' is not an ISO-8601"),
        ({"layer2": {"1": _entry("x", updated_at="2025-01-31T12:00:00")}}, "has no time zone"),
        ({"layer2": {"1": _entry("x", history=[{"label": "y"}])}}, r"layers.layer2.1.history\[0\] needs 'version'"),
        ({"layer2": []}, "layers.layer2 must be an object, got list"),
    ],
)
def test_import_refuses_malformed_documents_naming_the_entry(store, path, layers, message):
    with pytest.raises(InvalidLabel, match=message):
        store.import_document({**_empty_doc(), "layers": layers})
    assert not path.exists()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({**_empty_doc(), "format": "other"}, "format 'other', expected 'fact-concept-labels'"),
        ({**_empty_doc(), "format_version": 2}, "format_version 2; this fact_model reads 1"),
        ({**_empty_doc(), "model_sha256": "xyz"}, "model_sha256 'xyz' is not a lowercase hex sha256"),
        ({**_empty_doc(), "extra": 1}, r"unknown field\(s\) \['extra'\]"),
        ([], "must be a JSON object, got list"),
    ],
)
def test_import_refuses_bad_headers(store, doc, message):
    with pytest.raises(InvalidLabel, match=message):
        store.import_document(doc)


def test_import_mode_is_checked(store):
    with pytest.raises(InvalidLabel, match="import mode must be 'merge' or 'replace', got 'overwrite'"):
        store.import_document(_empty_doc(), mode="overwrite")


def test_export_then_import_into_a_fresh_store_round_trips(store, tmp_path):
    store.put("layer2", 1, "one", note="n", author="ana")
    store.put("layer2", 1, "uno")
    store.put("layer3", 255, "last")
    store.delete("layer3", 255)
    other = LabelStore(tmp_path / "copy" / "labels.json", SHA, LAYERS)
    other.path.parent.mkdir()
    assert other.import_document(store.export()) == {"added": 2, "updated": 0, "unchanged": 0, "removed": 0}
    assert other.export()["layers"] == store.export()["layers"]
    # re-importing the same document changes nothing
    assert store.import_document(store.export()) == {"added": 0, "updated": 0, "unchanged": 2, "removed": 0}
    assert other.get("layer2", 1).version == 2


def test_merge_appends_the_imported_history_after_the_existing_one(store):
    store.put("layer2", 1, "mine v1")
    store.put("layer2", 1, "mine v2")
    store.put("layer2", 2, "untouched")
    incoming = {
        **_empty_doc(),
        "layers": {
            "layer2": {
                "1": _entry(
                    "theirs v2",
                    2,
                    [
                        {
                            "version": 1,
                            "label": "theirs v1",
                            "note": "",
                            "updated_at": "2025-01-30T00:00:00+00:00",
                            "author": "zoe",
                        }
                    ],
                ),
                "3": _entry("new"),
            }
        },
    }
    counts = store.import_document(incoming)
    assert counts == {"added": 1, "updated": 1, "unchanged": 0, "removed": 0}
    merged = store.get("layer2", 1)
    assert merged.label == "theirs v2" and merged.version == 4
    assert [(h.version, h.label) for h in merged.history] == [(1, "mine v1"), (2, "mine v2"), (3, "theirs v1")]
    assert merged.history[-1].author == "zoe"
    assert store.get("layer2", 2).label == "untouched"
    assert store.get("layer2", 3).version == 1


def test_replace_makes_the_document_the_content(store):
    store.put("layer2", 1, "mine")
    store.put("layer2", 2, "gone")
    incoming = {**_empty_doc(), "layers": {"layer2": {"1": _entry("restored", 7)}, "layer3": {"0": _entry("new")}}}
    counts = store.import_document(incoming, mode="replace")
    assert counts == {"added": 1, "updated": 1, "unchanged": 0, "removed": 1}
    assert store.get("layer2", 2) is None
    assert store.get("layer2", 1).version == 7  # verbatim: a restore from backup
    assert {layer: sorted(m) for layer, m in store.all().items()} == {"layer2": [1], "layer3": [0]}


# ---------------------------------------------------------------------------- concurrency
WRITES = 25
CONCEPTS_PER_WRITER = 5  # each written WRITES / CONCEPTS_PER_WRITER times by its writer


def _writer(store: LabelStore, index: int) -> None:
    """``WRITES`` puts: its own concepts in layer2 in turn, and one shared concept of layer3 every fifth put."""
    for i in range(WRITES):
        concept = index * CONCEPTS_PER_WRITER + i % CONCEPTS_PER_WRITER
        store.put("layer2", concept, f"writer {index} write {i}", author=f"w{index}")
        if i % CONCEPTS_PER_WRITER == 0:
            store.put("layer3", 0, f"shared by {index}", author=f"w{index}")


def _process_writer(path: str, index: int) -> None:
    _writer(LabelStore(path, SHA, LAYERS), index)


def _check_every_write(store: LabelStore, writers: int) -> None:
    labels = store.all()["layer2"]
    assert len(labels) == writers * CONCEPTS_PER_WRITER
    for index in range(writers):
        for j in range(CONCEPTS_PER_WRITER):
            entry = labels[index * CONCEPTS_PER_WRITER + j]
            assert entry.version == WRITES // CONCEPTS_PER_WRITER  # no write lost
            assert entry.label == f"writer {index} write {WRITES - CONCEPTS_PER_WRITER + j}"
            assert [h.label for h in entry.history] == [
                f"writer {index} write {i}" for i in range(j, WRITES - CONCEPTS_PER_WRITER + j, CONCEPTS_PER_WRITER)
            ]
    shared = store.get("layer3", 0)
    assert shared.version == writers * (WRITES // CONCEPTS_PER_WRITER)
    assert len(shared.history) == shared.version - 1


def test_threads_lose_no_write(path):
    shared = LabelStore(path, SHA, LAYERS)
    # Half the threads share one store (the in-process lock), half have their own (the file lock).
    stores = [shared if i % 2 else LabelStore(path, SHA, LAYERS) for i in range(8)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            _writer(stores[i], i)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    _check_every_write(LabelStore(path, SHA, LAYERS), 8)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_processes_lose_no_write(path):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_process_writer, args=(str(path), i)) for i in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=180)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    _check_every_write(LabelStore(path, SHA, LAYERS), 4)


def test_a_reader_never_sees_half_a_file(path):
    writer = LabelStore(path, SHA, LAYERS)
    writer.put("layer2", 0, "start")
    stop = threading.Event()
    seen: list[int] = []
    failures: list[BaseException] = []

    def read() -> None:
        reader = LabelStore(path, SHA, LAYERS)
        while not stop.is_set():
            try:
                entry = reader.get("layer2", 0)
                assert entry is not None and reader.problem() is None
                seen.append(entry.version)
            except BaseException as err:  # reported below
                failures.append(err)
                return

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for i in range(40):
            writer.put("layer2", 0, f"edit {i}", note="n" * (i * 40))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures and seen == sorted(seen)


def test_tempfile_is_in_the_same_folder(store, path, monkeypatch):
    made = []
    mkstemp = tempfile.mkstemp
    monkeypatch.setattr(concept_labels.tempfile, "mkstemp", lambda **kw: made.append(kw["dir"]) or mkstemp(**kw))
    store.put("layer2", 0, "x")
    assert made == [path.parent]
