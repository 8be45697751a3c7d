"""The pair verifier (pipeline/dedup/pair_verify.py) and the verify phase's work
(pipeline/dedup/verification.py): two images decided alone, and a task's share of the pairs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from pipeline.cli import ConfigError
from pipeline.dedup.index import Pairs
from pipeline.dedup.pair_verify import VerifySettings, ambiguous, compare, decide, measure, prepare, verify_pair
from pipeline.dedup.settings import settings_from_config, verify_from_config
from pipeline.dedup.verification import owned_candidates, pair_chunks, verify_candidates

from .conftest import compose_config
from .test_planted_edits import planted


def stored(image: Image.Image, quality: int = 95) -> Image.Image:
    """``image`` as img2dataset stores it and the data layer reads it back."""
    return planted.decode(planted.img2dataset_resize(planted.jpeg_bytes(image, quality))[0])


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(11)
    return [planted.photo_like(rng, planted.random_size(rng)) for _ in range(3)] + [planted.skimage_crop(rng, "astronaut")]


def test_an_image_is_its_own_copy(pictures):
    """The same pixels align by the identity: every correlation 1, nothing changed, colour residual 0."""
    for picture in pictures:
        verdict = verify_pair(picture, picture)
        assert verdict.match and not verdict.mirrored
        assert verdict.structure == pytest.approx(1.0, abs=1e-4) and verdict.changed == 0.0
        assert verdict.colour == pytest.approx(0.0, abs=1e-4)


def test_a_mirrored_copy_matches_mirrored(pictures):
    """The mirrored orientation is the one that matches: unmirrored, a photograph is another picture."""
    for picture in pictures:
        verdict = verify_pair(picture, ImageOps.mirror(picture))
        assert verdict.match and verdict.mirrored


def test_a_greyscale_copy_is_judged_without_colour(pictures):
    for picture in pictures:
        verdict = verify_pair(picture, ImageOps.grayscale(picture).convert("RGB"))
        assert verdict.match and math.isnan(verdict.colour)


def test_letterbox_bars_are_cut(pictures):
    """Black bars inside img2dataset's white border: both cut, so the copy aligns by the identity."""
    for picture in pictures:
        w, h = picture.size
        boxed = Image.new("RGB", (w, h + h // 3), (0, 0, 0))
        boxed.paste(picture, (0, h // 6))
        verdict = verify_pair(stored(picture), stored(boxed))
        assert verdict.match, verdict


def test_other_pictures_do_not_match(pictures):
    """Distinct pictures of one kind: no pair is one picture."""
    for a in range(len(pictures)):
        for b in range(a + 1, len(pictures)):
            assert not verify_pair(stored(pictures[a]), stored(pictures[b])).match


def test_look_alikes_that_fool_the_embedder_are_told_apart():
    """Posters of one template (only the title and one block differ), tiles of one picture and
    gradients of distinct colours: the embedder puts some of them above its threshold; the
    verifier must refuse every pair."""
    rng = np.random.default_rng(4)
    for images in (planted.posters(rng, 6), planted.tiles(rng, 9), planted.distinct_gradients(rng, 8)):
        prepared = [prepare(stored(im)) for im in images]
        for a in range(len(prepared)):
            for b in range(a + 1, len(prepared)):
                assert not compare(prepared[a], prepared[b]).match, (a, b)


def test_decide_reproduces_the_verdicts_own_match(pictures):
    """:func:`decide` under the settings a verdict was measured with gives its ``match``; under
    a colour limit of 0 a pair with any colour residual is refused."""
    settings = VerifySettings()
    verdicts = measure(prepare(pictures[0]), prepare(ImageOps.mirror(pictures[1])))
    verdicts += measure(prepare(pictures[0]), prepare(ImageOps.mirror(pictures[0])))
    assert verdicts
    for verdict in verdicts:
        assert decide(verdict, settings) == verdict.match
        if verdict.colour > 0:
            assert not decide(verdict, dataclasses.replace(settings, max_colour=0.0))


def test_settings_out_of_range_name_their_key():
    with pytest.raises(ValueError, match="verify.min_structure"):
        VerifySettings(min_structure=2.0)
    with pytest.raises(ValueError, match="verify.side"):
        VerifySettings(side=8)
    base = {"threshold": 0.9, "k": 32, "top_k": 5, "min_group_size": 2, "batch_size": 8, "index": {}}
    with pytest.raises(ConfigError, match="verify.max_colour"):
        settings_from_config(OmegaConf.create({**base, "verify": {"max_colour": 3.0}}))
    with pytest.raises(ConfigError, match=r"verify: unknown keys \['min_structur'\]"):
        verify_from_config(OmegaConf.create({"verify": {"min_structur": 0.5}}))
    with pytest.raises(ConfigError, match="verify.chunk_images"):
        verify_from_config(OmegaConf.create({"verify": {"chunk_images": 1}}))
    stage = verify_from_config(OmegaConf.create({"verify": {"enabled": False, "min_structure": 0.7}}))
    assert stage.enabled is False and stage.pair.min_structure == 0.7


# ----------------------------------------------------------------------------------------
# A task's share of the pairs


def write_pair_file(path, i, j, sim):
    from pipeline.dedup.buckets import write_pairs

    write_pairs(path, Pairs(np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(sim, np.float32)))


def test_every_candidate_pair_is_owned_by_one_task_once(tmp_path):
    """Pairs in both directions and split over files: the tasks' shares partition the undirected pairs."""
    rng = np.random.default_rng(0)
    n = 50
    i, j = rng.integers(0, n, 400), rng.integers(0, n, 400)
    i, j = i[i != j], j[i != j]
    sim = rng.uniform(0.5, 1.0, len(i)).astype(np.float32)
    files = [tmp_path / "a.npy", tmp_path / "b.npy"]
    half = len(i) // 2
    write_pair_file(files[0], i[:half], j[:half], sim[:half])
    write_pair_file(files[1], j[half:], i[half:], sim[half:])  # the other direction
    expected = {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())}
    for world_size in (1, 3):
        shares = []
        for rank in range(world_size):
            lo, hi = n * rank // world_size, n * (rank + 1) // world_size
            pairs = owned_candidates(files, n, lo, hi, k=None, chunk_rows=7)
            assert (pairs.i < pairs.j).all() and ((pairs.i >= lo) & (pairs.i < hi)).all()
            shares.extend(zip(pairs.i.tolist(), pairs.j.tolist()))
        assert len(shares) == len(set(shares)) and set(shares) == expected


def test_chunks_hold_at_most_chunk_images_images():
    rng = np.random.default_rng(1)
    i, j = rng.integers(0, 40, 300), rng.integers(0, 40, 300)
    for limit in (2, 3, 10):
        covered = 0
        for part in pair_chunks(i, j, limit):
            assert len(set(i[part]) | set(j[part])) <= limit
            covered += part.stop - part.start
        assert covered == len(i)


def test_verified_components_do_not_depend_on_the_chunks():
    """Copies and strangers in one list of candidates: the components of the kept pairs and
    the grey image's best ambiguous matches are those of every matching pair, however many
    images a chunk holds; a pair whose image cannot be fetched is counted and not kept."""
    from pipeline.dedup.grouping import connected_groups
    from pipeline.dedup.verification import best_for_grey

    rng = np.random.default_rng(2)
    originals = [planted.photo_like(rng, planted.random_size(rng)) for _ in range(3)]
    images = [stored(im) for im in originals] + [stored(ImageOps.mirror(im), 60) for im in originals]
    images += [stored(ImageOps.grayscale(originals[0]).convert("RGB"))]
    keys = [f"k{r}" for r in range(len(images))]
    n = len(images)
    i, j = np.triu_indices(n, 1)
    pairs = Pairs(i.astype(np.int64), j.astype(np.int64), np.linspace(1.0, 0.5, len(i)).astype(np.float32))
    truth = connected_groups(n, [0, 1, 2, 0], [3, 4, 5, 6])

    def key_of(rows):
        return [keys[r] for r in rows]

    results = []
    for chunk in (2, 3, n):
        fetched = []

        def fetch(wanted, fetched=fetched):
            fetched.append(len(wanted))
            return {k: images[keys.index(k)] for k in wanted}

        kept, unsure, counts = verify_candidates(pairs, key_of, fetch, VerifySettings(), chunk)
        # The grey copy's matches with pictures in colour are ambiguous (only those, and all
        # of them: a pair with a grey image is always compared); its best is its original.
        assert sorted(zip(unsure["i"].tolist(), unsure["j"].tolist())) == [(0, 6), (3, 6)]
        assert max(fetched) <= chunk and counts.candidates == len(i) and counts.unfetched == 0
        best = unsure[best_for_grey(unsure)]
        groups = connected_groups(n, np.r_[kept.i, best["i"]], np.r_[kept.j, best["j"]])
        assert len(set(zip(groups.tolist(), truth.tolist()))) == len(set(truth.tolist())) == len(set(groups.tolist()))
        results.append(groups)
    kept, _, counts = verify_candidates(
        pairs, key_of, lambda wanted: {k: images[keys.index(k)] for k in wanted if k != "k6"}, VerifySettings(), n
    )
    assert counts.unfetched == n - 1 and 6 not in set(kept.i.tolist()) | set(kept.j.tolist())


def test_a_grey_image_joins_only_its_best_ambiguous_matches():
    """Grey image 0 matches 1 and 3 at 0.99 (a tie: both count) and 2 at 0.9 (does not count);
    grey 4's only match counts although image 5 (in colour) has a better one; a pair of two
    images in colour never counts, one of two grey images does. The choice does not depend on
    the rows' order."""
    from pipeline.dedup.verification import AMBIGUOUS, best_for_grey

    rows = [(0, 1, 0.99, True, False), (0, 2, 0.9, True, False), (3, 0, 0.99, False, True), (4, 5, 0.8, True, False)]
    rows += [(5, 6, 0.95, False, False), (7, 8, 0.5, True, True)]
    table = np.array(rows, dtype=AMBIGUOUS)
    expected = [True, False, True, True, False, True]
    assert best_for_grey(table).tolist() == expected
    order = np.random.default_rng(0).permutation(len(table))
    assert best_for_grey(table[order]).tolist() == [expected[k] for k in order]
    assert best_for_grey(table[:0]).tolist() == []


def test_the_stage_config_holds_the_verifiers_defaults():
    """conf/dedup.yaml's verifier settings are VerifySettings' defaults (those the planted-edits
    sweep reports as the defaults), and its candidate threshold is the default embedder's."""
    from pipeline.embedders.robust import RobustEmbedder

    stage = settings_from_config(compose_config("dedup")).verify
    assert stage.pair == VerifySettings() and stage.enabled is None
    assert stage.candidate_threshold == RobustEmbedder().candidate_threshold
    assert settings_from_config(compose_config("dedup", ["embedder=thumbnail"])).verify.candidate_threshold is None


def test_each_images_nearest_are_candidates_down_to_the_floor(tmp_path):
    """A pair below the candidate threshold is a candidate when it is either image's nearest
    (``neighbours`` 1), whichever direction the search wrote it in; not otherwise."""
    files = [tmp_path / "pairs.npy"]
    # (query, neighbour, similarity): each query's list as the search writes it (the floor is the search's own).
    rows = [
        (0, 1, 0.9),
        (0, 2, 0.45),
        (0, 3, 0.42),
        (2, 0, 0.45),
        (3, 5, 0.5),
        (3, 0, 0.42),
        (4, 5, 0.41),
        (5, 3, 0.5),
        (5, 4, 0.41),
    ]
    write_pair_file(files[0], *zip(*rows))
    found = owned_candidates(files, 6, 0, 6, k=None, chunk_rows=4, threshold=0.6, neighbours=1)
    assert set(zip(found.i.tolist(), found.j.tolist())) == {(0, 1), (0, 2), (3, 5), (4, 5)}
    found = owned_candidates(files, 6, 0, 6, k=None, chunk_rows=4, threshold=0.6, neighbours=0)
    assert set(zip(found.i.tolist(), found.j.tolist())) == {(0, 1)}
    found = owned_candidates(files, 6, 0, 6, k=None, chunk_rows=4)
    assert len(found) == 5


def test_a_texture_the_embedder_scatters_is_grouped_through_its_copies_nearest(tmp_path):
    """Crops of a brick texture: a crop reshuffles its low frequencies, so the embedder places
    the copies far apart (similarities around 0-0.6), yet each copy's nearest is another copy;
    with the stage's defaults (each image's 8 nearest down to the floor are candidates) the
    verifier joins every copy and nothing else; with candidates at the threshold alone it
    does not."""
    import skimage.data

    rng = np.random.default_rng(3)
    brick = Image.fromarray(skimage.data.brick()).convert("RGB")
    records = [planted.PlantedRecord(planted.jpeg_bytes(brick, 95), "a brick wall", "brick", "texture", 13, ["original"])]
    for _ in range(12):
        copy, applied, quality = planted.edit_copy(brick, rng, {"crop": 1.0})
        records.append(planted.PlantedRecord(planted.jpeg_bytes(copy, quality), "a brick wall", "brick", "texture", 13, applied))
    for k in range(24):
        picture = planted.photo_like(rng, planted.random_size(rng))
        records.append(
            planted.PlantedRecord(planted.jpeg_bytes(picture, 95), f"photo {k}", f"photo-{k}", "photo", 1, ["original"])
        )
    planted.write_planted(tmp_path, records, formats=("files",))
    from pipeline.embedders.robust import RobustEmbedder

    embedder = RobustEmbedder()
    found = planted.score_with_dedup(tmp_path, "files", embedder, run_dir=tmp_path / "runs" / "defaults")
    assert found["precision"] == 1.0 and found["recall"] == 1.0, found
    alone = planted.score_with_dedup(tmp_path, "files", embedder, run_dir=tmp_path / "runs" / "alone", candidate_neighbours=0)
    assert alone["recall"] < 1.0, alone


def test_a_flat_field_is_not_a_copy_of_a_picture_with_contrast():
    """A flat grey field and a grey ramp of the same mean: neither has detail, and only one is
    flat; a copy keeps its luminance contrast (greyscale keeps luminance), so they differ. Two
    flat fields of one brightness, with nothing else to tell them apart, match."""
    rng = np.random.default_rng(0)
    flat = np.full((200, 300), 120.0) + rng.normal(0, 0.5, (200, 300))
    ramp = np.linspace(80, 160, 200)[:, None] + np.zeros((1, 300))

    def grey(array):
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")

    verdict = verify_pair(stored(grey(flat)), stored(grey(ramp)))
    assert not verdict.match, verdict
    assert verify_pair(stored(grey(flat)), stored(grey(flat + 2.0))).match


def test_a_drawing_on_a_light_ground_keeps_its_ground():
    """A drawing on a near-white ground, stored as img2dataset stores it (centred on pure
    white): only the padding is cut, not the drawing's own ground up to its first stroke
    (which a crop changes from copy to copy): what is compared is the whole drawing."""
    drawing = Image.new("RGB", (400, 300), (244, 246, 243))
    ImageDraw.Draw(drawing).ellipse((170, 120, 230, 180), outline=(20, 20, 20), width=3)
    settings = VerifySettings()
    side = settings.side
    whole = np.asarray(drawing.convert("L").resize((side, side), Image.Resampling.BICUBIC), np.float32) / 255
    prepared = prepare(stored(drawing), settings).luma
    # The inset cuts 2 px of 128 past the padding: the kept part lies within 4% of the whole.
    inner = slice(side // 12, side - side // 12)
    assert np.corrcoef(prepared[inner, inner].ravel(), whole[inner, inner].ravel())[0, 1] > 0.8


def wallpaper(seed: int, ground: tuple[int, int, int] = (225, 110, 235), motif: int = 24) -> Image.Image:
    """A 640 x 427 wallpaper: a ``motif`` px tile of three random shapes on ``ground``, repeated,
    every other row offset by half a tile (at the verifier's 96 px its period is under 4 px)."""
    rng = np.random.default_rng(seed)
    tile = Image.new("RGB", (motif, motif), ground)
    draw = ImageDraw.Draw(tile)
    for _ in range(3):
        x0, y0 = rng.integers(0, motif - 6, size=2).tolist()
        x1, y1 = x0 + int(rng.integers(3, 7)), y0 + int(rng.integers(3, 7))
        (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(
            (x0, y0, x1, y1), fill=tuple(rng.integers(0, 256, size=3).tolist())
        )
    image = Image.new("RGB", (640, 427))
    for row, y in enumerate(range(0, 427, motif)):
        for x in range(-motif, 640, motif):
            image.paste(tile, (x + (motif // 2 if row % 2 else 0), y))
    return image


def cropped_copy(image: Image.Image) -> Image.Image:
    """A web copy: 7% cut from the left and 3% from the bottom (the aspect changes), shrunk to
    40%, saved at JPEG quality 50, then stored as img2dataset stores it."""
    w, h = image.size
    small = image.crop((round(0.07 * w), 0, w, h - round(0.03 * h))).resize(
        (round(0.4 * w), round(0.4 * h)), Image.Resampling.LANCZOS
    )
    return stored(planted.decode(planted.jpeg_bytes(small, 50)))


def test_a_wallpapers_cropped_copy_is_matched_on_its_lattice():
    """A fine wallpaper's copy, cropped unevenly and shrunk: at 96 px its motif is lost, at
    ``lattice_side`` (192) aligned on the spectral peaks it is the same picture; another
    motif on the same ground and lattice is not. A photograph is no lattice (no extra cost)."""
    original, other = stored(wallpaper(1)), cropped_copy(wallpaper(2))
    copy = cropped_copy(wallpaper(1))
    settings = VerifySettings()
    assert prepare(copy, settings).lattice is not None and prepare(original, settings).lattice is not None
    verdict = verify_pair(original, copy, settings)
    assert verdict.match and verdict.structure >= settings.min_structure
    assert not verify_pair(original, copy, dataclasses.replace(settings, lattice_side=0)).match
    assert not verify_pair(original, other, settings).match
    rng = np.random.default_rng(11)
    assert prepare(planted.photo_like(rng, (400, 300)), settings).lattice is None


def test_a_wallpapers_copy_is_its_candidate_through_the_lattice_share():
    """The embedder proposes the copy: its low frequencies are JPEG noise and a crop reshuffles
    them, its spectrum's sharp peaks (the lattice share) stay; without that share's ramp the
    two are unrelated."""
    from pipeline.embedders.robust import RobustEmbedder

    pair = [stored(wallpaper(1)), cropped_copy(wallpaper(1))]
    embedder = RobustEmbedder()
    a, b = embedder.embed(pair)
    assert float(a @ b) >= embedder.candidate_floor
    a, b = RobustEmbedder(lattice_from=0.98, lattice_full=0.99).embed(pair)
    assert float(a @ b) < embedder.candidate_floor


def test_a_wide_and_a_tall_texture_that_agree_once_squared_are_two_pictures():
    """A sinusoidal stripe texture drawn wide (300 x 180) and another drawn tall (180 x 300),
    the second grey, whose squares are the same stripes: without the aspect check they match
    (nothing else tells a grey copy apart); with the default ``max_aspect_ratio`` (2) they are
    two pictures (aspects 5/3 and 3/5: 25/9 apart, by arithmetic). A cropped copy of the wide
    one (7% of its width and 3% of its height cut, a 1.04 change) still matches."""
    y, x = np.mgrid[0:400, 0:400].astype(np.float32) / 400
    stripes = (np.sin(2 * np.pi * 5 * (x * np.cos(0.6) + y * np.sin(0.6))) + 1) / 2
    red, green = np.array([200.0, 40, 40]), np.array([40.0, 190, 60])
    square = Image.fromarray((red + stripes[..., None] * (green - red)).astype(np.uint8))
    wide = square.resize((300, 180), Image.Resampling.LANCZOS)
    tall = ImageOps.grayscale(square).convert("RGB").resize((180, 300), Image.Resampling.LANCZOS)
    settings = VerifySettings()
    unchecked = verify_pair(stored(wide), stored(tall), dataclasses.replace(settings, max_aspect_ratio=10.0))
    assert unchecked.match, unchecked
    verdict = verify_pair(stored(wide), stored(tall), settings)
    assert not verdict.match and verdict.aspect_ratio > settings.max_aspect_ratio, verdict
    assert verify_pair(stored(wide), cropped_copy(wide), settings).match


def stripe_texture(angle: float, periods: float, low, high, size=(320, 240)) -> Image.Image:
    """A sinusoidal stripe texture: ``periods`` periods across the width, at ``angle`` radians,
    from colour ``low`` to ``high``."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / w
    t = (np.sin(2 * np.pi * periods * (x * np.cos(angle) + y * np.sin(angle))) + 1) / 2
    return Image.fromarray((np.array(low, np.float32) + t[..., None] * (np.subtract(high, low))).astype(np.uint8))


def test_a_grey_copy_joins_the_one_picture_it_matches_best():
    """A grey copy of a red and green stripe texture matches its original and, in luminance,
    a purple and blue texture whose stripes are 2 degrees and 4% finer apart: both matches are
    ambiguous (no colour to tell), only the better scored counts (one picture, whichever it
    is), so the two textures stay apart; the two in colour do not match at all."""
    from pipeline.dedup.grouping import connected_groups
    from pipeline.dedup.verification import best_for_grey

    original = stripe_texture(0.6, 5.0, (200, 40, 40), (40, 190, 60))
    other = stripe_texture(0.6 + math.radians(2), 5.2, (150, 60, 100), (60, 150, 200))
    grey = ImageOps.grayscale(original).convert("RGB")
    images = [stored(original), stored(other), stored(grey, 60)]
    settings = VerifySettings()
    with_other = verify_pair(images[2], images[1], settings)
    assert with_other.match and ambiguous(with_other, settings)  # in luminance, the other texture is a copy too
    assert not verify_pair(images[0], images[1], settings).match
    pairs = Pairs(np.array([0, 0, 1], np.int64), np.array([1, 2, 2], np.int64), np.ones(3, np.float32))
    keys = ["a", "b", "c"]
    kept, unsure, _ = verify_candidates(
        pairs, lambda rows: [keys[r] for r in rows], lambda wanted: {k: images[keys.index(k)] for k in wanted}, settings, 3
    )
    assert len(kept) == 0 and len(unsure) == 2
    counts = best_for_grey(unsure)
    assert counts.sum() == 1 and unsure["score"][counts][0] == unsure["score"].max()
    groups = connected_groups(3, unsure["i"][counts], unsure["j"][counts])
    assert groups[0] != groups[1]


def test_tiles_of_one_smooth_picture_are_told_apart_by_their_faint_texture():
    """Two side by side tiles of one smooth picture (a brightness ramp and faint blobs), each
    with its own faint texture (a high-pass standard deviation near 0.009 at 96 px, between
    ``faint_floor`` and ``detail_floor``): their tones run alike (a ramp resembles any ramp,
    correlation 0.95-0.98), their textures do not correlate, so they are two pictures; a
    shrunk JPEG copy of one still matches it."""
    import cv2

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:720, 0:900].astype(np.float32)
    blobs = cv2.GaussianBlur(rng.normal(0, 1, (720, 900)).astype(np.float32), (0, 0), 40)
    texture = cv2.GaussianBlur(rng.normal(0, 1, (720, 900)).astype(np.float32), (0, 0), 3)
    luminance = 60 + 120 * x / 900 + 40 * y / 720 + blobs * (3.0 / blobs.std()) + texture * (2.5 / texture.std())
    big = Image.fromarray(np.clip(np.stack([luminance * 1.1, luminance * 0.9, luminance * 0.7], -1), 0, 255).astype(np.uint8))
    left, right = big.crop((0, 0, 300, 240)), big.crop((300, 0, 600, 240))
    settings = VerifySettings()
    verdict = verify_pair(stored(left), stored(right), settings)
    assert not verdict.match and settings.faint_floor <= verdict.detail < settings.detail_floor, verdict
    # Without the faint texture's rule, the tone alone decides, and it matches.
    assert verify_pair(stored(left), stored(right), dataclasses.replace(settings, min_tone_faint=settings.min_tone)).match
    small = left.resize((200, 160), Image.Resampling.LANCZOS)
    assert verify_pair(stored(left), stored(planted.decode(planted.jpeg_bytes(small, 50))), settings).match


def line_chart(seed: int) -> Image.Image:
    """A 480 x 360 grey line chart: thick axes, a grid and a title shared by every seed, and
    one thin line of its own (a random walk drawn from ``seed``)."""
    image = Image.new("RGB", (480, 360), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 10, 300, 30), fill=(40, 40, 40))  # the title bar
    for k in range(5):
        draw.line((60, 300 - 60 * k, 460, 300 - 60 * k), fill=(215, 215, 215), width=1)
    draw.line((60, 50, 60, 300), fill=(0, 0, 0), width=4)
    draw.line((60, 300, 460, 300), fill=(0, 0, 0), width=4)
    rng = np.random.default_rng(seed)
    xs = np.linspace(64, 456, 25)
    ys = 300 - np.clip(np.cumsum(rng.normal(0, 0.12, len(xs))) + rng.uniform(0.3, 0.7), 0, 1) * 240
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(90, 90, 90), width=2)
    return image


def test_line_charts_of_one_layout_are_told_apart_tile_by_tile():
    """Two grey line charts of one layout whose lines differ correlate overall (the axes and
    the title bar carry most of the detail) but not in the tiles the lines cross: two
    pictures; a shrunk JPEG copy of one still matches it."""
    settings = VerifySettings()
    a, b = stored(line_chart(3)), stored(line_chart(4))
    overall = verify_pair(a, b, dataclasses.replace(settings, min_local_structure=-1.0))
    assert overall.match, overall  # without the tiles, one picture
    verdict = verify_pair(a, b, settings)
    assert not verdict.match and verdict.local_structure < settings.min_local_structure, verdict
    small = line_chart(3).resize((300, 225), Image.Resampling.LANCZOS)
    copy = verify_pair(a, stored(planted.decode(planted.jpeg_bytes(small, 50))), settings)
    assert copy.match and copy.local_structure >= settings.min_local_structure, copy


def test_a_gradient_of_one_luminance_is_matched_by_its_colour():
    """A gradient between two colours of nearly one luminance, and a copy with a thin white rule
    across it: the copy's contrast comes from the rule alone (the original's is below
    ``near_flat_floor``, the copy's above it) and its tone does not correlate, so colour
    decides; a gradient of the same shape between two other colours is another picture."""
    rng = np.random.default_rng(0)
    colours, others = (
        np.array([planted.colour_of_luminance(rng, 0.35), planted.colour_of_luminance(rng, 0.38)], np.float32) for _ in range(2)
    )
    original = planted.gradient(np.random.default_rng(1), colours)
    other = planted.gradient(np.random.default_rng(1), others)  # one seed: the same size and direction, other colours
    ruled = original.copy()
    w, h = ruled.size
    ImageDraw.Draw(ruled).rectangle((0, h // 12, w, h // 12 + max(2, h // 40)), fill=(255, 255, 255))
    settings = VerifySettings()
    a, b, c = stored(original), stored(ruled, 70), stored(other)
    verdict = verify_pair(a, b, settings)
    larger = verdict.contrast * verdict.contrast_ratio
    assert verdict.contrast < settings.near_flat_floor <= larger and verdict.tone < settings.min_tone  # what makes the case
    assert verdict.match and verdict.colour <= settings.near_flat_colour
    assert not verify_pair(a, c, settings).match and not verify_pair(b, c, settings).match


def test_a_product_shot_on_white_is_matched_on_its_ground_whatever_ground_its_copy_keeps():
    """A product shot on white and a cropped greyscale copy padded with white above and below:
    the bar cut takes as much of the white as reaches each side, so the two trimmed pictures
    differ in shape beyond any plausible warp and do not match (the case); centred on their
    ground, they are one picture. Other product shots (one maker, other seeds) stay apart."""
    original = planted.product(np.random.default_rng(0))
    w, h = original.size
    box = (int(0.07 * w), int(0.02 * h), w - int(0.06 * w), h - int(0.05 * h))
    cropped = ImageOps.grayscale(original.crop(box)).convert("RGB")
    padded = Image.new("RGB", (cropped.width, int(cropped.height * 1.5)), (255, 255, 255))
    padded.paste(cropped, (0, int(cropped.height * 0.25)))
    settings = VerifySettings()
    trimmed_only = dataclasses.replace(settings, ground_view=False)
    a, b = stored(original), stored(padded, 60)
    pa, pb = prepare(a, settings), prepare(b, settings)
    assert pa.ground is not None and pb.ground is not None
    assert max(pa.aspect, pb.aspect) / min(pa.aspect, pb.aspect) > settings.max_aspect_ratio  # what makes the case
    assert not verify_pair(a, b, trimmed_only).match
    verdict = compare(pa, pb, settings)
    assert verdict.match and verdict.view == "ground" and verdict.structure >= settings.min_structure_ground
    others = [prepare(stored(planted.product(np.random.default_rng(seed))), settings) for seed in range(1, 8)]
    for prepared in [pa, *others]:
        for other in others:
            if other is not prepared:
                assert not compare(prepared, other, settings).match


def test_only_a_picture_on_a_plain_ground_has_a_ground_view(pictures):
    """A photograph's edges hold picture; a shape off centre on a ground of one colour, black,
    white or grey, has one (the bar cut, centred, leaves it some of a black or white ground,
    all of a grey one), and its shape is the content's whatever the ground around it (the same
    product shot padded with more white on one side gives the same aspect, up to the
    resampling of the working copy: within 10%). Off with ``ground_view=False``."""
    # (A picture cut by the bars down to its content on most of its edges has none: the bar cut
    # then leaves little ground to vary, and no edge tells the ground's colour.)
    settings = VerifySettings()
    for picture in pictures:
        assert prepare(stored(picture), settings).ground is None
    for ground in ((0, 0, 0), (255, 255, 255), (128, 128, 128)):
        shape = Image.new("RGB", (300, 200), ground)
        ImageDraw.Draw(shape).ellipse((40, 30, 160, 130), fill=(200, 60, 40))
        assert prepare(shape, settings).ground is not None, ground
    product = planted.product(np.random.default_rng(0))
    wider = Image.new("RGB", (product.width * 3 // 2, product.height), (255, 255, 255))
    wider.paste(product, (product.width // 2, 0))
    views = [prepare(stored(image), settings).ground for image in (product, wider)]
    assert views[0] is not None and views[1] is not None
    assert views[0].aspect == pytest.approx(views[1].aspect, rel=0.1)
    assert prepare(stored(product), dataclasses.replace(settings, ground_view=False)).ground is None


def test_a_copy_whose_white_ground_an_edit_made_grey_is_matched_on_its_ground():
    """A brightness and contrast edit (0.85 and 0.8) turns a product shot's white ground light
    grey: no bar, so the copy keeps all of its ground while the original loses most of its white
    to the bar cut, and the trimmed pictures do not match (the case); their ground views,
    each centred on its content, do."""
    original = planted.product(np.random.default_rng(2))
    dimmed = ImageEnhance.Contrast(ImageEnhance.Brightness(original).enhance(0.85)).enhance(0.8)
    settings = VerifySettings()
    a, b = stored(original), stored(dimmed, 70)
    assert not verify_pair(a, b, dataclasses.replace(settings, ground_view=False)).match
    verdict = verify_pair(a, b, settings)
    assert verdict.match and verdict.view == "ground"


def test_a_rotated_badge_whose_tilted_edges_spread_detail_is_matched():
    """A badge is flat colour: its median high-pass magnitude is nearly nothing. Rotated two or
    three degrees on white and letterboxed, its copy's tilted edges against the white spread
    detail over much of the picture, a texture ratio above ``max_texture_ratio``; where the
    structure correlation reaches ``texture_structure`` that ratio refuses nothing. Different
    badges still do not match."""
    settings = VerifySettings()
    ratio_decides = dataclasses.replace(settings, texture_structure=1.0)
    rng = np.random.default_rng(15)
    badges = [planted.badge(rng) for _ in range(10)]
    gained = []
    for badge in badges:
        for angle in (2.0, -3.0):
            turned = badge.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
            a = prepare(stored(badge), settings)
            b = prepare(stored(planted.letterbox(turned, rng, (255, 255, 255)), 70), settings)
            verdict = compare(a, b, settings)
            if verdict.match and not compare(a, b, ratio_decides).match:
                gained.append(verdict)
    assert gained, "premise: the texture ratio alone refuses some rotated badges"
    for verdict in gained:
        assert verdict.structure >= settings.texture_structure and verdict.texture_ratio > settings.max_texture_ratio
    prepared = [prepare(stored(badge), settings) for badge in badges]
    matched = [(i, j) for i in range(10) for j in range(i + 1, 10) if compare(prepared[i], prepared[j], settings).match]
    assert not matched, matched
