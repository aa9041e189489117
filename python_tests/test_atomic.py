"""torchspec_ext.atomic: a file or a folder is replaced whole, or left as it was."""

import pytest

from torchspec_ext import atomic


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "latest"
    atomic.write_text(path, "step-1")
    atomic.write_text(path, "step-2")
    assert path.read_text() == "step-2"
    with pytest.raises(RuntimeError):
        with atomic.staged(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "step-2"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary left behind


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "draft"
    for version in ("1", "2"):
        with atomic.staged(out) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
            assert not (out / "weights").exists() or (out / "weights").read_text() == "1"
    assert (out / "weights").read_text() == "2" and [p.name for p in out.iterdir()] == ["weights"]
    with pytest.raises(OSError):
        with atomic.staged(out) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("3")
            raise OSError("disk full")
    assert (out / "weights").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]
