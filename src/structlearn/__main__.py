"""``python -m structlearn``: the same Hydra app as the ``structlearn`` console script."""

from structlearn.run import main

if __name__ == "__main__":
    main()
