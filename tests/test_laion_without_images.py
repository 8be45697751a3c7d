"""An audit without the training images: precomputed embeddings and a metadata table (url,
caption, key) -> the duplicate finder -> the detector lists the images verification needs ->
(downloaded as img2dataset writes them) -> verification, with the verdicts of an audit that
held every image."""

from __future__ import annotations

import json
import shutil

import hydra
import numpy as np
import pandas as pd
from PIL import Image

from pipeline.data.embeddings_store import write_shard
from pipeline.detect.stage import run as run_detect_stage
from tests.conftest import compose_config
from tests.test_detect import PLANTED, build_run

N_CANDIDATES = 2
VERDICT_COLUMNS = ["prompt_id", "extracted", "samples_matched", "best_train_key", "best_distance", "n_candidates"]


def url_of(key: str) -> str:
    return f"https://images.example/{key}.jpg?size=large&name=a%20b"


def laion_embeddings(train, out, embedder) -> dict[str, np.ndarray]:
    """LAION's layout: img_emb + metadata (key, caption, url) of every training image, two shards."""
    keys = sorted(p.relative_to(train).with_suffix("").as_posix() for p in train.rglob("*.jpg"))
    vectors = embedder.embed([Image.open(train / f"{k}.jpg").convert("RGB") for k in keys])
    half = len(keys) // 2
    for shard, part in enumerate((slice(0, half), slice(half, None))):
        metadata = pd.DataFrame(
            {
                "key": keys[part],
                "caption": [(train / f"{k}.txt").read_text(encoding="utf-8") for k in keys[part]],
                "url": [url_of(k) for k in keys[part]],
            }
        )
        write_shard(out, shard, vectors[part], metadata)
    return {k: v.astype(np.float32) for k, v in zip(keys, vectors)}


def download_as_img2dataset(listed: pd.DataFrame, train, out) -> None:
    """What ``img2dataset --input_format parquet --url_col url --caption_col caption --output_format files``
    writes for the list: its own keys (a counter), the url in each record's .json."""
    folder = out / "00000"
    folder.mkdir(parents=True)
    for i, row in enumerate(listed.itertuples()):
        name = f"{i:09d}"
        source = row.url.removeprefix("https://images.example/").split(".jpg?")[0]
        shutil.copyfile(train / f"{source}.jpg", folder / f"{name}.jpg")
        (folder / f"{name}.txt").write_text(row.caption, encoding="utf-8")
        meta = {"url": row.url, "caption": row.caption, "key": name, "status": "success", "width": 64, "height": 64}
        (folder / f"{name}.json").write_text(json.dumps(meta), encoding="utf-8")


def detect(run_dir, embeddings, *overrides):
    cfg = compose_config(
        "detect",
        [
            f"run_dir={run_dir}",
            f"verify.embeddings_dir={embeddings}",
            f"verify.n_candidates={N_CANDIDATES}",
            "progress=false",
            *overrides,
        ],
    )
    return run_detect_stage(cfg), cfg


def test_candidates_list_download_and_verification(tmp_path, capsys):
    run = build_run(tmp_path)
    run_dir, train = run["run_dir"], run["train"]
    embedder = hydra.utils.instantiate(compose_config("detect").embedder)
    vectors = laion_embeddings(train, tmp_path / "laion_emb", embedder)

    # 1. No images: the detector lists what verification needs.
    summary, _ = detect(run_dir, tmp_path / "laion_emb")
    listed = pd.read_parquet(run_dir / "detect" / "candidates.parquet")
    assert summary.extracted is None
    assert "candidates.parquet" in capsys.readouterr().out

    # The list is each prompt's group, then each sample's N_CANDIDATES nearest training images
    # by the same embedding (brute force here), with the metadata's url and caption.
    selected = pd.read_parquet(run_dir / "dedup" / "selected.parquet")
    expected = {k for keys in selected["keys"] for k in keys}
    keys = sorted(vectors)
    matrix = np.stack([vectors[k] for k in keys])
    for pid in PLANTED:
        for path in sorted((run_dir / "generations" / pid).glob("*.png")):
            query = embedder.embed([Image.open(path).convert("RGB")])[0].astype(np.float32)
            expected |= {keys[i] for i in np.argsort(-(matrix @ query), kind="stable")[:N_CANDIDATES]}
    assert set(listed["key"]) == expected
    assert list(listed.columns) == ["url", "caption", "key"]
    for row in listed.itertuples():
        assert row.url == url_of(row.key)
        assert row.caption == (train / f"{row.key}.txt").read_text(encoding="utf-8")

    # 2. Downloaded with img2dataset (its own keys, the url kept), read under the list's keys.
    download_as_img2dataset(listed, train, tmp_path / "download")
    with_download, _ = detect(
        run_dir,
        tmp_path / "laion_emb",
        "data=files",
        f"data.path={tmp_path / 'download'}",
        f"data.key_table={run_dir / 'detect' / 'candidates.parquet'}",
    )
    verdicts = with_download.memorized_table[VERDICT_COLUMNS].sort_values("prompt_id").reset_index(drop=True)

    # 3. The same audit holding every training image gives the same verdicts.
    shutil.rmtree(run_dir / "detect")
    with_everything, _ = detect(run_dir, tmp_path / "laion_emb", "data=files", f"data.path={train}")
    reference = with_everything.memorized_table[VERDICT_COLUMNS].sort_values("prompt_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(verdicts, reference)
    assert verdicts.set_index("prompt_id").loc["00000", "extracted"]
    assert with_download.extracted == with_everything.extracted >= 1
