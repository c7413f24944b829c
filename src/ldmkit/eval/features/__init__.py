"""Feature extractors for distribution metrics (DINOv2, CLIP), each recording its identity."""
