"""Volume store: round trip, OME-Zarr metadata, slab streaming, atomic completion."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from medrecon.errors import InputError
from medrecon.volume import Geometry, Volume, default_chunk_depth, slab_ranges


def _oblique_geometry() -> Geometry:
    c, s = np.cos(0.3), np.sin(0.3)
    # columns: z axis, y axis, x axis (LPS); a rotation about the patient's x axis
    direction = np.array([[0, 0, 1.0], [-s, c, 0], [c, s, 0]])
    return Geometry((2.5, 0.7, 0.7), (-120.0, -80.5, 33.0), tuple(map(tuple, direction)))


def test_round_trip_values_geometry_and_ome(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(13, 24, 20)).astype(np.float32)
    geom = _oblique_geometry()
    vol = Volume.from_array(tmp_path / "v.zarr", data, geom, {"modality": "CT", "units": "HU"}, chunk_depth=4)
    again = Volume.open(tmp_path / "v.zarr")
    np.testing.assert_array_equal(again.read(), data)
    assert again.geometry.isclose(geom)
    assert again.array.chunks == (4, 24, 20)
    assert again.meta["modality"] == "CT" and again.meta["complete"] is True
    assert again.meta["value_range"] == pytest.approx([float(data.min()), float(data.max())])
    ome = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert all(a["unit"] == "millimeter" for a in ms["axes"])
    tf = ms["datasets"][0]["coordinateTransformations"]
    assert tf[0] == {"type": "scale", "scale": [2.5, 0.7, 0.7]}
    np.testing.assert_allclose(tf[1]["translation"], geom.direction_matrix.T @ np.array(geom.origin))
    assert vol.array.metadata.dimension_names == ("z", "y", "x")


def test_affine_maps_index_to_lps():
    geom = _oblique_geometry()
    p = geom.index_to_lps(np.array([[2, 3, 4]]))[0]
    expect = np.array(geom.origin) + geom.direction_matrix @ (np.array(geom.spacing) * [2, 3, 4])
    np.testing.assert_allclose(p, expect)


def test_slab_writing_and_iteration(tmp_path):
    data = np.arange(10 * 6 * 5, dtype=np.float32).reshape(10, 6, 5)
    with Volume.create(tmp_path / "s.zarr", data.shape, Geometry(), {}, chunk_depth=3) as w:
        for start in range(0, 10, 3):
            w.write_slab(start, data[start:start + 3])
    vol = Volume.open(tmp_path / "s.zarr")
    got = []
    for (start, stop, lo, hi), slab in vol.iter_slabs(slab=4, halo=1):
        np.testing.assert_array_equal(slab, data[lo:hi])
        got.append(slab[start - lo:start - lo + (stop - start)])
    np.testing.assert_array_equal(np.concatenate(got), data)


def test_slab_ranges_cover_exactly_once():
    for depth, slab, halo in [(10, 3, 1), (7, 7, 2), (1, 4, 0), (512, 64, 8)]:
        cover = np.zeros(depth, int)
        for start, stop, lo, hi in slab_ranges(depth, slab, halo):
            cover[start:stop] += 1
            assert lo == max(0, start - halo) and hi == min(depth, stop + halo)
        assert (cover == 1).all()


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "bad.zarr"
    with pytest.raises(RuntimeError, match="boom"), Volume.create(out, (4, 3, 3), Geometry()) as w:
        w.write_slab(0, np.zeros((2, 3, 3)))
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unfinished_write_is_refused(tmp_path):
    out = tmp_path / "part.zarr"
    w = Volume.create(out, (4, 3, 3), Geometry())
    w.write_slab(0, np.ones((2, 3, 3)))
    with pytest.raises(RuntimeError, match="never written"):
        w.commit()
    w.abort()
    assert not out.exists()
    with pytest.raises(InputError, match="does not exist"):
        Volume.open(out)


def test_store_without_completion_flag_is_incomplete(tmp_path):
    out = tmp_path / "v.zarr"
    Volume.from_array(out, np.ones((2, 3, 3), np.float32), Geometry())
    g = zarr.open_group(str(out), mode="r+")
    g.attrs["medrecon"] = {**g.attrs["medrecon"], "complete": False}
    with pytest.raises(InputError, match="incomplete"):
        Volume.open(out)


def test_nan_is_refused_with_location(tmp_path):
    data = np.zeros((4, 3, 3), np.float32)
    data[2, 1, 1] = np.nan
    with pytest.raises(InputError, match=r"1 NaN/Inf voxels in slices 2\.\.3"):
        Volume.from_array(tmp_path / "n.zarr", data, Geometry(), chunk_depth=2)
    assert not (tmp_path / "n.zarr").exists()


def test_rewrite_replaces_existing(tmp_path):
    out = tmp_path / "v.zarr"
    Volume.from_array(out, np.zeros((2, 3, 3), np.float32), Geometry())
    Volume.from_array(out, np.ones((3, 3, 3), np.float32), Geometry())
    assert Volume.open(out).shape == (3, 3, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.zarr"]


def test_geometry_validation():
    with pytest.raises(InputError, match="spacing"):
        Geometry((0.0, 1.0, 1.0))
    with pytest.raises(InputError, match="orthonormal"):
        Geometry(direction=((1, 0, 0), (1, 0, 0), (0, 0, 1)))


def test_default_chunk_depth_is_about_8_mib():
    assert default_chunk_depth((512, 512, 512)) == 8
    assert default_chunk_depth((3, 64, 64)) == 3


def test_slab_memory_does_not_grow_with_depth(tmp_path):
    """Writing and reading slab by slab keeps peak traced memory at a slab, not at the volume."""
    import tracemalloc

    def peak(depth: int) -> int:
        slab = np.ones((4, 128, 128), np.float32)
        tracemalloc.start()
        with Volume.create(tmp_path / f"m{depth}.zarr", (depth, 128, 128), Geometry(), chunk_depth=4) as w:
            for z in range(0, depth, 4):
                w.write_slab(z, slab)
        for _rng, _data in Volume.open(tmp_path / f"m{depth}.zarr").iter_slabs():
            pass
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    small, large = peak(16), peak(128)
    assert large < 1.5 * small + (1 << 20), (small, large)


def test_child_volume_lives_inside_parent(tmp_path):
    mean = np.ones((4, 5, 6), np.float32)
    with Volume.create(tmp_path / "r.zarr", mean.shape, Geometry(), {"kind": "mean"}) as w:
        w.write(mean)
        with w.child("std", {"kind": "std"}) as c:
            c.write(2 * mean)
    parent = Volume.open(tmp_path / "r.zarr")
    child = Volume.open(tmp_path / "r.zarr" / "std")
    np.testing.assert_array_equal(child.read(), 2 * mean)
    assert parent.meta["kind"] == "mean" and child.meta["kind"] == "std"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]
