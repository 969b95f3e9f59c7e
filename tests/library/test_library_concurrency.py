"""Concurrent writers never lose an entry. Threads and processes start together at a
barrier and the checks are about the end state only (true under every interleaving);
the races that matter are also forced one by one, deterministically, by interposing on
the store: a stale listing, a compactor that dies after sealing, a lost compare-and-swap,
a reader whose manifest is compacted away under it."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from typing import Any

import pytest
from library_helpers import add_in_process, tiny

from adapterkit import Library, library
from adapterkit.library import LOG, MANIFEST, Store


def run_threads(workers: list[Callable[[], None]]) -> None:
    """Start every worker at once (a barrier) and join them; re-raise the first failure."""
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def wrap(work: Callable[[], None]) -> None:
        try:
            barrier.wait()
            work()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("compact_every", [3, 1000])
def test_threads_adding_and_removing_keep_every_entry(
    backend: tuple[str, dict[str, Any]], compact_every: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, options = backend
    monkeypatch.setattr(library, "COMPACT_EVERY", compact_every)
    Library.init(url, storage_options=options)
    models = [tiny(k) for k in range(4)]

    def writer(k: int) -> Callable[[], None]:
        def work() -> None:
            lib = Library(url, storage_options=options)  # each writer its own handle
            for i in range(6):
                lib.add(models[k], f"w{k}/{i}", task=f"task{k}", tags=[f"t{i % 2}"])
            lib.remove(f"w{k}/0")
        return work

    run_threads([writer(k) for k in range(4)])
    lib = Library(url, storage_options=options)
    expected = sorted(f"w{k}/{i}" for k in range(4) for i in range(1, 6))
    assert [e.name for e in lib.entries()] == expected
    assert [e.name for e in lib.select(task="task2", tags="t1")] == ["w2/1", "w2/3", "w2/5"]
    assert lib.rebuild(dry_run=True).stale is False  # the files agree with the index
    lib.compact()
    assert sorted(library.parse_manifest(lib._store().read(MANIFEST))[1]) == expected


def test_threads_racing_for_one_name_one_wins(memory_url: str) -> None:
    Library.init(memory_url)
    outcomes: list[str] = []
    lock = threading.Lock()

    def work(k: int) -> Callable[[], None]:
        def add() -> None:
            try:
                Library(memory_url).add(tiny(k), "same", task=f"by{k}")
                result = f"by{k}"
            except library.StorageError as exc:
                assert "already has 'same.safetensors'" in str(exc)
                result = "refused"
            with lock:
                outcomes.append(result)
        return add

    run_threads([work(k) for k in range(4)])
    winners = [o for o in outcomes if o != "refused"]
    assert len(winners) == 1 and len(outcomes) == 4
    entry = Library(memory_url).get("same")
    assert entry.task == winners[0]
    import adapterkit

    assert adapterkit.inspect(entry.url).digest == entry.digest  # the file is the winner's


def test_processes_adding_keep_every_entry(tmp_path: Any) -> None:
    url = str(tmp_path / "lib")
    Library.init(url)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=add_in_process, args=(url, k, 8, 3, barrier)) for k in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    names = sorted(f"p{k}-{i}" for k in range(3) for i in range(8))
    lib = Library(url)
    assert [e.name for e in lib.entries()] == names and len(names) == 24
    assert {e.task for e in lib.entries()} == {"task0", "task1", "task2"}


# --- the races, forced one at a time ----------------------------------------------------


def test_stale_listing_loses_the_slot_and_takes_the_next(memory_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers list the same free slot: the second's create-only write fails, it lists
    again and appends after the first."""
    lib = Library.init(memory_url)
    lib.add(tiny(1), "first")
    real_slots, real_create = Store.slots, Store.create
    created: list[tuple[str, bool]] = []
    listings: list[str] = []

    def stale_once(self: Store, rel_dir: str) -> list[Any]:
        found = real_slots(self, rel_dir)
        listings.append(rel_dir)
        if len(listings) == 1:  # the first listing misses the record just written by "first"
            return found[:-1]
        return found

    def recording(self: Store, rel: str, data: bytes) -> bool:
        done = real_create(self, rel, data)
        created.append((rel, done))
        return done

    monkeypatch.setattr(Store, "slots", stale_once)
    monkeypatch.setattr(Store, "create", recording)
    lib.add(tiny(2), "second")
    records = [(rel.rpartition("/")[2], done) for rel, done in created if rel.startswith(LOG)]
    assert records == [("0000000000.json", False), ("0000000001.json", True)]
    monkeypatch.undo()
    assert [e.name for e in lib.entries()] == ["first", "second"]


def test_a_compactor_that_dies_after_sealing_blocks_nobody(memory_url: str) -> None:
    """A seal without its fold: readers fold the sealed records themselves, writers append
    to the next generation, and the next compaction folds both generations."""
    lib = Library.init(memory_url)
    for i in range(3):
        lib.add(tiny(i), f"e{i}")
    store = lib._store(write=True)
    lib._seal(store, 0)  # ... and the compactor dies here
    assert [e.name for e in lib.entries()] == ["e0", "e1", "e2"]
    lib.add(tiny(3), "e3")
    assert library.parse_manifest(store.read(MANIFEST))[0] == 0  # still not folded
    assert [s.index for s in store.slots(f"{LOG}/0000000001")] == [0]  # e3, after the seal
    assert [e.name for e in lib.entries()] == ["e0", "e1", "e2", "e3"]
    assert lib.compact() == 2  # seals generation 1 and folds both
    generation, entries = library.parse_manifest(store.read(MANIFEST))
    assert generation == 2 and sorted(entries) == ["e0", "e1", "e2", "e3"]


def test_a_lost_compare_and_swap_is_retried(
    backend: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two compactors fold the same sealed generation: the one whose compare-and-swap
    finds the manifest replaced re-reads it and finds nothing left to fold."""
    url, options = backend
    lib = Library.init(url, storage_options=options)
    for i in range(3):
        lib.add(tiny(i), f"e{i}")
    rival = Library(url, storage_options=options)
    real = Store.replace_if
    ours: list[bool] = []
    rival_done: list[int] = []

    def rival_first(self: Store, rel: str, data: bytes, token: str) -> bool:
        if not rival_done:
            rival_done.append(-1)  # (the rival's own compare-and-swap comes through here too)
            rival_done[0] = rival.compact()  # the rival folds generation 0 first ...
            rival.add(tiny(7), "rival")  # ... and appends after it
            ours.clear()
        done = real(self, rel, data, token)
        ours.append(done)
        return done

    monkeypatch.setattr(Store, "replace_if", rival_first)
    assert lib.compact() == 1
    monkeypatch.undo()
    assert rival_done == [1] and ours == [False]  # ours lost, re-read, found nothing left to fold
    assert [e.name for e in lib.entries()] == ["e0", "e1", "e2", "rival"]
    assert sorted(library.parse_manifest(lib._store().read(MANIFEST))[1]) == ["e0", "e1", "e2"]


def test_a_reader_with_an_old_manifest_reads_on_through_the_log(
    backend: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader reads manifest G; before it lists G's records, writers seal and fold G
    and append to G+1: the reader follows the sealed generation on to the next."""
    url, options = backend
    lib = Library.init(url, storage_options=options)
    for i in range(3):
        lib.add(tiny(i), f"e{i}")
    store = lib._store()
    old = store.read_token(MANIFEST)
    writer = Library(url, storage_options=options)
    assert writer.compact() == 1
    writer.add(tiny(5), "later")
    real = Store.read_token
    monkeypatch.setattr(Store, "read_token", lambda self, rel: old if rel == MANIFEST else real(self, rel))
    assert [e.name for e in lib.entries()] == ["e0", "e1", "e2", "later"]


def test_a_writer_that_listed_before_a_compaction_appends_after_it(
    memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer lists the current generation (empty), then stalls while others fill it, seal
    it and fold it: its create-only write finds the slot taken (folded records are never
    deleted, so their slots never free up), it lists again, meets the seal and appends to
    the next generation."""
    monkeypatch.setattr(library, "COMPACT_EVERY", 3)
    lib = Library.init(memory_url)
    other = Library(memory_url)
    real_slots = Store.slots
    stalled: list[str] = []

    def stall_first(self: Store, rel_dir: str) -> list[Any]:
        found = real_slots(self, rel_dir)
        if not stalled:
            stalled.append(rel_dir)
            for i in range(3):  # others fill generation 0, the third seals and folds it
                other.add(tiny(i), f"o{i}")
        return found  # listed before those

    monkeypatch.setattr(Store, "slots", stall_first)
    lib.add(tiny(9), "late")
    monkeypatch.undo()
    assert stalled == [f"{LOG}/0000000000"]
    store = lib._store()
    assert [s.size for s in store.slots(f"{LOG}/0000000000")][-1] == 0  # sealed ...
    assert library.parse_manifest(store.read(MANIFEST))[0] == 1  # ... and folded
    assert len(store.slots(f"{LOG}/0000000001")) == 1  # "late" went after the fold
    assert [e.name for e in lib.entries()] == ["late", "o0", "o1", "o2"]


def test_a_failed_append_leaves_no_file(memory_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = Library.init(memory_url)

    def fail(*args: Any) -> Any:
        raise library.StorageError("cannot write: injected")

    monkeypatch.setattr(Library, "_append", fail)
    with pytest.raises(library.StorageError, match="injected"):
        lib.add(tiny(1), "a")
    monkeypatch.undo()
    assert lib.entries() == [] and lib.rebuild(dry_run=True).stale is False
    lib.add(tiny(1), "a")  # the name is free


def test_a_killed_writer_leaves_a_file_that_rebuild_indexes(memory_url: str) -> None:
    """A writer killed between its file and its record leaves an unlisted file: the name is
    refused until rebuild indexes it."""
    import adapterkit

    lib = Library.init(memory_url)
    adapterkit.save(tiny(1), f"{memory_url}/orphan.safetensors", metadata={"task": "late"})
    with pytest.raises(library.StorageError, match="index it with adapterkit library rebuild"):
        lib.add(tiny(2), "orphan")
    assert lib.rebuild().added == ("orphan",)
    assert lib.get("orphan").task == "late"


def test_a_removal_in_flight_is_not_resurrected_by_rebuild(memory_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """remove logs the removal, then deletes the file: a rebuild in between does not bring
    the entry back."""
    lib = Library.init(memory_url)
    lib.add(tiny(1), "a")
    lib.add(tiny(2), "b")
    seen: list[Any] = []

    def rebuild_before_delete(self: Store, rels: Any) -> None:
        if not seen:
            seen.append(None)  # (the rebuild's own compaction deletes records through here too)
            seen[0] = Library(memory_url).rebuild()
        real_delete(self, rels)

    real_delete = Store.delete
    monkeypatch.setattr(Store, "delete", rebuild_before_delete)
    lib.remove("a")
    monkeypatch.undo()
    assert seen[0].removed == () and seen[0].skipped == (("a.safetensors", "its removal is logged (being deleted)"),)
    assert [e.name for e in lib.entries()] == ["b"]
