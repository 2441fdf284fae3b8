"""--local-root holds against a race: a file is opened beneath the root by file descriptors, so a folder swapped for a
link between the check of its path and its read cannot lead out of the root, and an error on the way ends the row."""
import os
import threading

import pytest

from psdclip.core import local


@pytest.fixture()
def tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    for k in range(20):
        (root / "a" / f"{k}.jpg").write_bytes(b"inside")
        (outside / f"{k}.jpg").write_bytes(b"SECRET")
    os.symlink("a", root / "alias")  # a link that stays inside: followed
    return root, outside


@pytest.fixture(params=["openat2", "fd walk"])
def how(request):
    """Both ways of opening beneath the root: the kernel's openat2, and the walk of directory fds without it."""
    before = local._have_openat2[0]
    local._have_openat2[0] = before and request.param == "openat2"
    if request.param == "openat2" and not before:
        pytest.skip("this kernel has no openat2")
    yield request.param
    local._have_openat2[0] = before


def test_a_folder_swapped_for_a_link_after_the_check_is_never_read(tree, how):
    root, outside = tree
    data, why = local.read("alias/3.jpg", str(root))
    assert why is None and data.getvalue() == b"inside"
    full, why = local.resolve("a/3.jpg", str(root))  # the check, as the list's clean stage makes it
    assert why is None
    os.rename(root / "a", root / "a.moved")  # ... then the folder becomes a link out of the root
    os.symlink(outside, root / "a")
    data, why = local.read_beneath(full[len("file://"):], str(root))
    assert data is None and why.startswith("outside --local-root"), why
    os.remove(root / "a")
    os.symlink("../outside", root / "a")  # a relative link out: refused the same way
    data, why = local.read_beneath(full[len("file://"):], str(root))
    assert data is None and why.startswith("outside --local-root"), why


def test_reads_racing_a_swapping_folder_get_inside_bytes_or_a_refusal(tree, how):
    """Reads of root/a/K.jpg while another thread swaps root/a for a link to the outside and back: every read gives
    the inside bytes or one refusal line, never the outside's bytes and never an exception (one run of the earlier
    reader stored 3 outside files of 380)."""
    root, outside = tree
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            os.rename(root / "a", root / "a.real")
            os.symlink(outside, root / "a")
            os.remove(root / "a")
            os.rename(root / "a.real", root / "a")

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    seen = {"inside": 0, "refused": 0}
    try:
        for i in range(3000):
            data, why = local.read(f"a/{i % 20}.jpg", str(root))
            assert data is None or data.getvalue() == b"inside", "read a file outside the root"
            seen["inside" if data is not None else "refused"] += 1
    finally:
        stop.set()
        t.join()
    assert seen["inside"] > 0 and seen["refused"] > 0, seen  # the race was run on both sides
