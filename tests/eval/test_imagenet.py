"""ImageNet variant layouts: WordNet-id folders (ImageNet, -Sketch, -R, -A), index folders (-V2), ObjectNet."""
import json
import os

import numpy as np
import pytest
from open_clip import IMAGENET_CLASSNAMES

from psdclip.core.errors import InputError
from psdclip.eval.imagenet import group_scores, imagenet_layout, imagenet_wnids

from helpers.datasets import image as _image, make_objectnet


def test_wordnet_subset_folders_map_onto_imagenet_classes(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and IMAGENET_CLASSNAMES[0] == "tench"
    picks = [wnids[999], wnids[1], wnids[409]]  # an ImageNet-R/-A-like subset, folders not in class order
    for w in picks:
        _image(tmp_path / w / "a.jpg")
    _image(tmp_path / picks[0] / "b.jpg")
    v = imagenet_layout(str(tmp_path))
    assert v.groups == [[1], [409], [999]] and v.classes == [1, 409, 999] and v.border == 0
    assert [IMAGENET_CLASSNAMES[g[0]] for g in v.groups] == ["goldfish", "analog clock", "toilet paper"]
    by_file = {os.path.relpath(f, tmp_path): int(l) for f, l in zip(v.files, v.labels)}
    assert by_file == {f"{wnids[1]}/a.jpg": 0, f"{wnids[409]}/a.jpg": 1, f"{wnids[999]}/a.jpg": 2,
                       f"{wnids[999]}/b.jpg": 2}


def test_v2_index_folders(tmp_path):
    for c in ("999", "0", "7"):
        _image(tmp_path / c / "x.jpeg")
    v = imagenet_layout(str(tmp_path))
    assert v.groups == [[0], [7], [999]]
    assert sorted(zip(map(os.path.basename, map(os.path.dirname, v.files)), v.labels.tolist())) == \
        [("0", 0), ("7", 1), ("999", 2)]


def test_objectnet_through_its_mapping_files(tmp_path):
    root = make_objectnet(tmp_path / "objectnet-1.0")
    for path in (root, root / "images"):  # the dataset folder or its images/ folder
        v = imagenet_layout(str(path))
        assert v.name == "objectnet" and v.border == 2
        assert v.groups == [[409, 530], [954]]  # Alarm clock -> analog + digital clock; Banana -> banana
        assert sorted(set(os.path.basename(os.path.dirname(f)) for f in v.files)) == ["alarm_clock", "banana"]
    # a class scores as the best of its ImageNet classes
    logits = np.array([[0.1, 0.9, 0.5], [0.2, 0.1, 0.7]])
    np.testing.assert_allclose(group_scores(logits, v.groups, v.classes), [[0.9, 0.5], [0.2, 0.7]])


@pytest.mark.parametrize("make, expect", [
    (lambda p: _image(p / "n99999999" / "a.jpg"), "'n99999999' is not an ImageNet-1k WordNet id"),
    (lambda p: _image(p / "cats" / "a.jpg"), "'cats' is not a WordNet id"),
    (lambda p: _image(p / "1000" / "a.jpg"), "'1000' is not an ImageNet class index"),
    (lambda p: os.makedirs(p / "n01440764"), "empty class folder"),
    (lambda p: (make_objectnet(p), os.remove(p / "mappings" / "pytorch_to_imagenet_2012_id.json")),
     "mapping file(s) missing: pytorch_to_imagenet_2012_id.json"),
    (lambda p: (make_objectnet(p), (p / "mappings" / "objectnet_to_imagenet_1k.json").write_text(
        json.dumps({"Banana": "plantain"}))), "'plantain' (for 'Banana') is not in imagenet_to_label_2012_v2"),
])
def test_bad_layouts_say_what_is_wrong(tmp_path, make, expect):
    make(tmp_path)
    with pytest.raises(InputError) as e:
        imagenet_layout(str(tmp_path))
    assert expect in str(e.value) and "\n" not in str(e.value)
