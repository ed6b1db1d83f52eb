"""The one-bot-per-database lock (bot/instance.py); the two-process case is in test_run.py."""

import os

import pytest

from bot import instance


def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    db = tmp_path / "data" / "fluxbot.db"
    with instance.exclusive(db):
        assert instance.lock_path(db).read_text() == f"{os.getpid()}\n"
        with pytest.raises(instance.AlreadyRunning, match=rf"already running on .*fluxbot\.db \(pid {os.getpid()}\)"):
            with instance.exclusive(db):
                pass
    assert not db.exists()  # the lock never creates the database
    with instance.exclusive(db):  # released on exit
        pass
