"""`python -m ldmkit.data.latent_cache`: the command lives in `ldmkit.cli.latent_cache`."""

from ldmkit.cli.latent_cache import main

main()
