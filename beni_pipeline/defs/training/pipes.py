"""The channel training processes report through (Dagster Pipes): a temporary file they append JSON lines to."""

import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg


class WholeLineMessageReader(dg.PipesMessageReader):
    """Reads the messages a process appends to a temporary file, one JSON line each, taking only whole lines.

    Dagster's file readers (1.13) parse whatever `readline` returns, and at the end of a file that is still being
    written that can be the first part of a line: the reader thread then dies on the JSON error, and every later
    message (step logs, the stage's materialization) is lost. A training stage that logs every step hit it on a GPU.
    """

    @contextmanager
    def read_messages(self, handler) -> Iterator[dict]:
        with tempfile.TemporaryDirectory(prefix="beni-pipes-") as tmp:
            path = Path(tmp) / "messages.jsonl"
            path.touch()
            done = threading.Event()
            thread = threading.Thread(target=self._read, args=(path, handler, done.is_set), name="beni-pipes-reader", daemon=True)
            thread.start()
            try:
                yield {"path": str(path)}  # where dagster_pipes' default writer appends its messages
            finally:
                done.set()
                thread.join()

    def _read(self, path: Path, handler, stopped: Callable[[], bool]) -> None:
        try:
            for line in whole_lines(path, stopped):
                handler.handle_message(json.loads(line))
        except Exception:
            handler.report_pipes_framework_exception("beni's Pipes reader", sys.exc_info())
            raise

    @property
    def expected_writer_count(self) -> int:  # the base class's is marked preview and warns on every run
        return 1

    def no_messages_debug_text(self) -> str:
        return "Read messages from a temporary messages.jsonl, where open_dagster_pipes' default writer appends them."


def whole_lines(path: Path, stopped: Callable[[], bool], poll_s: float = 0.01) -> Iterator[str]:
    """The lines appended to `path`, each once it is whole, until `stopped()` and the file is read to its end."""
    part = ""
    with open(path, encoding="utf-8") as f:
        while True:
            if chunk := f.readline():
                part += chunk
                if part.endswith("\n"):
                    yield part
                    part = ""
            elif stopped():
                return
            else:
                time.sleep(poll_s)
