"""Writers of trained adapters in the formats other tools load: PEFT (checked against vLLM),
a merged HF model, llama.cpp GGUF (adapter or merged) and an Ollama folder (formats.py)."""

FORMATS = ("peft", "merged", "gguf-lora", "gguf-merged", "ollama")
