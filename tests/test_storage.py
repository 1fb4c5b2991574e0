"""fashion_jax.support.storage's local files: whole-file writes that survive a crash."""

import os

from fashion_jax.support import storage


def test_a_whole_file_write_is_on_disk_before_it_replaces_the_old(tmp_path, monkeypatch):
  """The new content was renamed over the old unsynced: a crash soon after (power, a VM's host)
  left an empty file on XFS or ext4 with data=writeback: a run's config.json, or metrics.jsonl
  rewritten on resume (truncate_after) with every line lost."""
  path, events = tmp_path / "metrics.jsonl", []
  path.write_text("old\n")
  fsync, replace = os.fsync, os.replace

  def synced(fd):
    events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    fsync(fd)

  def replaced(source, target):
    events.append(("replace", os.fspath(source)))
    replace(source, target)

  monkeypatch.setattr(storage.os, "fsync", synced)
  monkeypatch.setattr(storage.os, "replace", replaced)
  storage.write_text(str(path), "new\n")
  assert path.read_text() == "new\n"
  assert [kind for kind, _ in events] == ["fsync", "replace"], events
  assert events[0][1] == events[1][1], events  # The temporary file's, then renamed.
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_a_folder_below_a_file_names_the_file(tmp_path):
  """--output_dir=x.png/sub (evaluate), --save_preprocessed=x.png/sub (predict): it said
  "... is not writable (Not a directory)", naming neither the file nor what to do."""
  import pytest  # pylint: disable=import-outside-toplevel
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  (tmp_path / "x.png").write_bytes(b"\x89PNG")
  for below in ("x.png/sub", "x.png/sub/deeper"):
    with pytest.raises(UserError) as raised:
      storage.ensure_writable_dir(str(tmp_path / below), "--output_dir")
    assert str(raised.value) == (
        f"{str(tmp_path / 'x.png')!r} is a file, not a folder: choose another --output_dir "
        f"({str(tmp_path / below)!r} would be inside it)")
  assert os.listdir(tmp_path) == ["x.png"] and (tmp_path / "x.png").read_bytes() == b"\x89PNG"
  link = tmp_path / "gone"  # A link to nothing is no file in the way: what the system says.
  link.symlink_to(tmp_path / "nothing")
  with pytest.raises(UserError, match="is not writable"):
    storage.ensure_writable_dir(str(link / "sub"), "--output_dir")
  assert storage.ensure_writable_dir(str(tmp_path / "a" / "b"), "--output_dir") == str(
      tmp_path / "a" / "b")
