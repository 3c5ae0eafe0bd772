"""hrnetdet.io: whole-file replacement and appends never write through a planted link."""
import os
import stat

import pytest

from hrnetdet.io import atomic_write_text, open_no_follow, private_dir


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "someone_elses_file"
    path.write_text("keep")
    return path


def test_atomic_write_replaces_a_planted_link_not_its_target(tmp_path, victim):
    (tmp_path / "results.json").symlink_to(victim)
    os.symlink(victim, tmp_path / f"results.json.tmp{os.getpid()}")  # the temporary name planted too
    atomic_write_text(str(tmp_path / "results.json"), "ours")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "results.json").is_symlink()
    assert (tmp_path / "results.json").read_text() == "ours"
    assert sorted(os.listdir(tmp_path)) == ["results.json", "someone_elses_file"]


def test_open_no_follow_refuses_links_and_fifos(tmp_path, victim):
    (tmp_path / "results.jsonl").symlink_to(victim)
    with pytest.raises(OSError, match="results.jsonl is a symbolic link"):
        open_no_follow(str(tmp_path / "results.jsonl"))
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError):
        open_no_follow(str(tmp_path / "pipe"))  # O_NONBLOCK: refused at once, never a hang
    assert victim.read_text() == "keep"
    with open_no_follow(str(tmp_path / "fresh.jsonl")) as f:
        f.write("line\n")
    assert (tmp_path / "fresh.jsonl").read_text() == "line\n"


def test_private_dir_is_closed_to_others_and_refuses_links(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    assert stat.S_IMODE(os.stat(private_dir(str(cache))).st_mode) == 0o700
    (tmp_path / "linked").symlink_to(cache)
    with pytest.raises(OSError, match="not a folder"):
        private_dir(str(tmp_path / "linked"))
