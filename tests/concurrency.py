"""Run calls on threads that start together, for the tests of concurrent use."""
from __future__ import annotations

import threading
from typing import Any, Callable


def run_together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Each call on its own thread, released at once by a barrier; their results in order.
    The first exception any thread raised is raised here, after every thread has ended."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
