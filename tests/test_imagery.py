"""NDVI from red/NIR rasters and from HLS through a STAC API served on 127.0.0.1.

The HLS test builds a small STAC API (landing page + /search) and Cloud-Optimised GeoTIFFs in
the layout of HLS v2.0 (int16 reflectance × 0.0001, nodata −9999, Fmask uint8) and serves them
from a loopback http.server with HTTP range requests, as GDAL reads COGs. Nothing else is
contacted.
"""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timezone
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

from conftest import shared_data_dir
from deepdem.cli import main
from deepdem.imagery import FMASK_BITS, fmask_clear, hls_ndvi, ndvi_from_bands, ndvi_from_raster
from deepdem.scene import Grid, Scene

UTM = CRS.from_epsg(32631)
SCENE = Grid(UTM, from_origin(500000.0, 4800000.0, 10.0, 10.0), 60, 60)  # 600 m x 600 m


def nir_of(x):
    """True NIR reflectance: linear in easting, so any georeferencing error shows in NDVI."""
    return 0.2 + 0.0005 * (x - 499700.0)


RED = 0.1


def expected_ndvi(x):
    return (nir_of(x) - RED) / (nir_of(x) + RED)


class _Handler(SimpleHTTPRequestHandler):
    """Static files with byte ranges (GDAL's /vsicurl/) and a minimal STAC item search."""

    items: list = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def _json(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _root(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _landing(self):
        root = self._root()
        return {"type": "Catalog", "stac_version": "1.0.0", "id": "test", "description": "loopback HLS",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
                "links": [{"rel": "self", "href": f"{root}/stac", "type": "application/json"},
                          {"rel": "root", "href": f"{root}/stac", "type": "application/json"},
                          {"rel": "search", "href": f"{root}/stac/search", "type": "application/geo+json", "method": "POST"}]}

    def _search(self, query):
        start, end = (datetime.fromisoformat(v.replace("Z", "+00:00")) for v in query["datetime"].split("/"))
        start, end = (d if d.tzinfo else d.replace(tzinfo=timezone.utc) for d in (start, end))
        w, s, e, n = query["bbox"]
        hits = []
        for item in self.items:
            when = datetime.fromisoformat(item["properties"]["datetime"].replace("Z", "+00:00"))
            iw, is_, ie, in_ = item["bbox"]
            if (item["collection"] in query["collections"] and start <= when <= end
                    and iw < e and ie > w and is_ < n and in_ > s):
                hits.append(item)
        return {"type": "FeatureCollection", "features": hits, "links": []}

    def do_POST(self):
        if self.path.rstrip("/") == "/stac/search":
            length = int(self.headers.get("Content-Length", 0))
            return self._json(self._search(json.loads(self.rfile.read(length))))
        self.send_error(404)

    def do_GET(self):
        if self.path.rstrip("/") == "/stac":
            return self._json(self._landing())
        path = Path(self.translate_path(self.path))
        ranged = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not path.is_file() or not ranged:
            return super().do_GET()
        data = path.read_bytes()
        first = int(ranged.group(1))
        last = min(int(ranged.group(2)) if ranged.group(2) else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[first : last + 1])


def _cog(path, data, transform, nodata, dtype):
    with rasterio.open(path, "w", driver="COG", height=data.shape[0], width=data.shape[1], count=1,
                       dtype=dtype, crs=UTM, transform=transform, nodata=nodata) as dst:
        dst.write(data.astype(dtype), 1)


def _granule(root, base, sensor, when, west, east, origin_offset, cloud=None, shadow=None, water=None,
             extra_bits=0, nir_value=None):
    """One HLS granule (30 m) from ``west`` to ``east``; returns its STAC item."""
    west += origin_offset
    transform = from_origin(west, 4800300.0, 30.0, 30.0)
    width, height = int((east - west) // 30), 40  # 4800300 .. 4799100: covers the scene rows
    cols = np.arange(width)
    x = west + (cols + 0.5) * 30.0
    nir = np.tile(nir_of(x) if nir_value is None else np.full(width, nir_value), (height, 1))
    red = np.full((height, width), RED)
    fmask = np.full((height, width), extra_bits, np.uint8)
    for rows_cols, bit in ((cloud, "cloud"), (shadow, "cloud_shadow"), (water, "water")):
        if rows_cols is not None:
            fmask[rows_cols] |= 1 << FMASK_BITS[bit]
            red[rows_cols], nir[rows_cols] = 0.5, 0.5  # what a cloud looks like: NDVI 0
    name = f"HLS.{sensor}.T31TEJ.{when:%Y%j}T103000.v2.0"
    nir_key = {"L30": "B05", "S30": "B8A"}[sensor]
    bands = {"B04": red, nir_key: nir}
    if sensor == "S30":
        bands["B05"] = np.full((height, width), 0.15)  # red edge: NDVI 0.2 if wrongly used as NIR
    assets = {}
    for key, values in bands.items():
        _cog(root / f"{name}.{key}.tif", np.round(values / 0.0001), transform, -9999, "int16")
        assets[key] = {"href": f"{base}/{name}.{key}.tif", "type": "image/tiff; application=geotiff"}
    _cog(root / f"{name}.Fmask.tif", fmask, transform, 255, "uint8")
    assets["Fmask"] = {"href": f"{base}/{name}.Fmask.tif", "type": "image/tiff; application=geotiff"}
    bounds = (west, 4800300.0 - height * 30.0, west + width * 30.0, 4800300.0)
    w, s, e, n = transform_bounds(UTM, "EPSG:4326", *bounds)
    return {"type": "Feature", "stac_version": "1.0.0", "id": name, "collection": f"HLS{sensor}_2.0",
            "bbox": [w, s, e, n], "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
            "properties": {"datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "eo:cloud_cover": 10},
            "links": [], "assets": assets}


@pytest.fixture
def stac_server(tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.delenv("EARTHDATA_TOKEN", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    data = tmp_path / "data"
    data.mkdir()
    l30 = _granule(data, f"{base}/data", "L30", datetime(2023, 7, 10), 499700.0, 500400.0, 0.0,
                   cloud=(slice(20, 26), slice(0, 12)),  # west-only area (x < 500060): cloudy, nothing else sees it
                   shadow=(slice(20, 26), slice(18, 23)),  # in the overlap: S30 fills it
                   water=(slice(30, 32), slice(0, 5)))
    s30 = _granule(data, f"{base}/data", "S30", datetime(2023, 7, 12), 500200.0, 500900.0, 15.0,
                   extra_bits=0b01000000)  # low aerosol: not a reason to drop a pixel
    old = _granule(data, f"{base}/data", "L30", datetime(2022, 1, 5), 499700.0, 500900.0, 0.0, nir_value=0.9)
    _Handler.items = [l30, s30, old]
    yield f"{base}/stac"
    server.shutdown()
    server.server_close()
    _Handler.items = []


def test_hls_mosaic_of_two_granules(stac_server):
    ndvi, provenance = hls_ndvi(SCENE, "2023-06-01", "2023-08-31", stac_url=stac_server)
    assert [(i["sensor"], i["bands"]["nir"]) for i in provenance["items"]] == [("L30", "B05"), ("S30", "B8A")]
    cols = np.arange(SCENE.width)
    x = SCENE.transform.c + (cols + 0.5) * 10.0
    expected = np.tile(expected_ndvi(x), (SCENE.height, 1)).astype(np.float32)
    # scene rows 0..59 are granule rows 10..29 (300 m north offset, 30 m vs 10 m pixels)
    row = lambda granule_row: slice(3 * granule_row - 30, 3 * granule_row - 30 + 3)  # noqa: E731
    cloudy = np.zeros(SCENE.shape, bool)
    cloudy[row(20).start : row(25).stop, : 12 * 3 - 30] = True  # cloud at granule cols < 12 = x < 500060
    # interior of each granule: away from the last/first half-pixel where bilinear has no neighbour
    edges = (np.abs(x - 500400.0) < 30) | (np.abs(x - 500215.0) < 30)
    check = ~cloudy & ~edges[None, :]
    error = np.abs(ndvi[check] - expected[check])
    # a 10 m georeferencing error would shift NDVI by ~3e-3 everywhere; beside masked pixels,
    # bilinear falls back to one-sided neighbours (up to half a 30 m pixel: < 5e-3)
    assert np.median(error) < 5e-4 and error.max() < 5e-3
    assert np.isnan(ndvi[cloudy & ~edges[None, :]]).all()  # L30 cloud: no clear observation there
    # cloud shadow in the overlap is filled by the S30 granule with the right value (not 0)
    shadow = np.s_[row(20).start : row(25).stop, 18 * 3 - 30 + 3 : 23 * 3 - 30 - 3]
    np.testing.assert_allclose(ndvi[shadow], expected[shadow], atol=5e-3)
    # wrongly using S30's B05 would give 0.2 in the east; a 2022 granule (NDVI 0.8) is outside the window
    east = x > 500450
    assert np.abs(ndvi[:, east] - 0.2).min() > 0.2 and np.nanmax(ndvi) < 0.75
    assert provenance["clear_observations"]["max"] == 2


def _on_scene_grid(path, data):
    with rasterio.open(path, "w", driver="GTiff", height=60, width=60, count=1, dtype="float32",
                       crs=UTM, transform=SCENE.transform, nodata=-9999) as dst:
        dst.write(data.astype(np.float32), 1)
    return str(path)


def test_ndvi_cli_and_prepare_hls(stac_server, tmp_path):
    rng = np.random.default_rng(0)
    like = _on_scene_grid(tmp_path / "like.tif", np.zeros((60, 60)))
    code = main(["prepare", "--dsm", like, "--ortho-left", _on_scene_grid(tmp_path / "l.tif", rng.random((60, 60))),
                 "--ortho-right", _on_scene_grid(tmp_path / "r.tif", rng.random((60, 60))),
                 "--triangulation-error", _on_scene_grid(tmp_path / "e.tif", np.full((60, 60), 0.3)),
                 "--hls", "2023-06-01/2023-08-31", "--stac-url", stac_server, "--out", str(tmp_path / "scene")])
    assert code == 0
    scene = Scene.open(tmp_path / "scene")
    hls = scene.manifest["provenance"]["hls"]
    assert [i["sensor"] for i in hls["items"]] == ["L30", "S30"]
    assert scene.read("ndvi")[0, 59] == pytest.approx(float(expected_ndvi(500595.0)), abs=2e-3)
    assert np.isnan(scene.read("ndvi")[32, 0]) and scene.read("nodata_mask")[32, 0] == 0  # under the L30 cloud
    code = main(["ndvi", "--like", str(like), "--start", "2023-06-01", "--end", "2023-08-31",
                 "--stac-url", stac_server, "--out", str(tmp_path / "ndvi.tif")])
    assert code == 0
    with rasterio.open(tmp_path / "ndvi.tif") as src:
        assert src.crs == UTM and src.transform == SCENE.transform and src.nodata == -9999
        assert src.read(1)[0, 59] == pytest.approx(float(expected_ndvi(500595.0)), abs=2e-3)


def test_hls_with_no_granule_in_the_window_is_an_error(stac_server, capsys, tmp_path):
    like = tmp_path / "like.tif"
    with rasterio.open(like, "w", driver="GTiff", height=60, width=60, count=1, dtype="float32",
                       crs=UTM, transform=SCENE.transform) as dst:
        dst.write(np.zeros((60, 60), np.float32), 1)
    code = main(["ndvi", "--like", str(like), "--start", "2019-01-01", "--end", "2019-02-01",
                 "--stac-url", stac_server, "--out", str(tmp_path / "ndvi.tif")])
    err = capsys.readouterr().err
    assert code == 2 and "no HLS granule" in err and not (tmp_path / "ndvi.tif").exists()


def test_fmask_bits():
    values = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 192, 255], np.uint8)
    # cirrus (bit 0) and aerosol (bits 6-7) keep the pixel; cloud, adjacency, shadow, snow, water drop it
    np.testing.assert_array_equal(fmask_clear(values), [1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0])


def test_ndvi_from_bands_handles_nodata_and_zero_sum():
    nir = np.array([0.5, 0.0, np.nan, 0.3], np.float32)
    red = np.array([0.1, 0.0, 0.1, 0.3], np.float32)
    out = ndvi_from_bands(nir, red)
    assert out[0] == pytest.approx(0.4 / 0.6) and np.isnan(out[1]) and np.isnan(out[2]) and out[3] == 0


def test_ndvi_from_ign_irc_orthophoto(tmp_path):
    irc = shared_data_dir() / "ign_montpellier" / "test_data_irc.tif"
    if not irc.exists():
        pytest.skip(f"real data not found at {irc} (set DEEPDEM_DATA)")
    ndvi, grid = ndvi_from_raster(irc, nir_band=1, red_band=2)
    with rasterio.open(irc) as src:
        nir, red = src.read(1).astype(float), src.read(2).astype(float)
        valid = (src.read(1) != 255) & (src.read(2) != 255)
    assert grid.shape == (252, 252)
    np.testing.assert_allclose(ndvi[valid], ((nir - red) / (nir + red))[valid], atol=1e-6)
    assert np.isnan(ndvi[~valid]).all()
    code = main(["ndvi", "--raster", str(irc), "--bands", "1,2", "--like",
                 str(irc.with_name("ref_DSM_77055_627760_50CM.tif")), "--out", str(tmp_path / "n.tif")])
    assert code == 0
    with rasterio.open(tmp_path / "n.tif") as src:
        assert src.shape == (100, 100) and src.crs == CRS.from_epsg(2154)
        values = src.read(1)
        assert -1 <= values.min() and values.max() <= 1


# -- the views' angles from WorldView metadata -----------------------------------------------------

def _worldview_xml(path, azimuth, elevation, off_nadir):
    path.write_text(f"""\ufeff<?xml version="1.0" encoding="UTF-8"?>
<isd><IMD><VERSION>AA</VERSION><IMAGE><SATID>WV03</SATID>
<MINSATAZ>{azimuth - 1}</MINSATAZ><MEANSATAZ>{azimuth}</MEANSATAZ><MAXSATAZ>{azimuth + 1}</MAXSATAZ>
<MEANSATEL>{elevation}</MEANSATEL><MEANOFFNADIRVIEWANGLE>{off_nadir}</MEANOFFNADIRVIEWANGLE>
</IMAGE></IMD></isd>
""")
    return path


def _worldview_imd(path, azimuth, elevation, off_nadir):
    path.write_text(f"""version = "AA";
BEGIN_GROUP = IMAGE_1
\tsatId = "WV03";
\tminSatAz = {azimuth - 1};
\tmeanSatAz = {azimuth};
\tmeanSatEl = {elevation};
\tmeanOffNadirViewAngle = {off_nadir};
END_GROUP = IMAGE_1
END;
""")
    return path


def test_read_view_takes_the_zenith_angle_at_the_ground_from_xml_and_imd(tmp_path):
    from deepdem.imagery import read_view

    for view in (read_view(_worldview_xml(tmp_path / "left.XML", 312.9, 73.7, 14.4)),
                 read_view(_worldview_imd(tmp_path / "left.IMD", 312.9, 73.7, 14.4))):
        assert view.azimuth == pytest.approx(312.9)
        assert view.off_nadir == pytest.approx(16.3)  # 90 - elevation, not the angle at the satellite
    assert read_view(_worldview_imd(tmp_path / "neg.IMD", -20.0, 60.0, 27.0)).azimuth == pytest.approx(340.0)


def test_read_view_says_what_is_missing_and_in_which_file(tmp_path):
    from deepdem.errors import InputError
    from deepdem.imagery import read_view

    (tmp_path / "dim.XML").write_text("<Dimap_Document><Geometric_Data/></Dimap_Document>")
    with pytest.raises(InputError, match="dim.XML: no meanSatAz or meanSatEl"):
        read_view(tmp_path / "dim.XML")
    (tmp_path / "broken.XML").write_text("<isd><IMD>")
    with pytest.raises(InputError, match="broken.XML: not valid XML"):
        read_view(tmp_path / "broken.XML")
    with pytest.raises(InputError, match="below.IMD: satellite elevation -5.0° is outside"):
        read_view(_worldview_imd(tmp_path / "below.IMD", 10.0, -5.0, 20.0))
    with pytest.raises(InputError, match="absent.XML: view metadata not found"):
        read_view(tmp_path / "absent.XML")
