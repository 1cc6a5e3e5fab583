"""``python -m shardopt ...`` is the ``shardopt`` console script."""
from .cli import main

# the guard matters: spawned demo ranks re-import this module as __mp_main__
if __name__ == "__main__":
    raise SystemExit(main())
