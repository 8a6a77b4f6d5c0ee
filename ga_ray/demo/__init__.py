"""The embedded demo world: a synthetic instruction mixture with known task families (`tasks`), a
byte-level BPE tokenizer with a chat template (`tokenizer`), a small pre-trained Llama
(`tiny_model`), held-out evaluation prompts and format checks (`formats`), built and cached by
`world.build_demo_world`."""

from ga_ray.demo.world import DemoWorld, build_demo_world, configure_run

__all__ = ["DemoWorld", "build_demo_world", "configure_run"]
