"""Tests for fashion_jax.serving.preprocess: file formats and modes, geometry, polarity, round trips.

Most tests draw one 'garment' (tests/photos.py), store it in some format or
mode, and check that it converts to the same 28x28 image as the plain 8-bit
grayscale version: the conversion must depend on what the picture shows, not
on how the file stores it.
"""

import io
import os
import re
import types
import warnings

import numpy as np
import pytest
from PIL import Image
from PIL import ImageOps

from fashion_jax.data import idx
from fashion_jax.serving import image_files
from fashion_jax.serving import preprocess
from tests import photos
from tests.conftest import REAL_DATA_ENV
from tests.conftest import make_images


def convert_file(path) -> np.ndarray:
  return preprocess.to_fashion_mnist(preprocess.load_image(str(path)))


def bounding_box(image: np.ndarray) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) margins of the pixels > 0."""
  rows = np.flatnonzero(image.max(axis=1))
  cols = np.flatnonzero(image.max(axis=0))
  return int(rows[0]), 27 - int(rows[-1]), int(cols[0]), 27 - int(cols[-1])


@pytest.fixture(scope="module")
def drawing():
  """(gray uint8 [240, 200] garment on white, its expected 28x28 conversion)."""
  gray = photos.garment()
  return gray, preprocess.to_fashion_mnist(Image.fromarray(gray))


def test_expected_conversion_looks_like_fashion_mnist(drawing):
  gray, expected = drawing
  assert expected.dtype == np.uint8 and expected.shape == (28, 28)
  assert expected.max() == 255  # Stretched like the data set.
  top, bottom, left, right = bounding_box(expected)
  assert (top, bottom) == (0, 0)  # The long (vertical) edge fills the frame...
  assert left >= 2 and right >= 2 and abs(left - right) <= 1  # ...the short one is centred.
  assert (expected[:, :2] == 0).all() and expected[14, 14] > 100  # Background 0, garment bright.
  # The lighter stripe stays darker than the body after negation.
  body, stripe = expected[22, 14], expected[16:18, 14].min()
  assert stripe < body - 50


def _digit_seven(height=400, width=300) -> np.ndarray:
  """A dark "7" drawn on white: gray uint8 [height, width], off-centre, thick strokes."""
  gray = np.full((height, width), 250, np.uint8)
  gray[60:100, 40:260] = 20  # The bar.
  for y in range(100, 380):  # The stem, slanting down to the left.
    x = 260 - (y - 100) * 160 // 280
    gray[y, max(x - 40, 0):x] = 20
  return gray


def test_mnist_recipe_fits_a_20px_box_centred_by_mass():
  """MNIST's recipe, not Fashion-MNIST's, for a digit run: the 28 px long edge of the garment
  recipe made a digit fill the frame, while MNIST's digits sit in a 20x20 box (4 px margins),
  placed by their centre of mass."""
  gray = _digit_seven()
  digit = preprocess.to_mnist(Image.fromarray(gray))
  assert digit.dtype == np.uint8 and digit.shape == (28, 28) and digit.max() == 255
  top, bottom, left, right = bounding_box(digit)
  assert 28 - top - bottom == 20 and 28 - left - right <= 20  # Taller than wide: 20 px tall.
  rows, cols = np.indices(digit.shape) + 0.5
  mass = digit.astype(np.float64).sum()
  assert abs((rows * digit).sum() / mass - 14) <= 0.5
  assert abs((cols * digit).sum() / mass - 14) <= 0.5
  # Placed by its mass, not its box: the heavy bar at the top takes the box 3 px down.
  assert (top, bottom) == (7, 1)
  garment = preprocess.to_fashion_mnist(Image.fromarray(gray))
  assert 28 - sum(bounding_box(garment)[:2]) == 28  # What the garment recipe does instead.
  # An MNIST image as it is (28x28) is taken as it is, as for Fashion-MNIST.
  np.testing.assert_array_equal(preprocess.to_mnist(Image.fromarray(digit)), digit)
  assert not preprocess.to_mnist(Image.new("L", (50, 40), 255)).any()  # Blank: nothing.


def _rgba_transparent(gray: np.ndarray) -> Image.Image:
  """The garment opaque, the background fully transparent with junk colours under it."""
  rgb = np.repeat(gray[..., None], 3, axis=2)
  background = gray == 255
  rgb[background] = np.array([0, 128, 255], np.uint8)  # Only alpha says this is background.
  alpha = np.where(background, 0, 255).astype(np.uint8)
  return Image.fromarray(np.dstack([rgb, alpha]))


def _palette_transparent(gray: np.ndarray) -> Image.Image:
  """Palette image: index 0 transparent (and black), 1 and 2 the garment's two grays."""
  index = np.select([gray == 40, gray == 120], [1, 2], 0).astype(np.uint8)
  image = Image.fromarray(index, "P")
  image.putpalette([0, 0, 0, 40, 40, 40, 120, 120, 120])
  image.info["transparency"] = 0
  return image


def _la_transparent(gray: np.ndarray) -> Image.Image:
  """Gray + alpha: the background transparent (and black underneath)."""
  background = gray == 255
  return Image.fromarray(np.dstack([np.where(background, 0, gray),
                                    np.where(background, 0, 255)]).astype(np.uint8))


def _save(image: Image.Image, path, **kwargs) -> None:
  image.save(path, **kwargs)


# (name, file suffix, writer(gray, path), exact): every way of storing the same garment.
FORMATS = [
    ("L_png", ".png", lambda g, p: _save(Image.fromarray(g), p), True),
    ("RGB_png", ".png", lambda g, p: _save(Image.fromarray(g).convert("RGB"), p), True),
    ("RGBA_transparent_png", ".png", lambda g, p: _save(_rgba_transparent(g), p), True),
    ("P_transparent_png", ".png", lambda g, p: _save(_palette_transparent(g), p), True),
    ("P_transparent_gif", ".gif", lambda g, p: _save(_palette_transparent(g), p), True),
    ("I16_png", ".png",
     lambda g, p: _save(Image.fromarray(g.astype(np.uint16) * 257), p), True),
    ("LA_transparent_png", ".png", lambda g, p: _save(_la_transparent(g), p), True),
    ("CMYK_tiff", ".tiff", lambda g, p: _save(Image.fromarray(g).convert("CMYK"), p), True),
    ("RGB_bmp", ".bmp", lambda g, p: _save(Image.fromarray(g).convert("RGB"), p), True),
    ("RGBA_webp_lossless", ".webp",
     lambda g, p: _save(_rgba_transparent(g), p, lossless=True, exact=False), True),
    ("RGB_jpeg", ".jpg",
     lambda g, p: _save(Image.fromarray(g).convert("RGB"), p, quality=92), False),
    ("CMYK_jpeg", ".jpg",
     lambda g, p: _save(Image.fromarray(g).convert("CMYK"), p, quality=92), False),
]


@pytest.mark.parametrize("name,suffix,write,exact", FORMATS, ids=[f[0] for f in FORMATS])
def test_every_format_and_mode_converts_the_same(tmp_path, drawing, name, suffix, write, exact):
  gray, expected = drawing
  path = tmp_path / f"{name}{suffix}"
  write(gray, path)
  with Image.open(path) as stored:  # The file really holds the mode under test.
    mode = name.split("_")[0]
    # 16-bit gray PNGs open as "I;16" (older Pillow: "I"); both are handled.
    assert stored.mode in (("I;16", "I") if mode == "I16" else (mode,)), stored.mode
  got = convert_file(path)
  assert got.dtype == np.uint8 and got.shape == (28, 28)
  if exact:
    np.testing.assert_array_equal(got, expected)
  else:  # Lossy: close, and the same shape.
    assert np.abs(got.astype(int) - expected).mean() < 4
    assert bounding_box(got) == bounding_box(expected)


def test_sixteen_bit_is_scaled_not_clipped():
  # Pillow's own I;16 -> L conversion clips (as of Pillow 13): every value here is > 255, so the
  # garment would vanish in one flat white.
  gray = photos.garment()
  sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
  assert sixteen.mode == "I;16"
  expected = preprocess.to_fashion_mnist(Image.fromarray(gray))
  np.testing.assert_array_equal(preprocess.to_fashion_mnist(sixteen), expected)
  # 32-bit integer ("I") and float ("F", 0..1) gray images, as some TIFF readers produce.
  as_int32 = Image.fromarray(gray.astype(np.int32) * 257)
  assert as_int32.mode == "I"
  np.testing.assert_array_equal(preprocess.to_fashion_mnist(as_int32), expected)
  as_float = Image.fromarray(gray.astype(np.float32) / 255.0)
  assert as_float.mode == "F"
  np.testing.assert_array_equal(preprocess.to_fashion_mnist(as_float), expected)


def test_ten_and_twelve_bit_data_in_sixteen_bit_files_is_not_blank(tmp_path):
  """Sensor data stored in 16-bit files: scaled by 255/65535, a 12-bit garment (background 4000,
  body 1000) rounded to levels 16 and 4, within the trim distance: "blank"."""
  gray = photos.garment()
  expected = preprocess.to_fashion_mnist(Image.fromarray(gray))
  for bits in (10, 12):
    path = tmp_path / f"{bits}.png"
    Image.fromarray((gray.astype(np.uint16) * (2 ** bits - 1) // 255).astype(np.uint16)).save(path)
    got = convert_file(path)  # As close as a lossy format's (rounding to fewer levels).
    assert np.abs(got.astype(int) - expected).mean() < 4, bits
    assert bounding_box(got) == bounding_box(expected), bits


def test_a_big_transparent_image_is_shrunk_before_its_alpha_is_flattened(tmp_path):
  """Alpha flattening and 16-bit scaling ran in floats at full size before the shrink to
  WORKING_SIZE: an 8000x6000 RGBA cut-out took 3.4 GB."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  gray = photos.garment(width=3000, height=3600)
  rgba = np.dstack([np.repeat(gray[..., None], 3, axis=2),
                    np.where(gray == 255, 0, 255).astype(np.uint8)])
  for name, image in (("rgba.png", Image.fromarray(rgba)),
                      ("p.png", Image.fromarray(rgba).convert("RGB").quantize(16)),
                      ("i16.png", Image.fromarray(gray.astype(np.uint16) * 257))):
    image.save(tmp_path / name)
    tracemalloc.start()
    try:
      got = convert_file(tmp_path / name)
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert peak < 120e6, (name, peak)  # Full size in float32: 3000 x 3600 x 4 x 4 = 173 MB.
    expected = preprocess.to_fashion_mnist(Image.fromarray(gray).reduce(4))
    assert np.abs(got.astype(int) - expected).mean() < 3, name
  # One colour keyed transparent (L, "transparency" 0): averaged before the key was applied, the
  # garment's edges mixed with it kept a dark outline.
  keyed = np.where(gray == 255, 0, 255 - gray)
  Image.fromarray(keyed.astype(np.uint8)).save(tmp_path / "keyed.png", transparency=0)
  full_size_first = preprocess.to_fashion_mnist(preprocess.normalize(Image.open(tmp_path / "keyed.png")))
  got = convert_file(tmp_path / "keyed.png")
  assert np.abs(got.astype(int) - full_size_first).max() <= 8
  # And 16-bit (I;16 with tRNS), at full size and reduced: the key was ignored, its black taken
  # for the background (found by a review).
  small = Image.fromarray(keyed.astype(np.uint8)).reduce(8)
  small.save(tmp_path / "keyed_small.png", transparency=0)
  for name, image in (("keyed16.png", keyed), ("keyed16_small.png", np.asarray(small))):
    Image.fromarray(image.astype(np.uint16) * 257).save(tmp_path / name, transparency=0)
    with Image.open(tmp_path / name) as stored:
      assert stored.mode in ("I;16", "I") and stored.info["transparency"] == 0
  got = convert_file(tmp_path / "keyed16.png")
  assert np.abs(got.astype(int) - full_size_first).max() <= 8
  np.testing.assert_array_equal(convert_file(tmp_path / "keyed16_small.png"),
                                convert_file(tmp_path / "keyed_small.png"))
  # 12-bit samples keyed at 65535: the key is no sample, so the data's 12 bits set the scale.
  twelve = np.where(np.asarray(small) == 0, 65535, np.asarray(small).astype(np.uint16) * 16)
  Image.fromarray(twelve.astype(np.uint16)).save(tmp_path / "keyed12.png", transparency=65535)
  assert np.abs(convert_file(tmp_path / "keyed12.png").astype(int)
                - convert_file(tmp_path / "keyed_small.png")).max() <= 8


def test_gif_takes_the_first_frame(tmp_path, drawing):
  gray, expected = drawing
  first = Image.fromarray(gray)
  second = Image.fromarray(np.ascontiguousarray(gray[::-1]))  # Upside down.
  path = tmp_path / "animated.gif"
  first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
  with Image.open(path) as stored:
    assert stored.n_frames == 2
  np.testing.assert_array_equal(convert_file(path), expected)
  assert not np.array_equal(preprocess.to_fashion_mnist(second), expected)


def test_exif_orientation_is_honoured(tmp_path, drawing):
  gray, expected = drawing
  upright = Image.fromarray(gray)
  # A camera stores the pixels sideways and says "rotate 90 degrees clockwise" (orientation 6).
  stored = upright.transpose(Image.Transpose.ROTATE_90)
  exif = Image.Exif()
  exif[0x0112] = 6
  path = tmp_path / "phone.jpg"
  stored.save(path, quality=95, exif=exif)
  assert ImageOps.exif_transpose(Image.open(path)).size == upright.size
  got = convert_file(path)
  assert np.abs(got.astype(int) - expected).mean() < 4
  top, bottom, _, _ = bounding_box(got)
  assert top == bottom == 0  # Upright: the tall garment fills the frame vertically.
  # Without the tag the same pixels would lie on their side.
  stored.save(tmp_path / "no_exif.jpg", quality=95)
  _, _, left, right = bounding_box(convert_file(tmp_path / "no_exif.jpg"))
  assert left == right == 0


def test_large_non_square_photos_match_small_ones(drawing):
  _, expected = drawing
  for width, height in ((1800, 2160), (3000, 3600)):  # Beyond WORKING_SIZE: reduced first.
    big = Image.fromarray(photos.garment(width, height))
    got = preprocess.to_fashion_mnist(big)
    assert got.dtype == np.uint8 and got.shape == (28, 28)
    assert np.abs(got.astype(int) - expected).mean() < 6, (width, height)
    assert bounding_box(got) == bounding_box(expected)


def test_dark_on_light_is_negated_light_on_dark_is_not(drawing):
  gray, expected = drawing
  # The same garment bright on black (as Fashion-MNIST shows it) converts the same way.
  np.testing.assert_array_equal(
      preprocess.to_fashion_mnist(Image.fromarray(255 - gray)), expected)
  # Object bright, background black in both cases.
  assert expected[0, 0] == 0 and expected[20, 14] > 150
  # An off-white or gray studio background also becomes 0, not a gray frame.
  offwhite = np.where(gray == 255, 228, gray).astype(np.uint8)
  got = preprocess.to_fashion_mnist(Image.fromarray(offwhite))
  assert (got[:, :3] == 0).all()
  assert np.abs(got.astype(int) - expected).mean() < 6


def test_white_garment_on_transparent_background_stays_visible(tmp_path):
  gray = photos.garment()
  alpha = np.where(gray == 255, 0, 255).astype(np.uint8)
  white = np.dstack([np.full_like(gray, 250)] * 3 + [alpha])  # Off-white, opaque where drawn.
  path = tmp_path / "white.png"
  Image.fromarray(white).save(path)
  got = convert_file(path)
  # Flattened onto black (on white it would vanish): the silhouette of the garment.
  silhouette = np.where(gray == 255, 255, 40).astype(np.uint8)
  reference = preprocess.to_fashion_mnist(Image.fromarray(silhouette))
  assert np.abs(got.astype(int) - reference).mean() < 3


def test_aspect_ratio_is_preserved():
  # A tall thin dark bar (400 x 40 on a wider canvas) stays tall and thin.
  tall = photos.dark_rectangle(500, 300, (50, 130, 450, 170))
  got = preprocess.to_fashion_mnist(Image.fromarray(tall))
  top, bottom, left, right = bounding_box(got)
  assert top == bottom == 0
  assert 28 - left - right == 3  # round(40 * 28 / 400) = 3 columns wide...
  assert left == 13 and right == 12  # ...centred, the odd pixel left, as in the data set.
  # And a wide one stays wide.
  wide = photos.dark_rectangle(300, 700, (100, 50, 200, 650))
  top, bottom, left, right = bounding_box(preprocess.to_fashion_mnist(Image.fromarray(wide)))
  assert left == right == 0
  assert 28 - top - bottom == 5 and top == 12 and bottom == 11  # round(100 * 28 / 600) = 5.


def test_output_is_always_uint8_28x28():
  rng = np.random.default_rng(0)
  for height, width in ((1, 1), (1, 500), (3, 2), (28, 28), (29, 27), (60, 1000), (700, 90)):
    image = np.full((height, width), 255, np.uint8)
    image[height // 4:max(height // 4 + 1, 3 * height // 4),
          width // 4:max(width // 4 + 1, 3 * width // 4)] = rng.integers(0, 100)
    got = preprocess.to_fashion_mnist(Image.fromarray(image))
    assert got.dtype == np.uint8 and got.shape == (28, 28), (height, width)
  blank = preprocess.to_fashion_mnist(Image.new("RGB", (300, 200), (250, 250, 250)))
  assert blank.shape == (28, 28) and not blank.any()


def test_noise_specks_do_not_stretch_the_trim(drawing):
  gray, expected = drawing
  specked = gray.copy()
  specked[3, 3:5] = specked[230, 190] = 0  # Black specks (2 px, 1 px) in far corners.
  got = preprocess.to_fashion_mnist(Image.fromarray(specked))
  np.testing.assert_array_equal(got, expected)


def test_is_pure():
  image = Image.fromarray(photos.garment())
  before = np.asarray(image).copy()
  first = preprocess.to_fashion_mnist(image)
  np.testing.assert_array_equal(np.asarray(image), before)
  np.testing.assert_array_equal(preprocess.to_fashion_mnist(image), first)


def test_synthetic_28x28_images_round_trip(tmp_path):
  # The tests' synthetic data set: a bright bar on uniform 0..60 noise, which is wider than the
  # trim distance, so "differs from the background" includes noise on both sides of it.
  images = make_images(np.arange(200) % 10, seed=100)
  for image in images:
    np.testing.assert_array_equal(preprocess.to_fashion_mnist(Image.fromarray(image)), image)
    inverted = Image.fromarray(255 - image).convert("RGB")
    np.testing.assert_array_equal(preprocess.to_fashion_mnist(inverted), image)
  for i, image in enumerate(images[:5]):  # And through files.
    Image.fromarray(image).save(tmp_path / f"{i}.png")
    Image.fromarray(255 - image).convert("RGB").save(tmp_path / f"{i}_inverted.png")
    np.testing.assert_array_equal(convert_file(tmp_path / f"{i}.png"), image)
    np.testing.assert_array_equal(convert_file(tmp_path / f"{i}_inverted.png"), image)


def test_mid_gray_background_polarity_follows_the_object(drawing):
  gray, _ = drawing
  darker = np.where(gray == 255, 128, gray // 3).astype(np.uint8)  # Garment 13/40 on 128.
  lighter = np.where(gray == 255, 128, 255 - gray // 3).astype(np.uint8)  # The opposite.
  for image in (darker, lighter):
    got = preprocess.to_fashion_mnist(Image.fromarray(image))
    assert got[:, :3].max() == 0 and got[20, 14] > 150  # Garment bright, background black.


@pytest.mark.parametrize("background, sign", [(170, 1), (200, 1), (85, -1), (50, -1)])
def test_a_garment_lighter_than_a_light_background_or_darker_than_a_dark_one(drawing, background,
                                                                            sign):
  """A white sneaker on a light-grey backdrop (or a black coat on a dark-grey one): a light
  background was negated and a dark one kept whatever the object, so the garment became darker
  than the background and was cut away: "blank", or JPEG noise classified (found by a review).
  The object itself decides where it clearly differs: the same garment, the same result."""
  gray, expected = drawing
  depth = 255 - background if sign > 0 else background  # The garment as deep as room allows.
  image = (background + sign * (255 - gray.astype(np.int32)) * depth // 255).astype(np.uint8)
  got = preprocess.to_fashion_mnist(Image.fromarray(image))
  assert got[:, :2].max() == 0 and got[14, 14] > 100, got  # Garment bright, background black.
  assert np.abs(got.astype(int) - expected).mean() < 12


def test_load_image_errors(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("not an image\n")
  with pytest.raises(preprocess.ImageError, match="not an image file"):
    preprocess.load_image(str(text))
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
      buffer, "PNG")
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  with pytest.raises(preprocess.ImageError, match="truncated"):
    preprocess.load_image(str(truncated))
  with pytest.raises(preprocess.ImageError, match="cannot open"):
    preprocess.load_image(str(tmp_path / "missing.png"))


def test_files_of_other_kinds_are_named_with_what_to_do(tmp_path):
  """An empty file, a NumPy array and the data set's own IDX files (raw or .gz) were each 'not
  an image file (Pillow cannot identify its format)', with nothing said of what to do."""
  (tmp_path / "empty.png").write_bytes(b"")
  np.save(tmp_path / "images.npy", np.zeros((2, 28, 28), np.uint8))
  for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte.gz"):
    idx.write_idx(str(tmp_path / name), np.zeros((2, 28, 28) if "images" in name else 2, np.uint8))
  (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b" + b"\xff" * 30)
  for name, says in (("empty.png", "empty file (0 bytes): nothing to classify; pass an image"),
                     ("images.npy", "a NumPy array (.npy), not an image file; save it as PNG"),
                     ("t10k-images-idx3-ubyte", "an IDX file (the data set's own format), not "
                      "an image file; evaluate classifies IDX test files"),
                     ("t10k-labels-idx1-ubyte.gz", "an IDX file"),
                     ("broken.gz", "not an image file of a format read here; pass PNG, JPEG")):
    with pytest.raises(preprocess.ImageError, match=re.escape(says)):
      preprocess.load_image(str(tmp_path / name))


def test_only_the_formats_named_are_opened_and_ghostscript_never_runs(tmp_path, monkeypatch):
  """Image.open tried every Pillow plugin: an EPS file named like a photo was opened as EPS and
  loaded by running Ghostscript on it (a PostScript interpreter: crafted files have run code),
  and rarer formats (TGA here) went through their own decoders. Only the formats predict names
  (and PNM) are opened now; an EPS is named, with what to do."""
  from PIL import EpsImagePlugin
  ran = []

  def ghostscript(*args, **kwargs):
    ran.append(args)
    raise OSError("Ghostscript ran")
  monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
  (tmp_path / "photo.jpg").write_bytes(
      b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 60\n"
      b"newpath 10 10 moveto 30 10 lineto 30 50 lineto closepath fill\nshowpage\n%%EOF\n")
  with pytest.raises(preprocess.ImageError, match=r"^a PostScript/EPS file, which is not read "
                     r"\(rendering it would run Ghostscript\); export it as PNG or JPEG"):
    preprocess.load_image(str(tmp_path / "photo.jpg"))
  assert not ran
  garment = np.full((60, 40), 240, np.uint8)
  garment[10:50, 10:30] = 30
  Image.fromarray(garment).save(tmp_path / "garment.tga", format="TGA")
  with pytest.raises(preprocess.ImageError, match=r"^a file in the Targa \(TGA\) format, which is "
                     r"not read here; convert it to PNG or JPEG first \(read here: PNG, JPEG, "
                     r"WebP, BMP, GIF, TIFF, PNM"):
    preprocess.load_image(str(tmp_path / "garment.tga"))
  expected = convert_file(_saved(tmp_path, garment, "PNG"))
  for kind in ("BMP", "GIF", "TIFF", "PPM", "WEBP", "JPEG"):  # Each named format still read.
    got = convert_file(_saved(tmp_path, garment, kind))
    assert (got == expected).all() if kind != "JPEG" else np.abs(
        got.astype(int) - expected).mean() < 8, kind  # (JPEG: its artefacts.)


@pytest.mark.parametrize("reads_avif", [True, False])
def test_an_image_of_a_format_not_read_is_named_not_called_no_image(tmp_path, monkeypatch,
                                                                    reads_avif):
  """A JPEG 2000, Photoshop, icon, Targa or IM image was "not an image file of a format read
  here". Its format is named by magic bytes specific enough to say what it is, no plugin opening
  it; a file of a format read but damaged is said to be so where its magic is as specific (PNG,
  JPEG, GIF, TIFF, WebP). Pillow's own accept functions are not (bc8f98d used them): a C or CSS
  file starting with "/*" was "a X11 Bitmap image" (so was an XPM: XBM is asked first), text
  starting "Py" or "P1" "a PNM image ... damaged or cut short?", a file starting with the
  little-endian 40 "a DIB image ... damaged"; each is "not an image file" again. The formats read
  that it lists take in AVIF where this Pillow reads it (predict's docstring and the README)."""
  from PIL import features
  garment = np.full((32, 32), 240, np.uint8)
  Image.fromarray(garment).save(tmp_path / "icon.ico")
  Image.fromarray(garment).save(tmp_path / "garment.tga")
  Image.fromarray(garment).save(tmp_path / "garment.sgi", format="SGI")
  png = io.BytesIO()
  Image.fromarray(garment).save(png, "PNG")
  for name, data in (("photo.jp2", b"\0\0\0\x0cjP  \r\n\x87\n\0\0\0\x14ftypjp2 " + b"\0" * 64),
                     ("codestream.j2k", b"\xff\x4f\xff\x51" + b"\0" * 64),
                     ("layers.psd", b"8BPS\0\1" + b"\0" * 64),
                     ("frame.im", b"Image type: L image\r\nImage size (x*y): 4*4\r\n" + b"\0" * 512),
                     ("pixmap.xpm", b'/* XPM */\nstatic char *x[] = {\n"1 1 1 1",\n". c #000000",'
                      b'\n"."};\n'),
                     ("damaged.png", png.getvalue()[:16] + b"\xff" * 64),
                     ("cut.gif", b"GIF89a\x20\0"),
                     ("style.png", b"/* Site styles */\nbody { color: #333; }\n"),
                     ("main.jpg", b"/*\n * main.c\n */\n#include <stdio.h>\n"),
                     ("notes.png", b"Python notes: install Pillow first\n"),
                     ("minutes.png", b"P3: the plan for the week\n"),
                     ("record.png", (40).to_bytes(4, "little") + bytes(range(1, 60))),
                     ("notes.txt", b"not an image\n")):
    (tmp_path / name).write_bytes(data)
  Image.init()
  opened = []

  class Opener:  # Stands in for a plugin's opener: says it ran.
    def __init__(self, fmt, factory):
      self.fmt, self.format_description = fmt, getattr(factory, "format_description", None)

    def __call__(self, *args, **kwargs):
      opened.append(self.fmt)
      raise SyntaxError(f"not {self.fmt}")
  for fmt, (factory, accept) in list(Image.OPEN.items()):  # No opener of a format not read runs.
    if fmt not in image_files.FORMATS:
      monkeypatch.setitem(Image.OPEN, fmt, (Opener(fmt, factory), accept))
  monkeypatch.setattr(features, "modules", {**features.modules, "avif": ("PIL._avif", None)})
  monkeypatch.setattr(features, "check_module",
                      lambda name, real=features.check_module: reads_avif if name == "avif"
                      else real(name))
  if reads_avif and "AVIF" not in image_files.formats():  # Pillow < 11.2 has no AVIF opener.
    pytest.skip("this Pillow has no AVIF opener")
  formats = ("PNG, JPEG, WebP, BMP, GIF, TIFF, PNM or AVIF" if reads_avif
             else "PNG, JPEG, WebP, BMP, GIF, TIFF or PNM")
  not_read = (" format, which is not read here; convert it to PNG or JPEG first (read here: "
              f"{formats})")
  no_image = f"not an image file of a format read here; pass {formats} images (convert others " \
             "to PNG first)"
  for name, says in (("photo.jp2", "a file in the JPEG 2000" + not_read),
                     ("codestream.j2k", "a file in the JPEG 2000" + not_read),
                     ("layers.psd", "a file in the Photoshop (PSD)" + not_read),
                     ("icon.ico", "a file in the Windows icon (ICO)" + not_read),
                     ("garment.tga", "a file in the Targa (TGA)" + not_read),
                     ("garment.sgi", "a file in the SGI" + not_read),
                     ("frame.im", "a file in the IFUNC Image Memory (IM)" + not_read),
                     ("pixmap.xpm", "a file in the X11 pixmap (XPM)" + not_read),
                     ("damaged.png", "a PNG image by its first bytes, which Pillow cannot read "
                      "(damaged or cut short?); pass an intact copy"),
                     ("cut.gif", "a GIF image by its first bytes, which Pillow cannot read "
                      "(damaged or cut short?); pass an intact copy"),
                     ("style.png", no_image), ("main.jpg", no_image), ("notes.png", no_image),
                     ("minutes.png", no_image), ("notes.txt", no_image)):
    with pytest.raises(preprocess.ImageError) as caught:
      preprocess.load_image(str(tmp_path / name))
    assert str(caught.value) == says, name
  assert not opened
  # What is said of a file starting with the little-endian 40 that DIB's opener refuses as not
  # its own (for most such files it raises its own OSError first: "corrupt or truncated").
  assert image_files.unidentified(str(tmp_path / "record.png")) == no_image


def _saved(folder, image: np.ndarray, kind: str):
  path = folder / f"garment.{kind.lower()}"
  Image.fromarray(image).save(path, format=kind, **{"WEBP": {"lossless": True},
                                                    "JPEG": {"quality": 95}}.get(kind, {}))
  return path


def test_an_iphone_heic_photo_is_named_and_not_skipped(tmp_path):
  """A HEIC photo (an iPhone camera's default) was "not an image file (Pillow cannot identify
  its format)", and a folder walk skipped such files without a word."""
  path = tmp_path / "IMG_0001.HEIC"
  path.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)  # Its first box.
  with pytest.raises(preprocess.ImageError, match=r"^a HEIC/HEIF photo .*convert it to JPEG"):
    preprocess.load_image(str(path))
  assert preprocess.is_image_filename(str(path)) and preprocess.is_image_filename("x.heif")


@pytest.mark.parametrize("reads_avif", [True, False])
def test_an_avif_image_is_not_called_an_iphone_photo(tmp_path, monkeypatch, reads_avif):
  """AVIF files use the general HEIF brands too (mif1, msf1): a damaged AVIF, or on Pillow
  10.x-11.1 (which reads no AVIF) any mif1 one, was "a HEIC/HEIF photo (an iPhone camera's
  format)" with a Mac `sips` hint. The compatible brands in the ftyp box tell them apart."""
  from PIL import features
  monkeypatch.setattr(features, "modules", {
      **features.modules, "avif": ("PIL._avif", "libavif_version")} if reads_avif else {
          k: v for k, v in features.modules.items() if k != "avif"})
  monkeypatch.setattr(features, "check_module", lambda name: reads_avif)
  says = (r"an AVIF image that Pillow cannot read \(damaged.*convert it to PNG or JPEG" if reads_avif
          else r"an AVIF image, which this Pillow \(.*\) cannot read; Pillow 11\.2 or later reads "
          r"AVIF .*convert it to PNG or JPEG")
  for name, box in (("general.avif", b"\0\0\0\x20ftypmif1\0\0\0\0mif1avifmiafMA1B"),
                    ("sequence.avif", b"\0\0\0\x1cftypmsf1\0\0\0\0msf1avismiaf"),
                    ("plain.avif", b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf")):
    (tmp_path / name).write_bytes(box + b"\0\0\0\x08junk" + b"\0" * 64)
    with pytest.raises(preprocess.ImageError, match="^" + says) as caught:
      preprocess.load_image(str(tmp_path / name))
    assert "HEIC" not in str(caught.value) and "sips" not in str(caught.value), name
  for name, box in (("IMG_0002.HEIC", b"\0\0\0\x1cftypmif1\0\0\0\0mif1MiHEheic"),
                    ("burst.heics", b"\0\0\0\x18ftypmsf1\0\0\0\0msf1hevc")):
    (tmp_path / name).write_bytes(box + b"\0" * 64)
    with pytest.raises(preprocess.ImageError, match=r"^a HEIC/HEIF photo .*sips"):
      preprocess.load_image(str(tmp_path / name))


def test_big_images_are_read_without_pillows_bomb_warning(tmp_path, drawing, monkeypatch):
  """Above Pillow's MAX_IMAGE_PIXELS (a 12000x12000 photo) it warned on stderr, two lines, though
  the image is only made 28x28; above twice that its DecompressionBombError is the file's error.
  The limit is lowered here instead of writing a 144-megapixel file."""
  gray, expected = drawing
  path = tmp_path / "big.png"
  Image.fromarray(gray).save(path)
  pixels = gray.shape[0] * gray.shape[1]
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels * 2 // 3)  # Warned, not refused.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    image = preprocess.load_image(str(path))
  assert not caught, [str(w.message) for w in caught]
  np.testing.assert_array_equal(preprocess.to_fashion_mnist(image), expected)
  with pytest.warns(Image.DecompressionBombWarning):  # Pillow does warn at this limit.
    Image.open(path).close()
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels // 3)  # Over twice the limit.
  with pytest.raises(preprocess.ImageError, match="too large to decode safely .*decompression bomb"):
    preprocess.load_image(str(path))


def test_a_jpeg_over_the_bomb_limit_decoded_under_it_is_read(tmp_path, drawing, monkeypatch):
  """A JPEG is decoded at 1/2 to 1/8 scale (libjpeg's draft); the decompression-bomb limit is for
  what is decoded. It was applied to the full size: a 200-megapixel phone photo (16320 x 12240,
  decoded at 2040 x 1530) was "too large to decode safely". The limit is lowered here instead."""
  _, expected = drawing
  path = tmp_path / "big.jpg"
  Image.fromarray(photos.garment(3600, 4320)).save(path, quality=95)
  with Image.open(path) as image:
    full = image.width * image.height
    image.draft(None, (preprocess.WORKING_SIZE, preprocess.WORKING_SIZE))
    decoded = image.width * image.height
  assert decoded * 4 <= full
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", decoded)  # Full size over twice the limit.
  got = preprocess.to_fashion_mnist(preprocess.load_image(str(path)))
  assert np.abs(got.astype(int) - expected).mean() < 6 and bounding_box(got) == bounding_box(
      expected)
  assert Image.MAX_IMAGE_PIXELS == decoded  # Put back.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", decoded // 3)  # Decoded over twice the limit.
  with pytest.raises(preprocess.ImageError, match="too large to decode safely .*decompression bomb"):
    preprocess.load_image(str(path))


def test_a_big_jpeg_is_read_without_changing_pillows_limit(tmp_path, monkeypatch):
  """Reading a JPEG over the decompression-bomb limit (decoded under it) set the global
  Image.MAX_IMAGE_PIXELS to None around Image.open: meanwhile any other thread's Image.open went
  unchecked, and two overlapping loads could leave it None for good. Watched here on the module
  itself; a phone's MPO (a JPEG with a second frame) is read the same way."""
  assigned = []

  class Watched(types.ModuleType):
    def __setattr__(self, name, value):
      if name == "MAX_IMAGE_PIXELS":
        assigned.append(value)
      super().__setattr__(name, value)

  gray = photos.garment(2400, 2400)
  jpeg, mpo = tmp_path / "big.jpg", tmp_path / "big.mpo.jpg"
  Image.fromarray(gray).save(jpeg, quality=95)
  Image.fromarray(gray).save(mpo, format="MPO", save_all=True,
                             append_images=[Image.fromarray(gray[::2, ::2])])
  with Image.open(jpeg) as image:
    image.draft(None, (preprocess.WORKING_SIZE, preprocess.WORKING_SIZE))
    decoded = image.width * image.height
  with Image.open(mpo) as image:
    assert image.format == "MPO" and image.n_frames == 2
  expected = preprocess.to_fashion_mnist(Image.fromarray(gray))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", decoded)  # Full size over twice the limit.
  monkeypatch.setattr(Image, "__class__", Watched)
  for path in (jpeg, mpo):
    with pytest.raises(Image.DecompressionBombError):
      Image.open(path)
    got = preprocess.to_fashion_mnist(preprocess.load_image(str(path)))
    assert np.abs(got.astype(int) - expected).mean() < 6, path
  assert assigned == [] and Image.MAX_IMAGE_PIXELS == decoded
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", decoded // 3)  # Decoded over twice the limit.
  with pytest.raises(preprocess.ImageError, match="too large to decode safely"):
    preprocess.load_image(str(mpo))


def test_is_image_filename():
  assert preprocess.is_image_filename("a/b/Photo.JPG")
  assert preprocess.is_image_filename("x.webp") and preprocess.is_image_filename("x.tiff")
  assert not preprocess.is_image_filename("notes.txt")
  assert not preprocess.is_image_filename("png")


@pytest.fixture(scope="module")
def real_test_images():
  """The real test split (module-scoped: conftest's real_idx_dir is per test)."""
  folder = os.environ.get(REAL_DATA_ENV, "")
  if not folder:
    pytest.skip(f"{REAL_DATA_ENV} is not set: no real Fashion-MNIST IDX folder to check against")
  images, labels = idx.load_split(folder, "test")
  return images[..., 0], labels


@pytest.mark.real_data
def test_real_geometry_is_what_the_docstring_says(real_test_images):
  """The measurements preprocess.py is built on, re-checked on the real test split."""
  images, _ = real_test_images
  n = len(images)
  rows = images.max(axis=2) > 0
  cols = images.max(axis=1) > 0
  first_row, last_row = rows.argmax(1), 27 - rows[:, ::-1].argmax(1)
  first_col, last_col = cols.argmax(1), 27 - cols[:, ::-1].argmax(1)
  height, width = last_row - first_row + 1, last_col - first_col + 1
  long_edge = np.maximum(height, width)
  assert (long_edge == 28).mean() > 0.97  # Measured 98.4%: trimmed tight, longest edge 28.
  # Short edge centred, an odd leftover pixel on the left/top (never the other way round).
  tall = height >= width
  difference = np.where(tall, first_col - (27 - last_col), first_row - (27 - last_row))
  assert np.isin(difference, [0, 1]).mean() > 0.99
  peaks = images.reshape(n, -1).max(axis=1)
  assert (peaks == 255).mean() > 0.9 and (peaks >= 254).mean() > 0.98  # Stretched to 255.
  assert np.median((images.reshape(n, -1) == 255).sum(axis=1)) <= 2  # ...not clipped.
  assert (images == 0).mean() > 0.45  # A black background.


@pytest.mark.real_data
def test_real_images_round_trip(real_test_images, tmp_path):
  images, _ = real_test_images
  subset = images[::10]  # 1,000 images, every class.
  for image in subset:
    np.testing.assert_array_equal(preprocess.to_fashion_mnist(Image.fromarray(image)), image)
    inverted = Image.fromarray(255 - image).convert("RGB")  # Dark on light, as RGB.
    np.testing.assert_array_equal(preprocess.to_fashion_mnist(inverted), image)
  for i, image in enumerate(subset[:20]):  # And through files.
    Image.fromarray(image).save(tmp_path / f"{i}.png")
    np.testing.assert_array_equal(convert_file(tmp_path / f"{i}.png"), image)
