"""Remote LIDAR: an EPT dataset built from a real IGN tile, served on 127.0.0.1 only.

No test reaches beyond the loopback interface: the 3DEP index and the EPT/COPC endpoints are
replaced by files written here and served by http.server in a thread (port 0).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import laspy
import numpy as np
import pyproj
import pytest
import rasterio

from deepdem.errors import InputError
from deepdem.lidar import find_3dep, grid_lidar, open_remote
from deepdem.lidar.cli import add_lidar_parser
from deepdem.lidar.remote import (EptDataset, HttpRangeFile, fetch, polygon_intersects_box,
                                  survey_year)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPDEM_DATA", REPO / ".." / "shared" / "data"))
TILE = DATA / "ign_montpellier" / "test_data_77055_627760_LA93_IGN69.laz"


class Handler(SimpleHTTPRequestHandler):
    """Static files with Range support, a request log, and injectable transient failures."""

    log: list = []
    fail_once: set = set()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        type(self).log.append(self.path)
        if self.path in self.fail_once:
            self.fail_once.discard(self.path)
            self.send_error(503, "try again")
            return
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if rng and path.is_file():
            data = path.read_bytes()
            start, end = rng.split("=")[1].split("-")
            start, end = int(start), min(int(end), len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(data[start:end + 1])
            return
        super().do_GET()


def write_ept(src: Path, out: Path) -> dict:
    """Write an EPT (laszip) dataset from a LAS file: root node + 8 depth-1 octants.

    One octant's hierarchy lives in its own file (count -1) to exercise sub-hierarchies.
    """
    las = laspy.read(src)
    x, y, z = np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)
    size = max(np.ptp(x), np.ptp(y), np.ptp(z)) + 1.0
    cube = [float(x.min()), float(y.min()), float(z.min())]
    cube += [cube[0] + size, cube[1] + size, cube[2] + size]
    (out / "ept-data").mkdir(parents=True)
    (out / "ept-hierarchy").mkdir()
    rng = np.random.default_rng(0)
    root = rng.random(len(x)) < 0.1
    half = size / 2
    ox = np.minimum(((x - cube[0]) // half).astype(int), 1)
    oy = np.minimum(((y - cube[1]) // half).astype(int), 1)
    oz = np.minimum(((z - cube[2]) // half).astype(int), 1)
    nodes = {"0-0-0-0": root}
    for i in range(2):
        for j in range(2):
            for k in range(2):
                m = ~root & (ox == i) & (oy == j) & (oz == k)
                if m.any():
                    nodes[f"1-{i}-{j}-{k}"] = m
    hierarchy = {}
    for key, m in nodes.items():
        header = laspy.LasHeader(point_format=las.header.point_format, version=las.header.version)
        header.scales, header.offsets = las.header.scales, las.header.offsets
        node = laspy.LasData(header)
        node.points = las.points[m]
        node.write(out / "ept-data" / f"{key}.laz")
        hierarchy[key] = int(m.sum())
    delegated = next(k for k in hierarchy if k.startswith("1-"))
    (out / "ept-hierarchy" / f"{delegated}.json").write_text(
        json.dumps({delegated: hierarchy[delegated]}))
    hierarchy[delegated] = -1
    (out / "ept-hierarchy" / "0-0-0-0.json").write_text(json.dumps(hierarchy))
    wkt = las.header.parse_crs().to_wkt()
    info = {
        "bounds": cube,
        "boundsConforming": [float(x.min()), float(y.min()), float(z.min()),
                             float(x.max()), float(y.max()), float(z.max())],
        "dataType": "laszip", "hierarchyType": "json", "points": int(len(x)), "span": 128,
        "srs": {"wkt": wkt}, "version": "1.0.0",
        "schema": [{"name": "X", "type": "signed", "size": 4, "scale": 0.01, "offset": 0}],
    }
    (out / "ept.json").write_text(json.dumps(info))
    return info


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not TILE.exists():
        pytest.skip(f"shared data not found: {TILE} (set DEEPDEM_DATA)")
    root = tmp_path_factory.mktemp("www")
    write_ept(TILE, root / "tile_ept")
    (root / "plain.laz").write_bytes(TILE.read_bytes())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, root
    httpd.shutdown()
    httpd.server_close()


def test_ept_equals_local_file(server, tmp_path):
    base, _ = server
    url = f"{base}/tile_ept/ept.json"
    local = grid_lidar([TILE], resolution=1.0, ground="class", progress=False)
    bounds = local.grid.bounds
    remote = grid_lidar([url], resolution=1.0, bounds=bounds, ground="class", progress=False,
                        out_dir=tmp_path / "remote")
    assert remote.grid == local.grid
    assert remote.points_gridded == local.points_gridded
    np.testing.assert_array_equal(remote.dsm, local.dsm)
    np.testing.assert_allclose(remote.dtm, local.dtm, atol=1e-6, equal_nan=True)
    with rasterio.open(tmp_path / "remote" / "dtm.tif") as src:
        assert src.crs.to_epsg() == 2154


def test_ept_reads_only_intersecting_nodes(server):
    base, _ = server
    ds = EptDataset(f"{base}/tile_ept/ept.json")
    xmin, ymin = ds.cube[0], ds.cube[1]
    corner = (xmin + 1, ymin + 1, xmin + 5, ymin + 5)  # inside octant x=0, y=0 only
    keys = {n.name for n in ds.nodes(corner)}
    assert "0-0-0-0" in keys
    assert all(k == "0-0-0-0" or k.split("-")[1:3] == ["0", "0"] for k in keys)
    Handler.log.clear()
    n = sum(len(c) for c in ds.chunks(corner, progress=False))
    fetched = [p for p in Handler.log if "/ept-data/" in p]
    assert len(fetched) == len(keys) < 9
    las = laspy.read(TILE)
    x, y = np.asarray(las.x), np.asarray(las.y)
    inside = (x >= corner[0]) & (x <= corner[2]) & (y >= corner[1]) & (y <= corner[3])
    assert n == int(inside.sum())


def test_retries_transient_errors(server):
    base, _ = server
    Handler.fail_once.add("/tile_ept/ept.json")
    Handler.log.clear()
    info = json.loads(fetch(f"{base}/tile_ept/ept.json", backoff=0.01))
    assert info["dataType"] == "laszip"
    assert Handler.log.count("/tile_ept/ept.json") == 2
    with pytest.raises(InputError, match="missing.json"):
        fetch(f"{base}/missing.json", retries=2, backoff=0.01)


def test_http_range_file_reads_a_laz_header(server):
    base, _ = server
    Handler.log.clear()
    with laspy.open(HttpRangeFile(f"{base}/plain.laz")) as reader:
        assert reader.header.point_count == laspy.open(TILE).header.point_count
    # A plain LAZ URL is not COPC: one clear error, not a traceback.
    with pytest.raises(InputError, match="COPC"):
        open_remote(f"{base}/plain.laz")


def make_index(root: Path, base: str) -> str:
    """A 3DEP-like boundaries index around the tile (lon/lat), pointing at the loopback EPT."""
    t = pyproj.Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    lon0, lat0, lon1, lat1 = t.transform_bounds(770540, 6277540, 770610, 6277610)
    square = [[[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]]
    far = [[[lon0 + 1, lat0 + 1], [lon1 + 1, lat0 + 1], [lon1 + 1, lat1 + 1], [lon0 + 1, lat0 + 1]]]
    url = f"{base}/tile_ept/ept.json"
    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"name": "FR_Montpellier_2015", "url": url, "count": 10}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"name": "FR_Montpellier_2021", "url": url + "?newer", "count": 10}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": far},
         "properties": {"name": "Elsewhere_2016", "url": f"{base}/nowhere/ept.json",
                        "count": 10}},
    ]
    (root / "resources.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                        "features": feats}))
    return f"{base}/resources.geojson"


def test_3dep_search_by_bounds_and_date(server, tmp_path):
    base, root = server
    index = make_index(root, base)
    bounds = (770560.0, 6277560.0, 770590.0, 6277590.0)
    old = find_3dep(bounds, "EPSG:2154", date="2016-06-01", index_url=index)
    assert [s.location for s in old] == [f"{base}/tile_ept/ept.json"]
    newest = find_3dep(bounds, "EPSG:2154", index_url=index)
    assert newest[0].location.endswith("?newer")
    with pytest.raises(InputError, match="no 3DEP survey"):
        find_3dep((0, 0, 10, 10), "EPSG:2154", index_url=index)

    parser = argparse.ArgumentParser()
    add_lidar_parser(parser.add_subparsers())
    out = tmp_path / "dep"
    args = parser.parse_args(["lidar", "--3dep", "--3dep-index", index, "--date", "2015",
                              "--bounds", *map(str, bounds), "--crs", "EPSG:2154",
                              "--resolution", "1", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    with rasterio.open(out / "dtm.tif") as src:
        assert src.shape == (30, 30)
        dtm = src.read(1, masked=True)
    local = grid_lidar([TILE], resolution=1.0, bounds=bounds, progress=False)
    np.testing.assert_allclose(dtm.filled(np.nan), local.dtm, atol=1e-4, equal_nan=True)


def test_polygon_box_predicates():
    sq = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    assert polygon_intersects_box(sq, (2, 2, 3, 3))  # box inside polygon
    assert polygon_intersects_box(sq, (-5, -5, 20, 20))  # polygon inside box
    assert polygon_intersects_box(sq, (9, -1, 11, 1))  # corners overlap
    assert not polygon_intersects_box(sq, (11, 11, 12, 12))
    assert survey_year("USGS_LPC_OR_Willamette_2016_2017") == 2017
    assert survey_year("ARRA-CA_GoldenGate_2010") == 2010
    assert survey_year("no_year_here") is None
