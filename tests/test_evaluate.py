import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from deepdem.errors import InputError
from deepdem.evaluate import error_metrics, evaluate


def test_metrics_equal_hand_computed_values():
    e = np.array([-2.0, -1.0, 0.0, 1.0, 5.0])
    m = error_metrics(e)
    assert m["count"] == 5
    assert m["mae"] == pytest.approx(9 / 5)
    assert m["rmse"] == pytest.approx(np.sqrt(31 / 5))
    assert m["mean"] == pytest.approx(0.6)
    assert m["median"] == 0.0
    # |e - median| = 2, 1, 0, 1, 5 -> median 1 -> NMAD 1.4826
    assert m["nmad"] == pytest.approx(1.4826)
    # numpy's linear percentile of |e| = 0,1,1,2,5 at 95 %: 2 + 0.8·3
    assert m["p95_abs"] == pytest.approx(4.4)


def test_metrics_ignore_nan():
    m = error_metrics(np.array([1.0, np.nan, -1.0]))
    assert m["count"] == 2 and m["mae"] == 1.0


def _write(path, data, nodata=-9999.0):
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[0], width=data.shape[1], count=1,
                       dtype="float32", crs="EPSG:32610", transform=from_origin(0, 10, 1, 1), nodata=nodata) as dst:
        dst.write(data.astype(np.float32), 1)
    return path


def test_refined_and_initial_are_compared_on_the_same_pixels(tmp_path):
    truth = np.zeros((4, 4))
    refined = np.full((4, 4), 1.0)
    initial = np.full((4, 4), 2.0)
    initial[0, :] = -9999.0  # a hole in the initial DSM: those pixels leave both comparisons
    refined[1, 0] = 100.0
    t, r, i = _write(tmp_path / "t.tif", truth), _write(tmp_path / "r.tif", refined), _write(tmp_path / "i.tif", initial)
    result = evaluate(r, t, initial=i, json_path=tmp_path / "m.json")
    assert result.pixels == 12
    assert result.metrics["initial"]["mae"] == pytest.approx(2.0)
    assert result.metrics["refined"]["mae"] == pytest.approx((11 * 1.0 + 100.0) / 12)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["pixels"] == 12
    assert "refined / initial MAE" in result.table()


def test_dem_without_valid_pixels_is_refused(tmp_path):
    t = _write(tmp_path / "t.tif", np.zeros((4, 4)))
    d = _write(tmp_path / "d.tif", np.full((4, 4), -9999.0))
    with pytest.raises(InputError, match="d.tif: DEM has no valid pixel"):
        evaluate(d, t)
