import pytest

from dsmtp.io import atomic_directory


def test_atomic_directory_publishes_only_complete_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the partial directory is gone too

    out.mkdir()  # an empty directory is replaced
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("done")
        assert not (out / "a.txt").exists()  # invisible until the block ends
    assert (out / "a.txt").read_text() == "done" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
