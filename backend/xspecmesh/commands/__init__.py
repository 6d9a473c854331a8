"""Sub-commands of the `xspecmesh` CLI, one module each (see xspecmesh.cli)."""
