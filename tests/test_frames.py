import logging
import shutil

import numpy as np
import pytest

from mexp.data.datasets import DatasetError, load_dataset
from mexp.data.frames import FrameError, read_clip, sample_positions, window


def _copy(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


def test_temporal_normalisation_keeps_the_apex():
    nums = list(range(100, 131))
    pos = sample_positions(nums, apex=117, length=8)
    assert 17 in pos.tolist() and pos[0] == 0 and pos[-1] == 30 and len(pos) == 8


def test_interpolation_between_frames(tmp_path):
    import cv2
    paths = []
    for i, v in enumerate([0, 100]):
        p = tmp_path / f"img{i}.png"
        cv2.imwrite(str(p), np.full((4, 4), v, np.uint8))
        paths.append(p)
    clip = read_clip(paths, [0, 1], None, 3, "gray", 4)
    assert clip.shape == (3, 4, 4, 1) and clip[:, 0, 0, 0].tolist() == [0, 50, 100]


def test_onset_beyond_the_clip_names_the_folder(tmp_path):
    with pytest.raises(FrameError, match="onset 99 is beyond the last frame 3"):
        window([(1, tmp_path / "a"), (3, tmp_path / "b")], 99, None, tmp_path)


def test_missing_frame_folder_names_it(synth_root, tiny_cfg, tmp_path):
    root = _copy(synth_root, tmp_path)
    shutil.rmtree(next((root / "sub02").iterdir()))
    tiny_cfg.data.root = str(root)
    with pytest.raises(FrameError, match=r"frame folder not found: .*sub02"):
        load_dataset(tiny_cfg.data)


def test_corrupt_image_names_the_file_and_skip_lists_it(synth_root, tiny_cfg, tmp_path, caplog):
    root = _copy(synth_root, tmp_path)
    clip = sorted((root / "sub03").iterdir())[0]
    bad = sorted(clip.glob("*.jpg"))[len(list(clip.glob("*.jpg"))) // 2]
    bad.write_bytes(b"not a jpeg")
    tiny_cfg.data.root = str(root)
    with pytest.raises(FrameError, match=bad.name):
        load_dataset(tiny_cfg.data)
    tiny_cfg.data.skip_bad_clips = True
    with caplog.at_level(logging.WARNING):
        cs = load_dataset(tiny_cfg.data)
    assert len(cs) == 41
    assert f"sub03_{clip.name}" in caplog.text and "skipped 1 bad clip" in caplog.text


def test_cache_is_rebuilt_when_a_frame_changes(synth_root, tiny_cfg, tmp_path, caplog):
    root = _copy(synth_root, tmp_path)
    tiny_cfg.data.root = str(root)
    first = load_dataset(tiny_cfg.data)
    frame = sorted(next((root / "sub01").iterdir()).glob("*.jpg"))[3]
    import cv2
    img = cv2.imread(str(frame), 0)
    cv2.imwrite(str(frame), 255 - img)
    with caplog.at_level(logging.INFO):
        second = load_dataset(tiny_cfg.data)
    assert "cache hits 41, decoded 1" in caplog.text
    assert second.digest != first.digest
    assert not list((tmp_path / "cache").rglob(".tmp-*"))   # atomic writes leave no temp files
    tiny_cfg.data.image_size = 24                            # preprocessing change: new key
    assert load_dataset(tiny_cfg.data).clips.shape[2] == 24


def test_empty_dataset_is_an_error(synth_root, tiny_cfg, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "coding.csv").write_text(
        "Subject,Filename,OnsetFrame,ApexFrame,OffsetFrame,Action Units,Estimated Emotion\n"
        "1,EP01,1,2,3,12,others\n")
    tiny_cfg.data.root = str(root)
    tiny_cfg.data.label_map = "megc2019_3"
    with pytest.raises(DatasetError, match="no clips left in .*coding.csv"):
        load_dataset(tiny_cfg.data)
    tiny_cfg.data.root = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="nowhere is not a folder"):
        load_dataset(tiny_cfg.data)


def test_flow28_benchmark_dataset(shared_data, tiny_cfg, monkeypatch):
    tiny_cfg.data.dataset = "megc2019_flow28"
    tiny_cfg.data.root = ""
    monkeypatch.setenv("MEXP_FLOW28", str(shared_data / "megc2019_flow28"))
    cs = load_dataset(tiny_cfg.data)
    assert cs.clips.shape == (442, 1, 28, 28, 3)
    assert len(set(cs.groups)) == 68
    assert np.bincount(cs.labels).tolist() == [250, 109, 83]
    per_image = cs.clips.reshape(442, -1, 3)
    assert (per_image.min(axis=1) == 0).all() and (per_image.max(axis=1) == 255).all()
    tiny_cfg.data.root = "${NO_SUCH_VAR:-/nowhere}/flow"
    monkeypatch.setenv("MEXP_FLOW28", "/nowhere")
    monkeypatch.setenv("MEXP_DATA", "/nowhere")
    with pytest.raises(DatasetError, match="flow benchmark not found"):
        load_dataset(tiny_cfg.data)


@pytest.mark.parametrize("dataset,frame_dir,name", [
    ("samm", "006/006_1_2", "006_{:05d}.jpg"),
    ("smic", "s3/micro/negative/s3_ne_03", "image{:06d}.bmp"),
    ("casme3", "spNO.1/a/color", "{}.jpg"),
])
def test_each_database_layout_reads_its_window(tmp_path, dataset, frame_dir, name):
    import cv2
    from mexp.data.frames import clip_folder, list_frames
    d = tmp_path / frame_dir
    d.mkdir(parents=True)
    for n in range(100, 112):
        cv2.imwrite(str(d / name.format(n)), np.full((20, 24), n, np.uint8))
    folder = clip_folder(tmp_path, frame_dir, dataset, frame_dir.split("/")[-1])
    win = window(list_frames(folder), 102, 109, folder)
    assert [n for n, _ in win] == list(range(102, 110))
    clip = read_clip([p for _, p in win], [n for n, _ in win], 105, 4, "gray", 16)
    assert clip.shape == (4, 16, 16, 1) and 105 in clip[:, 0, 0, 0].tolist()


def test_smic_release_without_the_micro_folder(tmp_path):
    import cv2
    from mexp.data.frames import clip_folder
    d = tmp_path / "s3" / "s3_ne_03"
    d.mkdir(parents=True)
    cv2.imwrite(str(d / "image000001.bmp"), np.zeros((8, 8), np.uint8))
    assert clip_folder(tmp_path, "s3/micro/negative/s3_ne_03", "smic", "s03_ne_03") == d
