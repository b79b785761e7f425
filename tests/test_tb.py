"""The TensorBoard logger's input-images thread (core/tb.py): it never fails a run, notes in
TensorBoard why the images are missing, and logs a bug with its traceback instead of hiding it."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from core import events as ev, tb
from core.config import RunConfig


class _Writer:
    def __init__(self, fail: bool = False):
        self.texts: list[tuple[str, str]] = []
        self.fail = fail

    def add_text(self, tag, text, *args, **kwargs):
        if self.fail:
            raise OSError(28, "No space left on device")
        self.texts.append((tag, text))


def _started(run_dir) -> ev.RunStarted:
    return ev.RunStarted(run_id="r1", run_dir=str(run_dir), device="cpu", classes=["a", "b"],
                         split_sizes={"train": 1}, input_shape=[3, 32, 32], params_total=1, params_trainable=1,
                         batches_per_epoch=1, start_epoch=0, epochs=1)


@pytest.fixture
def logger():
    if not tb.available():
        pytest.skip("tensorboard is not installed")
    return tb.TensorBoardLogger(images=4)


def test_unreadable_data_is_noted_in_tensorboard_and_logged_without_traceback(logger, tmp_path, caplog):
    config = RunConfig.from_dict({"data": {"source": "folder", "location": str(tmp_path / "gone")}})
    run = SimpleNamespace(writer=_Writer())
    with caplog.at_level(logging.WARNING, logger="core.tb"):
        logger._input_images(run, config, _started(tmp_path))
    [(tag, text)] = run.writer.texts
    assert tag == "inputs" and text.startswith("input images not logged: ")
    [record] = [r for r in caplog.records if r.name == "core.tb"]
    assert record.levelno == logging.WARNING and "r1" in record.getMessage() and record.exc_info is None


def test_a_bug_is_logged_with_its_traceback_and_the_note_says_so(logger, tmp_path, caplog, monkeypatch):
    def broken(*args):
        raise TypeError("not what a dataset returns")

    monkeypatch.setattr(logger, "_write_input_images", broken)
    run = SimpleNamespace(writer=_Writer())
    with caplog.at_level(logging.WARNING, logger="core.tb"):
        logger._input_images(run, None, _started(tmp_path))
    [(_, text)] = run.writer.texts
    assert "TypeError: not what a dataset returns" in text and "traceback" in text
    [record] = [r for r in caplog.records if r.name == "core.tb"]
    assert record.levelno == logging.ERROR and record.exc_info and record.exc_info[0] is TypeError


def test_a_note_that_cannot_be_written_goes_to_the_log(logger, tmp_path, caplog):
    config = RunConfig.from_dict({"data": {"source": "folder", "location": str(tmp_path / "gone")}})
    run = SimpleNamespace(writer=_Writer(fail=True))
    with caplog.at_level(logging.WARNING, logger="core.tb"):
        logger._input_images(run, config, _started(tmp_path))   # raises nothing
    assert any("not written to TensorBoard either" in r.getMessage() for r in caplog.records)
