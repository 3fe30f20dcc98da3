"""UniFER on Ray: FER with multimodal LLMs — benchmark, curation, SFT, RLVR and serving."""

__version__ = "0.1.0"
