"""Multimodal data: the procedural demo caption set (`demo`), JSONL -> WebDataset shards
(`shards`), and the text side of a sample: placeholders, chat template, loss masks and
sequence packing (`text`). The media decoders live with the loaders.
"""
