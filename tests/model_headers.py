"""Model files for the pre-flight's tests: checkpoints that are only a safetensors header (the names and
shapes by which a family is told; the pre-flight reads nothing else), and a minimal LLM job."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from shared.sd.base_model import SD1_TEXT_KEY, SDXL_TEXT2_PREFIX, UNET_KEY_PREFIX

VAE_DOWN = "first_stage_model.encoder.down.{}.downsample.conv.weight"


def header_only_checkpoint(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A .safetensors file whose header lists these tensors (empty data: only the header is read here)."""
    header = json.dumps({name: {"dtype": "F16", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in shapes.items()}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def sd15_layout(path: Path) -> Path:
    """The names and shapes by which SD1.5's single file says what it is: its UNet's conv_in and three
    downsamplers (input_blocks 3, 6, 9), its VAE's three, and CLIP-L."""
    shapes = {UNET_KEY_PREFIX + "input_blocks.0.0.weight": [320, 4, 3, 3], SD1_TEXT_KEY: [49408, 768]}
    shapes |= {UNET_KEY_PREFIX + f"input_blocks.{i}.0.op.weight": [320, 320, 3, 3] for i in (3, 6, 9)}
    shapes |= {VAE_DOWN.format(i): [128, 128, 3, 3] for i in range(3)}
    return header_only_checkpoint(path, shapes)


def sdxl_layout(path: Path) -> Path:
    shapes = {UNET_KEY_PREFIX + "input_blocks.0.0.weight": [320, 4, 3, 3],
              SDXL_TEXT2_PREFIX + "transformer.resblocks.9.mlp.c_proj.bias": [1280]}
    shapes |= {UNET_KEY_PREFIX + f"input_blocks.{i}.0.op.weight": [320, 320, 3, 3] for i in (3, 6)}
    shapes |= {VAE_DOWN.format(i): [128, 128, 3, 3] for i in range(3)}
    return header_only_checkpoint(path, shapes)


def llm_job(tmp_path: Path) -> dict:
    model = tmp_path / "llm"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n{"prompt": "a", "completion": "b"}\n')
    return {"base_model": str(model), "train_data_dir": str(data), "output_dir": str(tmp_path / "out" / "tone")}
