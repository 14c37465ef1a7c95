"""The serving runtime: device worker, micro-batcher, adapter cache, inference, images, heatmaps, readiness."""
