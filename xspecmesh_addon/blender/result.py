"""The object a job grows: created beside the source, rebuilt from numpy arrays, named for how it ended.

Geometry goes in through the attribute API (`foreach_set` on whole arrays), never face by face. The object takes the
source's world matrix, so its vertices are stored in the source's local frame.
"""
from __future__ import annotations

import bpy
import numpy as np

from ..core import buffers

PARTIAL_SUFFIX = " (partial)"
STATS_PROPERTY = "xspecmesh"  # custom property on the result: request settings and the backend's stats


def result_name(source_name: str) -> str:
    return f"{source_name}_retopo"


def write_mesh(mesh, verts: np.ndarray, faces: np.ndarray) -> None:
    """Replace the mesh's geometry with triangles in a handful of bulk calls."""
    mesh.clear_geometry()
    if len(faces) == 0:
        mesh.update()
        return
    mesh.vertices.add(len(verts))
    mesh.loops.add(faces.size)
    mesh.polygons.add(len(faces))
    mesh.attributes["position"].data.foreach_set("vector", np.ascontiguousarray(verts, np.float32).ravel())
    mesh.attributes[".corner_vert"].data.foreach_set("value", np.ascontiguousarray(faces, np.int32).ravel())
    mesh.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    mesh.update(calc_edges=True)
    mesh.shade_flat()  # low-poly hard-surface: faceted (without the sharp_face attribute Blender shades smooth)


class ResultObject:
    """Owns `<source>_retopo` while a job runs; looks it up by name so an undo mid-run cannot leave a dead pointer."""

    def __init__(self, source, collections, normalization_matrix: np.ndarray):
        world = np.array(source.matrix_world, dtype=np.float64)
        if abs(np.linalg.det(world[:3, :3])) < 1e-12:  # a zero-scaled source: keep the result in world space
            world = np.eye(4)
        # normalized frame → world → the source's local frame, applied to every vertex the backend sends
        self.to_local = np.linalg.inv(world) @ normalization_matrix
        self.world = world
        self.collections = list(collections)
        mesh = bpy.data.meshes.new(result_name(source.name))
        obj = bpy.data.objects.new(result_name(source.name), mesh)
        obj.matrix_world = _matrix(world)
        for coll in self.collections:
            coll.objects.link(obj)
        self.name = obj.name

    @property
    def object(self):
        obj = bpy.data.objects.get(self.name)
        if obj is None:  # removed (e.g. undone) while the job ran: start over with a fresh one
            mesh = bpy.data.meshes.new(self.name)
            obj = bpy.data.objects.new(self.name, mesh)
            obj.matrix_world = _matrix(self.world)
            for coll in self.collections:
                try:
                    coll.objects.link(obj)
                except (ReferenceError, RuntimeError):
                    pass
            self.name = obj.name
        return obj

    def show(self, triangles: np.ndarray) -> None:
        """Live view: a triangle soup of everything received so far."""
        verts, faces = buffers.soup(triangles)
        write_mesh(self.object.data, buffers.transform(verts, self.to_local), faces)

    def finish(self, triangles: np.ndarray, *, partial: bool, info: dict) -> str | None:
        """Weld and keep the result (renamed when partial); remove it when nothing was generated. Returns its name."""
        verts, faces = buffers.weld(triangles)
        obj = self.object
        if len(faces) == 0:
            self.remove()
            return None
        write_mesh(obj.data, buffers.transform(verts, self.to_local), faces)
        if partial:
            obj.name = obj.name + PARTIAL_SUFFIX
            obj.data.name = obj.name
            self.name = obj.name
        obj[STATS_PROPERTY] = _id_property(info)
        return obj.name

    def remove(self) -> None:
        obj = bpy.data.objects.get(self.name)
        if obj is not None:
            mesh = obj.data
            bpy.data.objects.remove(obj)
            if mesh is not None and mesh.users == 0:
                bpy.data.meshes.remove(mesh)


def _matrix(m: np.ndarray):
    from mathutils import Matrix

    return Matrix(m.tolist())


def _id_property(value):
    """Plain values for an ID property (which cannot hold None)."""
    if isinstance(value, dict):
        return {str(k): _id_property(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_id_property(v) for v in value if v is not None]
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
