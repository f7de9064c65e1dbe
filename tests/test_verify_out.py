"""`robustedge verify` writes its report beside the bundle, named for the bundle however it is written, and
never inside it (a bundle on a device may be read-only, and its manifest hashes what is in it)."""

import pytest

from robustedge.errors import RobustEdgeError
from robustedge.edge.reverify import verify_out


@pytest.mark.parametrize("cwd,bundle,expected", [
    ("", "bundle", "bundle-verify"),
    ("", "bundle/", "bundle-verify"),
    ("bundle", ".", "bundle-verify"),
    ("bundle/sub", "..", "bundle-verify"),
    ("", "link", "link-verify"),  # a link to the bundle keeps its own name
])
def test_the_default_report_folder_is_beside_the_bundle(tmp_path, monkeypatch, cwd, bundle, expected):
    (tmp_path / "bundle" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "bundle")
    monkeypatch.chdir(tmp_path / cwd)
    assert verify_out(bundle).resolve() == (tmp_path / expected).resolve()


@pytest.mark.parametrize("out,message", [
    ("bundle/report", "is inside the bundle"),
    ("link/report", "is inside the bundle"),
    ("bundle", "is inside the bundle"),
    ("afile/sub", "is not a folder this process can write into"),
    ("", "must be a folder path, got an empty one"),
])
def test_a_report_folder_inside_the_bundle_or_under_a_file_is_refused(tmp_path, monkeypatch, out, message):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "bundle")
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RobustEdgeError, match=message):
        verify_out("bundle", out)
