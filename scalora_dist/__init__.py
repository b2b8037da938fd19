"""scalora-dist: LoRA, rsLoRA and ScaLoRA fine-tuning of transformers causal LMs."""

__version__ = "0.1.0"
