"""pipeline/storage.py's object-store semantics on fsspec's in-memory file system (the S3 tests run the same code
against moto), beside the local ones."""
import pytest

from psdclip.core import storage


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "ds")
        return
    import fsspec
    import uuid

    url = f"memory://psdclip-test-{uuid.uuid4().hex[:8]}/ds"
    yield url
    fsspec.filesystem("memory").rm(url.split("://", 1)[1], recursive=True)


def test_files_folders_and_listings(root):
    J = storage.join
    assert storage.resolve(root + "/") == (root if storage.is_remote(root) else storage.resolve(root))
    assert not storage.exists(root) and storage.listdir(root) == [] and storage.glob(root, "*") == []
    storage.makedirs(J(root, "empty"))
    assert storage.isdir(J(root, "empty")) and storage.listdir(J(root, "empty")) == []  # (.keep not listed)
    with storage.atomic_path(J(root, "a", "x.bin")) as tmp:
        storage.ensure_parent(J(root, "a", "x.bin"))
        with open(tmp, "wb") as f:
            f.write(b"12345")
    with pytest.raises(RuntimeError):  # a failed writer leaves nothing behind
        with storage.atomic_path(J(root, "a", "y.bin")) as tmp:
            open(tmp, "wb").close()
            raise RuntimeError
    assert storage.listdir(J(root, "a")) == ["x.bin"] and storage.size(J(root, "a", "x.bin")) == 5
    assert storage.isfile(J(root, "a", "x.bin")) and not storage.isdir(J(root, "a", "x.bin"))
    storage.copy(J(root, "a", "x.bin"), J(root, "a", "z.bin"))
    assert {k.rsplit("/", 1)[-1]: v for k, v in storage.sizes(J(root, "a"), "*.bin").items()} == {"x.bin": 5, "z.bin": 5}
    with storage.open_file(J(root, "a", "z.bin")) as f:
        assert f.read() == b"12345"
    storage.remove(J(root, "a", "z.bin"))
    storage.remove(J(root, "a", "z.bin"))  # gone already: no error
    assert storage.glob(J(root, "a"), "*.bin") == [J(root, "a", "x.bin")]


@pytest.mark.parametrize("in_place", [True, False])
def test_a_folder_is_published_whole_with_its_commit_file_last(root, in_place):
    J = storage.join
    final = J(root, "ingests", "00001")
    storage.makedirs(J(root, "ingests"))
    # what a crashed attempt left at the final name
    with storage.atomic_path(J(final, "stale.bin")) as tmp:
        storage.ensure_parent(J(final, "stale.bin"))
        open(tmp, "wb").close()
    folder = storage.staging_dir(final) if in_place else storage.tmp_name(final, False)
    if not storage.is_remote(root):
        storage.rmtree(final)  # (locally the rename needs the final name free; a build never reuses one)
    for name in ("shards/00000.arrow", "shards/00001.arrow", "inputs.json"):
        with storage.atomic_path(J(folder, name)) as tmp:
            storage.ensure_parent(J(folder, name))
            with open(tmp, "w") as f:
                f.write(name)
    storage.publish_dir(folder, final, last="inputs.json")
    assert sorted(storage.listdir(final)) == ["inputs.json", "shards"]
    assert sorted(storage.listdir(J(final, "shards"))) == ["00000.arrow", "00001.arrow"]
    assert sorted(storage.listdir(J(root, "ingests"))) == ["00001"]  # nothing left at the temporary name
