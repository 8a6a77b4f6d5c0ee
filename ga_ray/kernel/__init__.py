"""The shared per-document kernel, below every stage that runs the model.

- `loading`: a user's causal LM, tokenizer and PEFT LoRA adapter.
- `lora_blocks`: the LoRA blocks of a PeftModel, keyed by PEFT parameter name.
- `collate`: padding prepared rows into a batch.
- `batching`: token-budget, length-bucketed batches.
- `per_document`: per-document LoRA gradients from one forward and one backward pass per batch.

factors, gradients, coherence and steer import it; it imports none of them.
"""
