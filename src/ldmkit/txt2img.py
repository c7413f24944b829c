"""Former home of the text-to-image generator: kept importable as a thin re-export of ldmkit.generator."""

from ldmkit.generator import (  # noqa: F401
    BackboneDenoiser, TextToImage, fresh_noise_seed, load_text_to_image, per_sample_generators, sampler_kwargs,
    seeded_noise,
)
