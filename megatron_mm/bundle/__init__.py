"""Offline bundles for GPU machines without internet: Transformer Engine's CUDA library cut to
one GPU architecture (`fatbin`), wheels rewritten with it (`wheel`). Used by tools/te_bundle.py."""
