"""The pipeline's stages, in the order they run: a module of names only, so that the command line can offer them
without importing the stages themselves (torch, transformers, Ray)."""

STAGES = ("curate_cot", "curate_rlvr", "sft", "rlvr", "bench", "serve")
