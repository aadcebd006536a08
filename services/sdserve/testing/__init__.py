"""Random-weight models for tests and benchmarks: no download, a few seconds to build.

`architectures` holds the parts' configs (tiny presets and Stable Diffusion 1.5's full size) and
builds them in memory; `tiny` writes a tiny model as a diffusers folder (`sdserve
make-tiny-model`).
"""
