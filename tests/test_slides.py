"""Slide reading and pyramid writing (stagejax.slides) on small slides."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from stagejax.errors import DatasetError, ResourceError
from stagejax.slides import _openslide, base, open_slide, write_pyramidal_tiff

W, H, TILE, MPP = 2048, 1536, 256, 0.5


def _section(h: int = H, w: int = W) -> np.ndarray:
    """Smooth gradients plus sharp discs: resampling errors stay small, misplaced tiles show."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h) + 64], axis=-1)
    for cx, cy in [(300, 200), (1500, 1100), (1000, 700)]:
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 < 120**2] = (200, 40, 120)
    return rgb.astype(np.uint8)


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return _section()


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory, source):
    """A lossless 2048 x 1536 OME-TIFF pyramid with 256 px tiles, rendered tile by tile."""
    path = tmp_path_factory.mktemp("slide") / "section.tif"
    calls = []

    def render(x, y, w, h):
        calls.append((x, y, w, h))
        return source[y : y + h, x : x + w]

    write_pyramidal_tiff(path, render, MPP, size=(W, H), tile_size=TILE, compression="deflate")
    assert calls[:2] == [(0, 0, TILE, TILE), (TILE, 0, TILE, TILE)]  # row-major, tile by tile
    assert len(calls) == (W // TILE) * (H // TILE)
    return path


def _box_mean(rgb: np.ndarray, k: int) -> np.ndarray:
    h, w = rgb.shape[0] // k * k, rgb.shape[1] // k * k
    return rgb[:h, :w].reshape(h // k, k, w // k, k, 3).astype(np.float64).mean(axis=(1, 3))


def _one_line(e: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)
    return msg


def test_regions_equal_the_source(pyramid, source):
    with open_slide(pyramid) as slide:
        assert slide.kind == "ome-tiff" and slide.dimensions == (W, H)
        for x, y, w, h in [(0, 0, 256, 256), (250, 300, 700, 333), (1900, 1400, 148, 136)]:
            region = slide.read_region(x, y, w, h)
            np.testing.assert_array_equal(region, source[y : y + h, x : x + w])
        edge = slide.read_region(W - 20, -10, 50, 40)  # partly outside: white there
        np.testing.assert_array_equal(edge[10:, :20], source[:30, W - 20 :])
        assert (edge[:10] == 255).all() and (edge[:, 20:] == 255).all()


def test_tiles_are_decoded_once_within_a_bounded_cache_and_threads_read_alike(
    pyramid, source, monkeypatch
):
    """Neighbouring tubules' crops share tiles: a tile is decoded once while it is in
    the cache, the cache never holds more than its bound, and regions read by several
    threads at once equal the source."""
    from concurrent.futures import ThreadPoolExecutor

    with open_slide(pyramid) as slide:
        decoded = []
        page = slide._pages[0]
        real = page.decode

        def counting(data, index, **kw):
            decoded.append(index)
            return real(data, index, **kw)

        monkeypatch.setattr(page, "decode", counting)
        slide.read_region(100, 100, 400, 400)  # 2 x 2 tiles of 256 px
        slide.read_region(300, 300, 400, 400)  # 2 x 2, one of them read before
        assert len(decoded) == 4 + 3 and len(set(decoded)) == len(decoded)
        slide._cache.max_bytes = 4 * TILE * TILE * 3  # four tiles
        boxes = [(x, y, 300, 200) for x in range(0, W - 300, 170) for y in range(0, H - 200, 190)]
        with ThreadPoolExecutor(4) as pool:
            regions = list(pool.map(lambda b: slide.read_region(*b), boxes))
        assert slide._cache.bytes <= slide._cache.max_bytes
        for (x, y, w, h), region in zip(boxes, regions, strict=True):
            np.testing.assert_array_equal(region, source[y : y + h, x : x + w])


def test_levels_agree_with_downsampling_level0(pyramid, source):
    with open_slide(pyramid) as slide:
        assert [lv.dimensions for lv in slide.levels] == [(2048, 1536), (1024, 768), (512, 384),
                                                         (256, 192)]  # fmt: skip
        assert [lv.downsample for lv in slide.levels] == [1, 2, 4, 8]
        for level in (1, 2, 3):
            k = 2**level
            got = slide.read_level(level).astype(np.float64)
            assert np.abs(got - _box_mean(source, k)).max() <= 1.5  # rounding at each halving
            assert slide.level_mpp(level) == MPP * k


def test_downsampled_reads_and_tiles(pyramid, source):
    with open_slide(pyramid) as slide:
        small = slide.read_downsampled(3)  # level 1, then resampled by 1.5
        assert small.shape == (512, 683, 3)
        assert np.abs(small[:-1, :-1] - _box_mean(source, 3)[:511, :682]).mean() < 2
        assert slide.thumbnail(256).shape == (192, 256, 3)
        level1 = slide.read_level(1)
        canvas = np.zeros_like(level1)
        tiles = list(slide.tiles(300, overlap=44, level=1))
        assert [(t.x, t.y) for t in tiles[:4]] == [(0, 0), (256, 0), (512, 0), (768, 0)]
        for t in tiles:
            canvas[t.y : t.y + t.image.shape[0], t.x : t.x + t.image.shape[1]] = t.image
        np.testing.assert_array_equal(canvas, level1)


def test_big_reads_are_refused_but_downsampled_reads_stream(pyramid, monkeypatch):
    monkeypatch.setattr(base, "MAX_READ_BYTES", 512 * 512 * 3)
    with open_slide(pyramid) as slide:
        with pytest.raises(ResourceError) as e:
            slide.read_level(0)
        _one_line(e, str(pyramid), "Slide.tiles")
        assert slide.read_downsampled(4).shape == (384, 512, 3)


def test_mpp_from_file_and_override(pyramid):
    with open_slide(pyramid) as slide:
        assert slide.mpp == pytest.approx(MPP) and slide.mpp_source == "OME PhysicalSizeX"
    with open_slide(pyramid, mpp=0.3) as slide:
        assert slide.mpp == 0.3 and slide.mpp_source == "--mpp"


def test_mpp_from_tiff_resolution_and_svs_description(tmp_path, source):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, source, tile=(256, 256), photometric="rgb",
                     resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")  # fmt: skip
    with open_slide(plain) as slide:
        assert slide.kind == "tiff" and slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region(100, 100, 300, 200),
                                      source[100:300, 100:400])  # fmt: skip
    svs = tmp_path / "slide.svs"
    desc = f"Aperio Image Library v12.0.15\r\n{W}x{H} (256x256) RGB|AppMag = 20|MPP = 0.4990"
    with tifffile.TiffWriter(svs) as tw:  # baseline, thumbnail (stripped), a 4x level
        tw.write(source, tile=(256, 256), photometric="rgb", description=desc, metadata=None)
        tw.write(source[::8, ::8], photometric="rgb", metadata=None)
        tw.write(np.ascontiguousarray(source[::4, ::4]), tile=(256, 256), photometric="rgb",
                 metadata=None)  # fmt: skip
    with open_slide(svs) as slide:
        assert slide.kind == "svs" and slide.mpp == pytest.approx(0.499)
        assert [lv.dimensions for lv in slide.levels] == [(W, H), (W // 4, H // 4)]
        np.testing.assert_array_equal(slide.read_region(10, 20, 100, 50, level=1),
                                      source[::4, ::4][20:70, 10:110])  # fmt: skip


def test_gray_16bit_tiff_becomes_8bit_rgb(tmp_path):
    gray = np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10
    path = tmp_path / "gray16.tif"
    tifffile.imwrite(path, gray, tile=(32, 32), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        rgb = slide.read_region(0, 0, 96, 64)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 96, 3)
    np.testing.assert_array_equal(rgb[..., 1], (gray >> 8).astype(np.uint8))


def test_missing_and_absurd_pixel_size(tmp_path, source):
    nompp = tmp_path / "nompp.tif"
    tifffile.imwrite(nompp, source[:256, :256], tile=(256, 256), photometric="rgb", metadata=None)
    with pytest.raises(DatasetError) as e:
        open_slide(nompp)
    _one_line(e, str(nompp), "no pixel size", "--mpp")
    with pytest.raises(DatasetError) as e:
        open_slide(nompp, mpp_flag="--config.section_mpp")
    _one_line(e, "--config.section_mpp")
    with open_slide(nompp, mpp=0.5) as slide:
        assert slide.mpp == 0.5
    for bad in (0.01, 100.0):
        with pytest.raises(DatasetError) as e:
            open_slide(nompp, mpp=bad)
        _one_line(e, str(nompp), "outside 0.05-20")
    dpi72 = tmp_path / "dpi72.tif"
    tifffile.imwrite(dpi72, source[:256, :256], photometric="rgb", resolution=(72, 72),
                     resolutionunit="INCH", metadata=None)  # fmt: skip
    with pytest.raises(DatasetError) as e:
        open_slide(dpi72)
    _one_line(e, str(dpi72), "352.8 um/px", "--mpp")


def test_truncated_and_corrupt_files(tmp_path, pyramid, source):
    data = pyramid.read_bytes()  # OME-XML at the end: any cut loses it
    for frac in (0.02, 0.5, 0.97):
        cut = tmp_path / f"cut{frac}.tif"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(DatasetError) as e:
            open_slide(cut)
        _one_line(e, str(cut), "truncated")
    plain = tmp_path / "plain.tif"  # tags first, tiles after: a cut loses tiles only
    tifffile.imwrite(plain, source, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    with tifffile.TiffFile(plain) as tf:
        offset, count = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    data = bytearray(plain.read_bytes())
    corrupt = tmp_path / "corrupt.tif"  # tile 5 zeroed: opens, fails when read
    corrupt.write_bytes(bytes(data[:offset]) + bytes(count) + bytes(data[offset + count :]))
    with open_slide(corrupt) as slide:
        slide.read_region(0, 0, 256 * 5, 256)  # tiles 0-4 are fine
        with pytest.raises(DatasetError) as e:
            slide.read_region(0, 0, 2048, 256)
        _one_line(e, str(corrupt), "cannot decode tile 5 of level 0")
    plain.write_bytes(bytes(data[:-40]))
    with pytest.raises(DatasetError) as e:
        open_slide(plain)
    _one_line(e, str(plain), "truncated: image data runs to byte")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(DatasetError) as e:
        open_slide(junk)
    _one_line(e, str(junk), "not a readable TIFF")


def test_unsupported_and_vendor_formats(tmp_path, monkeypatch):
    czi = tmp_path / "scan.czi"
    czi.write_bytes(b"ZISRAWFILE" + bytes(100))
    with pytest.raises(DatasetError) as e:
        open_slide(czi)
    _one_line(e, str(czi), "unsupported slide format '.czi'", "stagejax[slides]")
    ndpi = tmp_path / "scan.ndpi"
    ndpi.write_bytes(b"II*\x00" + bytes(100))
    monkeypatch.setattr(_openslide, "_import_openslide", lambda: None)
    with pytest.raises(DatasetError) as e:
        open_slide(ndpi)
    _one_line(e, str(ndpi), "needs OpenSlide", "pip install 'stagejax[slides]'")


def test_openslide_backend_reads_a_tiled_tiff(tmp_path, source):
    pytest.importorskip("openslide")
    path = tmp_path / "generic.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:  # levels in the main IFD chain
        for k in (1, 2):
            tw.write(np.ascontiguousarray(source[::k, ::k]), tile=(256, 256), photometric="rgb",
                     subfiletype=0 if k == 1 else 1, resolution=(2e4 / k, 2e4 / k),
                     resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    with open_slide(path, backend="openslide") as slide:
        assert slide.kind.startswith("openslide:") and slide.mpp == pytest.approx(0.5)
        assert [lv.downsample for lv in slide.levels] == [1.0, 2.0]
        np.testing.assert_array_equal(slide.read_region(300, 200, 200, 100),
                                      source[200:300, 300:500])  # fmt: skip
        np.testing.assert_array_equal(slide.read_region(10, 20, 50, 30, level=1),
                                      source[::2, ::2][20:50, 10:60])  # fmt: skip
    bogus = tmp_path / "bogus.ndpi"
    bogus.write_bytes(b"garbage" * 50)
    with pytest.raises(DatasetError) as e:
        open_slide(bogus)
    _one_line(e, str(bogus))


def test_png_section(tmp_path, source):
    path = tmp_path / "section.png"
    rgba = np.dstack([source[:300, :400], np.full((300, 400), 255, np.uint8)])
    Image.fromarray(rgba).save(path, dpi=(25400 / 0.5, 25400 / 0.5))
    with open_slide(path) as slide:
        assert slide.kind == "png" and slide.mpp == pytest.approx(0.5, rel=1e-3)
        np.testing.assert_array_equal(slide.read_region(50, 60, 100, 70), source[60:130, 50:150])
        assert slide.thumbnail(100).shape == (75, 100, 3)
    bare = tmp_path / "bare.png"
    Image.fromarray(source[:64, :64]).save(bare)
    with pytest.raises(DatasetError) as e:
        open_slide(bare)
    _one_line(e, str(bare), "--mpp")
    truncated = tmp_path / "cut.png"
    Image.fromarray(source[:300, :400]).save(truncated, dpi=(50800, 50800))
    truncated.write_bytes(truncated.read_bytes()[:-2000])
    with pytest.raises(DatasetError) as e:
        open_slide(truncated)
    _one_line(e, str(truncated))


def test_jpeg_pyramid_from_tile_iterator(tmp_path, source):
    def tiles():
        for y in range(0, H, 512):
            for x in range(0, W, 512):
                yield source[y : y + 512, x : x + 512]

    path = write_pyramidal_tiff(tmp_path / "s.tif", tiles(), 0.25, size=(W, H), quality=95)
    with open_slide(path) as slide:
        assert len(slide.levels) == 3 and slide.mpp == pytest.approx(0.25)
        err = np.abs(slide.read_region(0, 0, W, H).astype(int) - source).mean()
        assert err < 2.0  # lossy, but close on a smooth section


def test_failed_write_leaves_nothing(tmp_path, pyramid):
    out = tmp_path / "out.tif"
    out.write_bytes(b"previous")

    def render(x, y, w, h):
        if y > 0:
            raise RuntimeError("renderer failed")
        return np.zeros((h, w, 3), np.uint8)

    with pytest.raises(RuntimeError, match="renderer failed"):
        write_pyramidal_tiff(out, render, 0.5, size=(600, 600), tile_size=256)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]
