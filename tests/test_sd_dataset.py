import pytest

from shared.errors import DatasetError
from shared.fixtures.images import make_image_folder
from shared.images.dataset import scan_dataset


def test_metadata_csv_with_quotes_and_commas(tmp_path):
    folder = make_image_folder(tmp_path / "d", count=3, captions="none")
    names = sorted(p.name for p in folder.glob("*.png"))
    (folder / "metadata.csv").write_text(
        'file,caption\n'
        f'{names[0]},"a red circle, flat style"\n'
        f'{names[1]},"she said ""hi"""\n'
        f'{names[2]},plain\n',
        encoding="utf-8",
    )
    scan = scan_dataset(folder)
    captions = {item.path.name: item.caption for item in scan.items}
    assert captions[names[0]] == "a red circle, flat style"
    assert captions[names[1]] == 'she said "hi"'
    assert scan.caption_source == "metadata.csv"
    assert "Found 3 images, 3 with captions" in scan.summary()


def test_txt_captions_and_uncaptioned_images_are_counted(tmp_path):
    folder = make_image_folder(tmp_path / "d", count=4, captions="txt")
    next(folder.glob("*.txt")).unlink()
    scan = scan_dataset(folder)
    assert len(scan.items) == 4 and scan.captioned == 3
    assert "Found 4 images, 3 with captions (.txt captions)" in scan.summary()


def test_metadata_naming_missing_files_gives_line_number(tmp_path):
    folder = make_image_folder(tmp_path / "d", count=2)
    with open(folder / "metadata.csv", "a", encoding="utf-8") as fh:
        fh.write("ghost.png,a ghost\nghost2.png,another\n")
    with pytest.raises(DatasetError, match=r"metadata.csv line 4: image 'ghost.png' not found in .* \(and 1 more rows\)"):
        scan_dataset(folder)


def test_metadata_row_pointing_outside_the_folder(tmp_path):
    folder = make_image_folder(tmp_path / "d", count=1, captions="none")
    make_image_folder(tmp_path / "secret", count=1, captions="none")
    (folder / "metadata.csv").write_text("file,caption\n../secret/000_red_circle.png,x\n")
    with pytest.raises(DatasetError, match="points outside"):
        scan_dataset(folder)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images in"):
        scan_dataset(tmp_path / "empty")


def test_unreadable_images_are_named_and_skipped(tmp_path):
    folder = make_image_folder(tmp_path / "d", count=3, captions="txt")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    scan = scan_dataset(folder)
    assert len(scan.items) == 3
    assert "skipped 1 unreadable: broken.png" in scan.summary()


def test_all_unreadable_is_an_error(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="none of the 1 images"):
        scan_dataset(folder)
