"""`python -m ldmkit.data.export_shards`: the command lives in `ldmkit.cli.export_shards`."""

from ldmkit.cli.export_shards import main

main()
