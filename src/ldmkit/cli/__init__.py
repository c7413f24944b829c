"""Thin command-line entry points: parse arguments, compose the config (`ldmkit.config`), call the library.

    python -m ldmkit.cli.train OVERRIDES        the same as `python train.py OVERRIDES` in a checkout
    python -m ldmkit.cli.eval OVERRIDES         the same as `python eval.py OVERRIDES`
    python -m ldmkit.cli.quickstart             `make quickstart`
    python -m ldmkit.cli.export_shards ...      a dataset split as webdataset shards
    python -m ldmkit.cli.latent_cache ...       the latent / text-embedding cache
    python -m ldmkit.cli.judge --cache-dir DIR  the shapes attribute classifier
    python -m ldmkit.cli.convert import|export  Stable Diffusion checkpoints <-> ldmkit artifacts

They work from an installed wheel (conf/ ships inside it; `$LDMKIT_CONF` points at your own).
"""
