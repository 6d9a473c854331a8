"""Hard-surface part families (shapes.FAMILY_GROUPS["hard_surface"]): they survive 7-bit quantization as closed
solids within the face cap over many seeds, in any of the 24 axis-aligned poses; groups and the preview."""
import numpy as np
import pytest
import trimesh

from xspecmesh.cli import main
from xspecmesh.errors import SettingsError
from xspecmesh.geometry import tokenizer
from xspecmesh.geometry.shapes import FAMILIES, FAMILY_GROUPS
from xspecmesh.training import data

HARD_SURFACE = FAMILY_GROUPS["hard_surface"]
CAP = 160  # the campaign's face cap (docs/TRAINING.md)


@pytest.mark.parametrize("family", HARD_SURFACE)
def test_parts_round_trip_through_tokens_as_closed_solids(family):
    """Over 25 seeds, augmented as in training: the tokens decode to the same faces, none collapsed, no two alike,
    and the decoded mesh is one closed, consistently wound body after welding (every part here is one solid)."""
    config = data.ShapeConfig(families=(family,), max_faces=CAP, axis_aligned=True, axis_turns=24)
    rng = np.random.default_rng(7)
    for _ in range(25):
        pair = data.make_pair(rng, config, num_points=32, augment=True)
        verts, faces = tokenizer.decode_mesh(pair.tokens)
        assert pair.family == family and 4 <= len(faces) <= CAP
        mesh = trimesh.Trimesh(verts, faces, process=True)  # welds equal vertices
        assert len(mesh.faces) == len(faces) and (mesh.area_faces > 0).all()
        assert len({tuple(sorted(f)) for f in mesh.faces.tolist()}) == len(faces)
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0 and mesh.body_count == 1


@pytest.mark.parametrize("family", HARD_SURFACE)
def test_most_raw_draws_survive_quantization(family):
    """The generator itself keeps features thick enough: most draws pass the quantization rule without retries
    (assemblies about half: where parts meet, slivers can collapse, and three parts can pass the face cap)."""
    config = data.ShapeConfig(families=(family,), max_faces=CAP, axis_aligned=True, axis_turns=24)
    rng = np.random.default_rng(3)
    kept = 0
    for _ in range(20):
        mesh = data._posed(FAMILIES[family](rng), rng, config)
        kept += mesh is not None and data._quantized_if_valid(mesh, config) is not None
    assert kept >= (8 if family == "assembly" else 14)


def test_the_24_turns_are_all_drawn_and_4_keep_up():
    rng = np.random.default_rng(0)
    turns = data.ShapeConfig(axis_aligned=True, axis_turns=24)
    mats = {tuple(np.round(data._turn(rng, turns).as_matrix()).astype(int).ravel()) for _ in range(400)}
    assert len(mats) == 24
    assert all(abs(np.linalg.det(np.reshape(m, (3, 3))) - 1) < 1e-9 for m in mats)
    yaw_only = data.ShapeConfig(axis_aligned=True)
    ups = {tuple(np.round(data._turn(rng, yaw_only).apply([0, 1, 0]), 6)) for _ in range(50)}
    assert ups == {(0.0, 1.0, 0.0)}
    with pytest.raises(SettingsError):
        data.ShapeConfig(axis_turns=24)  # 24 turns are axis-aligned poses
    with pytest.raises(SettingsError):
        data.ShapeConfig(axis_aligned=True, axis_turns=8)


def test_family_groups_expand_and_split_the_parts():
    config = data.ShapeConfig.parse("simple_parts,nut,tube")
    assert config.names == (*FAMILY_GROUPS["simple_parts"], "nut")
    assert set(FAMILY_GROUPS["simple_parts"]) | set(FAMILY_GROUPS["compound_parts"]) == set(HARD_SURFACE)
    assert not set(FAMILY_GROUPS["simple_parts"]) & set(FAMILY_GROUPS["compound_parts"])
    with pytest.raises(SettingsError):
        data.ShapeConfig.parse("hard_surface,teapot")


def test_preview_per_family_draws_every_family(tmp_path, capsys):
    out = tmp_path / "parts.png"
    assert main(["dataset", "preview", "--families", "hard_surface", "--per-family", "1", "--axis-turns", "24",
                 "--max-faces", str(CAP), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({len(HARD_SURFACE)} shapes)" in capsys.readouterr().out
    assert main(["dataset", "preview", "--per-family", "0", "-o", str(out)]) == 2
