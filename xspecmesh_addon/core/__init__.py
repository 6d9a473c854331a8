"""The add-on's bpy-free core: the protocol, the backend process and its client, the typed request, triangle
buffers, surface sampling, the backend's locations and its installer. Nothing here imports bpy, so the tests load
these modules without Blender (tests/addon_modules.py)."""
