"""The Blender layer: operators, panel, scene settings, preferences and result objects (everything that imports
bpy). The bpy-free work (protocol, backend process, request, buffers, surface sampling) is in `..core`."""

ADDON_ID = __package__.rpartition(".")[0]  # the add-on's package: what Blender registers preferences under
