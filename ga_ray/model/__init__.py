"""Models: loading a user's causal LM, tokenizer and LoRA adapter (`loading`), and the LoRA blocks (`lora_blocks`)."""
