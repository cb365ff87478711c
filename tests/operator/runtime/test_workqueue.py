"""workqueue.WorkQueue: one queued entry per key, one worker per key at a time,
the earliest delay wins, workers outlive a failing handler."""

from __future__ import annotations

import asyncio

from lorajob_operator.workqueue import NEW_KEY_EVERY, WorkQueue

WAIT = 10.0  # generous upper bound for something that must happen (not a timing check)


def test_a_key_is_queued_once_however_often_added() -> None:
    async def check() -> None:
        queue: WorkQueue[str] = WorkQueue()
        for key in ("a", "b", "a", "a"):
            queue.add(key)
        assert len(queue) == 2
        assert [await queue.get(), await queue.get()] == ["a", "b"]
        assert len(queue) == 0

    asyncio.run(check())


def test_a_key_added_while_held_comes_back_only_after_done() -> None:
    async def check() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        assert await queue.get() == "a"
        queue.add("a")
        queue.add("a")
        assert len(queue) == 0  # not handed to a second worker while held
        queue.done("a")
        assert len(queue) == 1
        assert await queue.get() == "a"
        queue.done("a")
        assert len(queue) == 0  # added twice while held: queued once

    asyncio.run(check())


def test_the_earliest_delay_wins_and_taking_the_key_cancels_it() -> None:
    async def check() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add_after("a", 300)
        late = queue.scheduled("a")
        queue.add_after("a", 100)
        sooner = queue.scheduled("a")
        assert late is not None
        assert sooner is not None
        assert sooner < late
        queue.add_after("a", 200)
        assert queue.scheduled("a") == sooner  # a later delay does not postpone it
        queue.add_after("a", 0.01)
        assert await asyncio.wait_for(queue.get(), WAIT) == "a"  # the short one fired
        assert queue.scheduled("a") is None
        queue.done("a")
        queue.add_after("a", 100)
        queue.add("a")
        assert await queue.get() == "a"
        assert queue.scheduled("a") is None  # the pass that follows sets the next one
        queue.done("a")
        queue.add_after("a", 100)
        queue.forget("a")
        assert queue.scheduled("a") is None

    asyncio.run(check())


def test_workers_serialize_each_key_and_survive_a_failing_handler() -> None:
    async def check() -> None:
        queue: WorkQueue[str] = WorkQueue()
        running: set[str] = set()
        overlaps: list[str] = []
        seen: list[str] = []
        finished = asyncio.Event()

        async def handler(key: str) -> None:
            if key in running:
                overlaps.append(key)
            running.add(key)
            seen.append(key)
            if seen == ["a"]:
                queue.add(key)  # re-added while held: a second pass, after this one
            await asyncio.sleep(0)  # let the other workers run meanwhile
            running.discard(key)
            if key == "boom":
                raise RuntimeError("a bug in one pass")
            if len(seen) >= 4:
                finished.set()

        queue.start(handler, workers=4)
        queue.add("a")
        queue.add("boom")
        queue.add("b")
        await asyncio.wait_for(finished.wait(), WAIT)
        assert sorted(seen) == ["a", "a", "b", "boom"]
        assert overlaps == []
        queue.add_after("c", 100)
        await queue.stop()
        assert queue.scheduled("c") is None

    asyncio.run(check())


def test_known_keys_are_taken_before_new_ones() -> None:
    """In a burst a known job's follow-up (e.g. its pod went Running) does not wait
    behind every new job's first pass."""

    async def check() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("new-1", new=True)
        queue.add("new-2", new=True)
        queue.add("known")
        queue.add("new-1")  # already queued: stays where it is
        assert len(queue) == 3
        assert [await queue.get() for _ in range(3)] == ["known", "new-1", "new-2"]

    asyncio.run(check())


def test_new_keys_are_not_starved_by_a_stream_of_follow_ups() -> None:
    """Thousands of running jobs re-queue themselves for progress polls; a new job
    still gets one take in every NEW_KEY_EVERY while both lanes are busy."""

    async def check() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("new-1", new=True)
        queue.add("new-2", new=True)
        for i in range(20):
            queue.add(f"known-{i}")
        taken: list[str] = []
        for _ in range(2 * NEW_KEY_EVERY):
            key = await queue.get()
            taken.append(key)
            queue.done(key)
            if key.startswith("known"):
                queue.add(key)  # the follow-up re-queues itself at once
        assert taken.index("new-1") == NEW_KEY_EVERY - 1
        assert taken.index("new-2") == 2 * NEW_KEY_EVERY - 1
        assert all(k.startswith("known") for k in taken if not k.startswith("new"))

    asyncio.run(check())
